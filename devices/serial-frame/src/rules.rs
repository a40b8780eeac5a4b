//! The field rules of version 1 that bind both sides, shared by the encoder and the
//! decoder so that what one writes the other reads. Rules only a decoder can meet
//! (version, reserved bits, control payload sizes, trailing bytes) live with it.

use crate::header::{Direction, FrameType};
use crate::{MAX_ID_LEN, MAX_PAYLOAD_LEN, MAX_SUFFIX_LEN};
use core::fmt;

/// Why a topic suffix is not a topic below `devices/{id}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuffixError {
    /// Not UTF-8.
    NotUtf8,
    /// An empty level: a leading or trailing `/`, or `//`.
    EmptyLevel,
    /// A wildcard (`+` or `#`): a suffix names one topic.
    Wildcard,
    /// A NUL character.
    Nul,
}

impl fmt::Display for SuffixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotUtf8 => "is not UTF-8",
            Self::EmptyLevel => "has an empty level (a leading or trailing '/', or '//')",
            Self::Wildcard => "has a wildcard ('+' or '#')",
            Self::Nul => "has a NUL character",
        })
    }
}

impl core::error::Error for SuffixError {}

/// A broken field rule, before it becomes an [`EncodeError`](crate::EncodeError) or a
/// [`DecodeError`](crate::DecodeError).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    ResyncUp,
    IdLength(usize),
    IdCharacter { at: usize, byte: u8 },
    CounterZero,
    SuffixLength { frame_type: FrameType, len: usize },
    SuffixInvalid(SuffixError),
    PayloadTooLarge(usize),
}

impl Rule {
    /// The error code the specification gives the rule.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ResyncUp => "resync_up",
            Self::IdLength(_) => "id_length",
            Self::IdCharacter { .. } => "id_character",
            Self::CounterZero => "counter_zero",
            Self::SuffixLength { .. } => "suffix_length",
            Self::SuffixInvalid(_) => "suffix_invalid",
            Self::PayloadTooLarge(_) => "payload_too_large",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ResyncUp => {
                f.write_str("RESYNC goes from the gateway to a device only (direction down)")
            }
            Self::IdLength(len) => write!(f, "device id is {len} bytes; it must be 1-{MAX_ID_LEN}"),
            Self::IdCharacter { at, byte } => write!(
                f,
                "device id has byte {byte:#04x} at offset {at}; ids are [A-Za-z0-9._-]"
            ),
            Self::CounterZero => f.write_str("counter is 0; counters start at 1"),
            Self::SuffixLength {
                frame_type: FrameType::Data,
                len,
            } => write!(
                f,
                "DATA topic suffix is {len} bytes; it must be 1-{MAX_SUFFIX_LEN}"
            ),
            Self::SuffixLength { frame_type, len } => {
                write!(f, "{frame_type} carries no topic suffix (got {len} bytes)")
            }
            Self::SuffixInvalid(why) => write!(f, "topic suffix {why}"),
            Self::PayloadTooLarge(len) => write!(
                f,
                "payload is {len} bytes; at most {MAX_PAYLOAD_LEN} are allowed"
            ),
        }
    }
}

/// RESYNC moves the device's counter, so only the gateway sends it.
pub(crate) fn check_direction(direction: Direction, frame_type: FrameType) -> Result<(), Rule> {
    if frame_type == FrameType::Resync && direction == Direction::Up {
        return Err(Rule::ResyncUp);
    }
    Ok(())
}

pub(crate) fn check_id_len(len: usize) -> Result<(), Rule> {
    if (1..=MAX_ID_LEN).contains(&len) {
        Ok(())
    } else {
        Err(Rule::IdLength(len))
    }
}

/// Ids are the gateway's principal ids: `[A-Za-z0-9._-]`, so no id can put a `/`, a
/// wildcard or a NUL into a topic built from it.
pub(crate) fn check_id(id: &[u8]) -> Result<&str, Rule> {
    if let Some(at) = id
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return Err(Rule::IdCharacter { at, byte: id[at] });
    }
    // All ASCII by now, so this cannot fail; the error arm still names a byte.
    core::str::from_utf8(id).map_err(|e| {
        let at = e.valid_up_to();
        Rule::IdCharacter {
            at,
            byte: id.get(at).copied().unwrap_or(0),
        }
    })
}

