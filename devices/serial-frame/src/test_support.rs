//! Helpers for the unit tests: a fixed key, frames built field by field, and raw
//! (decoded) frames re-signed after an edit, to reach each decoder rule with a
//! correct tag.

use crate::{Body, Direction, Key, Outgoing, cobs, encode};
use hmac::{KeyInit, Mac};
use std::vec;
use std::vec::Vec;

pub(crate) const KEY_BYTES: [u8; 32] = [0x42; 32];

pub(crate) fn key() -> Key {
    Key::new(&KEY_BYTES).unwrap()
}

pub(crate) fn data_up<'a>(counter: u64, suffix: &'a str, payload: &'a [u8]) -> Outgoing<'a> {
    Outgoing {
        direction: Direction::Up,
        id: "thermo-7",
        counter,
        body: Body::Data { suffix, payload },
    }
}

/// The frame as it goes on the wire, delimiter included.
pub(crate) fn wire(frame: &Outgoing<'_>) -> Vec<u8> {
    let mut out = vec![0u8; crate::MAX_WIRE_LEN];
    let len = encode(&key(), frame, &mut out).unwrap();
    out.truncate(len);
    out
}

/// The decoded bytes of a frame (tag included).
pub(crate) fn raw(frame: &Outgoing<'_>) -> Vec<u8> {
    let mut wire = wire(frame);
    wire.pop();
    let len = cobs::decode_in_place(&mut wire).unwrap();
    wire.truncate(len);
    wire
}

/// Replaces the tag of a raw frame with a correct one for `body` (the raw frame
/// without its last 16 bytes).
pub(crate) fn sign(body: &[u8]) -> Vec<u8> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&KEY_BYTES).unwrap();
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    [body, &tag[..16]].concat()
}

/// COBS-encodes a raw frame (no delimiter), as `decode` takes it.
pub(crate) fn encoded(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; cobs::max_encoded_len(raw.len())];
    let len = cobs::encode(raw, &mut out).unwrap();
    out.truncate(len);
    out
}
