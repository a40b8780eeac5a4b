//! The Portcullis serial wire format, version 1: authenticated frames between a device
//! and the gateway over a UART or an RS-485 bus. `docs/serial-protocol.md` is the
//! specification; this crate is the device-side implementation that firmware links,
//! and the one the gateway's serial adapter decodes with.
//!
//! Why it looks the way it does:
//!
//! * A serial line has no packets, so frames are COBS-encoded and end in `0x00`: a
//!   receiver that joins mid-stream, or loses bytes to noise, finds the next frame at
//!   the next delimiter ([`Deframer`]) and loses only the frame the noise touched.
//! * A serial line has no TLS either, so every frame carries a 128-bit truncated
//!   HMAC-SHA256 tag under the device's own key, over every byte before it (direction
//!   included, so a frame cannot be reflected back to its sender), and a counter that
//!   must rise in each direction ([`ReplayGuard`]). Frames are authenticated, not
//!   encrypted: a later version (a different version byte) can add an AEAD.
//! * Decoding is split in two, [`decode`] then [`Unverified::verify`], because the
//!   receiver must read the device id to find the key before it can check the tag.
//!   Nothing but the id and direction is readable before the tag verifies.
//! * Devices have little flash and wear it out, so [`CounterReservation`] writes the
//!   counter's bound once per range of frames and still never reuses a counter after a
//!   crash.
//!
//! Everything is `no_std`, allocation-free and panic-free on any input: frames are
//! decoded in place in the caller's buffer and encoded into the caller's buffer.
//!
//! A device's side of it:
//!
//! ```
//! use core::num::NonZeroU64;
//! use portcullis_serial_frame::*;
//!
//! let key = Key::new(&[0x42; KEY_LEN])?;
//! let mut counters = CounterReservation::new(0 /* bound loaded from flash */, NonZeroU64::new(1000).unwrap());
//! let counter = loop {
//!     match counters.next_counter() {
//!         Next::Counter(c) => break c,
//!         Next::NeedsReserve(bound) => {
//!             /* write `bound` to flash, then: */
//!             counters.reserved(bound);
//!         }
//!         Next::Exhausted => panic!("re-key the device"),
//!     }
//! };
//! let frame = Outgoing {
//!     direction: Direction::Up,
//!     id: "thermo-7",
//!     counter,
//!     body: Body::Data { suffix: "telemetry/temp", payload: b"21.5" },
//! };
//! let mut wire = [0u8; MAX_WIRE_LEN];
//! let len = encode(&key, &frame, &mut wire)?;
//! // uart.write(&[0]); uart.write(&wire[..len]);
//!
//! // Receiving: the gateway's answers, down.
//! let mut down = ReplayGuard::new(0 /* persisted if the device acts on commands */);
//! let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
//! # let answer = Outgoing { direction: Direction::Down, id: "thermo-7", counter: 1, body: Body::Resync { floor: 5000 } };
//! # let mut rx = [0u8; MAX_WIRE_LEN];
//! # let rx_len = encode(&key, &answer, &mut rx)?;
//! deframer.feed(&rx[..rx_len], |event| {
//!     let Deframed::Frame(encoded) = event else { return }; // count oversize runs
//!     let Ok(unverified) = decode(encoded) else { return }; // count decode errors
//!     if unverified.id() != "thermo-7" || unverified.direction() != Direction::Down {
//!         return;
//!     }
//!     let Ok(frame) = unverified.verify(&key) else { return };
//!     if down.admit(&frame).is_err() {
//!         return;
//!     }
//!     if let Some(floor) = frame.resync_floor() {
//!         counters.jump_above(floor);
//!     }
//! });
//! assert_eq!(counters.next_counter(), Next::NeedsReserve(6000));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

mod body;
pub mod cobs;
mod decode;
mod deframe;
mod encode;
mod header;
mod key;
mod replay;
mod reservation;
mod rules;
#[cfg(test)]
mod test_support;

pub use body::{Body, NakReason};
pub use decode::{DecodeError, Field, Frame, TagError, Unverified, decode};
pub use deframe::{Deframed, Deframer};
pub use encode::{EncodeError, Outgoing, encode};
pub use header::{Direction, FrameType};
pub use key::{Key, KeyTooShort};
pub use replay::{Replay, ReplayGuard};
pub use reservation::{CounterReservation, Next};
pub use rules::SuffixError;

/// The version byte of the frames this crate reads and writes.
pub const VERSION: u8 = 0x01;
/// Longest device id, in bytes (ids are `[A-Za-z0-9._-]`, so bytes are characters).
pub const MAX_ID_LEN: usize = 64;
/// Longest topic suffix of a DATA frame, in bytes of UTF-8.
pub const MAX_SUFFIX_LEN: usize = 128;
/// Largest payload of a DATA frame.
pub const MAX_PAYLOAD_LEN: usize = 1024;
/// Length of the truncated HMAC-SHA256 tag that ends every frame.
pub const TAG_LEN: usize = 16;
/// Length of a device key as provisioned (32 random bytes).
pub const KEY_LEN: usize = 32;
/// Shortest key [`Key::new`] accepts.
pub const MIN_KEY_LEN: usize = 16;

/// Payload length of an ACK (the acknowledged counter).
pub const ACK_PAYLOAD_LEN: usize = 8;
/// Payload length of a NAK (the refused counter and a reason byte).
pub const NAK_PAYLOAD_LEN: usize = 9;
/// Payload length of a RESYNC (the floor).
pub const RESYNC_PAYLOAD_LEN: usize = 8;

/// Shortest decoded frame: version, flags, id length, a one-byte id, counter, suffix
/// length, payload length, tag (a control frame with its payload missing is still
/// refused later, by its type's payload length).
pub const MIN_FRAME_LEN: usize = 3 + 1 + 8 + 1 + 2 + TAG_LEN;
/// Longest decoded frame: 3 + 64 + 8 + 1 + 128 + 2 + 1024 + 16.
pub const MAX_FRAME_LEN: usize =
    3 + MAX_ID_LEN + 8 + 1 + MAX_SUFFIX_LEN + 2 + MAX_PAYLOAD_LEN + TAG_LEN;
/// Longest COBS encoding of a frame, without its delimiter. Also the bound for the
/// longer encoding some encoders emit (see [`cobs`]): it differs only when the
/// length is a multiple of 254, which 1246 is not.
pub const MAX_ENCODED_LEN: usize = cobs::max_encoded_len(MAX_FRAME_LEN);
/// Longest frame on the wire: the encoding and its `0x00` delimiter. A buffer of this
/// size holds any frame [`encode`] can write.
pub const MAX_WIRE_LEN: usize = MAX_ENCODED_LEN + 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_the_documented_numbers() {
        assert_eq!(MIN_FRAME_LEN, 31);
        assert_eq!(MAX_FRAME_LEN, 1246);
        assert_eq!(MAX_ENCODED_LEN, 1251);
        assert_eq!(MAX_WIRE_LEN, 1252);
    }
}
