//! The chain, pure: each line sealed with a sequence number, the previous line's MAC
//! and its own HMAC-SHA256, and read back into those parts; signed checkpoints that
//! name a line, so a log cut short or replaced can be caught off the box.

use super::entry::{AuditEntry, Body, Extra};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// `prev` of the very first line of a log.
pub(super) const GENESIS: [u8; 32] = [0; 32];
/// Domain tags, so that a line MAC can never pass for a checkpoint signature.
const LINE_TAG: &[u8] = b"portcullis-audit-line-v1\0";
const CHECKPOINT_TAG: &[u8] = b"portcullis-audit-checkpoint-v1\0";

fn hmac(key: &[u8; 32]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// The MAC of a line: over the previous line's MAC and the exact text of this line
/// up to (not including) `,"mac":"…"}`.
fn line_mac(key: &[u8; 32], prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut mac = hmac(key);
    mac.update(LINE_TAG);
    mac.update(prev);
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn checkpoint_signature(key: &[u8; 32], seq: u64, mac: &[u8; 32], time_ms: u64) -> [u8; 32] {
    let mut sig = hmac(key);
    sig.update(CHECKPOINT_TAG);
    sig.update(&seq.to_be_bytes());
    sig.update(mac);
    sig.update(&time_ms.to_be_bytes());
    sig.finalize().into_bytes().into()
}

/// Seals lines into the chain: sequence number, link to the previous MAC, own MAC.
pub(super) struct Chain {
    key: [u8; 32],
    next_seq: u64,
    prev: [u8; 32],
}

impl Chain {
    /// A chain going on after `last` (seq and MAC), or a new one.
    pub(super) fn new(key: [u8; 32], last: Option<(u64, [u8; 32])>) -> Self {
        match last {
            Some((seq, mac)) => Chain {
                key,
                next_seq: seq.saturating_add(1),
                prev: mac,
            },
            None => Chain {
                key,
                next_seq: 0,
                prev: GENESIS,
            },
        }
    }

    /// The line for `entry`, newline included. None only if it cannot be serialized,
    /// which plain strings and numbers never fail.
    pub(super) fn seal(&mut self, entry: &AuditEntry, extra: &Extra) -> Option<Vec<u8>> {
        let body = Body {
            seq: self.next_seq,
            entry,
            extra,
            prev: hex::encode(self.prev),
        };
        let mut line = serde_json::to_vec(&body).ok()?;
        // Drop the closing brace: the MAC covers everything before `,"mac":`.
        line.pop();
        let mac = line_mac(&self.key, &self.prev, &line);
        line.extend_from_slice(b",\"mac\":\"");
        line.extend_from_slice(hex::encode(mac).as_bytes());
        line.extend_from_slice(b"\"}\n");
        self.prev = mac;
        self.next_seq = self.next_seq.saturating_add(1);
        Some(line)
    }

    /// A `checkpoint` line, and the signed checkpoint that names it.
    pub(super) fn checkpoint(&mut self, time_ms: u64) -> Option<(Vec<u8>, Checkpoint)> {
        let seq = self.next_seq;
        let line = self.seal(
            &AuditEntry::own("checkpoint", "allow", time_ms),
            &Extra::default(),
        )?;
        Some((line, Checkpoint::sign(&self.key, seq, &self.prev, time_ms)))
    }
}

/// "The log reached `seq`, and that line's MAC is `mac`", signed with the chain key.
/// Kept off the box (published under `portcullis/events/audit`), it lets
/// [`verify`](super::verify) tell a log that was cut short or replaced since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// Hex MAC of line `seq` (the `checkpoint` line itself).
    pub mac: String,
    pub time_ms: u64,
    /// Hex HMAC-SHA256 over a domain tag, seq, MAC and time.
    pub signature: String,
}

impl Checkpoint {
    fn sign(key: &[u8; 32], seq: u64, mac: &[u8; 32], time_ms: u64) -> Self {
        Checkpoint {
            seq,
            mac: hex::encode(mac),
            time_ms,
            signature: hex::encode(checkpoint_signature(key, seq, mac, time_ms)),
        }
    }

    /// Whether the signature was made with `key` over these fields.
    pub fn verify_signature(&self, key: &[u8; 32]) -> bool {
        let (Some(mac), Some(signature)) = (decode32(&self.mac), decode32(&self.signature)) else {
            return false;
        };
        checkpoint_signature(key, self.seq, &mac, self.time_ms)
            .ct_eq(&signature)
            .into()
    }

    /// What [`verify`](super::verify) is to find in the files.
    pub fn expectation(&self) -> (u64, String) {
        (self.seq, self.mac.clone())
    }
}

/// Parse `verify`'s `--checkpoint SEQ:MAC` argument.
pub fn parse_checkpoint_arg(arg: &str) -> Result<(u64, String), String> {
    let usage =
        || "--checkpoint: expected SEQ:MAC, a number, a colon and 64 hex digits".to_string();
    let (seq, mac) = arg.split_once(':').ok_or_else(usage)?;
    let seq = seq.trim().parse::<u64>().map_err(|_| usage())?;
    let mac = decode32(mac.trim()).ok_or_else(usage)?;
    Ok((seq, hex::encode(mac)))
}

pub(super) fn decode32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// A chain line, split into what the chain needs.
pub(super) struct Parsed<'a> {
    pub(super) seq: u64,
    pub(super) prev: [u8; 32],
    pub(super) mac: [u8; 32],
    /// The MACed text, when the line ends exactly as the writer ends it.
    pub(super) body: Option<&'a [u8]>,
}

