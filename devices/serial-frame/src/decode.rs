//! Reading a frame, in two steps: [`decode`] undoes COBS in place and parses every
//! field with strict bounds, exposing only the device id (to find the key) and the
//! direction; [`Unverified::verify`] then checks the tag in constant time and only
//! then gives out the counter, topic and payload.
//!
//! Fields are read front to back and each is checked as soon as it is read, so the
//! first broken rule is the one reported, the same one the specification's order and
//! the Python implementation give.

use crate::body::{Body, control_body, fixed_payload_len};
use crate::cobs::{self, CobsError};
use crate::header::{DOWN_BIT, Direction, FrameType, RESERVED_MASK, TYPE_MASK};
use crate::key::Key;
use crate::rules::{self, Rule, SuffixError};
use crate::{MAX_ENCODED_LEN, NakReason, TAG_LEN, VERSION};
use core::fmt;
use hmac::Mac as _;

/// A field of the decoded frame, to say where it ended too early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Version,
    Flags,
    IdLength,
    Id,
    Counter,
    SuffixLength,
    Suffix,
    PayloadLength,
    Payload,
    Tag,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Version => "version",
            Self::Flags => "flags",
            Self::IdLength => "id length",
            Self::Id => "device id",
            Self::Counter => "counter",
            Self::SuffixLength => "suffix length",
            Self::Suffix => "topic suffix",
            Self::PayloadLength => "payload length",
            Self::Payload => "payload",
            Self::Tag => "tag",
        })
    }
}

/// Why received bytes are not a version 1 frame. One variant per rule; the
/// [`label`](DecodeError::label) is the error code the specification lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// More than [`MAX_ENCODED_LEN`] encoded bytes.
    Oversize { len: usize },
    /// Not a COBS encoding.
    Cobs(CobsError),
    /// The frame ends inside this field.
    Truncated(Field),
    /// A version other than 1 (a later version's layout is unknown here).
    UnknownVersion(u8),
    /// Any of the flags' reserved bits 3–6 set (the whole flags byte).
    ReservedFlags(u8),
    /// Frame type bits 4–7.
    UnknownType(u8),
    /// A RESYNC with direction up.
    ResyncUp,
    /// The id length is not 1..=64.
    IdLength(usize),
    /// The id has a byte outside `[A-Za-z0-9._-]`.
    IdCharacter { at: usize, byte: u8 },
    /// Counter 0.
    CounterZero,
    /// A DATA suffix not 1..=128 bytes, or a control frame with a suffix.
    SuffixLength { frame_type: FrameType, len: usize },
    /// The suffix is not one topic below `devices/{id}/`.
    SuffixInvalid(SuffixError),
    /// A payload length over 1024.
    PayloadTooLarge(usize),
    /// A control frame whose payload is not its type's fixed size.
    PayloadLength { frame_type: FrameType, len: usize },
    /// Bytes after the tag.
    TrailingBytes(usize),
}

impl DecodeError {
    /// Stable label for logs and metrics; the error code in the specification.
    pub fn label(self) -> &'static str {
        match self {
            Self::Oversize { .. } => "oversize",
            Self::Cobs(_) => "cobs",
            Self::Truncated(_) => "truncated",
            Self::UnknownVersion(_) => "unknown_version",
            Self::ReservedFlags(_) => "reserved_flags",
            Self::UnknownType(_) => "unknown_type",
            Self::PayloadLength { .. } => "payload_length",
            Self::TrailingBytes(_) => "trailing_bytes",
            shared => shared.rule().map_or("invalid", Rule::label),
        }
    }

    fn rule(self) -> Option<Rule> {
        Some(match self {
            Self::ResyncUp => Rule::ResyncUp,
            Self::IdLength(len) => Rule::IdLength(len),
            Self::IdCharacter { at, byte } => Rule::IdCharacter { at, byte },
            Self::CounterZero => Rule::CounterZero,
            Self::SuffixLength { frame_type, len } => Rule::SuffixLength { frame_type, len },
            Self::SuffixInvalid(why) => Rule::SuffixInvalid(why),
            Self::PayloadTooLarge(len) => Rule::PayloadTooLarge(len),
            _ => return None,
        })
    }
}

