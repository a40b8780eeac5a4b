//! Control messages between replicas: a quarantine, a release or a ban made on one
//! replica takes effect on the others. They travel through the broker cluster under
//! `portcullis/control/…`, so they are authenticated here: an HMAC-SHA256 under a key
//! every replica shares (and nobody else holds), over the sender, a sequence number,
//! the time and the action. A receiver refuses a message whose MAC does not match,
//! one from itself, one whose sequence number is not above the last it took from that
//! sender, and one older (or further ahead) than the window: a captured message
//! cannot be replayed.
//!
//! Pure: no I/O, no clock of its own (times are passed in), so it can be tested and
//! fuzzed as it is.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;
use subtle::ConstantTimeEq;

/// Domain separation: this key authenticates control messages and nothing else.
const LABEL: &[u8] = b"portcullis replica control v1";
const MAC_HEX: usize = 64;
/// Largest control message taken.
pub const MAX_LEN: usize = 8192;
/// How far a message's time may be from the receiver's.
pub const WINDOW_MS: u64 = 60_000;

/// What one replica tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Quarantine {
        device: String,
        reason: String,
    },
    Release {
        device: String,
        reason: String,
    },
    BanAdd {
        target: String,
        /// Unix seconds; `None`: until removed.
        until_unix: Option<u64>,
        reason: Option<String>,
    },
    BanRemove {
        target: String,
    },
}

impl Action {
    /// The topic level under `portcullis/control/`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Quarantine { .. } | Action::Release { .. } => "quarantine",
            Action::BanAdd { .. } | Action::BanRemove { .. } => "ban",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlMessage {
    /// The sending replica (its upstream client id).
    pub from: String,
    pub seq: u64,
    pub at_ms: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// Why a control message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed control message ({0})")]
    Malformed(String),
    #[error("control message MAC does not match (not from a replica holding the key)")]
    BadMac,
    #[error("control message from this replica itself")]
    Own,
    #[error("replayed control message (sequence {seq} from {from}, last taken {last})")]
    Replayed { from: String, seq: u64, last: u64 },
    #[error("control message outside the time window ({0} ms away)")]
    Stale(u64),
}

impl Refused {
    /// A short label for metrics and the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Malformed(_) => "malformed",
            Refused::BadMac => "bad_mac",
            Refused::Own => "own",
            Refused::Replayed { .. } => "replayed",
            Refused::Stale(_) => "stale",
        }
    }
}

/// The shared key, derived from the key file's bytes.
#[derive(Clone)]
pub struct ControlKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlKey(..)")
    }
}

