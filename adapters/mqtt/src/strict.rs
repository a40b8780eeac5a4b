//! The strict MQTT decoder: the one pass that turns a client's raw frame into the
//! packet the session acts on.
//!
//! General-purpose MQTT codecs are lenient: they accept reserved header flags, QoS 3,
//! wildcards in topic names, NUL characters in strings, duplicated or misplaced MQTT 5
//! properties, and more. This module owns the rules the specifications impose on the client → server direction
//! and reads each *complete* raw frame (fixed header + remaining length + body) once,
//! refusing it at the first broken rule or producing its [`Incoming`] packet.
//!
//! * [`frame_len`] delimits frames in a receive buffer and refuses oversized frames as
//!   soon as the remaining length is known, so a peer cannot make us buffer them.
//! * [`decode_connect`] reads the first frame of a connection, which must be CONNECT,
//!   and picks the protocol version.
//! * [`decode_frame`] reads every later frame for the negotiated version.
//!
//! Everything here is pure (no I/O) and never panics on any input: all reads go
//! through a small bounds-checked cursor, and payloads and binary properties are
//! shares of the frame, not copies. Failures are reported as a [`StrictError`] naming
//! the rule that was broken; [`StrictError::reason_code`] gives the MQTT 5 reason code
//! to put in a CONNACK or DISCONNECT.
//!
//! Rules that need connection state (topic alias ranges, receive maximum, whether a
//! DISCONNECT may set a session expiry interval, packet identifier reuse) or policy
//! (client identifier format, topic-filter wildcard placement, which authentication
//! methods are supported) are left to the caller.

#![forbid(unsafe_code)]

use crate::incoming::{ConnectInfo, Incoming, PublishIn, RawProps, SubscribeFilter, Will};
use bytes::Bytes;
use std::fmt;

/// MQTT protocol version negotiated by the CONNECT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// MQTT control packet types (fixed header bits 7–4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect,
    Connack,
    Publish,
    Puback,
    Pubrec,
    Pubrel,
    Pubcomp,
    Subscribe,
    Suback,
    Unsubscribe,
    Unsuback,
    Pingreq,
    Pingresp,
    Disconnect,
    Auth,
}

impl PacketType {
    /// Decodes the packet type nibble; 0 is reserved and yields `None`.
    fn from_nibble(nibble: u8) -> Option<Self> {
        Some(match nibble {
            1 => Self::Connect,
            2 => Self::Connack,
            3 => Self::Publish,
            4 => Self::Puback,
            5 => Self::Pubrec,
            6 => Self::Pubrel,
            7 => Self::Pubcomp,
            8 => Self::Subscribe,
            9 => Self::Suback,
            10 => Self::Unsubscribe,
            11 => Self::Unsuback,
            12 => Self::Pingreq,
            13 => Self::Pingresp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            _ => return None,
        })
    }

    /// The packet's name as written in the specification.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Connack => "CONNACK",
            Self::Publish => "PUBLISH",
            Self::Puback => "PUBACK",
            Self::Pubrec => "PUBREC",
            Self::Pubrel => "PUBREL",
            Self::Pubcomp => "PUBCOMP",
            Self::Subscribe => "SUBSCRIBE",
            Self::Suback => "SUBACK",
            Self::Unsubscribe => "UNSUBSCRIBE",
            Self::Unsuback => "UNSUBACK",
            Self::Pingreq => "PINGREQ",
            Self::Pingresp => "PINGRESP",
            Self::Disconnect => "DISCONNECT",
            Self::Auth => "AUTH",
        }
    }

    /// Fixed header flags the packet must carry; `None` for PUBLISH, whose flags
    /// carry DUP/QoS/RETAIN and are checked separately.
    fn required_flags(self) -> Option<u8> {
        match self {
            Self::Publish => None,
            Self::Pubrel | Self::Subscribe | Self::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An MQTT 5 property identifier known to the specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyId(pub u8);

impl PropertyId {
    /// Human-readable property name (lower case, as in the specification).
    pub fn name(self) -> &'static str {
        property_spec(self.0).map_or("unknown property", |(name, _)| name)
    }
}

impl fmt::Display for PropertyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x} ({})", self.0, self.name())
    }
}

/// Where an MQTT 5 property section sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertySection {
    /// The properties of the packet itself (in its variable header).
    Packet(PacketType),
    /// The will properties in the CONNECT payload.
    Will,
}

impl fmt::Display for PropertySection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Packet(packet) => f.write_str(packet.name()),
            Self::Will => f.write_str("CONNECT will properties"),
        }
    }
}

/// A field of an MQTT packet, used to say where a problem was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    FixedHeader,
    RemainingLength,
    ProtocolName,
    ProtocolLevel,
    ConnectFlags,
    KeepAlive,
    ClientId,
    WillTopic,
    WillPayload,
    UserName,
    Password,
    TopicName,
    PacketId,
    ReasonCode,
    /// The property length (variable byte integer) and the section it delimits.
    Properties,
    PropertyId,
    /// The value of a property.
    Property(PropertyId),
    UserPropertyName,
    UserPropertyValue,
    TopicFilter,
    SubscriptionOptions,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::FixedHeader => "fixed header",
            Self::RemainingLength => "remaining length",
            Self::ProtocolName => "protocol name",
            Self::ProtocolLevel => "protocol level",
            Self::ConnectFlags => "connect flags",
            Self::KeepAlive => "keep alive",
            Self::ClientId => "client identifier",
            Self::WillTopic => "will topic",
            Self::WillPayload => "will payload",
            Self::UserName => "user name",
            Self::Password => "password",
            Self::TopicName => "topic name",
            Self::PacketId => "packet identifier",
            Self::ReasonCode => "reason code",
            Self::Properties => "property section",
            Self::PropertyId => "property identifier",
            Self::Property(id) => return write!(f, "property {id}"),
            Self::UserPropertyName => "user property name",
            Self::UserPropertyValue => "user property value",
            Self::TopicFilter => "topic filter",
            Self::SubscriptionOptions => "subscription options",
        };
        f.write_str(name)
    }
}

/// Why a frame was refused. One variant per rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictError {
    // ---- framing -------------------------------------------------------------
    #[error("malformed remaining length (more than 4 bytes)")]
    MalformedRemainingLength,
    #[error("packet too large: {size} bytes > limit {limit}")]
    PacketTooLarge { size: usize, limit: usize },
    #[error("frame is {actual} bytes but its fixed header announces {expected}")]
    FrameLengthMismatch { expected: usize, actual: usize },
    #[error("truncated {0}: runs past the end of the packet or property section")]
    Truncated(Field),
    #[error("{extra} unexpected trailing bytes at the end of {packet}")]
    TrailingBytes { packet: PacketType, extra: usize },
    #[error("remaining length {actual} invalid for {packet} (must be {expected})")]
    InvalidRemainingLength {
        packet: PacketType,
        actual: usize,
        expected: usize,
    },
    #[error("malformed variable byte integer in {0} (more than 4 bytes or not minimally encoded)")]
    MalformedVarInt(Field),

    // ---- fixed header ----------------------------------------------------------
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    #[error("{0} is a server-to-client packet and must not be sent by a client")]
    ServerOnlyPacket(PacketType),
    #[error("CONNECT is only allowed as the first packet of a connection")]
    UnexpectedConnect,
    #[error("first packet of a connection must be CONNECT, got packet type {0}")]
    ExpectedConnect(u8),
    #[error("reserved flags {flags:#x} set on {packet} (must be {expected:#x})")]
    ReservedFlags {
        packet: PacketType,
        flags: u8,
        expected: u8,
    },
    #[error("PUBLISH with QoS 3")]
    PublishQos3,
    #[error("PUBLISH with DUP set on a QoS 0 message")]
    DupOnQos0,
    #[error("enhanced authentication (AUTH) is not supported")]
    AuthNotSupported,

    // ---- CONNECT ---------------------------------------------------------------
    #[error("bad protocol name (must be \"MQTT\")")]
    BadProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("reserved bit 0 of the CONNECT flags is set")]
    ConnectReservedFlag,
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    #[error("will QoS 3")]
    WillQos3,
    #[error("password flag set without the user name flag")]
    PasswordWithoutUserName,

    // ---- strings and topics ----------------------------------------------------
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(Field),
    #[error("NUL character in {0}")]
    NulCharacter(Field),
    #[error("wildcard character ('+' or '#') in {0}")]
    WildcardInTopicName(Field),
    #[error("empty {0}")]
    EmptyTopic(Field),
    #[error("zero-length topic name without a topic alias")]
    EmptyTopicWithoutAlias,

    // ---- packet identifiers, SUBSCRIBE / UNSUBSCRIBE ----------------------------
    #[error("packet identifier 0 in {0}")]
    ZeroPacketId(PacketType),
    #[error("{0} contains no topic filter")]
    NoTopicFilters(PacketType),
    #[error("reserved bits set in subscription options {0:#04x}")]
    SubscriptionOptionsReserved(u8),
    #[error("subscription with QoS 3")]
    SubscriptionQos3,
    #[error("subscription with retain handling 3")]
    RetainHandling3,
    #[error("no local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    #[error("invalid reason code {code:#04x} in {packet} from a client")]
    InvalidReasonCode { packet: PacketType, code: u8 },

    // ---- MQTT 5 properties -----------------------------------------------------
    #[error("unknown MQTT 5 property {id:#04x} in {section}")]
    UnknownProperty { id: u32, section: PropertySection },
    #[error("MQTT 5 property {property} not allowed in {section}")]
    PropertyNotAllowed {
        property: PropertyId,
        section: PropertySection,
    },
    #[error("duplicate MQTT 5 property {property} in {section}")]
    DuplicateProperty {
        property: PropertyId,
        section: PropertySection,
    },
    #[error("invalid value {value} for MQTT 5 property {property} in {section}")]
    InvalidPropertyValue {
        property: PropertyId,
        section: PropertySection,
        value: u32,
    },
    #[error("authentication data without authentication method in {0}")]
    AuthDataWithoutMethod(PropertySection),
}

impl StrictError {
    /// MQTT 5 reason code to send (0x81 malformed packet, 0x82 protocol error,
    /// 0x84 unsupported protocol version, 0x95 packet too large).
    ///
    /// The classification follows the MQTT 5.0 specification where it names one
    /// (e.g. §1.5.4 ill-formed UTF-8 and U+0000, §2.1.3 invalid flags and §2.2.2.2
    /// properties not valid for the packet type are Malformed Packets; duplicated
    /// properties and out-of-range property values are Protocol Errors).
    pub fn reason_code(&self) -> u8 {
        const MALFORMED: u8 = 0x81;
        const PROTOCOL_ERROR: u8 = 0x82;
        const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
        const PACKET_TOO_LARGE: u8 = 0x95;
        match self {
            Self::PacketTooLarge { .. } => PACKET_TOO_LARGE,
            Self::BadProtocolName | Self::UnsupportedProtocolLevel(_) => {
                UNSUPPORTED_PROTOCOL_VERSION
            }
            Self::MalformedRemainingLength
            | Self::FrameLengthMismatch { .. }
            | Self::Truncated(_)
            | Self::TrailingBytes { .. }
            | Self::InvalidRemainingLength { .. }
            | Self::MalformedVarInt(_)
            | Self::InvalidPacketType(_)
            | Self::ReservedFlags { .. }
            | Self::PublishQos3
            | Self::DupOnQos0
            | Self::ConnectReservedFlag
            | Self::WillFlagsWithoutWill
            | Self::WillQos3
            | Self::PasswordWithoutUserName
            | Self::InvalidUtf8(_)
            | Self::NulCharacter(_)
            | Self::SubscriptionOptionsReserved(_)
            | Self::SubscriptionQos3
            | Self::UnknownProperty { .. }
            | Self::PropertyNotAllowed { .. } => MALFORMED,
            Self::ServerOnlyPacket(_)
            | Self::UnexpectedConnect
            | Self::ExpectedConnect(_)
            | Self::AuthNotSupported
            | Self::WildcardInTopicName(_)
            | Self::EmptyTopic(_)
            | Self::EmptyTopicWithoutAlias
            | Self::ZeroPacketId(_)
            | Self::NoTopicFilters(_)
            | Self::RetainHandling3
            | Self::NoLocalOnSharedSubscription
            | Self::InvalidReasonCode { .. }
            | Self::DuplicateProperty { .. }
            | Self::InvalidPropertyValue { .. }
            | Self::AuthDataWithoutMethod(_) => PROTOCOL_ERROR,
        }
    }
}