impl From<Rule> for DecodeError {
    fn from(rule: Rule) -> Self {
        match rule {
            Rule::ResyncUp => Self::ResyncUp,
            Rule::IdLength(len) => Self::IdLength(len),
            Rule::IdCharacter { at, byte } => Self::IdCharacter { at, byte },
            Rule::CounterZero => Self::CounterZero,
            Rule::SuffixLength { frame_type, len } => Self::SuffixLength { frame_type, len },
            Rule::SuffixInvalid(why) => Self::SuffixInvalid(why),
            Rule::PayloadTooLarge(len) => Self::PayloadTooLarge(len),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("serial frame refused: ")?;
        if let Some(rule) = self.rule() {
            return write!(f, "{rule}");
        }
        match *self {
            Self::Oversize { len } => write!(
                f,
                "{len} encoded bytes without a delimiter; at most {MAX_ENCODED_LEN}"
            ),
            Self::Cobs(why) => write!(f, "{why}"),
            Self::Truncated(field) => write!(f, "the frame ends inside its {field}"),
            Self::UnknownVersion(version) => write!(
                f,
                "version {version:#04x}; this receiver reads version {VERSION:#04x}"
            ),
            Self::ReservedFlags(flags) => write!(
                f,
                "flags {flags:#04x} set reserved bits {:#04x}",
                flags & RESERVED_MASK
            ),
            Self::UnknownType(bits) => write!(f, "unknown frame type {bits}"),
            Self::PayloadLength { frame_type, len } => write!(
                f,
                "{frame_type} payload is {len} bytes; it must be {}",
                fixed_payload_len(frame_type).unwrap_or(0)
            ),
            Self::TrailingBytes(extra) => write!(f, "{extra} bytes after the tag"),
            _ => Ok(()),
        }
    }
}

impl core::error::Error for DecodeError {}

/// The tag does not verify under the key: the wrong key, or the frame was altered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagError;

impl TagError {
    /// Stable label for logs and metrics; the error code in the specification.
    pub fn label(self) -> &'static str {
        "tag"
    }
}

impl fmt::Display for TagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "serial frame refused: its tag does not verify under the device's key (wrong key, or altered)",
        )
    }
}

impl core::error::Error for TagError {}

/// The parsed fields, shared by both steps.
#[derive(Clone, Copy)]
struct Parsed<'a> {
    /// The decoded frame, tag included.
    raw: &'a [u8],
    tag_at: usize,
    direction: Direction,
    frame_type: FrameType,
    id: &'a str,
    counter: u64,
    suffix: &'a str,
    payload: &'a [u8],
    body: Body<'a>,
}

/// A well-formed frame whose tag is not checked yet.
#[derive(Clone, Copy)]
pub struct Unverified<'a>(Parsed<'a>);

impl<'a> Unverified<'a> {
    /// The device id, to look up the key with. Not authenticated.
    pub fn id(&self) -> &'a str {
        self.0.id
    }

    /// The direction bit, so a receiver can drop frames sent its own way before
    /// spending a MAC on them. Not authenticated.
    pub fn direction(&self) -> Direction {
        self.0.direction
    }

    /// Checks the tag under `key` (in constant time) and gives the frame out only if
    /// it verifies. A frame that fails must change no state: see
    /// [`ReplayGuard`](crate::ReplayGuard).
    pub fn verify(&self, key: &Key) -> Result<Frame<'a>, TagError> {
        let (signed, tag) = self.0.raw.split_at_checked(self.0.tag_at).ok_or(TagError)?;
        let mut mac = key.mac();
        mac.update(signed);
        mac.verify_truncated_left(tag).map_err(|_| TagError)?;
        Ok(Frame(self.0))
    }
}

impl fmt::Debug for Unverified<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unverified")
            .field("id", &self.0.id)
            .field("direction", &self.0.direction)
            .finish_non_exhaustive()
    }
}

/// A frame whose tag verified under its device's key. Its counter still has to pass
/// the stream's [`ReplayGuard`](crate::ReplayGuard).
#[derive(Clone, Copy)]
pub struct Frame<'a>(Parsed<'a>);

