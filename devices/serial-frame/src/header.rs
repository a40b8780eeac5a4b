//! The flags byte: which way a frame travels and what kind of frame it is.
//!
//! The direction is a bit under the tag, so a frame one side sent cannot be played
//! back to it as if the other side had sent it.

use core::fmt;

/// Direction bit (bit 7): set for gateway → device.
pub(crate) const DOWN_BIT: u8 = 0x80;
/// Frame type (bits 0–2).
pub(crate) const TYPE_MASK: u8 = 0x07;
/// Reserved in version 1 (bits 3–6): a frame with any of them set is refused.
pub(crate) const RESERVED_MASK: u8 = 0x78;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device → gateway.
    Up,
    /// Gateway → device.
    Down,
}

impl Direction {
    /// The name the specification and the test vectors use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Telemetry up, a command down.
    Data,
    /// Acknowledges a frame by its counter.
    Ack,
    /// Refuses a frame by its counter, with a reason.
    Nak,
    /// Gateway → device only: continue the up counter above this floor.
    Resync,
}

impl FrameType {
    pub(crate) fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0 => Self::Data,
            1 => Self::Ack,
            2 => Self::Nak,
            3 => Self::Resync,
            _ => return None,
        })
    }

    pub(crate) fn bits(self) -> u8 {
        match self {
            Self::Data => 0,
            Self::Ack => 1,
            Self::Nak => 2,
            Self::Resync => 3,
        }
    }

    /// The name the specification and the test vectors use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Data => "DATA",
            Self::Ack => "ACK",
            Self::Nak => "NAK",
            Self::Resync => "RESYNC",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

pub(crate) fn flags(direction: Direction, frame_type: FrameType) -> u8 {
    let down = match direction {
        Direction::Up => 0,
        Direction::Down => DOWN_BIT,
    };
    down | frame_type.bits()
}