/// Given the bytes buffered so far, return `Ok(Some(frame_len))` when a complete frame
/// is present (`frame_len` = fixed header bytes + remaining length), `Ok(None)` if more
/// bytes are needed, and an error on a malformed remaining length (more than 4 bytes;
/// non-minimal encodings are accepted) or a frame larger than `max_packet_size`.
///
/// The size limit applies to the whole frame, fixed header included (as MQTT 5's
/// Maximum Packet Size does), and is checked as soon as the remaining length is known,
/// before the body arrives, so a peer cannot make us buffer it.
pub fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, StrictError> {
    let Some(after_type) = buf.get(1..) else {
        return Ok(None);
    };
    match decode_vbi(after_type) {
        Vbi::Incomplete => Ok(None),
        Vbi::Malformed => Err(StrictError::MalformedRemainingLength),
        // Non-minimal remaining lengths are accepted; only the body's integers must be
        // minimal.
        Vbi::Complete { value, len, .. } => {
            let total = 1usize.saturating_add(len).saturating_add(to_usize(value));
            if total > max_packet_size {
                return Err(StrictError::PacketTooLarge {
                    size: total,
                    limit: max_packet_size,
                });
            }
            Ok((buf.len() >= total).then_some(total))
        }
    }
}

/// Decodes the first frame of a connection, which must be CONNECT.
///
/// The protocol name must be exactly `"MQTT"` and the level 4 (MQTT 3.1.1) or 5
/// (MQTT 5.0); anything else (including MQTT 3.1's `"MQIsdp"`/3) is refused before
/// the rest is read. The rest of the packet is then read with that version's rules.
pub fn decode_connect(frame: &Bytes) -> Result<(ProtocolVersion, ConnectInfo), StrictError> {
    let (header, body) = split_frame(frame)?;
    let type_bits = header >> 4;
    if type_bits != 1 {
        return Err(StrictError::ExpectedConnect(type_bits));
    }
    check_fixed_flags(PacketType::Connect, header & 0x0f)?;

    let mut c = Cursor::new(frame, body);
    if c.binary(Field::ProtocolName)? != b"MQTT" {
        return Err(StrictError::BadProtocolName);
    }
    let version = match c.u8(Field::ProtocolLevel)? {
        4 => ProtocolVersion::V311,
        5 => ProtocolVersion::V5,
        level => return Err(StrictError::UnsupportedProtocolLevel(level)),
    };
    let connect = read_connect_rest(&mut c, version)?;
    Ok((version, connect))
}

/// Decodes one complete frame (anything after CONNECT) from a client speaking
/// `version`.
pub fn decode_frame(frame: &Bytes, version: ProtocolVersion) -> Result<Incoming, StrictError> {
    let (header, body) = split_frame(frame)?;
    let (type_bits, flags) = (header >> 4, header & 0x0f);
    let packet = match PacketType::from_nibble(type_bits) {
        // Type 15 is reserved in MQTT 3.1.1; AUTH only exists in MQTT 5.
        Some(PacketType::Auth) if version == ProtocolVersion::V311 => None,
        other => other,
    }
    .ok_or(StrictError::InvalidPacketType(type_bits))?;

    match packet {
        PacketType::Connect => return Err(StrictError::UnexpectedConnect),
        PacketType::Connack | PacketType::Suback | PacketType::Unsuback | PacketType::Pingresp => {
            return Err(StrictError::ServerOnlyPacket(packet));
        }
        _ => check_fixed_flags(packet, flags)?,
    }

    let mut c = Cursor::new(frame, body);
    match packet {
        PacketType::Publish => read_publish(&mut c, flags, version).map(Incoming::Publish),
        PacketType::Puback => read_pub_response(&mut c, packet, version).map(Incoming::PubAck),
        PacketType::Pubrec => read_pub_response(&mut c, packet, version).map(Incoming::PubRec),
        PacketType::Pubrel => read_pub_response(&mut c, packet, version).map(Incoming::PubRel),
        PacketType::Pubcomp => read_pub_response(&mut c, packet, version).map(Incoming::PubComp),
        PacketType::Subscribe => read_subscribe(&mut c, version),
        PacketType::Unsubscribe => read_unsubscribe(&mut c, version),
        PacketType::Pingreq => expect_remaining_length(packet, body, 0).map(|()| Incoming::PingReq),
        PacketType::Disconnect => read_disconnect(&mut c, version),
        PacketType::Auth => read_auth(&mut c),
        // Refused above; repeated so that this match stays exhaustive.
        PacketType::Connect => Err(StrictError::UnexpectedConnect),
        PacketType::Connack | PacketType::Suback | PacketType::Unsuback | PacketType::Pingresp => {
            Err(StrictError::ServerOnlyPacket(packet))
        }
    }
}

// ---- framing -------------------------------------------------------------------

enum Vbi {
    Complete {
        value: u32,
        len: usize,
        /// False for encodings such as `0x80 0x00` that use more bytes than needed.
        minimal: bool,
    },
    Incomplete,
    Malformed,
}

/// Decodes a variable byte integer (at most 4 bytes).
fn decode_vbi(buf: &[u8]) -> Vbi {
    let mut value: u32 = 0;
    for (i, &byte) in buf.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Vbi::Complete {
                value,
                len: i + 1,
                minimal: i == 0 || byte != 0,
            };
        }
    }
    if buf.len() >= 4 {
        Vbi::Malformed
    } else {
        Vbi::Incomplete
    }
}

fn to_usize(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Splits a complete frame into its first header byte and its body, checking that the
/// frame is exactly as long as its remaining length says.
fn split_frame(frame: &[u8]) -> Result<(u8, &[u8]), StrictError> {
    let Some((&header, after_type)) = frame.split_first() else {
        return Err(StrictError::Truncated(Field::FixedHeader));
    };
    match decode_vbi(after_type) {
        Vbi::Incomplete => Err(StrictError::Truncated(Field::RemainingLength)),
        Vbi::Malformed => Err(StrictError::MalformedRemainingLength),
        Vbi::Complete { value, len, .. } => {
            let body = after_type.get(len..).unwrap_or_default();
            let expected = to_usize(value);
            if body.len() == expected {
                Ok((header, body))
            } else {
                Err(StrictError::FrameLengthMismatch {
                    expected: expected.saturating_add(1 + len),
                    actual: frame.len(),
                })
            }
        }
    }
}

fn check_fixed_flags(packet: PacketType, flags: u8) -> Result<(), StrictError> {
    match packet.required_flags() {
        Some(expected) if flags != expected => Err(StrictError::ReservedFlags {
            packet,
            flags,
            expected,
        }),
        _ => Ok(()),
    }
}

fn expect_remaining_length(
    packet: PacketType,
    body: &[u8],
    expected: usize,
) -> Result<(), StrictError> {
    if body.len() == expected {
        Ok(())
    } else {
        Err(StrictError::InvalidRemainingLength {
            packet,
            actual: body.len(),
            expected,
        })
    }
}

// ---- cursor --------------------------------------------------------------------

/// Bounds-checked reader over a packet body. Every read names the field it reads so
/// that running out of bytes is reported as `Truncated(field)`.
struct Cursor<'a> {
    buf: &'a [u8],
    /// The whole frame `buf` lies in: binary fields are handed out as shares of it,
    /// not copies.
    frame: &'a Bytes,
}

impl<'a> Cursor<'a> {
    fn new(frame: &'a Bytes, buf: &'a [u8]) -> Self {
        Self { buf, frame }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, field: Field) -> Result<&'a [u8], StrictError> {
        let Some((head, tail)) = self.buf.split_at_checked(n) else {
            return Err(StrictError::Truncated(field));
        };
        self.buf = tail;
        Ok(head)
    }

    /// A cursor over the next `n` bytes (a property section), which this one skips.
    fn section(&mut self, n: usize, field: Field) -> Result<Cursor<'a>, StrictError> {
        let part = self.take(n, field)?;
        Ok(Cursor::new(self.frame, part))
    }

    /// `part` (read through this cursor, so inside the frame) without copying it.
    fn share(&self, part: &'a [u8]) -> Bytes {
        self.frame.slice_ref(part)
    }

    /// Everything left (a PUBLISH payload).
    fn rest(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.buf);
        self.share(rest)
    }

    fn u8(&mut self, field: Field) -> Result<u8, StrictError> {
        let (&byte, tail) = self
            .buf
            .split_first()
            .ok_or(StrictError::Truncated(field))?;
        self.buf = tail;
        Ok(byte)
    }

    fn u16(&mut self, field: Field) -> Result<u16, StrictError> {
        let (bytes, tail) = self
            .buf
            .split_first_chunk::<2>()
            .ok_or(StrictError::Truncated(field))?;
        self.buf = tail;
        Ok(u16::from_be_bytes(*bytes))
    }

    fn u32(&mut self, field: Field) -> Result<u32, StrictError> {
        let (bytes, tail) = self
            .buf
            .split_first_chunk::<4>()
            .ok_or(StrictError::Truncated(field))?;
        self.buf = tail;
        Ok(u32::from_be_bytes(*bytes))
    }

    /// Variable byte integer inside a packet body. Unlike the remaining length it must
    /// be minimally encoded ([MQTT-1.5.5-1]): `0x91 0x00` must not pass as property
    /// 0x11 to a reader that takes identifiers as single bytes.
    fn vbi(&mut self, field: Field) -> Result<u32, StrictError> {
        match decode_vbi(self.buf) {
            Vbi::Complete {
                value,
                len,
                minimal: true,
            } => {
                self.take(len, field)?;
                Ok(value)
            }
            Vbi::Incomplete => Err(StrictError::Truncated(field)),
            Vbi::Complete { minimal: false, .. } | Vbi::Malformed => {
                Err(StrictError::MalformedVarInt(field))
            }
        }
    }

    /// Two-byte length followed by that many bytes.
    fn binary(&mut self, field: Field) -> Result<&'a [u8], StrictError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    /// UTF-8 encoded string: well-formed UTF-8 (no surrogates, no overlong forms)
    /// without U+0000.
    fn utf8(&mut self, field: Field) -> Result<&'a str, StrictError> {
        let bytes = self.binary(field)?;
        let text = std::str::from_utf8(bytes).map_err(|_| StrictError::InvalidUtf8(field))?;
        if text.contains('\0') {
            return Err(StrictError::NulCharacter(field));
        }
        Ok(text)
    }

    /// Fails if anything is left after the packet's last field.
    fn finish(&self, packet: PacketType) -> Result<(), StrictError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(StrictError::TrailingBytes {
                packet,
                extra: self.buf.len(),
            })
        }
    }
}

// ---- packets ---------------------------------------------------------------------

/// CONNECT after protocol name and level: flags, keep alive, properties, payload.
fn read_connect_rest(
    c: &mut Cursor<'_>,
    version: ProtocolVersion,
) -> Result<ConnectInfo, StrictError> {
    let flags = c.u8(Field::ConnectFlags)?;
    let reserved = flags & 0x01 != 0;
    let clean_start = flags & 0x02 != 0;
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password = flags & 0x40 != 0;
    let user_name = flags & 0x80 != 0;

    if reserved {
        return Err(StrictError::ConnectReservedFlag);
    }
    if !will && (will_qos != 0 || will_retain) {
        return Err(StrictError::WillFlagsWithoutWill);
    }
    if will_qos == 3 {
        return Err(StrictError::WillQos3);
    }
    if version == ProtocolVersion::V311 && password && !user_name {
        return Err(StrictError::PasswordWithoutUserName);
    }

    let keep_alive = c.u16(Field::KeepAlive)?;
    let props = match version {
        ProtocolVersion::V311 => Props::default(),
        ProtocolVersion::V5 => {
            let section = PropertySection::Packet(PacketType::Connect);
            let props = read_properties(c, section)?;
            if props.has(prop::AUTHENTICATION_DATA) && !props.has(prop::AUTHENTICATION_METHOD) {
                return Err(StrictError::AuthDataWithoutMethod(section));
            }
            props
        }
    };

    let client_id = c.utf8(Field::ClientId)?.to_owned();
    let will = if will {
        let will_props = match version {
            ProtocolVersion::V311 => Props::default(),
            ProtocolVersion::V5 => read_properties(c, PropertySection::Will)?,
        };
        let topic = c.utf8(Field::WillTopic)?;
        check_topic_name(topic, Field::WillTopic)?;
        let payload = c.binary(Field::WillPayload)?;
        Some(Will {
            topic: topic.to_owned(),
            payload: c.share(payload),
            qos: will_qos,
            retain: will_retain,
            delay: will_props.will_delay.unwrap_or(0),
            props: will_props.publish,
        })
    } else {
        None
    };
    let user_name = if user_name {
        c.utf8(Field::UserName)?
    } else {
        ""
    };
    let password = if password {
        c.binary(Field::Password)?
    } else {
        &[]
    };
    c.finish(PacketType::Connect)?;

    let session_expiry = match version {
        // 3.1.1 clean_session = 0 asks for "as long as allowed".
        ProtocolVersion::V311 if !clean_start => u32::MAX,
        ProtocolVersion::V311 => 0,
        ProtocolVersion::V5 => props.session_expiry.unwrap_or(0),
    };
    // An empty user name with no password is no login at all; an empty password
    // is none.
    let login = !user_name.is_empty() || !password.is_empty();
    Ok(ConnectInfo {
        client_id,
        username: login.then(|| user_name.to_owned()),
        password: (!password.is_empty()).then(|| password.to_vec()),
        keep_alive,
        clean_start,
        session_expiry,
        will,
        receive_maximum: props.receive_maximum,
        max_packet_size: props.max_packet_size,
        topic_alias_maximum: props.topic_alias_maximum.unwrap_or(0),
        auth_method: props.has(prop::AUTHENTICATION_METHOD),
    })
}