impl<'a> Frame<'a> {
    pub fn direction(&self) -> Direction {
        self.0.direction
    }

    pub fn frame_type(&self) -> FrameType {
        self.0.frame_type
    }

    pub fn id(&self) -> &'a str {
        self.0.id
    }

    pub fn counter(&self) -> u64 {
        self.0.counter
    }

    /// The topic suffix; empty for control frames.
    pub fn suffix(&self) -> &'a str {
        self.0.suffix
    }

    /// The payload as sent (for control frames, its serialised fields).
    pub fn payload(&self) -> &'a [u8] {
        self.0.payload
    }

    /// The typed content.
    pub fn body(&self) -> Body<'a> {
        self.0.body
    }

    /// For an ACK, the acknowledged counter.
    pub fn ack(&self) -> Option<u64> {
        match self.0.body {
            Body::Ack { counter } => Some(counter),
            _ => None,
        }
    }

    /// For a NAK, the refused counter and why.
    pub fn nak(&self) -> Option<(u64, NakReason)> {
        match self.0.body {
            Body::Nak { counter, reason } => Some((counter, reason)),
            _ => None,
        }
    }

    /// For a RESYNC, the floor the device's up counter must continue above.
    pub fn resync_floor(&self) -> Option<u64> {
        match self.0.body {
            Body::Resync { floor } => Some(floor),
            _ => None,
        }
    }

    /// The decoded frame, tag included (for an audit record).
    pub fn raw(&self) -> &'a [u8] {
        self.0.raw
    }
}

impl fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("direction", &self.0.direction)
            .field("id", &self.0.id)
            .field("counter", &self.0.counter)
            .field("body", &self.0.body)
            .finish()
    }
}

/// Decodes one frame as it came off the wire, without its `0x00` delimiter (as a
/// [`Deframer`](crate::Deframer) yields it). COBS is undone in place, so `encoded`
/// holds the decoded frame afterwards; the result borrows it.
pub fn decode(encoded: &mut [u8]) -> Result<Unverified<'_>, DecodeError> {
    if encoded.len() > MAX_ENCODED_LEN {
        return Err(DecodeError::Oversize { len: encoded.len() });
    }
    let len = cobs::decode_in_place(encoded).map_err(DecodeError::Cobs)?;
    let raw: &[u8] = encoded;
    parse(raw.get(..len).unwrap_or_default()).map(Unverified)
}

fn parse(raw: &[u8]) -> Result<Parsed<'_>, DecodeError> {
    let mut cursor = Cursor { buf: raw, at: 0 };

    let version = cursor.byte(Field::Version)?;
    if version != VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let flags = cursor.byte(Field::Flags)?;
    if flags & RESERVED_MASK != 0 {
        return Err(DecodeError::ReservedFlags(flags));
    }
    let frame_type = FrameType::from_bits(flags & TYPE_MASK)
        .ok_or(DecodeError::UnknownType(flags & TYPE_MASK))?;
    let direction = if flags & DOWN_BIT == 0 {
        Direction::Up
    } else {
        Direction::Down
    };
    rules::check_direction(direction, frame_type)?;

    let id_len = usize::from(cursor.byte(Field::IdLength)?);
    rules::check_id_len(id_len)?;
    let id = rules::check_id(cursor.take(id_len, Field::Id)?)?;

    let counter = u64::from_be_bytes(cursor.array(Field::Counter)?);
    rules::check_counter(counter)?;

    let suffix_len = usize::from(cursor.byte(Field::SuffixLength)?);
    rules::check_suffix_len(frame_type, suffix_len)?;
    let suffix = cursor.take(suffix_len, Field::Suffix)?;
    let suffix = match frame_type {
        FrameType::Data => rules::check_suffix(suffix)?,
        _ => "",
    };

    let payload_len = usize::from(u16::from_be_bytes(cursor.array(Field::PayloadLength)?));
    rules::check_payload_len(payload_len)?;
    if let Some(fixed) = fixed_payload_len(frame_type)
        && fixed != payload_len
    {
        return Err(DecodeError::PayloadLength {
            frame_type,
            len: payload_len,
        });
    }
    let payload = cursor.take(payload_len, Field::Payload)?;

    let tag_at = cursor.at;
    cursor.take(TAG_LEN, Field::Tag)?;
    let extra = raw.len() - cursor.at;
    if extra != 0 {
        return Err(DecodeError::TrailingBytes(extra));
    }

    let body = match frame_type {
        FrameType::Data => Body::Data { suffix, payload },
        control => control_body(control, payload).ok_or(DecodeError::PayloadLength {
            frame_type,
            len: payload_len,
        })?,
    };
    Ok(Parsed {
        raw,
        tag_at,
        direction,
        frame_type,
        id,
        counter,
        suffix,
        payload,
        body,
    })
}