impl Parsed<'_> {
    pub(super) fn mac_ok(&self, key: &[u8; 32]) -> bool {
        self.body
            .is_some_and(|body| line_mac(key, &self.prev, body).ct_eq(&self.mac).into())
    }
}

/// Why a line is not a chain line.
pub(super) enum Unreadable {
    /// Valid JSON cut short.
    Torn,
    NotJson,
    /// JSON, but no `seq`, `prev` and `mac`.
    Unchained,
}

pub(super) fn parse_line(line: &[u8]) -> Result<Parsed<'_>, Unreadable> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        // Only a cut object is torn; a blank line is not "incomplete".
        if e.is_eof() && line.trim_ascii_start().starts_with(b"{") {
            Unreadable::Torn
        } else {
            Unreadable::NotJson
        }
    })?;
    let seq = value.get("seq").and_then(Value::as_u64);
    let prev = value.get("prev").and_then(Value::as_str).and_then(decode32);
    let mac = value.get("mac").and_then(Value::as_str).and_then(decode32);
    let (Some(seq), Some(prev), Some(mac)) = (seq, prev, mac) else {
        return Err(Unreadable::Unchained);
    };
    let suffix = format!(",\"mac\":\"{}\"}}", hex::encode(mac));
    Ok(Parsed {
        seq,
        prev,
        mac,
        body: line.strip_suffix(suffix.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::*;

    #[test]
    fn a_checkpoint_signature_binds_its_fields_and_key() {
        let checkpoint = Checkpoint::sign(&KEY, 41, &[3; 32], 1_700_000_000_000);
        assert!(checkpoint.verify_signature(&KEY));
        assert!(!checkpoint.verify_signature(&[8; 32]));
        let moved = Checkpoint {
            seq: 40,
            ..checkpoint.clone()
        };
        assert!(!moved.verify_signature(&KEY));
        let garbled = Checkpoint {
            mac: "zz".into(),
            ..checkpoint
        };
        assert!(!garbled.verify_signature(&KEY));
    }

    #[test]
    fn the_checkpoint_argument_is_seq_colon_mac() {
        let mac = "AB".repeat(32);
        assert_eq!(
            parse_checkpoint_arg(&format!("17:{mac}")),
            Ok((17, "ab".repeat(32)))
        );
        assert!(parse_checkpoint_arg("17").is_err());
        assert!(parse_checkpoint_arg("x:00").is_err());
        assert!(parse_checkpoint_arg(&format!("17:{}", "0".repeat(63))).is_err());
    }
}