fn read_publish(
    c: &mut Cursor<'_>,
    flags: u8,
    version: ProtocolVersion,
) -> Result<PublishIn, StrictError> {
    let dup = flags & 0x08 != 0;
    let qos = (flags >> 1) & 0x03;
    let retain = flags & 0x01 != 0;
    if qos == 3 {
        return Err(StrictError::PublishQos3);
    }
    if dup && qos == 0 {
        return Err(StrictError::DupOnQos0);
    }

    let topic = c.utf8(Field::TopicName)?;
    if topic.contains(['+', '#']) {
        return Err(StrictError::WildcardInTopicName(Field::TopicName));
    }
    if topic.is_empty() && version == ProtocolVersion::V311 {
        return Err(StrictError::EmptyTopic(Field::TopicName));
    }
    let pkid = if qos > 0 { c.u16(Field::PacketId)? } else { 0 };
    if qos > 0 && pkid == 0 {
        return Err(StrictError::ZeroPacketId(PacketType::Publish));
    }
    let props = match version {
        ProtocolVersion::V311 => RawProps::default(),
        ProtocolVersion::V5 => {
            let props = read_properties(c, PropertySection::Packet(PacketType::Publish))?;
            // Whether the alias is actually known is connection state: the caller's call.
            if topic.is_empty() && !props.has(prop::TOPIC_ALIAS) {
                return Err(StrictError::EmptyTopicWithoutAlias);
            }
            props.publish
        }
    };
    Ok(PublishIn {
        topic: topic.to_owned(),
        // The rest is the application payload.
        payload: c.rest(),
        qos,
        retain,
        pkid,
        props,
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP: their packet identifier.
fn read_pub_response(
    c: &mut Cursor<'_>,
    packet: PacketType,
    version: ProtocolVersion,
) -> Result<u16, StrictError> {
    if version == ProtocolVersion::V311 {
        expect_remaining_length(packet, c.buf, 2)?;
    }
    let pkid = c.u16(Field::PacketId)?;
    if pkid == 0 {
        return Err(StrictError::ZeroPacketId(packet));
    }
    if version == ProtocolVersion::V5 {
        read_reason_and_properties(c, packet)?;
    }
    c.finish(packet)?;
    Ok(pkid)
}

fn read_subscribe(c: &mut Cursor<'_>, version: ProtocolVersion) -> Result<Incoming, StrictError> {
    let packet = PacketType::Subscribe;
    let pkid = c.u16(Field::PacketId)?;
    if pkid == 0 {
        return Err(StrictError::ZeroPacketId(packet));
    }
    let identifier = match version {
        ProtocolVersion::V311 => None,
        ProtocolVersion::V5 => read_properties(c, PropertySection::Packet(packet))?.subscription_id,
    };
    if c.is_empty() {
        return Err(StrictError::NoTopicFilters(packet));
    }
    let mut filters = Vec::new();
    while !c.is_empty() {
        let filter = c.utf8(Field::TopicFilter)?;
        if filter.is_empty() {
            return Err(StrictError::EmptyTopic(Field::TopicFilter));
        }
        let options = c.u8(Field::SubscriptionOptions)?;
        let reserved_mask = match version {
            ProtocolVersion::V311 => 0b1111_1100,
            ProtocolVersion::V5 => 0b1100_0000,
        };
        if options & reserved_mask != 0 {
            return Err(StrictError::SubscriptionOptionsReserved(options));
        }
        let qos = options & 0b11;
        if qos == 3 {
            return Err(StrictError::SubscriptionQos3);
        }
        // MQTT 3.1.1 options carry only the QoS (the reserved bits are checked above).
        let no_local = options & 0b0100 != 0;
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(StrictError::RetainHandling3);
        }
        if no_local && filter.starts_with("$share/") {
            return Err(StrictError::NoLocalOnSharedSubscription);
        }
        filters.push(SubscribeFilter {
            path: filter.to_owned(),
            qos,
            no_local,
            retain_as_published: options & 0b1000 != 0,
            retain_handling,
        });
    }
    Ok(Incoming::Subscribe {
        pkid,
        filters,
        identifier,
    })
}

fn read_unsubscribe(c: &mut Cursor<'_>, version: ProtocolVersion) -> Result<Incoming, StrictError> {
    let packet = PacketType::Unsubscribe;
    let pkid = c.u16(Field::PacketId)?;
    if pkid == 0 {
        return Err(StrictError::ZeroPacketId(packet));
    }
    if version == ProtocolVersion::V5 {
        read_properties(c, PropertySection::Packet(packet))?;
    }
    if c.is_empty() {
        return Err(StrictError::NoTopicFilters(packet));
    }
    let mut filters = Vec::new();
    while !c.is_empty() {
        let filter = c.utf8(Field::TopicFilter)?;
        if filter.is_empty() {
            return Err(StrictError::EmptyTopic(Field::TopicFilter));
        }
        filters.push(filter.to_owned());
    }
    Ok(Incoming::Unsubscribe { pkid, filters })
}

fn read_disconnect(c: &mut Cursor<'_>, version: ProtocolVersion) -> Result<Incoming, StrictError> {
    let packet = PacketType::Disconnect;
    match version {
        ProtocolVersion::V311 => {
            expect_remaining_length(packet, c.buf, 0)?;
            Ok(Incoming::Disconnect {
                reason: 0,
                session_expiry: None,
            })
        }
        ProtocolVersion::V5 => {
            let (reason, props) = read_reason_and_properties(c, packet)?;
            c.finish(packet)?;
            Ok(Incoming::Disconnect {
                reason,
                session_expiry: props.session_expiry,
            })
        }
    }
}

/// MQTT 5 AUTH: read like any other packet so that malformed input is reported as
/// such, then refused because the gateway does not do enhanced authentication.
fn read_auth(c: &mut Cursor<'_>) -> Result<Incoming, StrictError> {
    let packet = PacketType::Auth;
    let (_, props) = read_reason_and_properties(c, packet)?;
    if props.has(prop::AUTHENTICATION_DATA) && !props.has(prop::AUTHENTICATION_METHOD) {
        return Err(StrictError::AuthDataWithoutMethod(PropertySection::Packet(
            packet,
        )));
    }
    c.finish(packet)?;
    Err(StrictError::AuthNotSupported)
}

/// Optional reason code, then optional properties (MQTT 5 PUBACK family, DISCONNECT,
/// AUTH). An absent reason code means 0x00; absent properties mean none.
fn read_reason_and_properties(
    c: &mut Cursor<'_>,
    packet: PacketType,
) -> Result<(u8, Props), StrictError> {
    if c.is_empty() {
        return Ok((0, Props::default()));
    }
    let code = c.u8(Field::ReasonCode)?;
    if !client_reason_code_allowed(packet, code) {
        return Err(StrictError::InvalidReasonCode { packet, code });
    }
    if c.is_empty() {
        return Ok((code, Props::default()));
    }
    Ok((code, read_properties(c, PropertySection::Packet(packet))?))
}

/// Reason codes a client may send (MQTT 5.0 §3.4.2.1, §3.5.2.1, §3.6.2.1, §3.7.2.1,
/// §3.14.2.1, §3.15.2.1).
fn client_reason_code_allowed(packet: PacketType, code: u8) -> bool {
    match packet {
        PacketType::Puback | PacketType::Pubrec => {
            matches!(
                code,
                0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
            )
        }
        PacketType::Pubrel | PacketType::Pubcomp => matches!(code, 0x00 | 0x92),
        PacketType::Disconnect => matches!(code, 0x00 | 0x04 | 0x80..=0x83 | 0x90 | 0x93..=0x99),
        PacketType::Auth => matches!(code, 0x00 | 0x18 | 0x19),
        _ => false,
    }
}

/// A topic name (will topic, response topic): non-empty, no wildcards.
fn check_topic_name(topic: &str, field: Field) -> Result<(), StrictError> {
    if topic.is_empty() {
        Err(StrictError::EmptyTopic(field))
    } else if topic.contains(['+', '#']) {
        Err(StrictError::WildcardInTopicName(field))
    } else {
        Ok(())
    }
}

// ---- MQTT 5 properties -----------------------------------------------------------

/// MQTT 5.0 property identifiers (§2.2.2.2).
mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

#[derive(Debug, Clone, Copy)]
enum ValueType {
    Byte,
    TwoByteInt,
    FourByteInt,
    VarInt,
    Utf8,
    Binary,
    Utf8Pair,
}

/// Name and value type of every property the specification defines.
fn property_spec(id: u8) -> Option<(&'static str, ValueType)> {
    use ValueType::*;
    use prop::*;
    Some(match id {
        PAYLOAD_FORMAT_INDICATOR => ("payload format indicator", Byte),
        MESSAGE_EXPIRY_INTERVAL => ("message expiry interval", FourByteInt),
        CONTENT_TYPE => ("content type", Utf8),
        RESPONSE_TOPIC => ("response topic", Utf8),
        CORRELATION_DATA => ("correlation data", Binary),
        SUBSCRIPTION_IDENTIFIER => ("subscription identifier", VarInt),
        SESSION_EXPIRY_INTERVAL => ("session expiry interval", FourByteInt),
        ASSIGNED_CLIENT_IDENTIFIER => ("assigned client identifier", Utf8),
        SERVER_KEEP_ALIVE => ("server keep alive", TwoByteInt),
        AUTHENTICATION_METHOD => ("authentication method", Utf8),
        AUTHENTICATION_DATA => ("authentication data", Binary),
        REQUEST_PROBLEM_INFORMATION => ("request problem information", Byte),
        WILL_DELAY_INTERVAL => ("will delay interval", FourByteInt),
        REQUEST_RESPONSE_INFORMATION => ("request response information", Byte),
        RESPONSE_INFORMATION => ("response information", Utf8),
        SERVER_REFERENCE => ("server reference", Utf8),
        REASON_STRING => ("reason string", Utf8),
        RECEIVE_MAXIMUM => ("receive maximum", TwoByteInt),
        TOPIC_ALIAS_MAXIMUM => ("topic alias maximum", TwoByteInt),
        TOPIC_ALIAS => ("topic alias", TwoByteInt),
        MAXIMUM_QOS => ("maximum QoS", Byte),
        RETAIN_AVAILABLE => ("retain available", Byte),
        USER_PROPERTY => ("user property", Utf8Pair),
        MAXIMUM_PACKET_SIZE => ("maximum packet size", FourByteInt),
        WILDCARD_SUBSCRIPTION_AVAILABLE => ("wildcard subscription available", Byte),
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => ("subscription identifier available", Byte),
        SHARED_SUBSCRIPTION_AVAILABLE => ("shared subscription available", Byte),
        _ => return None,
    })
}

/// Whether a client may send property `id` in `section` (MQTT 5.0 §2.2.2.2, client →
/// server direction). Server-only properties (assigned client identifier, maximum QoS,
/// ...) are allowed nowhere; the subscription identifier is not allowed in a client's
/// PUBLISH ([MQTT-3.3.4-6]).
fn property_allowed(section: PropertySection, id: u8) -> bool {
    use prop::*;
    match section {
        PropertySection::Will => matches!(
            id,
            PAYLOAD_FORMAT_INDICATOR
                | MESSAGE_EXPIRY_INTERVAL
                | CONTENT_TYPE
                | RESPONSE_TOPIC
                | CORRELATION_DATA
                | WILL_DELAY_INTERVAL
                | USER_PROPERTY
        ),
        PropertySection::Packet(packet) => match packet {
            PacketType::Connect => matches!(
                id,
                SESSION_EXPIRY_INTERVAL
                    | AUTHENTICATION_METHOD
                    | AUTHENTICATION_DATA
                    | REQUEST_PROBLEM_INFORMATION
                    | REQUEST_RESPONSE_INFORMATION
                    | RECEIVE_MAXIMUM
                    | TOPIC_ALIAS_MAXIMUM
                    | USER_PROPERTY
                    | MAXIMUM_PACKET_SIZE
            ),
            PacketType::Publish => matches!(
                id,
                PAYLOAD_FORMAT_INDICATOR
                    | MESSAGE_EXPIRY_INTERVAL
                    | CONTENT_TYPE
                    | RESPONSE_TOPIC
                    | CORRELATION_DATA
                    | TOPIC_ALIAS
                    | USER_PROPERTY
            ),
            PacketType::Puback | PacketType::Pubrec | PacketType::Pubrel | PacketType::Pubcomp => {
                matches!(id, REASON_STRING | USER_PROPERTY)
            }
            PacketType::Subscribe => matches!(id, SUBSCRIPTION_IDENTIFIER | USER_PROPERTY),
            PacketType::Unsubscribe => id == USER_PROPERTY,
            PacketType::Disconnect => matches!(
                id,
                SESSION_EXPIRY_INTERVAL | SERVER_REFERENCE | REASON_STRING | USER_PROPERTY
            ),
            PacketType::Auth => matches!(
                id,
                AUTHENTICATION_METHOD | AUTHENTICATION_DATA | REASON_STRING | USER_PROPERTY
            ),
            PacketType::Connack
            | PacketType::Suback
            | PacketType::Unsuback
            | PacketType::Pingreq
            | PacketType::Pingresp => false,
        },
    }
}

/// The set of property identifiers seen in one property section.
#[derive(Debug, Default, Clone, Copy)]
struct Seen(u64);

impl Seen {
    fn bit(id: u8) -> u64 {
        1u64.checked_shl(u32::from(id)).unwrap_or(0)
    }

    fn has(self, id: u8) -> bool {
        self.0 & Self::bit(id) != 0
    }

    fn insert(&mut self, id: u8) {
        self.0 |= Self::bit(id);
    }
}

/// What one property section said, as far as the session uses it.
#[derive(Debug, Default)]
struct Props {
    seen: Seen,
    /// PUBLISH and will properties (user properties are kept only there).
    publish: RawProps,
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
    topic_alias_maximum: Option<u16>,
    will_delay: Option<u32>,
    subscription_id: Option<u32>,
}

impl Props {
    fn has(&self, id: u8) -> bool {
        self.seen.has(id)
    }

    fn keep(&mut self, id: u8, value: Value<'_>, section: PropertySection) {
        use prop::*;
        let p = &mut self.publish;
        match (id, value) {
            (PAYLOAD_FORMAT_INDICATOR, Value::Byte(v)) => p.payload_format = Some(v),
            (MESSAGE_EXPIRY_INTERVAL, Value::FourByteInt(v)) => p.message_expiry = Some(v),
            (CONTENT_TYPE, Value::Utf8(s)) => p.content_type = Some(s.to_owned()),
            (RESPONSE_TOPIC, Value::Utf8(s)) => p.response_topic = Some(s.to_owned()),
            (CORRELATION_DATA, Value::Binary(b)) => p.correlation_data = Some(b),
            (TOPIC_ALIAS, Value::TwoByteInt(v)) => p.topic_alias = Some(v),
            (USER_PROPERTY, Value::Utf8Pair(k, v))
                if matches!(
                    section,
                    PropertySection::Will | PropertySection::Packet(PacketType::Publish)
                ) =>
            {
                p.user_properties.push((k.to_owned(), v.to_owned()));
            }
            (SESSION_EXPIRY_INTERVAL, Value::FourByteInt(v)) => self.session_expiry = Some(v),
            (RECEIVE_MAXIMUM, Value::TwoByteInt(v)) => self.receive_maximum = Some(v),
            (MAXIMUM_PACKET_SIZE, Value::FourByteInt(v)) => self.max_packet_size = Some(v),
            (TOPIC_ALIAS_MAXIMUM, Value::TwoByteInt(v)) => self.topic_alias_maximum = Some(v),
            (WILL_DELAY_INTERVAL, Value::FourByteInt(v)) => self.will_delay = Some(v),
            (SUBSCRIPTION_IDENTIFIER, Value::VarInt(v)) => self.subscription_id = Some(v),
            // Checked, not used (reason string, authentication data, ...).
            _ => {}
        }
    }
}

/// One property value, as its type reads it.
#[derive(Debug)]
enum Value<'a> {
    Byte(u8),
    TwoByteInt(u16),
    FourByteInt(u32),
    VarInt(u32),
    Utf8(&'a str),
    Binary(Bytes),
    Utf8Pair(&'a str, &'a str),
}

/// Reads one property section: property length, then (identifier, value) pairs.
fn read_properties(c: &mut Cursor<'_>, section: PropertySection) -> Result<Props, StrictError> {
    let len = c.vbi(Field::Properties)?;
    let mut section_bytes = c.section(to_usize(len), Field::Properties)?;
    let mut props = Props::default();
    while !section_bytes.is_empty() {
        let raw_id = section_bytes.vbi(Field::PropertyId)?;
        let Some((id, value_type)) = u8::try_from(raw_id)
            .ok()
            .and_then(|id| property_spec(id).map(|(_, value_type)| (id, value_type)))
        else {
            return Err(StrictError::UnknownProperty {
                id: raw_id,
                section,
            });
        };
        let property = PropertyId(id);
        if !property_allowed(section, id) {
            return Err(StrictError::PropertyNotAllowed { property, section });
        }
        if id != prop::USER_PROPERTY && props.has(id) {
            return Err(StrictError::DuplicateProperty { property, section });
        }
        props.seen.insert(id);
        let value = read_property_value(&mut section_bytes, property, value_type, section)?;
        props.keep(id, value, section);
    }
    Ok(props)
}

/// Reads one property value of the given type and applies the value rules a
/// server must enforce on client properties.
fn read_property_value<'a>(
    props: &mut Cursor<'a>,
    property: PropertyId,
    value_type: ValueType,
    section: PropertySection,
) -> Result<Value<'a>, StrictError> {
    let field = Field::Property(property);
    let invalid = |value: u32| StrictError::InvalidPropertyValue {
        property,
        section,
        value,
    };
    Ok(match value_type {
        ValueType::Byte => {
            let value = props.u8(field)?;
            let boolean = matches!(
                property.0,
                prop::PAYLOAD_FORMAT_INDICATOR
                    | prop::REQUEST_PROBLEM_INFORMATION
                    | prop::REQUEST_RESPONSE_INFORMATION
            );
            if boolean && value > 1 {
                return Err(invalid(value.into()));
            }
            Value::Byte(value)
        }
        ValueType::TwoByteInt => {
            let value = props.u16(field)?;
            let nonzero = matches!(property.0, prop::RECEIVE_MAXIMUM | prop::TOPIC_ALIAS);
            if nonzero && value == 0 {
                return Err(invalid(0));
            }
            Value::TwoByteInt(value)
        }
        ValueType::FourByteInt => {
            let value = props.u32(field)?;
            if property.0 == prop::MAXIMUM_PACKET_SIZE && value == 0 {
                return Err(invalid(0));
            }
            Value::FourByteInt(value)
        }
        ValueType::VarInt => {
            let value = props.vbi(field)?;
            if property.0 == prop::SUBSCRIPTION_IDENTIFIER && value == 0 {
                return Err(invalid(0));
            }
            Value::VarInt(value)
        }
        ValueType::Utf8 => {
            let text = props.utf8(field)?;
            if property.0 == prop::RESPONSE_TOPIC {
                check_topic_name(text, field)?;
            }
            Value::Utf8(text)
        }
        ValueType::Binary => {
            let bytes = props.binary(field)?;
            Value::Binary(props.share(bytes))
        }
        ValueType::Utf8Pair => Value::Utf8Pair(
            props.utf8(Field::UserPropertyName)?,
            props.utf8(Field::UserPropertyValue)?,
        ),
    })
}