/// Reads forward through the decoded frame; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: Field) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Truncated(field))?;
        let bytes = self
            .buf
            .get(self.at..end)
            .ok_or(DecodeError::Truncated(field))?;
        self.at = end;
        Ok(bytes)
    }

    fn byte(&mut self, field: Field) -> Result<u8, DecodeError> {
        let [byte] = self.array(field)?;
        Ok(byte)
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        bytes.try_into().map_err(|_| DecodeError::Truncated(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{data_up, encoded, key, raw, sign, wire};
    use crate::{MAX_WIRE_LEN, Outgoing};
    use std::string::ToString;
    use std::vec::Vec;

    // Offsets in a raw frame for the id "thermo-7" (8 bytes).
    const FLAGS: usize = 1;
    const ID_LEN: usize = 2;
    const COUNTER: usize = 11;
    const SUFFIX_LEN: usize = 19;

    fn decoded(mut encoded: Vec<u8>) -> Result<Vec<u8>, DecodeError> {
        decode(&mut encoded).map(|u| u.0.raw.to_vec())
    }

    /// Decodes and verifies a raw frame under the test key.
    fn check(raw: &[u8]) -> Result<(), &'static str> {
        let mut enc = encoded(raw);
        let unverified = decode(&mut enc).map_err(DecodeError::label)?;
        unverified.verify(&key()).map_err(TagError::label)?;
        Ok(())
    }

    /// Edits the signed part of a valid raw frame and signs it again, so only the
    /// edited rule can fail.
    fn edited(frame: &Outgoing<'_>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut body = raw(frame);
        body.truncate(body.len() - 16);
        edit(&mut body);
        sign(&body)
    }

    fn refused(raw: &[u8]) -> DecodeError {
        decode(&mut encoded(raw)).unwrap_err()
    }

    fn telemetry() -> Outgoing<'static> {
        data_up(7, "telemetry/temp", br#"{"c":21.5}"#)
    }

    fn ack() -> Outgoing<'static> {
        Outgoing {
            direction: Direction::Down,
            id: "thermo-7",
            counter: 3,
            body: Body::Ack { counter: 7 },
        }
    }

    #[test]
    fn every_frame_type_round_trips() {
        let bodies = [
            (
                Direction::Up,
                Body::Data {
                    suffix: "telemetry/temp",
                    payload: b"21.5",
                },
            ),
            (
                Direction::Down,
                Body::Data {
                    suffix: "commands/reboot",
                    payload: b"",
                },
            ),
            (Direction::Up, Body::Ack { counter: 9 }),
            (Direction::Down, Body::Ack { counter: u64::MAX }),
            (
                Direction::Down,
                Body::Nak {
                    counter: 9,
                    reason: NakReason::RateLimited,
                },
            ),
            (
                Direction::Up,
                Body::Nak {
                    counter: 9,
                    reason: NakReason::Other(77),
                },
            ),
            (Direction::Down, Body::Resync { floor: 1_000_000 }),
        ];
        for (direction, body) in bodies {
            let out = Outgoing {
                direction,
                id: "thermo-7",
                counter: 42,
                body,
            };
            let mut bytes = wire(&out);
            assert_eq!(bytes.pop(), Some(0));
            assert!(!bytes.contains(&0));
            let unverified = decode(&mut bytes).unwrap();
            assert_eq!(unverified.id(), "thermo-7");
            assert_eq!(unverified.direction(), direction);
            let frame = unverified.verify(&key()).unwrap();
            assert_eq!(frame.direction(), direction);
            assert_eq!(frame.frame_type(), body.frame_type());
            assert_eq!(frame.id(), "thermo-7");
            assert_eq!(frame.counter(), 42);
            assert_eq!(frame.body(), body);
        }
    }

    #[test]
    fn control_frames_have_typed_accessors() {
        let frame_of = |direction, body| {
            let out = Outgoing {
                direction,
                id: "d",
                counter: 1,
                body,
            };
            let mut bytes = wire(&out);
            bytes.pop();
            let frame = decode(&mut bytes).unwrap().verify(&key()).unwrap();
            (
                frame.ack(),
                frame.nak(),
                frame.resync_floor(),
                frame.suffix().len(),
            )
        };
        assert_eq!(
            frame_of(Direction::Up, Body::Ack { counter: 5 }),
            (Some(5), None, None, 0)
        );
        assert_eq!(
            frame_of(
                Direction::Down,
                Body::Nak {
                    counter: 5,
                    reason: NakReason::Quarantined
                }
            ),
            (None, Some((5, NakReason::Quarantined)), None, 0)
        );
        assert_eq!(
            frame_of(Direction::Down, Body::Resync { floor: 5 }),
            (None, None, Some(5), 0)
        );
    }

    #[test]
    fn flipped_tag_bit_is_refused() {
        let good = raw(&telemetry());
        assert_eq!(check(&good), Ok(()));
        for bit in 0..16 * 8 {
            let mut bad = good.clone();
            let at = good.len() - 16 + bit / 8;
            bad[at] ^= 1 << (bit % 8);
            assert_eq!(check(&bad), Err("tag"), "bit {bit}");
        }
    }

    #[test]
    fn flipped_bit_anywhere_is_refused() {
        let good = raw(&telemetry());
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(check(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn a_frame_under_another_key_is_refused() {
        let mut bytes = wire(&telemetry());
        bytes.pop();
        let unverified = decode(&mut bytes).unwrap();
        let other = Key::new(&[0x43; 32]).unwrap();
        assert_eq!(unverified.verify(&other).unwrap_err(), TagError);
        assert!(unverified.verify(&key()).is_ok());
    }

    #[test]
    fn reflected_frame_is_refused() {
        // The gateway's ACK, turned around to look like the device's own ACK.
        let mut reflected = raw(&ack());
        reflected[FLAGS] &= !DOWN_BIT;
        assert_eq!(check(&reflected), Err("tag"));
    }

    #[test]
    fn reserved_flag_bits_are_refused() {
        for bit in 3..=6 {
            let bad = edited(&telemetry(), |b| b[FLAGS] |= 1 << bit);
            assert_eq!(refused(&bad), DecodeError::ReservedFlags(1 << bit));
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        let bad = edited(&telemetry(), |b| b[0] = 2);
        assert_eq!(refused(&bad), DecodeError::UnknownVersion(2));
    }

    #[test]
    fn unknown_frame_types_are_refused() {
        for t in 4..=7 {
            let bad = edited(&telemetry(), |b| b[FLAGS] = t);
            assert_eq!(refused(&bad), DecodeError::UnknownType(t));
        }
    }

    #[test]
    fn resync_from_a_device_is_refused() {
        let down = Outgoing {
            direction: Direction::Down,
            id: "d",
            counter: 1,
            body: Body::Resync { floor: 9 },
        };
        let up = Outgoing {
            direction: Direction::Up,
            ..down
        };
        let mut out = [0u8; MAX_WIRE_LEN];
        assert_eq!(
            up.encode(&key(), &mut out),
            Err(crate::EncodeError::ResyncUp)
        );
        let bad = edited(&down, |b| b[FLAGS] &= !DOWN_BIT);
        assert_eq!(refused(&bad), DecodeError::ResyncUp);
    }

    #[test]
    fn counter_zero_is_refused() {
        let bad = edited(&telemetry(), |b| b[COUNTER..COUNTER + 8].fill(0));
        assert_eq!(refused(&bad), DecodeError::CounterZero);
    }

    #[test]
    fn id_length_outside_1_to_64_is_refused() {
        let bad = edited(&telemetry(), |b| b[ID_LEN] = 0);
        assert_eq!(refused(&bad), DecodeError::IdLength(0));
        let bad = edited(&telemetry(), |b| b[ID_LEN] = 65);
        assert_eq!(refused(&bad), DecodeError::IdLength(65));
    }

    #[test]
    fn id_outside_the_principal_alphabet_is_refused() {
        let bad = edited(&telemetry(), |b| b[3 + 6] = b'/');
        assert_eq!(
            refused(&bad),
            DecodeError::IdCharacter { at: 6, byte: b'/' }
        );
    }

    #[test]
    fn data_without_a_suffix_is_refused() {
        let bad = edited(&data_up(1, "a", b"x"), |b| {
            b[SUFFIX_LEN] = 0;
            b.remove(SUFFIX_LEN + 1);
        });
        assert_eq!(
            refused(&bad),
            DecodeError::SuffixLength {
                frame_type: FrameType::Data,
                len: 0
            }
        );
    }

    #[test]
    fn control_frame_with_a_suffix_is_refused() {
        let bad = edited(&ack(), |b| {
            b[SUFFIX_LEN] = 1;
            b.insert(SUFFIX_LEN + 1, b'a');
        });
        assert_eq!(
            refused(&bad),
            DecodeError::SuffixLength {
                frame_type: FrameType::Ack,
                len: 1
            }
        );
    }

    #[test]
    fn suffix_that_is_not_one_topic_is_refused() {
        for (edit, why) in [
            (b'+', SuffixError::Wildcard),
            (b'#', SuffixError::Wildcard),
            (0, SuffixError::Nul),
            (b'/', SuffixError::EmptyLevel),
            (0xff, SuffixError::NotUtf8),
        ] {
            // "telemetry/temp": replace the last byte.
            let bad = edited(&telemetry(), |b| b[SUFFIX_LEN + 14] = edit);
            assert_eq!(refused(&bad), DecodeError::SuffixInvalid(why));
        }
    }

    #[test]
    fn control_payload_of_the_wrong_size_is_refused() {
        let at = SUFFIX_LEN + 1;
        let bad = edited(&ack(), |b| {
            b[at + 1] = 9;
            b.push(0);
        });
        assert_eq!(
            refused(&bad),
            DecodeError::PayloadLength {
                frame_type: FrameType::Ack,
                len: 9
            }
        );
    }

    #[test]
    fn payload_over_1024_bytes_is_refused() {
        let payload = [7u8; 1025];
        let mut out = [0u8; MAX_WIRE_LEN + 8];
        assert_eq!(
            data_up(1, "a", &payload).encode(&key(), &mut out),
            Err(crate::EncodeError::PayloadTooLarge(1025))
        );
        let bad = edited(&data_up(1, "a", &payload[..1024]), |b| {
            let at = SUFFIX_LEN + 2;
            b[at..at + 2].copy_from_slice(&1025u16.to_be_bytes());
            b.push(7);
        });
        assert_eq!(refused(&bad), DecodeError::PayloadTooLarge(1025));
    }

    #[test]
    fn every_truncation_is_refused() {
        let good = raw(&telemetry());
        for len in 0..good.len() {
            let err = decode(&mut encoded(&good[..len])).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated(_)),
                "len {len}: {err:?}"
            );
        }
        assert_eq!(
            decode(&mut encoded(&good[..good.len() - 1])).unwrap_err(),
            DecodeError::Truncated(Field::Tag)
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bad = raw(&telemetry());
        bad.push(1);
        assert_eq!(refused(&bad), DecodeError::TrailingBytes(1));
    }

    #[test]
    fn more_than_the_largest_encoding_is_refused_before_decoding() {
        let mut long = std::vec![1u8; crate::MAX_ENCODED_LEN + 1];
        assert_eq!(
            decode(&mut long).unwrap_err(),
            DecodeError::Oversize {
                len: crate::MAX_ENCODED_LEN + 1
            }
        );
    }

    #[test]
    fn broken_cobs_is_refused() {
        let mut bytes = wire(&telemetry());
        bytes.pop();
        bytes[0] = 0xFE;
        assert!(matches!(decoded(bytes), Err(DecodeError::Cobs(_))));
    }

    #[test]
    fn the_largest_frame_fits_the_largest_wire_buffer() {
        let id = "x".repeat(64);
        let suffix = "s".repeat(128);
        let payload = [0x5a; 1024];
        let out = Outgoing {
            direction: Direction::Up,
            id: &id,
            counter: u64::MAX,
            body: Body::Data {
                suffix: &suffix,
                payload: &payload,
            },
        };
        let mut buf = [0u8; MAX_WIRE_LEN];
        let len = out.encode(&key(), &mut buf).unwrap();
        assert!(len <= MAX_WIRE_LEN);
        let frame_len = len - 1;
        let frame = decode(&mut buf[..frame_len])
            .unwrap()
            .verify(&key())
            .unwrap();
        assert_eq!(frame.raw().len(), crate::MAX_FRAME_LEN);
        assert_eq!(frame.payload(), &payload[..]);
    }

    #[test]
    fn a_buffer_one_byte_short_reports_the_exact_need() {
        let need = wire(&telemetry()).len();
        let mut short = std::vec![0u8; need - 1];
        assert_eq!(
            telemetry().encode(&key(), &mut short),
            Err(crate::EncodeError::BufferTooSmall {
                needed: need,
                available: need - 1
            })
        );
        let mut exact = std::vec![0u8; need];
        assert_eq!(telemetry().encode(&key(), &mut exact), Ok(need));
    }

    #[test]
    fn encode_refuses_what_decode_refuses() {
        use crate::EncodeError as E;
        let mut out = [0u8; MAX_WIRE_LEN];
        let long_id = "x".repeat(65);
        let long_suffix = "s".repeat(129);
        let cases: [(Outgoing<'_>, E); 7] = [
            (
                Outgoing {
                    id: "",
                    ..telemetry()
                },
                E::IdLength(0),
            ),
            (
                Outgoing {
                    id: &long_id,
                    ..telemetry()
                },
                E::IdLength(65),
            ),
            (
                Outgoing {
                    id: "a b",
                    ..telemetry()
                },
                E::IdCharacter { at: 1, byte: b' ' },
            ),
            (data_up(0, "a", b""), E::CounterZero),
            (
                data_up(1, "", b""),
                E::SuffixLength {
                    frame_type: FrameType::Data,
                    len: 0,
                },
            ),
            (
                data_up(1, &long_suffix, b""),
                E::SuffixLength {
                    frame_type: FrameType::Data,
                    len: 129,
                },
            ),
            (
                data_up(1, "a/+", b""),
                E::SuffixInvalid(SuffixError::Wildcard),
            ),
        ];
        for (frame, expected) in cases {
            assert_eq!(frame.encode(&key(), &mut out), Err(expected));
        }
    }

    #[test]
    fn error_messages_name_what_was_wrong() {
        assert_eq!(
            DecodeError::ReservedFlags(0x88).to_string(),
            "serial frame refused: flags 0x88 set reserved bits 0x08"
        );
        assert_eq!(
            DecodeError::Truncated(Field::Tag).to_string(),
            "serial frame refused: the frame ends inside its tag"
        );
        assert_eq!(
            DecodeError::IdCharacter { at: 2, byte: b'/' }.to_string(),
            "serial frame refused: device id has byte 0x2f at offset 2; ids are [A-Za-z0-9._-]"
        );
        assert_eq!(
            DecodeError::PayloadLength {
                frame_type: FrameType::Nak,
                len: 8
            }
            .to_string(),
            "serial frame refused: NAK payload is 8 bytes; it must be 9"
        );
        assert_eq!(
            crate::EncodeError::SuffixLength {
                frame_type: FrameType::Ack,
                len: 3
            }
            .to_string(),
            "cannot encode frame: ACK carries no topic suffix (got 3 bytes)"
        );
        assert_eq!(DecodeError::CounterZero.label(), "counter_zero");
        assert_eq!(crate::EncodeError::CounterZero.label(), "counter_zero");
    }
}
