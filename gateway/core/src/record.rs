//! Self-checking registry records.
//!
//! Every value the registry stores is sealed: a version byte, an HMAC-SHA256 and the
//! JSON payload. The MAC covers the table name and the record's key as well as the
//! payload, so a flipped byte, a record moved to another key or table, or one edited
//! without the key is refused instead of served. The key is derived (with its own
//! label) from the audit chain key, which lives outside the data dir: with the data
//! dir alone nobody can forge a sealed record (an unsealed file is refused once the
//! gateway has sealed its registry: see `Registry::open_with`).
//!
//! Everything here is pure, so it can be fuzzed: no storage, no clock.

use hmac::{Hmac, KeyInit, Mac};
use serde::de::DeserializeOwned;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The first byte of a sealed value.
pub const SEALED_V1: u8 = 1;
const MAC_LEN: usize = 32;
/// Domain separation: this key is used for nothing but registry records.
const LABEL: &[u8] = b"portcullis registry record MAC v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{len} bytes, shorter than a sealed record ({min})")]
    Truncated { len: usize, min: usize },
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    #[error("MAC does not match (altered, moved from another key, or sealed under another key)")]
    BadMac,
    #[error("unreadable content: {0}")]
    Payload(String),
}

/// Seals and opens records under the registry key.
#[derive(Clone)]
pub struct RecordSealer {
    key: [u8; 32],
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordSealer(..)")
    }
}

impl RecordSealer {
    /// The registry key derived from a root key kept outside the data dir (the audit
    /// chain key).
    pub fn derive(root: &[u8; 32]) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(root).expect("HMAC takes any key");
        mac.update(LABEL);
        RecordSealer {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self, table: &str, key: &str, payload: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        // Length-prefixed, so ("ab", "c") and ("a", "bc") never share a MAC.
        for part in [table.as_bytes(), key.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(payload);
        mac.finalize().into_bytes().into()
    }

    /// The stored form of `payload` at `key` in `table`.
    pub fn seal(&self, table: &str, key: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + MAC_LEN + payload.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&self.mac(table, key, payload));
        out.extend_from_slice(payload);
        out
    }

    /// The payload of a stored value, if it was sealed under this key for exactly
    /// this table and record key.
    pub fn open<'a>(
        &self,
        table: &str,
        key: &str,
        value: &'a [u8],
    ) -> Result<&'a [u8], RecordError> {
        let min = 1 + MAC_LEN;
        let (&format, rest) = value.split_first().ok_or(RecordError::Truncated {
            len: value.len(),
            min,
        })?;
        if format != SEALED_V1 {
            return Err(RecordError::UnknownFormat(format));
        }
        let (stored, payload) = rest
            .split_at_checked(MAC_LEN)
            .ok_or(RecordError::Truncated {
                len: value.len(),
                min,
            })?;
        let expected = self.mac(table, key, payload);
        if bool::from(expected.ct_eq(stored)) {
            Ok(payload)
        } else {
            Err(RecordError::BadMac)
        }
    }

    /// Open and parse a stored value.
    pub fn decode<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
        value: &[u8],
    ) -> Result<T, RecordError> {
        decode_payload(self.open(table, key, value)?)
    }
}

/// Parse a payload (a sealed record's content, or a record written before records
/// were sealed).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(payload).map_err(|e| RecordError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> RecordSealer {
        RecordSealer::derive(&[3; 32])
    }

    #[test]
    fn a_sealed_record_opens_to_its_payload() {
        let v = sealer().seal("principals", "device/a", b"{}");
        assert_eq!(sealer().open("principals", "device/a", &v), Ok(&b"{}"[..]));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let v = sealer().seal("bans", "source/10.0.0.0/8", b"{\"reason\":\"x\"}");
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x01;
            assert!(
                sealer().open("bans", "source/10.0.0.0/8", &bad).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_record_moved_to_another_key_or_table_is_refused() {
        let v = sealer().seal("principals", "device/a", b"{}");
        assert_eq!(
            sealer().open("principals", "device/b", &v),
            Err(RecordError::BadMac)
        );
        assert_eq!(
            sealer().open("behaviour", "device/a", &v),
            Err(RecordError::BadMac)
        );
        // The length prefix keeps the boundary between table and key.
        let w = sealer().seal("ab", "c", b"{}");
        assert_eq!(sealer().open("a", "bc", &w), Err(RecordError::BadMac));
    }

    #[test]
    fn a_record_sealed_under_another_root_key_is_refused() {
        let v = RecordSealer::derive(&[4; 32]).seal("principals", "device/a", b"{}");
        assert_eq!(
            sealer().open("principals", "device/a", &v),
            Err(RecordError::BadMac)
        );
    }

    #[test]
    fn short_and_unknown_values_are_errors_not_panics() {
        assert!(matches!(
            sealer().open("t", "k", b""),
            Err(RecordError::Truncated { .. })
        ));
        assert!(matches!(
            sealer().open("t", "k", &[1; 10]),
            Err(RecordError::Truncated { .. })
        ));
        assert_eq!(
            sealer().open("t", "k", b"{}"),
            Err(RecordError::UnknownFormat(b'{'))
        );
    }
}
