//! Writing a frame: the fields are checked by the rules the decoder applies, then
//! serialised, tagged and COBS-encoded in one pass into the caller's buffer.

use crate::body::{Body, ControlPayload};
use crate::cobs;
use crate::header::{self, Direction, FrameType};
use crate::key::Key;
use crate::rules::{self, Rule, SuffixError};
use crate::{TAG_LEN, VERSION};
use core::fmt;
use hmac::Mac as _;

/// A frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing<'a> {
    pub direction: Direction,
    /// The device's id, whichever side sends.
    pub id: &'a str,
    /// The sender's next counter in this direction's stream (from
    /// [`CounterReservation`](crate::CounterReservation) on a device).
    pub counter: u64,
    pub body: Body<'a>,
}

impl Outgoing<'_> {
    /// Same as [`encode`].
    pub fn encode(&self, key: &Key, out: &mut [u8]) -> Result<usize, EncodeError> {
        encode(key, self, out)
    }
}

/// Why a frame could not be written. Each field rule is the one the decoder applies,
/// and has the same [`label`](EncodeError::label) as its [`DecodeError`](crate::DecodeError).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is too small; [`MAX_WIRE_LEN`](crate::MAX_WIRE_LEN) always
    /// suffices.
    BufferTooSmall { needed: usize, available: usize },
    /// A RESYNC with direction up.
    ResyncUp,
    /// The id is not 1..=64 bytes.
    IdLength(usize),
    /// The id has a byte outside `[A-Za-z0-9._-]`.
    IdCharacter { at: usize, byte: u8 },
    /// Counter 0.
    CounterZero,
    /// A DATA suffix not 1..=128 bytes.
    SuffixLength { frame_type: FrameType, len: usize },
    /// The suffix is not one topic below `devices/{id}/`.
    SuffixInvalid(SuffixError),
    /// A DATA payload over 1024 bytes.
    PayloadTooLarge(usize),
}

impl EncodeError {
    /// Stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self.rule() {
            Some(rule) => rule.label(),
            None => "buffer_too_small",
        }
    }

    fn rule(self) -> Option<Rule> {
        Some(match self {
            Self::BufferTooSmall { .. } => return None,
            Self::ResyncUp => Rule::ResyncUp,
            Self::IdLength(len) => Rule::IdLength(len),
            Self::IdCharacter { at, byte } => Rule::IdCharacter { at, byte },
            Self::CounterZero => Rule::CounterZero,
            Self::SuffixLength { frame_type, len } => Rule::SuffixLength { frame_type, len },
            Self::SuffixInvalid(why) => Rule::SuffixInvalid(why),
            Self::PayloadTooLarge(len) => Rule::PayloadTooLarge(len),
        })
    }
}

impl From<Rule> for EncodeError {
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

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cannot encode frame: ")?;
        match (*self, self.rule()) {
            (Self::BufferTooSmall { needed, available }, _) => write!(
                f,
                "output buffer holds {available} bytes; the frame needs {needed}"
            ),
            (_, Some(rule)) => write!(f, "{rule}"),
            (_, None) => Ok(()),
        }
    }
}

impl core::error::Error for EncodeError {}

/// Writes `frame` into `out`, COBS-encoded and followed by its `0x00` delimiter, and
/// returns the number of bytes to send. On an error `out` holds nothing useful.
pub fn encode(key: &Key, frame: &Outgoing<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let frame_type = frame.body.frame_type();
    rules::check_direction(frame.direction, frame_type)?;
    let id_len = u8::try_from(frame.id.len()).map_err(|_| Rule::IdLength(frame.id.len()))?;
    rules::check_id_len(frame.id.len())?;
    rules::check_id(frame.id.as_bytes())?;
    rules::check_counter(frame.counter)?;

    let control = ControlPayload::of(&frame.body);
    let (suffix, payload) = match frame.body {
        Body::Data { suffix, payload } => (suffix, payload),
        _ => (
            "",
            control.as_ref().map_or(&[][..], ControlPayload::as_bytes),
        ),
    };
    let suffix_len = u8::try_from(suffix.len()).map_err(|_| Rule::SuffixLength {
        frame_type,
        len: suffix.len(),
    })?;
    rules::check_suffix_len(frame_type, suffix.len())?;
    if frame_type == FrameType::Data {
        rules::check_suffix_text(suffix)?;
    }
    let payload_len =
        u16::try_from(payload.len()).map_err(|_| Rule::PayloadTooLarge(payload.len()))?;
    rules::check_payload_len(payload.len())?;

    let mut mac = key.mac();
    let mut wire = cobs::Encoder::new(out);
    let mut put = |bytes: &[u8]| {
        mac.update(bytes);
        wire.push_all(bytes);
    };
    put(&[VERSION, header::flags(frame.direction, frame_type), id_len]);
    put(frame.id.as_bytes());
    put(&frame.counter.to_be_bytes());
    put(&[suffix_len]);
    put(suffix.as_bytes());
    put(&payload_len.to_be_bytes());
    put(payload);
    let tag = mac.finalize().into_bytes();
    wire.push_all(&tag[..TAG_LEN]);
    wire.finish_frame()
        .map_err(|too_small| EncodeError::BufferTooSmall {
            needed: too_small.needed,
            available: too_small.available,
        })
}
