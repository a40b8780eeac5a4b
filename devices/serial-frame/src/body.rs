//! What a frame carries after its counter: a topic suffix and an application payload
//! for DATA, a fixed-size payload for each control frame.

use crate::header::FrameType;
use crate::{ACK_PAYLOAD_LEN, NAK_PAYLOAD_LEN, RESYNC_PAYLOAD_LEN};
use core::fmt;

/// The typed content of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// Telemetry (up), published as `devices/{id}/{suffix}`; or a command (down), whose
    /// topic below `devices/{id}/` is `suffix` (e.g. `commands/reboot`).
    Data { suffix: &'a str, payload: &'a [u8] },
    /// Acknowledges the frame with this counter in the other direction's stream.
    Ack { counter: u64 },
    /// Refuses the frame with this counter in the other direction's stream.
    Nak { counter: u64, reason: NakReason },
    /// Gateway → device: the device continues its up counter strictly above `floor`.
    Resync { floor: u64 },
}

impl Body<'_> {
    /// The frame type this body is sent as.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Data { .. } => FrameType::Data,
            Self::Ack { .. } => FrameType::Ack,
            Self::Nak { .. } => FrameType::Nak,
            Self::Resync { .. } => FrameType::Resync,
        }
    }
}

/// Why a NAK refused a frame. Reason bytes this version does not name decode as
/// [`NakReason::Other`], so a newer gateway's reasons reach older firmware intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NakReason {
    /// 1: the device's group may not publish to that topic.
    NotAuthorized,
    /// 2: over the device's rate limit.
    RateLimited,
    /// 3: the payload failed validation.
    Invalid,
    /// 4: larger than the gateway accepts for that topic.
    TooLarge,
    /// 5: the device is quarantined.
    Quarantined,
    /// 6: the gateway cannot take it now; send it again later.
    Busy,
    /// Any other reason byte.
    Other(u8),
}

impl NakReason {
    /// Reads a reason byte; never fails.
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            1 => Self::NotAuthorized,
            2 => Self::RateLimited,
            3 => Self::Invalid,
            4 => Self::TooLarge,
            5 => Self::Quarantined,
            6 => Self::Busy,
            other => Self::Other(other),
        }
    }

    /// The reason byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::NotAuthorized => 1,
            Self::RateLimited => 2,
            Self::Invalid => 3,
            Self::TooLarge => 4,
            Self::Quarantined => 5,
            Self::Busy => 6,
            Self::Other(byte) => byte,
        }
    }

    /// Stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAuthorized => "not_authorized",
            Self::RateLimited => "rate_limited",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::Quarantined => "quarantined",
            Self::Busy => "busy",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for NakReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(byte) => write!(f, "other({byte})"),
            known => f.write_str(known.label()),
        }
    }
}

/// The payload length a control frame must have; `None` for DATA.
pub(crate) fn fixed_payload_len(frame_type: FrameType) -> Option<usize> {
    match frame_type {
        FrameType::Data => None,
        FrameType::Ack => Some(ACK_PAYLOAD_LEN),
        FrameType::Nak => Some(NAK_PAYLOAD_LEN),
        FrameType::Resync => Some(RESYNC_PAYLOAD_LEN),
    }
}

/// A control frame's payload, serialised.
pub(crate) struct ControlPayload {
    bytes: [u8; NAK_PAYLOAD_LEN],
    len: usize,
}

impl ControlPayload {
    pub(crate) fn of(body: &Body<'_>) -> Option<Self> {
        let mut bytes = [0u8; NAK_PAYLOAD_LEN];
        let (counter, reason) = match *body {
            Body::Data { .. } => return None,
            Body::Ack { counter } => (counter, None),
            Body::Nak { counter, reason } => (counter, Some(reason)),
            Body::Resync { floor } => (floor, None),
        };
        let (head, tail) = bytes.split_at_mut(8);
        head.copy_from_slice(&counter.to_be_bytes());
        let len = match reason {
            Some(reason) => {
                tail[0] = reason.to_byte();
                NAK_PAYLOAD_LEN
            }
            None => 8,
        };
        Some(Self { bytes, len })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Reads a control frame's payload, whose length the decoder has already checked.
pub(crate) fn control_body(frame_type: FrameType, payload: &[u8]) -> Option<Body<'static>> {
    let counter = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    Some(match frame_type {
        FrameType::Data => return None,
        FrameType::Ack => Body::Ack { counter },
        FrameType::Nak => Body::Nak {
            counter,
            reason: NakReason::from_byte(*payload.get(8)?),
        },
        FrameType::Resync => Body::Resync { floor: counter },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_nak_reasons_decode_as_other() {
        assert_eq!(NakReason::from_byte(0), NakReason::Other(0));
        assert_eq!(NakReason::from_byte(7), NakReason::Other(7));
        assert_eq!(NakReason::from_byte(200).to_byte(), 200);
        assert_eq!(std::format!("{}", NakReason::Other(200)), "other(200)");
    }

    #[test]
    fn named_nak_reasons_round_trip() {
        for byte in 1..=6 {
            let reason = NakReason::from_byte(byte);
            assert!(!matches!(reason, NakReason::Other(_)));
            assert_eq!(reason.to_byte(), byte);
        }
    }

    #[test]
    fn control_payloads_have_their_fixed_lengths() {
        for body in [
            Body::Ack { counter: 7 },
            Body::Nak {
                counter: 7,
                reason: NakReason::Busy,
            },
            Body::Resync { floor: 7 },
        ] {
            let payload = ControlPayload::of(&body).unwrap();
            assert_eq!(
                Some(payload.as_bytes().len()),
                fixed_payload_len(body.frame_type())
            );
            assert_eq!(
                control_body(body.frame_type(), payload.as_bytes()),
                Some(body)
            );
        }
    }
}