/// Counters start at 1, so a zeroed counter (erased flash, a missing initialisation)
/// never passes as fresh.
pub(crate) fn check_counter(counter: u64) -> Result<(), Rule> {
    if counter == 0 {
        Err(Rule::CounterZero)
    } else {
        Ok(())
    }
}

/// DATA names a topic, so its suffix has 1..=128 bytes; control frames have none.
pub(crate) fn check_suffix_len(frame_type: FrameType, len: usize) -> Result<(), Rule> {
    let allowed = match frame_type {
        FrameType::Data => (1..=MAX_SUFFIX_LEN).contains(&len),
        FrameType::Ack | FrameType::Nak | FrameType::Resync => len == 0,
    };
    if allowed {
        Ok(())
    } else {
        Err(Rule::SuffixLength { frame_type, len })
    }
}

pub(crate) fn check_suffix(suffix: &[u8]) -> Result<&str, Rule> {
    let text =
        core::str::from_utf8(suffix).map_err(|_| Rule::SuffixInvalid(SuffixError::NotUtf8))?;
    check_suffix_text(text)?;
    Ok(text)
}

pub(crate) fn check_suffix_text(suffix: &str) -> Result<(), Rule> {
    for level in suffix.split('/') {
        if level.is_empty() {
            return Err(Rule::SuffixInvalid(SuffixError::EmptyLevel));
        }
        if level.contains(['+', '#']) {
            return Err(Rule::SuffixInvalid(SuffixError::Wildcard));
        }
        if level.contains('\0') {
            return Err(Rule::SuffixInvalid(SuffixError::Nul));
        }
    }
    Ok(())
}

pub(crate) fn check_payload_len(len: usize) -> Result<(), Rule> {
    if len > MAX_PAYLOAD_LEN {
        Err(Rule::PayloadTooLarge(len))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_principal_ids() {
        assert_eq!(check_id(b"thermo-7.a_B"), Ok("thermo-7.a_B"));
        assert_eq!(
            check_id(b"a/b"),
            Err(Rule::IdCharacter { at: 1, byte: b'/' })
        );
        assert_eq!(
            check_id(b"a b"),
            Err(Rule::IdCharacter { at: 1, byte: b' ' })
        );
        assert_eq!(check_id_len(0), Err(Rule::IdLength(0)));
        assert_eq!(check_id_len(64), Ok(()));
        assert_eq!(check_id_len(65), Err(Rule::IdLength(65)));
    }

    #[test]
    fn suffixes_name_one_topic_below_the_device() {
        assert_eq!(check_suffix(b"telemetry/temp"), Ok("telemetry/temp"));
        assert_eq!(check_suffix("é/ü".as_bytes()), Ok("é/ü"));
        for (bad, why) in [
            (&b"/a"[..], SuffixError::EmptyLevel),
            (b"a/", SuffixError::EmptyLevel),
            (b"a//b", SuffixError::EmptyLevel),
            (b"a/+", SuffixError::Wildcard),
            (b"a/#", SuffixError::Wildcard),
            (b"a+b", SuffixError::Wildcard),
            (b"a\0", SuffixError::Nul),
            (b"\xff", SuffixError::NotUtf8),
        ] {
            assert_eq!(check_suffix(bad), Err(Rule::SuffixInvalid(why)), "{bad:?}");
        }
    }

    #[test]
    fn data_needs_a_suffix_and_control_frames_have_none() {
        assert!(check_suffix_len(FrameType::Data, 0).is_err());
        assert!(check_suffix_len(FrameType::Data, 128).is_ok());
        assert!(check_suffix_len(FrameType::Data, 129).is_err());
        for t in [FrameType::Ack, FrameType::Nak, FrameType::Resync] {
            assert!(check_suffix_len(t, 0).is_ok());
            assert!(check_suffix_len(t, 1).is_err());
        }
    }

    #[test]
    fn payloads_over_1024_bytes_are_too_large() {
        assert_eq!(check_payload_len(1024), Ok(()));
        assert_eq!(check_payload_len(1025), Err(Rule::PayloadTooLarge(1025)));
    }
}