impl ControlKey {
    /// At least 32 bytes of secret, as every replica's key file holds them.
    pub fn derive(secret: &[u8]) -> Result<ControlKey, String> {
        if secret.len() < 32 {
            return Err(format!(
                "{} bytes: a control key needs at least 32 (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
        mac.update(LABEL);
        let key = mac.finalize().into_bytes();
        Ok(ControlKey {
            mac: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key"),
        })
    }

    fn tag(&self, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The payload: the MAC in hex, a dot, the message as JSON.
    pub fn seal(&self, msg: &ControlMessage) -> Vec<u8> {
        let body = serde_json::to_vec(msg).unwrap_or_default();
        let mut out = self.tag(&body).into_bytes();
        out.push(b'.');
        out.extend_from_slice(&body);
        out
    }

    /// The message, if the MAC matches (nothing else is checked here).
    pub fn open(&self, payload: &[u8]) -> Result<ControlMessage, Refused> {
        if payload.len() > MAX_LEN {
            return Err(Refused::Malformed(format!("{} bytes", payload.len())));
        }
        let (tag, body) = payload
            .split_at_checked(MAC_HEX)
            .ok_or_else(|| Refused::Malformed("too short".into()))?;
        let body = body
            .strip_prefix(b".")
            .ok_or_else(|| Refused::Malformed("no MAC separator".into()))?;
        if !bool::from(self.tag(body).as_bytes().ct_eq(tag)) {
            return Err(Refused::BadMac);
        }
        serde_json::from_slice(body).map_err(|e| Refused::Malformed(e.to_string()))
    }
}

/// What a receiver remembers: the last sequence number taken from each sender.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    last: HashMap<String, u64>,
}

/// Senders remembered, at most (a key holder inventing senders cannot grow it past).
const MAX_SENDERS: usize = 1024;

impl ReplayGuard {
    /// Open and check a payload received at `now_ms` by replica `me`.
    pub fn admit(
        &mut self,
        key: &ControlKey,
        payload: &[u8],
        me: &str,
        now_ms: u64,
    ) -> Result<ControlMessage, Refused> {
        let msg = key.open(payload)?;
        if msg.from == me {
            return Err(Refused::Own);
        }
        let away = now_ms.abs_diff(msg.at_ms);
        if away > WINDOW_MS {
            return Err(Refused::Stale(away));
        }
        if let Some(&last) = self.last.get(&msg.from)
            && msg.seq <= last
        {
            return Err(Refused::Replayed {
                from: msg.from.clone(),
                seq: msg.seq,
                last,
            });
        }
        if self.last.len() >= MAX_SENDERS && !self.last.contains_key(&msg.from) {
            // Forget the quietest sender; the time window still holds for it.
            if let Some(k) = self
                .last
                .iter()
                .min_by_key(|(_, s)| **s)
                .map(|(k, _)| k.clone())
            {
                self.last.remove(&k);
            }
        }
        self.last.insert(msg.from.clone(), msg.seq);
        Ok(msg)
    }
}

/// A sender's sequence numbers: starting from its clock at start (in µs), so that a
/// restarted replica's messages are above everything it sent before.
#[derive(Debug)]
pub struct Sequence(u64);

impl Sequence {
    pub fn starting_at(now_ms: u64) -> Sequence {
        Sequence(now_ms.saturating_mul(1000))
    }

    pub fn advance(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: &str, seq: u64, at_ms: u64) -> ControlMessage {
        ControlMessage {
            from: from.into(),
            seq,
            at_ms,
            action: Action::Quarantine {
                device: "d1".into(),
                reason: "operator".into(),
            },
        }
    }

    #[test]
    fn a_sealed_message_opens_for_another_replica_once() {
        let key = ControlKey::derive(&[7; 32]).unwrap();
        let mut guard = ReplayGuard::default();
        let sealed = key.seal(&msg("a", 5, 1_000_000));
        assert_eq!(
            guard.admit(&key, &sealed, "b", 1_000_500),
            Ok(msg("a", 5, 1_000_000))
        );
        // The same bytes again: a replay.
        assert!(matches!(
            guard.admit(&key, &sealed, "b", 1_000_600),
            Err(Refused::Replayed {
                seq: 5,
                last: 5,
                ..
            })
        ));
        // A later one passes.
        let next = key.seal(&msg("a", 6, 1_000_700));
        assert!(guard.admit(&key, &next, "b", 1_000_800).is_ok());
    }

    #[test]
    fn forged_altered_own_and_stale_messages_are_refused() {
        let key = ControlKey::derive(&[7; 32]).unwrap();
        let other = ControlKey::derive(&[8; 32]).unwrap();
        let mut guard = ReplayGuard::default();
        let now = 10_000_000;
        assert_eq!(
            guard.admit(&key, &other.seal(&msg("a", 1, now)), "b", now),
            Err(Refused::BadMac)
        );
        let mut altered = key.seal(&msg("a", 1, now));
        let n = altered.len();
        altered[n - 3] ^= 1;
        assert_eq!(guard.admit(&key, &altered, "b", now), Err(Refused::BadMac));
        assert_eq!(
            guard.admit(&key, &key.seal(&msg("b", 1, now)), "b", now),
            Err(Refused::Own)
        );
        assert!(matches!(
            guard.admit(&key, &key.seal(&msg("a", 1, now - WINDOW_MS - 1)), "b", now),
            Err(Refused::Stale(_))
        ));
        assert!(matches!(
            guard.admit(&key, b"short", "b", now),
            Err(Refused::Malformed(_))
        ));
        assert!(matches!(
            guard.admit(&key, &vec![b'a'; MAX_LEN + 1], "b", now),
            Err(Refused::Malformed(_))
        ));
        // None of these moved the guard: the genuine message still passes.
        assert!(
            guard
                .admit(&key, &key.seal(&msg("a", 1, now)), "b", now)
                .is_ok()
        );
    }

    #[test]
    fn a_short_key_is_refused_and_a_restarted_sender_counts_on_from_above() {
        assert!(ControlKey::derive(&[1; 31]).is_err());
        let mut before = Sequence::starting_at(1_000);
        let last = (0..5).map(|_| before.advance()).last().unwrap();
        let mut after = Sequence::starting_at(1_001);
        assert!(after.advance() > last);
    }
}
