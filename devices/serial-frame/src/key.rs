//! A device's key, keyed once: the HMAC state after the key is absorbed is kept, so
//! each frame costs only its own bytes.

use crate::MIN_KEY_LEN;
use core::fmt;
use hmac::{Hmac, KeyInit};
use sha2::Sha256;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// A device key (32 random bytes as provisioned; at least [`MIN_KEY_LEN`]).
#[derive(Clone)]
pub struct Key {
    mac: HmacSha256,
}

/// The key is shorter than [`MIN_KEY_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTooShort {
    /// Length of the key offered.
    pub len: usize,
}

impl fmt::Display for KeyTooShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device key is {} bytes; at least {MIN_KEY_LEN} are required (32 as provisioned)",
            self.len
        )
    }
}

impl core::error::Error for KeyTooShort {}

impl Key {
    /// Takes the key bytes. Shorter than [`MIN_KEY_LEN`] is refused: a 128-bit tag
    /// is no stronger than the key behind it.
    pub fn new(bytes: &[u8]) -> Result<Self, KeyTooShort> {
        let too_short = KeyTooShort { len: bytes.len() };
        if bytes.len() < MIN_KEY_LEN {
            return Err(too_short);
        }
        // HMAC takes keys of any length, so this never fails.
        let mac = HmacSha256::new_from_slice(bytes).map_err(|_| too_short)?;
        Ok(Self { mac })
    }

    pub(crate) fn mac(&self) -> HmacSha256 {
        self.mac.clone()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_shorter_than_16_bytes_are_refused() {
        assert_eq!(Key::new(&[7; 15]).unwrap_err(), KeyTooShort { len: 15 });
        assert!(Key::new(&[7; 16]).is_ok());
        assert!(Key::new(&[7; 32]).is_ok());
        assert!(Key::new(&[7; 100]).is_ok());
    }

    #[test]
    fn a_key_never_shows_in_debug_output() {
        let key = Key::new(&[0x5a; 32]).unwrap();
        assert_eq!(std::format!("{key:?}"), "Key(..)");
    }
}