/// Run arbitrary bytes through the decoder as a connection's stream: frames are cut
/// with [`frame_len`], the first decoded as CONNECT, every frame also under both
/// protocol versions. Returns how many frames were accepted. For the fuzz target and
/// the test that replays its corpus: whatever the bytes, this returns.
pub fn replay(data: &[u8]) -> usize {
    const MAX_PACKET: usize = 1 << 20;
    let data = Bytes::copy_from_slice(data);
    let mut at = 0;
    let mut accepted = 0;
    let mut first = true;
    while let Ok(Some(len)) = frame_len(data.get(at..).unwrap_or_default(), MAX_PACKET) {
        let Some(frame) = at.checked_add(len).and_then(|end| data.get(at..end)) else {
            break;
        };
        let frame = data.slice_ref(frame);
        if first {
            accepted += usize::from(decode_connect(&frame).is_ok());
            first = false;
        }
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            accepted += usize::from(decode_frame(&frame, version).is_ok());
        }
        if len == 0 {
            break;
        }
        at += len;
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProtocolVersion::{V5, V311};

    /// The rules alone: whether the first frame decodes, and as which version.
    fn check_connect(frame: &[u8]) -> Result<ProtocolVersion, StrictError> {
        decode_connect(&Bytes::copy_from_slice(frame)).map(|(version, _)| version)
    }

    /// The rules alone: whether a later frame decodes.
    fn check_frame(frame: &[u8], version: ProtocolVersion) -> Result<(), StrictError> {
        decode_frame(&Bytes::copy_from_slice(frame), version).map(drop)
    }

    #[test]
    fn replay_checks_a_stream_frame_by_frame_and_stops_at_a_partial_one() {
        // CONNECT (3.1.1, client id "d"), PINGREQ, then half a frame.
        let connect = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'd',
        ];
        let mut stream = connect.to_vec();
        stream.extend_from_slice(&[0xc0, 0x00, 0x30, 0x05, 0x00]);
        // CONNECT accepted once; PINGREQ under both versions.
        assert_eq!(replay(&stream), 3);
        assert_eq!(replay(&[0xff; 3]), 0);
    }

    // ---- frame builders ----------------------------------------------------------

    fn vbi(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                return out;
            }
        }
    }

    /// Fixed header (first byte + remaining length) followed by `body`.
    fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        out.extend(vbi(body.len()));
        out.extend_from_slice(body);
        out
    }

    /// Two-byte length prefixed bytes.
    fn bin(bytes: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn s(text: &str) -> Vec<u8> {
        bin(text.as_bytes())
    }

    /// Property section: variable byte length then the raw properties.
    fn props(raw: &[u8]) -> Vec<u8> {
        let mut out = vbi(raw.len());
        out.extend_from_slice(raw);
        out
    }

    fn user_prop(name: &str, value: &str) -> Vec<u8> {
        [&[0x26][..], &s(name), &s(value)].concat()
    }

    fn str_prop(id: u8, value: &[u8]) -> Vec<u8> {
        [&[id][..], &bin(value)].concat()
    }

    fn connect_level(
        name: &str,
        level: u8,
        flags: u8,
        properties: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = s(name);
        body.extend_from_slice(&[level, flags, 0x00, 0x3c]);
        if level == 5 {
            body.extend(props(properties));
        }
        body.extend_from_slice(payload);
        frame(0x10, &body)
    }

    fn connect_v311(flags: u8, payload: &[u8]) -> Vec<u8> {
        connect_level("MQTT", 4, flags, &[], payload)
    }

    fn connect_v5(flags: u8, properties: &[u8], payload: &[u8]) -> Vec<u8> {
        connect_level("MQTT", 5, flags, properties, payload)
    }

    fn publish(
        version: ProtocolVersion,
        flags: u8,
        topic: &[u8],
        pkid: Option<u16>,
        properties: &[u8],
    ) -> Vec<u8> {
        let mut body = bin(topic);
        if let Some(id) = pkid {
            body.extend(id.to_be_bytes());
        }
        if version == V5 {
            body.extend(props(properties));
        }
        body.extend_from_slice(b"payload");
        frame(0x30 | flags, &body)
    }

    fn subscribe(
        version: ProtocolVersion,
        pkid: u16,
        properties: &[u8],
        filters: &[(&[u8], u8)],
    ) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if version == V5 {
            body.extend(props(properties));
        }
        for (filter, options) in filters {
            body.extend(bin(filter));
            body.push(*options);
        }
        frame(0x82, &body)
    }

    fn unsubscribe(
        version: ProtocolVersion,
        pkid: u16,
        properties: &[u8],
        filters: &[&[u8]],
    ) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if version == V5 {
            body.extend(props(properties));
        }
        for filter in filters {
            body.extend(bin(filter));
        }
        frame(0xa2, &body)
    }

    /// Will, will QoS 1, will retain, user name, password, clean session.
    const FULL_CONNECT_FLAGS: u8 = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02;

    fn valid_connect_v311() -> Vec<u8> {
        let payload = [
            s("dev-1"),
            s("devices/dev-1/status"),
            bin(b"offline"),
            s("user"),
            bin(b"secret"),
        ]
        .concat();
        connect_v311(FULL_CONNECT_FLAGS, &payload)
    }

    fn valid_connect_v5() -> Vec<u8> {
        let properties = [
            &[0x11, 0, 0, 0x0e, 0x10][..], // session expiry interval
            &[0x21, 0, 10],                // receive maximum
            &[0x27, 0, 4, 0, 0],           // maximum packet size
            &[0x22, 0, 5],                 // topic alias maximum
            &[0x19, 1],                    // request response information
            &[0x17, 0],                    // request problem information
            &user_prop("site", "a"),
            &user_prop("site", "b"),
        ]
        .concat();
        let will_properties = [
            &[0x18, 0, 0, 0, 5][..], // will delay interval
            &[0x01, 1],              // payload format indicator
            &[0x02, 0, 0, 0, 30],    // message expiry interval
            &str_prop(0x03, b"text/plain"),
            &str_prop(0x08, b"devices/dev-5/replies"),
            &str_prop(0x09, b"corr"),
            &user_prop("k", "v"),
        ]
        .concat();
        let payload = [
            s("dev-5"),
            props(&will_properties),
            s("devices/dev-5/status"),
            bin(b"offline"),
            s("user"),
            bin(b"secret"),
        ]
        .concat();
        connect_v5(FULL_CONNECT_FLAGS, &properties, &payload)
    }

    fn valid_frames(version: ProtocolVersion) -> Vec<Vec<u8>> {
        let v5_publish_props = [
            &[0x01, 1][..],
            &[0x02, 0, 0, 0, 60],
            &str_prop(0x03, b"application/json"),
            &str_prop(0x08, b"replies/x"),
            &str_prop(0x09, b"id"),
            &[0x23, 0, 1],
            &user_prop("a", "b"),
        ]
        .concat();
        let publish_props: &[u8] = if version == V5 {
            &v5_publish_props
        } else {
            &[]
        };
        vec![
            publish(version, 0x00, b"a/b", None, &[]),
            publish(version, 0x02, b"a/b", Some(1), &[]),
            publish(version, 0x0b, b"a/b", Some(7), publish_props),
            subscribe(version, 1, &[], &[(b"a/+/c", 0x01), (b"x/#", 0x02)]),
            unsubscribe(version, 2, &[], &[b"a/+/c", b"x/#"]),
            frame(0x40, &[0, 1]),
            frame(0x50, &[0, 1]),
            frame(0x62, &[0, 1]),
            frame(0x70, &[0, 1]),
            frame(0xc0, &[]),
            frame(0xe0, &[]),
        ]
    }

    // ---- positive cases --------------------------------------------------------------

    #[test]
    fn well_formed_v311_connect_with_will_user_name_and_password_passes() {
        assert_eq!(check_connect(&valid_connect_v311()), Ok(V311));
        assert_eq!(check_connect(&connect_v311(0x02, &s("dev"))), Ok(V311));
        // Empty client identifier is a policy decision for the caller.
        assert_eq!(check_connect(&connect_v311(0x02, &s(""))), Ok(V311));
    }

    #[test]
    fn well_formed_v5_connect_with_properties_and_will_properties_passes() {
        assert_eq!(check_connect(&valid_connect_v5()), Ok(V5));
        assert_eq!(check_connect(&connect_v5(0x02, &[], &s("dev"))), Ok(V5));
    }

    #[test]
    fn well_formed_frames_pass() {
        for version in [V311, V5] {
            for f in valid_frames(version) {
                assert_eq!(check_frame(&f, version), Ok(()), "{version:?} {f:02x?}");
            }
        }
    }

    #[test]
    fn well_formed_v5_acks_and_disconnects_pass() {
        let reason_string = str_prop(0x1f, b"ok");
        let frames = [
            frame(0x40, &[0, 1, 0x10]),
            frame(0x40, &[0, 1, 0x00, 0x00]),
            frame(0x50, &[&[0, 1, 0x00][..], &props(&reason_string)].concat()),
            frame(
                0x62,
                &[&[0, 1, 0x92][..], &props(&user_prop("a", "b"))].concat(),
            ),
            frame(0x70, &[0, 1, 0x00, 0x00]),
            frame(0xe0, &[0x04]),
            frame(
                0xe0,
                &[
                    &[0x00][..],
                    &props(&[&[0x11, 0, 0, 0, 0][..], &reason_string].concat()),
                ]
                .concat(),
            ),
            subscribe(V5, 3, &[0x0b, 0x80, 0x01], &[(b"$share/g/a", 0x2a)]),
            unsubscribe(V5, 3, &user_prop("a", "b"), &[b"a"]),
        ];
        for f in frames {
            assert_eq!(check_frame(&f, V5), Ok(()), "{f:02x?}");
        }
    }

    // ---- what a frame decodes to -------------------------------------------------------

    fn connect_info(frame: &[u8]) -> ConnectInfo {
        decode_connect(&Bytes::copy_from_slice(frame)).unwrap().1
    }

    fn incoming(frame: &[u8], version: ProtocolVersion) -> Incoming {
        decode_frame(&Bytes::copy_from_slice(frame), version).unwrap()
    }

    #[test]
    fn v311_connect_decodes_its_will_and_login() {
        let c = connect_info(&valid_connect_v311());
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.username.as_deref(), Some("user"));
        assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
        assert_eq!(c.keep_alive, 60);
        assert!(c.clean_start);
        assert_eq!(c.session_expiry, 0);
        assert_eq!(
            c.will,
            Some(Will {
                topic: "devices/dev-1/status".into(),
                payload: Bytes::from_static(b"offline"),
                qos: 1,
                retain: true,
                delay: 0,
                props: RawProps::default(),
            })
        );
        assert_eq!((c.receive_maximum, c.max_packet_size), (None, None));
        assert_eq!(c.topic_alias_maximum, 0);
        assert!(!c.auth_method);
    }

    #[test]
    fn v311_connect_without_clean_session_asks_for_the_longest_session() {
        let c = connect_info(&connect_v311(0x00, &s("dev")));
        assert!(!c.clean_start);
        assert_eq!(c.session_expiry, u32::MAX);
        assert_eq!((c.username, c.password, c.will), (None, None, None));
    }

    #[test]
    fn v5_connect_decodes_its_properties_and_will_properties() {
        let c = connect_info(&valid_connect_v5());
        assert_eq!(c.client_id, "dev-5");
        assert_eq!(c.session_expiry, 3600);
        assert_eq!(c.receive_maximum, Some(10));
        assert_eq!(c.max_packet_size, Some(262_144));
        assert_eq!(c.topic_alias_maximum, 5);
        let will = c.will.expect("will");
        assert_eq!(will.topic, "devices/dev-5/status");
        assert_eq!(will.delay, 5);
        assert_eq!(
            will.props,
            RawProps {
                payload_format: Some(1),
                message_expiry: Some(30),
                content_type: Some("text/plain".into()),
                response_topic: Some("devices/dev-5/replies".into()),
                correlation_data: Some(Bytes::from_static(b"corr")),
                user_properties: vec![("k".into(), "v".into())],
                topic_alias: None,
            }
        );
    }

    #[test]
    fn v5_connect_with_an_authentication_method_says_so() {
        let c = connect_info(&connect_with_props(&str_prop(0x15, b"SCRAM")));
        assert!(c.auth_method);
    }

    #[test]
    fn a_password_is_binary_and_an_empty_login_is_none() {
        // MQTT 5 password without user name, not UTF-8.
        let c = connect_info(&connect_v5(
            0x42,
            &[],
            &[s("dev"), bin(&[0xff, 0])].concat(),
        ));
        assert_eq!(c.username.as_deref(), Some(""));
        assert_eq!(c.password.as_deref(), Some(&[0xff, 0][..]));
        // User name flag with an empty name and no password: no login at all.
        let c = connect_info(&connect_v311(0x82, &[s("dev"), s("")].concat()));
        assert_eq!((c.username, c.password), (None, None));
        // An empty password is none.
        let c = connect_info(&connect_v311(0xc2, &[s("dev"), s("u"), bin(b"")].concat()));
        assert_eq!((c.username.as_deref(), c.password), (Some("u"), None));
    }

    #[test]
    fn publish_decodes_its_properties_and_shares_the_payload_with_the_frame() {
        let f = Bytes::from(valid_frames(V5).swap_remove(2));
        let Ok(Incoming::Publish(p)) = decode_frame(&f, V5) else {
            panic!("not a publish");
        };
        assert_eq!(
            (p.topic.as_str(), p.qos, p.retain, p.pkid),
            ("a/b", 1, true, 7)
        );
        assert_eq!(&p.payload[..], b"payload");
        let inside = f.as_ptr_range();
        assert!(inside.contains(&p.payload.as_ptr()), "payload not copied");
        assert_eq!(
            p.props,
            RawProps {
                payload_format: Some(1),
                message_expiry: Some(60),
                content_type: Some("application/json".into()),
                response_topic: Some("replies/x".into()),
                correlation_data: Some(Bytes::from_static(b"id")),
                user_properties: vec![("a".into(), "b".into())],
                topic_alias: Some(1),
            }
        );
        let v311 = incoming(&publish(V311, 0x00, b"a/b", None, &[]), V311);
        assert_eq!(
            v311,
            Incoming::Publish(PublishIn {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"payload"),
                qos: 0,
                retain: false,
                pkid: 0,
                props: RawProps::default(),
            })
        );
    }

    #[test]
    fn subscribe_decodes_each_filter_with_its_options_and_the_identifier() {
        let f = subscribe(
            V5,
            3,
            &[0x0b, 0x80, 0x01],
            &[(b"$share/g/a", 0x2a), (b"b", 0x05)],
        );
        let filter =
            |path: &str, qos, no_local, retain_as_published, retain_handling| SubscribeFilter {
                path: path.into(),
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            };
        assert_eq!(
            incoming(&f, V5),
            Incoming::Subscribe {
                pkid: 3,
                filters: vec![
                    filter("$share/g/a", 2, false, true, 2),
                    filter("b", 1, true, false, 0)
                ],
                identifier: Some(128),
            }
        );
        let f = subscribe(V311, 1, &[], &[(b"a/+/c", 0x01)]);
        assert_eq!(
            incoming(&f, V311),
            Incoming::Subscribe {
                pkid: 1,
                filters: vec![filter("a/+/c", 1, false, false, 0)],
                identifier: None,
            }
        );
    }

    #[test]
    fn other_packets_decode_to_what_the_session_needs() {
        for version in [V311, V5] {
            let unsubscribe = unsubscribe(version, 2, &[], &[b"a/+/c", b"x/#"]);
            assert_eq!(
                incoming(&unsubscribe, version),
                Incoming::Unsubscribe {
                    pkid: 2,
                    filters: vec!["a/+/c".into(), "x/#".into()],
                }
            );
            assert_eq!(
                incoming(&frame(0x40, &[0, 1]), version),
                Incoming::PubAck(1)
            );
            assert_eq!(
                incoming(&frame(0x50, &[0, 2]), version),
                Incoming::PubRec(2)
            );
            assert_eq!(
                incoming(&frame(0x62, &[0, 3]), version),
                Incoming::PubRel(3)
            );
            assert_eq!(
                incoming(&frame(0x70, &[0, 4]), version),
                Incoming::PubComp(4)
            );
            assert_eq!(incoming(&frame(0xc0, &[]), version), Incoming::PingReq);
            assert_eq!(
                incoming(&frame(0xe0, &[]), version),
                Incoming::Disconnect {
                    reason: 0,
                    session_expiry: None
                }
            );
        }
    }

    #[test]
    fn v5_disconnect_reads_a_property_length_of_two_bytes() {
        let reason_string = str_prop(0x1f, &[b'r'; 200]);
        let properties = [&reason_string[..], &[0x11, 0, 0, 0, 0]].concat();
        assert!(properties.len() > 127);
        let f = frame(0xe0, &[&[0x04][..], &props(&properties)].concat());
        assert_eq!(
            incoming(&f, V5),
            Incoming::Disconnect {
                reason: 0x04,
                session_expiry: Some(0)
            }
        );
    }

    // ---- frame_len ---------------------------------------------------------------------

    #[test]
    fn frame_len_waits_for_more_bytes() {
        assert_eq!(frame_len(&[], 1024), Ok(None));
        assert_eq!(frame_len(&[0x30], 1024), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x80], 1024), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x05, 0, 1], 1024), Ok(None));
    }

    #[test]
    fn frame_len_reports_complete_frames_including_fixed_header() {
        assert_eq!(frame_len(&[0xc0, 0x00], 1024), Ok(Some(2)));
        let f = publish(V311, 0, b"a", None, &[]);
        let mut buffered = f.clone();
        buffered.extend_from_slice(&[0xc0, 0x00]);
        assert_eq!(frame_len(&buffered, 1024), Ok(Some(f.len())));
    }

    #[test]
    fn frame_len_accepts_non_minimal_remaining_length() {
        assert_eq!(frame_len(&[0xc0, 0x80, 0x00], 1024), Ok(Some(3)));
    }

    #[test]
    fn frame_len_refuses_five_byte_remaining_length() {
        let buf = [0x30, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(
            frame_len(&buf, usize::MAX),
            Err(StrictError::MalformedRemainingLength)
        );
        assert_eq!(
            frame_len(&buf[..5], usize::MAX),
            Err(StrictError::MalformedRemainingLength)
        );
    }

    #[test]
    fn frame_len_refuses_oversized_frame_before_the_body_arrives() {
        // Remaining length 299_996 takes 3 bytes: total 1 + 3 + 299_996 = 300_000.
        let mut header = vec![0x30];
        header.extend(vbi(299_996));
        let err = frame_len(&header, 262_144).unwrap_err();
        assert_eq!(
            err,
            StrictError::PacketTooLarge {
                size: 300_000,
                limit: 262_144
            }
        );
        assert_eq!(
            err.to_string(),
            "packet too large: 300000 bytes > limit 262144"
        );
        assert_eq!(err.reason_code(), 0x95);
        // Exactly at the limit is fine.
        assert_eq!(frame_len(&header, 300_000), Ok(None));
    }

    // ---- fixed header --------------------------------------------------------------------

    #[test]
    fn frame_whose_length_disagrees_with_its_header_is_refused() {
        let mut f = frame(0xc0, &[]);
        f.push(0);
        assert_eq!(
            check_frame(&f, V311),
            Err(StrictError::FrameLengthMismatch {
                expected: 2,
                actual: 3
            })
        );
        assert_eq!(
            check_frame(&[0x40, 0x02, 0x00], V311),
            Err(StrictError::FrameLengthMismatch {
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(
            check_frame(&[], V311),
            Err(StrictError::Truncated(Field::FixedHeader))
        );
        assert_eq!(
            check_frame(&[0x30, 0x80], V311),
            Err(StrictError::Truncated(Field::RemainingLength))
        );
    }

    #[test]
    fn check_frame_refuses_five_byte_remaining_length() {
        let f = [0x30, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::MalformedRemainingLength)
        );
        assert_eq!(
            check_connect(&f),
            Err(StrictError::MalformedRemainingLength)
        );
    }

    #[test]
    fn packet_type_zero_is_refused() {
        for version in [V311, V5] {
            assert_eq!(
                check_frame(&[0x00, 0x00], version),
                Err(StrictError::InvalidPacketType(0))
            );
        }
    }

    #[test]
    fn auth_is_an_invalid_packet_type_in_v311() {
        assert_eq!(
            check_frame(&[0xf0, 0x00], V311),
            Err(StrictError::InvalidPacketType(15))
        );
    }

    #[test]
    fn auth_is_refused_as_unsupported_in_v5() {
        let f = frame(
            0xf0,
            &[&[0x18][..], &props(&str_prop(0x15, b"SCRAM-SHA-1"))].concat(),
        );
        assert_eq!(check_frame(&f, V5), Err(StrictError::AuthNotSupported));
        assert_eq!(
            check_frame(&[0xf0, 0x00], V5),
            Err(StrictError::AuthNotSupported)
        );
    }

    #[test]
    fn auth_with_reserved_flags_is_refused() {
        assert_eq!(
            check_frame(&[0xf1, 0x00], V5),
            Err(StrictError::ReservedFlags {
                packet: PacketType::Auth,
                flags: 1,
                expected: 0
            })
        );
    }

    #[test]
    fn malformed_auth_is_reported_as_malformed() {
        let f = frame(
            0xf0,
            &[&[0x18][..], &props(&str_prop(0x16, b"data"))].concat(),
        );
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::AuthDataWithoutMethod(PropertySection::Packet(
                PacketType::Auth
            )))
        );
        let f = frame(0xf0, &[&[0x18][..], &props(&[0x11, 0, 0, 0, 1])].concat());
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::PropertyNotAllowed {
                property: PropertyId(0x11),
                section: PropertySection::Packet(PacketType::Auth)
            })
        );
    }

    #[test]
    fn server_to_client_packets_from_a_client_are_refused() {
        let cases = [
            (0x20, PacketType::Connack),
            (0x90, PacketType::Suback),
            (0xb0, PacketType::Unsuback),
            (0xd0, PacketType::Pingresp),
        ];
        for version in [V311, V5] {
            for (first, packet) in cases {
                let f = frame(first, &[0, 0]);
                assert_eq!(
                    check_frame(&f, version),
                    Err(StrictError::ServerOnlyPacket(packet))
                );
            }
        }
    }

    #[test]
    fn connect_after_the_first_frame_is_refused() {
        for version in [V311, V5] {
            let err = check_frame(&valid_connect_v311(), version).unwrap_err();
            assert_eq!(err, StrictError::UnexpectedConnect);
            assert_eq!(err.reason_code(), 0x82);
        }
    }

    #[test]
    fn subscribe_with_reserved_flags_is_refused() {
        let mut f = subscribe(V311, 1, &[], &[(b"a", 0)]);
        f[0] = 0x83;
        let err = check_frame(&f, V311).unwrap_err();
        assert_eq!(
            err,
            StrictError::ReservedFlags {
                packet: PacketType::Subscribe,
                flags: 3,
                expected: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "reserved flags 0x3 set on SUBSCRIBE (must be 0x2)"
        );
        assert_eq!(err.reason_code(), 0x81);
    }

    #[test]
    fn unsubscribe_and_pubrel_without_flag_bit_1_are_refused() {
        let mut f = unsubscribe(V5, 1, &[], &[b"a"]);
        f[0] = 0xa0;
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::ReservedFlags {
                packet: PacketType::Unsubscribe,
                flags: 0,
                expected: 2
            })
        );
        assert_eq!(
            check_frame(&[0x60, 0x02, 0, 1], V311),
            Err(StrictError::ReservedFlags {
                packet: PacketType::Pubrel,
                flags: 0,
                expected: 2
            })
        );
    }

    #[test]
    fn other_packets_with_nonzero_flags_are_refused() {
        let cases = [
            (0x42, PacketType::Puback, &[0u8, 1][..]),
            (0x58, PacketType::Pubrec, &[0, 1]),
            (0x71, PacketType::Pubcomp, &[0, 1]),
            (0xc4, PacketType::Pingreq, &[]),
            (0xe2, PacketType::Disconnect, &[]),
        ];
        for (first, packet, body) in cases {
            assert_eq!(
                check_frame(&frame(first, body), V311),
                Err(StrictError::ReservedFlags {
                    packet,
                    flags: first & 0x0f,
                    expected: 0
                })
            );
        }
        let mut f = valid_connect_v311();
        f[0] = 0x11;
        assert_eq!(
            check_connect(&f),
            Err(StrictError::ReservedFlags {
                packet: PacketType::Connect,
                flags: 1,
                expected: 0
            })
        );
    }

    #[test]
    fn publish_with_qos_3_is_refused() {
        let f = publish(V311, 0x06, b"a", Some(1), &[]);
        assert_eq!(check_frame(&f, V311), Err(StrictError::PublishQos3));
    }

    #[test]
    fn publish_with_dup_on_qos_0_is_refused() {
        let f = publish(V5, 0x08, b"a", None, &[]);
        assert_eq!(check_frame(&f, V5), Err(StrictError::DupOnQos0));
    }

    #[test]
    fn pingreq_with_a_body_is_refused() {
        assert_eq!(
            check_frame(&frame(0xc0, &[0]), V5),
            Err(StrictError::InvalidRemainingLength {
                packet: PacketType::Pingreq,
                actual: 1,
                expected: 0
            })
        );
    }

    #[test]
    fn v311_disconnect_with_a_body_is_refused() {
        assert_eq!(
            check_frame(&frame(0xe0, &[0]), V311),
            Err(StrictError::InvalidRemainingLength {
                packet: PacketType::Disconnect,
                actual: 1,
                expected: 0
            })
        );
    }

    #[test]
    fn v311_publish_acknowledgements_must_be_exactly_two_bytes() {
        for first in [0x40, 0x50, 0x62, 0x70] {
            for body in [&[0u8][..], &[0, 1, 0]] {
                let err = check_frame(&frame(first, body), V311).unwrap_err();
                assert!(
                    matches!(err, StrictError::InvalidRemainingLength { expected: 2, .. }),
                    "{err:?}"
                );
            }
        }
    }

    #[test]
    fn publish_acknowledgement_with_packet_id_zero_is_refused() {
        assert_eq!(
            check_frame(&frame(0x40, &[0, 0]), V311),
            Err(StrictError::ZeroPacketId(PacketType::Puback))
        );
    }

    #[test]
    fn truncated_v5_publish_acknowledgement_is_malformed() {
        assert_eq!(
            check_frame(&frame(0x40, &[0]), V5),
            Err(StrictError::Truncated(Field::PacketId))
        );
    }

    #[test]
    fn v5_acknowledgement_with_invalid_reason_code_is_refused() {
        assert_eq!(
            check_frame(&frame(0x40, &[0, 1, 0x92]), V5),
            Err(StrictError::InvalidReasonCode {
                packet: PacketType::Puback,
                code: 0x92
            })
        );
        assert_eq!(
            check_frame(&frame(0x70, &[0, 1, 0x10]), V5),
            Err(StrictError::InvalidReasonCode {
                packet: PacketType::Pubcomp,
                code: 0x10
            })
        );
    }

    #[test]
    fn v5_disconnect_with_server_only_reason_code_is_refused() {
        // 0x8E "session taken over" is sent by servers only.
        assert_eq!(
            check_frame(&frame(0xe0, &[0x8e]), V5),
            Err(StrictError::InvalidReasonCode {
                packet: PacketType::Disconnect,
                code: 0x8e
            })
        );
    }

    #[test]
    fn v5_acknowledgement_with_trailing_bytes_is_refused() {
        assert_eq!(
            check_frame(&frame(0x40, &[0, 1, 0x00, 0x00, 0xff]), V5),
            Err(StrictError::TrailingBytes {
                packet: PacketType::Puback,
                extra: 1
            })
        );
    }

    // ---- CONNECT -----------------------------------------------------------------------

    #[test]
    fn first_frame_that_is_not_connect_is_refused() {
        assert_eq!(
            check_connect(&[0xc0, 0x00]),
            Err(StrictError::ExpectedConnect(12))
        );
        assert_eq!(
            check_connect(&[0x00, 0x00]),
            Err(StrictError::ExpectedConnect(0))
        );
    }

    #[test]
    fn connect_with_wrong_protocol_name_is_refused() {
        let err = check_connect(&connect_level("MQTX", 4, 0x02, &[], &s("dev"))).unwrap_err();
        assert_eq!(err, StrictError::BadProtocolName);
        assert_eq!(err.reason_code(), 0x84);
        assert_eq!(
            check_connect(&connect_level("mqtt", 4, 0x02, &[], &s("dev"))),
            Err(StrictError::BadProtocolName)
        );
    }

    #[test]
    fn mqtt_3_1_mqisdp_connect_is_refused() {
        assert_eq!(
            check_connect(&connect_level("MQIsdp", 3, 0x02, &[], &s("dev"))),
            Err(StrictError::BadProtocolName)
        );
    }

    #[test]
    fn connect_with_unsupported_protocol_level_is_refused() {
        for level in [0, 3, 6, 0x84] {
            let err =
                check_connect(&connect_level("MQTT", level, 0x02, &[], &s("dev"))).unwrap_err();
            assert_eq!(err, StrictError::UnsupportedProtocolLevel(level));
            assert_eq!(err.reason_code(), 0x84);
        }
        assert_eq!(
            StrictError::UnsupportedProtocolLevel(3).to_string(),
            "unsupported protocol level 3"
        );
    }

    #[test]
    fn connect_with_reserved_flag_is_refused() {
        for f in [
            connect_v311(0x03, &s("dev")),
            connect_v5(0x03, &[], &s("dev")),
        ] {
            assert_eq!(check_connect(&f), Err(StrictError::ConnectReservedFlag));
        }
    }

    #[test]
    fn will_qos_or_retain_without_will_flag_is_refused() {
        for flags in [0x02 | 0x08, 0x02 | 0x10, 0x02 | 0x20, 0x02 | 0x18] {
            assert_eq!(
                check_connect(&connect_v311(flags, &s("dev"))),
                Err(StrictError::WillFlagsWithoutWill)
            );
            assert_eq!(
                check_connect(&connect_v5(flags, &[], &s("dev"))),
                Err(StrictError::WillFlagsWithoutWill)
            );
        }
    }

    #[test]
    fn will_qos_3_is_refused() {
        let payload = [s("dev"), s("will"), bin(b"x")].concat();
        assert_eq!(
            check_connect(&connect_v311(0x1e, &payload)),
            Err(StrictError::WillQos3)
        );
    }

    #[test]
    fn v311_password_without_user_name_is_refused() {
        let payload = [s("dev"), bin(b"pw")].concat();
        assert_eq!(
            check_connect(&connect_v311(0x42, &payload)),
            Err(StrictError::PasswordWithoutUserName)
        );
    }

    #[test]
    fn v5_password_without_user_name_is_accepted() {
        let payload = [s("dev"), bin(b"pw")].concat();
        assert_eq!(check_connect(&connect_v5(0x42, &[], &payload)), Ok(V5));
    }

    #[test]
    fn client_id_with_invalid_utf8_is_refused() {
        // Overlong encoding of '/', a lone surrogate, and a stray continuation byte.
        for bad in [&[0xc0, 0xaf][..], &[0xed, 0xa0, 0x80], &[b'a', 0x80]] {
            assert_eq!(
                check_connect(&connect_v311(0x02, &bin(bad))),
                Err(StrictError::InvalidUtf8(Field::ClientId))
            );
        }
    }

    #[test]
    fn client_id_with_nul_is_refused() {
        let err = check_connect(&connect_v5(0x02, &[], &s("de\0v"))).unwrap_err();
        assert_eq!(err, StrictError::NulCharacter(Field::ClientId));
        assert_eq!(err.to_string(), "NUL character in client identifier");
        assert_eq!(err.reason_code(), 0x81);
    }

    #[test]
    fn will_topic_with_wildcard_is_refused() {
        for topic in ["a/+", "a/#"] {
            let payload = [s("dev"), s(topic), bin(b"x")].concat();
            assert_eq!(
                check_connect(&connect_v311(0x06, &payload)),
                Err(StrictError::WildcardInTopicName(Field::WillTopic))
            );
        }
    }

    #[test]
    fn empty_will_topic_is_refused() {
        let payload = [s("dev"), props(&[]), s(""), bin(b"x")].concat();
        assert_eq!(
            check_connect(&connect_v5(0x06, &[], &payload)),
            Err(StrictError::EmptyTopic(Field::WillTopic))
        );
    }

    #[test]
    fn will_topic_with_invalid_utf8_or_nul_is_refused() {
        let payload = [s("dev"), bin(&[0xff]), bin(b"x")].concat();
        assert_eq!(
            check_connect(&connect_v311(0x06, &payload)),
            Err(StrictError::InvalidUtf8(Field::WillTopic))
        );
        let payload = [s("dev"), s("a\0b"), bin(b"x")].concat();
        assert_eq!(
            check_connect(&connect_v311(0x06, &payload)),
            Err(StrictError::NulCharacter(Field::WillTopic))
        );
    }

    #[test]
    fn user_name_with_invalid_utf8_or_nul_is_refused() {
        let payload = [s("dev"), bin(&[0xfe, 0x41])].concat();
        assert_eq!(
            check_connect(&connect_v311(0x82, &payload)),
            Err(StrictError::InvalidUtf8(Field::UserName))
        );
        let payload = [s("dev"), s("\0")].concat();
        assert_eq!(
            check_connect(&connect_v5(0x82, &[], &payload)),
            Err(StrictError::NulCharacter(Field::UserName))
        );
    }

    #[test]
    fn truncated_connect_fields_are_malformed() {
        // Client identifier length points past the end.
        let payload = [0x00, 0x10, b'a'];
        assert_eq!(
            check_connect(&connect_v311(0x02, &payload)),
            Err(StrictError::Truncated(Field::ClientId))
        );
        // Flags promise a will, user name and password that are missing.
        assert_eq!(
            check_connect(&connect_v311(0xc6, &s("dev"))),
            Err(StrictError::Truncated(Field::WillTopic))
        );
        let payload = [s("dev"), s("u")].concat();
        assert_eq!(
            check_connect(&connect_v311(0xc2, &payload)),
            Err(StrictError::Truncated(Field::Password))
        );
        // Variable header cut short.
        assert_eq!(
            check_connect(&frame(0x10, &s("MQTT"))),
            Err(StrictError::Truncated(Field::ProtocolLevel))
        );
        assert_eq!(
            check_connect(&frame(0x10, &[0x00])),
            Err(StrictError::Truncated(Field::ProtocolName))
        );
    }

    #[test]
    fn connect_with_trailing_bytes_is_refused() {
        let payload = [s("dev"), vec![0xaa]].concat();
        assert_eq!(
            check_connect(&connect_v311(0x02, &payload)),
            Err(StrictError::TrailingBytes {
                packet: PacketType::Connect,
                extra: 1
            })
        );
    }

    // ---- PUBLISH -------------------------------------------------------------------------

    #[test]
    fn publish_topic_with_wildcard_is_refused() {
        for version in [V311, V5] {
            for topic in [&b"a/+/b"[..], b"#", b"a+"] {
                assert_eq!(
                    check_frame(&publish(version, 0, topic, None, &[]), version),
                    Err(StrictError::WildcardInTopicName(Field::TopicName))
                );
            }
        }
    }

    #[test]
    fn publish_topic_with_invalid_utf8_is_refused() {
        let err = check_frame(&publish(V311, 0, &[b'a', 0xc3], None, &[]), V311).unwrap_err();
        assert_eq!(err, StrictError::InvalidUtf8(Field::TopicName));
        assert_eq!(err.to_string(), "invalid UTF-8 in topic name");
    }

    #[test]
    fn publish_topic_with_nul_is_refused() {
        assert_eq!(
            check_frame(&publish(V5, 0, b"a\0", None, &[]), V5),
            Err(StrictError::NulCharacter(Field::TopicName))
        );
    }

    #[test]
    fn v311_publish_with_empty_topic_is_refused() {
        assert_eq!(
            check_frame(&publish(V311, 0, b"", None, &[]), V311),
            Err(StrictError::EmptyTopic(Field::TopicName))
        );
    }

    #[test]
    fn v5_publish_with_empty_topic_needs_a_topic_alias() {
        assert_eq!(
            check_frame(&publish(V5, 0, b"", None, &[]), V5),
            Err(StrictError::EmptyTopicWithoutAlias)
        );
        assert_eq!(
            check_frame(&publish(V5, 0, b"", None, &[0x23, 0, 3]), V5),
            Ok(())
        );
    }

    #[test]
    fn publish_qos_above_0_with_packet_id_zero_is_refused() {
        for version in [V311, V5] {
            for flags in [0x02, 0x04] {
                assert_eq!(
                    check_frame(&publish(version, flags, b"a", Some(0), &[]), version),
                    Err(StrictError::ZeroPacketId(PacketType::Publish))
                );
            }
        }
    }

    #[test]
    fn truncated_publish_is_malformed() {
        assert_eq!(
            check_frame(&frame(0x30, &[0x00, 0x05, b'a']), V311),
            Err(StrictError::Truncated(Field::TopicName))
        );
        assert_eq!(
            check_frame(&frame(0x32, &s("a")), V311),
            Err(StrictError::Truncated(Field::PacketId))
        );
        assert_eq!(
            check_frame(&frame(0x30, &s("a")), V5),
            Err(StrictError::Truncated(Field::Properties))
        );
    }

    // ---- SUBSCRIBE / UNSUBSCRIBE -------------------------------------------------------------

    #[test]
    fn subscribe_with_packet_id_zero_is_refused() {
        for version in [V311, V5] {
            assert_eq!(
                check_frame(&subscribe(version, 0, &[], &[(b"a", 0)]), version),
                Err(StrictError::ZeroPacketId(PacketType::Subscribe))
            );
        }
    }

    #[test]
    fn subscribe_without_filters_is_refused() {
        for version in [V311, V5] {
            assert_eq!(
                check_frame(&subscribe(version, 1, &[], &[]), version),
                Err(StrictError::NoTopicFilters(PacketType::Subscribe))
            );
        }
    }

    #[test]
    fn subscribe_with_empty_filter_is_refused() {
        assert_eq!(
            check_frame(&subscribe(V311, 1, &[], &[(b"a", 0), (b"", 0)]), V311),
            Err(StrictError::EmptyTopic(Field::TopicFilter))
        );
    }

    #[test]
    fn subscribe_filter_with_invalid_utf8_or_nul_is_refused() {
        assert_eq!(
            check_frame(
                &subscribe(V5, 1, &[], &[(&[0xf8, 0x88, 0x80, 0x80, 0x80], 0)]),
                V5
            ),
            Err(StrictError::InvalidUtf8(Field::TopicFilter))
        );
        assert_eq!(
            check_frame(&subscribe(V311, 1, &[], &[(b"a/\0", 0)]), V311),
            Err(StrictError::NulCharacter(Field::TopicFilter))
        );
    }

    #[test]
    fn subscribe_missing_options_byte_is_malformed() {
        let f = frame(0x82, &[&[0, 1][..], &s("a")].concat());
        assert_eq!(
            check_frame(&f, V311),
            Err(StrictError::Truncated(Field::SubscriptionOptions))
        );
    }

    #[test]
    fn v311_subscribe_options_with_upper_bits_set_are_refused() {
        for options in [0x04, 0x40, 0x81] {
            assert_eq!(
                check_frame(&subscribe(V311, 1, &[], &[(b"a", options)]), V311),
                Err(StrictError::SubscriptionOptionsReserved(options))
            );
        }
    }

    #[test]
    fn subscribe_with_qos_3_is_refused() {
        for version in [V311, V5] {
            assert_eq!(
                check_frame(&subscribe(version, 1, &[], &[(b"a", 0x03)]), version),
                Err(StrictError::SubscriptionQos3)
            );
        }
    }

    #[test]
    fn v5_subscribe_options_with_reserved_bits_are_refused() {
        for options in [0x40, 0x80] {
            assert_eq!(
                check_frame(&subscribe(V5, 1, &[], &[(b"a", options)]), V5),
                Err(StrictError::SubscriptionOptionsReserved(options))
            );
        }
    }

    #[test]
    fn v5_subscribe_with_retain_handling_3_is_refused() {
        assert_eq!(
            check_frame(&subscribe(V5, 1, &[], &[(b"a", 0x30)]), V5),
            Err(StrictError::RetainHandling3)
        );
    }

    #[test]
    fn v5_no_local_on_shared_subscription_is_refused() {
        assert_eq!(
            check_frame(&subscribe(V5, 1, &[], &[(b"$share/g/a", 0x04)]), V5),
            Err(StrictError::NoLocalOnSharedSubscription)
        );
        assert_eq!(
            check_frame(&subscribe(V5, 1, &[], &[(b"a", 0x04)]), V5),
            Ok(())
        );
    }

    #[test]
    fn unsubscribe_with_packet_id_zero_is_refused() {
        assert_eq!(
            check_frame(&unsubscribe(V311, 0, &[], &[b"a"]), V311),
            Err(StrictError::ZeroPacketId(PacketType::Unsubscribe))
        );
    }

    #[test]
    fn unsubscribe_without_filters_is_refused() {
        for version in [V311, V5] {
            assert_eq!(
                check_frame(&unsubscribe(version, 1, &[], &[]), version),
                Err(StrictError::NoTopicFilters(PacketType::Unsubscribe))
            );
        }
    }

    #[test]
    fn unsubscribe_with_empty_or_invalid_filter_is_refused() {
        assert_eq!(
            check_frame(&unsubscribe(V5, 1, &[], &[b"a", b""]), V5),
            Err(StrictError::EmptyTopic(Field::TopicFilter))
        );
        assert_eq!(
            check_frame(&unsubscribe(V311, 1, &[], &[&[0xc1, 0x81]]), V311),
            Err(StrictError::InvalidUtf8(Field::TopicFilter))
        );
    }

    // ---- MQTT 5 properties -------------------------------------------------------------------

    const CONNECT: PropertySection = PropertySection::Packet(PacketType::Connect);
    const PUBLISH: PropertySection = PropertySection::Packet(PacketType::Publish);

    fn connect_with_props(properties: &[u8]) -> Vec<u8> {
        connect_v5(0x02, properties, &s("dev"))
    }

    #[test]
    fn duplicate_property_is_refused() {
        let err =
            check_connect(&connect_with_props(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2])).unwrap_err();
        assert_eq!(
            err,
            StrictError::DuplicateProperty {
                property: PropertyId(0x11),
                section: CONNECT
            }
        );
        assert_eq!(
            err.to_string(),
            "duplicate MQTT 5 property 0x11 (session expiry interval) in CONNECT"
        );
        assert_eq!(err.reason_code(), 0x82);
        let f = publish(V5, 0, b"a", None, &[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1]);
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::DuplicateProperty {
                property: PropertyId(0x02),
                section: PUBLISH
            })
        );
    }

    #[test]
    fn user_property_may_repeat() {
        let properties = [user_prop("a", "1"), user_prop("a", "2"), user_prop("b", "")].concat();
        assert_eq!(check_connect(&connect_with_props(&properties)), Ok(V5));
        assert_eq!(
            check_frame(&publish(V5, 0, b"t", None, &properties), V5),
            Ok(())
        );
    }

    #[test]
    fn unknown_property_is_refused() {
        for id in [0x00, 0x04, 0x2b, 0x7f] {
            assert_eq!(
                check_connect(&connect_with_props(&[id, 0])),
                Err(StrictError::UnknownProperty {
                    id: u32::from(id),
                    section: CONNECT
                })
            );
        }
        // Identifiers are variable byte integers: 0x80 0x01 is 128.
        assert_eq!(
            check_connect(&connect_with_props(&[0x80, 0x01, 0])),
            Err(StrictError::UnknownProperty {
                id: 128,
                section: CONNECT
            })
        );
    }

    #[test]
    fn property_not_allowed_in_connect_is_refused() {
        // Maximum QoS (server only) and topic alias (PUBLISH only).
        for (id, raw) in [(0x24, &[0x24, 1][..]), (0x23, &[0x23, 0, 1])] {
            let err = check_connect(&connect_with_props(raw)).unwrap_err();
            assert_eq!(
                err,
                StrictError::PropertyNotAllowed {
                    property: PropertyId(id),
                    section: CONNECT
                }
            );
            assert_eq!(err.reason_code(), 0x81);
        }
    }

    #[test]
    fn property_not_allowed_in_will_properties_is_refused() {
        let payload = [s("dev"), props(&[0x11, 0, 0, 0, 1]), s("w"), bin(b"x")].concat();
        assert_eq!(
            check_connect(&connect_v5(0x06, &[], &payload)),
            Err(StrictError::PropertyNotAllowed {
                property: PropertyId(0x11),
                section: PropertySection::Will
            })
        );
    }

    #[test]
    fn subscription_identifier_in_client_publish_is_refused() {
        assert_eq!(
            check_frame(&publish(V5, 0, b"a", None, &[0x0b, 0x01]), V5),
            Err(StrictError::PropertyNotAllowed {
                property: PropertyId(0x0b),
                section: PUBLISH
            })
        );
    }

    #[test]
    fn property_not_allowed_in_other_packets_is_refused() {
        let cases = [
            (
                frame(
                    0x40,
                    &[&[0, 1, 0][..], &props(&[0x11, 0, 0, 0, 1])].concat(),
                ),
                PacketType::Puback,
                0x11,
            ),
            (
                subscribe(V5, 1, &[0x1f, 0, 0], &[(b"a", 0)]),
                PacketType::Subscribe,
                0x1f,
            ),
            (
                unsubscribe(V5, 1, &[0x0b, 1], &[b"a"]),
                PacketType::Unsubscribe,
                0x0b,
            ),
            (
                frame(0xe0, &[&[0][..], &props(&[0x21, 0, 1])].concat()),
                PacketType::Disconnect,
                0x21,
            ),
        ];
        for (f, packet, id) in cases {
            assert_eq!(
                check_frame(&f, V5),
                Err(StrictError::PropertyNotAllowed {
                    property: PropertyId(id),
                    section: PropertySection::Packet(packet)
                })
            );
        }
    }

    #[test]
    fn duplicate_subscription_identifier_in_subscribe_is_refused() {
        assert_eq!(
            check_frame(&subscribe(V5, 1, &[0x0b, 1, 0x0b, 2], &[(b"a", 0)]), V5),
            Err(StrictError::DuplicateProperty {
                property: PropertyId(0x0b),
                section: PropertySection::Packet(PacketType::Subscribe)
            })
        );
    }

    #[test]
    fn property_section_running_past_the_packet_end_is_malformed() {
        // Property length 10, but only 2 bytes follow.
        let mut body = s("MQTT");
        body.extend_from_slice(&[5, 0x02, 0, 60, 10, 0x17, 1]);
        assert_eq!(
            check_connect(&frame(0x10, &body)),
            Err(StrictError::Truncated(Field::Properties))
        );
        let f = frame(0x30, &[&s("a")[..], &[0x05, 0x23]].concat());
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::Truncated(Field::Properties))
        );
    }

    #[test]
    fn property_value_running_past_the_section_end_is_malformed() {
        // Section of 3 bytes holding a four-byte-integer property.
        let payload = [s("dev")].concat();
        let mut body = s("MQTT");
        body.extend_from_slice(&[5, 0x02, 0, 60, 3, 0x11, 0, 0]);
        body.extend(payload);
        assert_eq!(
            check_connect(&frame(0x10, &body)),
            Err(StrictError::Truncated(Field::Property(PropertyId(0x11))))
        );
        // A string whose length runs past the section.
        assert_eq!(
            check_frame(&publish(V5, 0, b"a", None, &[0x03, 0, 9, b'x']), V5),
            Err(StrictError::Truncated(Field::Property(PropertyId(0x03))))
        );
    }

    #[test]
    fn non_minimal_variable_byte_integers_in_the_body_are_refused() {
        // Property length 0 encoded in two bytes.
        let f = frame(0x30, &[&s("a")[..], &[0x80, 0x00]].concat());
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::MalformedVarInt(Field::Properties))
        );
        // Property identifier 0x11 encoded in two bytes (a one-byte reader would see 0x91).
        assert_eq!(
            check_connect(&connect_with_props(&[0x91, 0x00, 0, 0, 0, 1])),
            Err(StrictError::MalformedVarInt(Field::PropertyId))
        );
        // Subscription identifier 1 encoded in two bytes.
        assert_eq!(
            check_frame(&subscribe(V5, 1, &[0x0b, 0x81, 0x00], &[(b"a", 0)]), V5),
            Err(StrictError::MalformedVarInt(Field::Property(PropertyId(
                0x0b
            ))))
        );
    }

    #[test]
    fn malformed_property_length_is_refused() {
        let f = frame(
            0x30,
            &[&s("a")[..], &[0xff, 0xff, 0xff, 0xff, 0x01]].concat(),
        );
        assert_eq!(
            check_frame(&f, V5),
            Err(StrictError::MalformedVarInt(Field::Properties))
        );
    }

    #[test]
    fn property_string_with_invalid_utf8_or_nul_is_refused() {
        let content_type = Field::Property(PropertyId(0x03));
        assert_eq!(
            check_frame(
                &publish(V5, 0, b"a", None, &str_prop(0x03, &[0xe2, 0x82])),
                V5
            ),
            Err(StrictError::InvalidUtf8(content_type))
        );
        assert_eq!(
            check_frame(&publish(V5, 0, b"a", None, &str_prop(0x03, b"t\0")), V5),
            Err(StrictError::NulCharacter(content_type))
        );
        let reason = str_prop(0x1f, b"\0");
        assert_eq!(
            check_frame(
                &frame(0x40, &[&[0, 1, 0][..], &props(&reason)].concat()),
                V5
            ),
            Err(StrictError::NulCharacter(Field::Property(PropertyId(0x1f))))
        );
    }

    #[test]
    fn user_property_name_or_value_with_invalid_utf8_or_nul_is_refused() {
        let bad_name = [&[0x26][..], &bin(&[0xff]), &s("v")].concat();
        assert_eq!(
            check_connect(&connect_with_props(&bad_name)),
            Err(StrictError::InvalidUtf8(Field::UserPropertyName))
        );
        let nul_value = user_prop("k", "v\0");
        assert_eq!(
            check_connect(&connect_with_props(&nul_value)),
            Err(StrictError::NulCharacter(Field::UserPropertyValue))
        );
        let nul_name = user_prop("\0", "v");
        assert_eq!(
            check_frame(&unsubscribe(V5, 1, &nul_name, &[b"a"]), V5),
            Err(StrictError::NulCharacter(Field::UserPropertyName))
        );
    }

    #[test]
    fn boolean_properties_must_be_0_or_1() {
        for id in [0x17, 0x19] {
            assert_eq!(
                check_connect(&connect_with_props(&[id, 2])),
                Err(StrictError::InvalidPropertyValue {
                    property: PropertyId(id),
                    section: CONNECT,
                    value: 2
                })
            );
        }
        assert_eq!(
            check_frame(&publish(V5, 0, b"a", None, &[0x01, 0xff]), V5),
            Err(StrictError::InvalidPropertyValue {
                property: PropertyId(0x01),
                section: PUBLISH,
                value: 255
            })
        );
    }

    #[test]
    fn zero_valued_receive_maximum_packet_size_topic_alias_or_subscription_id_is_refused() {
        for (raw, id) in [(&[0x21, 0, 0][..], 0x21), (&[0x27, 0, 0, 0, 0], 0x27)] {
            assert_eq!(
                check_connect(&connect_with_props(raw)),
                Err(StrictError::InvalidPropertyValue {
                    property: PropertyId(id),
                    section: CONNECT,
                    value: 0
                })
            );
        }
        assert_eq!(
            check_frame(&publish(V5, 0, b"a", None, &[0x23, 0, 0]), V5),
            Err(StrictError::InvalidPropertyValue {
                property: PropertyId(0x23),
                section: PUBLISH,
                value: 0
            })
        );
        assert_eq!(
            check_frame(&subscribe(V5, 1, &[0x0b, 0], &[(b"a", 0)]), V5),
            Err(StrictError::InvalidPropertyValue {
                property: PropertyId(0x0b),
                section: PropertySection::Packet(PacketType::Subscribe),
                value: 0
            })
        );
    }

    #[test]
    fn response_topic_with_wildcard_is_refused() {
        assert_eq!(
            check_frame(&publish(V5, 0, b"a", None, &str_prop(0x08, b"r/#")), V5),
            Err(StrictError::WildcardInTopicName(Field::Property(
                PropertyId(0x08)
            )))
        );
    }

    #[test]
    fn authentication_data_without_method_is_refused() {
        assert_eq!(
            check_connect(&connect_with_props(&str_prop(0x16, b"x"))),
            Err(StrictError::AuthDataWithoutMethod(CONNECT))
        );
        let both = [str_prop(0x15, b"m"), str_prop(0x16, b"x")].concat();
        assert_eq!(check_connect(&connect_with_props(&both)), Ok(V5));
    }

    #[test]
    fn v311_frames_carry_no_property_section() {
        // The same bytes that are a valid MQTT 5 PUBACK with properties are too long
        // for MQTT 3.1.1.
        let f = frame(0x40, &[0, 1, 0, 0]);
        assert_eq!(check_frame(&f, V5), Ok(()));
        assert!(check_frame(&f, V311).is_err());
    }

    // ---- error metadata --------------------------------------------------------------------

    #[test]
    fn reason_codes_follow_the_spec_categories() {
        assert_eq!(StrictError::MalformedRemainingLength.reason_code(), 0x81);
        assert_eq!(
            StrictError::InvalidUtf8(Field::TopicName).reason_code(),
            0x81
        );
        assert_eq!(StrictError::Truncated(Field::ClientId).reason_code(), 0x81);
        assert_eq!(StrictError::RetainHandling3.reason_code(), 0x82);
        assert_eq!(StrictError::AuthNotSupported.reason_code(), 0x82);
        assert_eq!(StrictError::BadProtocolName.reason_code(), 0x84);
        assert_eq!(
            StrictError::PacketTooLarge { size: 2, limit: 1 }.reason_code(),
            0x95
        );
    }

    #[test]
    fn error_messages_name_what_was_wrong() {
        assert_eq!(
            StrictError::MalformedRemainingLength.to_string(),
            "malformed remaining length (more than 4 bytes)"
        );
        assert_eq!(
            StrictError::Truncated(Field::Property(PropertyId(0x03))).to_string(),
            "truncated property 0x03 (content type): runs past the end of the packet or property section"
        );
        assert_eq!(
            StrictError::PropertyNotAllowed {
                property: PropertyId(0x0b),
                section: PropertySection::Will
            }
            .to_string(),
            "MQTT 5 property 0x0b (subscription identifier) not allowed in CONNECT will properties"
        );
        assert_eq!(
            StrictError::UnknownProperty {
                id: 0x2b,
                section: CONNECT
            }
            .to_string(),
            "unknown MQTT 5 property 0x2b in CONNECT"
        );
    }

    // ---- robustness ----------------------------------------------------------------------------

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Runs every entry point on `bytes`; the point is that none of them panics.
    fn exercise(bytes: &[u8]) {
        let _ = check_connect(bytes);
        let _ = check_frame(bytes, V311);
        let _ = check_frame(bytes, V5);
        for limit in [0, 16, usize::MAX] {
            if let Ok(Some(len)) = frame_len(bytes, limit) {
                assert!(len <= bytes.len() && len <= limit);
            }
        }
    }

    fn all_valid_frames() -> Vec<Vec<u8>> {
        let mut frames = vec![valid_connect_v311(), valid_connect_v5()];
        frames.extend(valid_frames(V311));
        frames.extend(valid_frames(V5));
        frames
    }

    #[test]
    fn every_prefix_of_a_valid_frame_is_handled_without_panicking() {
        for f in all_valid_frames() {
            for end in 0..f.len() {
                let prefix = &f[..end];
                exercise(prefix);
                assert_eq!(frame_len(prefix, usize::MAX), Ok(None), "{prefix:02x?}");
            }
            assert_eq!(frame_len(&f, usize::MAX), Ok(Some(f.len())));
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..4000 {
            let len = rng.below(64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            exercise(&bytes);
            // Same body behind a well-formed fixed header, to get past framing.
            let first = bytes.first().copied().unwrap_or(0);
            exercise(&frame(first, bytes.get(1..).unwrap_or_default()));
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic() {
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        let frames = all_valid_frames();
        for _ in 0..4000 {
            let f = &frames[rng.below(frames.len())];
            // Mutate the body and re-frame it so the mutation reaches the packet parsers.
            let vbi_len = f[1..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
            let mut body = f[1 + vbi_len..].to_vec();
            if body.is_empty() {
                continue;
            }
            for _ in 0..=rng.below(3) {
                let at = rng.below(body.len());
                body[at] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                body.truncate(rng.below(body.len()));
            }
            exercise(&frame(f[0], &body));
        }
    }
}
