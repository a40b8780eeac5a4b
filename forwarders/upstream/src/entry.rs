//! One message as the outbox stores it: the message, when it was taken and when it
//! expires, in a small versioned binary form. Decoding checks every length and never
//! panics: a damaged entry is an error, not a crash.

use portcullis_core::message::Message;
use portcullis_core::wire::{self, Reader};

pub use portcullis_core::wire::WireError as EntryError;

/// Version 2: the message in the core's stored form after the two timestamps.
const VERSION: u8 = 2;
/// Version and the two timestamps.
const HEADER: usize = 1 + 8 + 8;

/// A message in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub message: Message,
    /// When the outbox took it, and when it is dropped if still undelivered (Unix ms).
    pub enqueued_ms: u64,
    pub expires_ms: u64,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let m = &self.message;
        let mut out = Vec::with_capacity(HEADER + 16 + m.topic.as_str().len() + m.payload.len());
        out.push(VERSION);
        out.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        wire::put_message(m, &mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        let mut r = Reader(bytes);
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(EntryError::Version(version));
        }
        let enqueued_ms = r.u64("timestamp")?;
        let expires_ms = r.u64("expiry")?;
        let message = wire::message(&mut r)?;
        if !r.is_empty() {
            return Err(EntryError::Invalid("entry: bytes after the message"));
        }
        Ok(Entry {
            message,
            enqueued_ms,
            expires_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use portcullis_core::message::{Properties, QoS};
    use portcullis_core::topic::TopicName;
    use std::sync::Arc;

    fn entry(props: Option<Properties>) -> Entry {
        Entry {
            message: Message {
                topic: TopicName::parse_unlimited("devices/d1/telemetry/t").unwrap(),
                payload: Bytes::from_static(b"{\"n\":1}"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: props.map(Arc::new),
            },
            enqueued_ms: 1_700_000_000_000,
            expires_ms: 1_700_000_600_000,
        }
    }

    #[test]
    fn an_entry_comes_back_as_it_was_stored() {
        let plain = entry(None);
        assert_eq!(Entry::decode(&plain.encode()).unwrap(), plain);
        // Properties (every kind is checked by the core's `wire` tests).
        let rich = entry(Some(Properties {
            message_expiry_secs: Some(60),
            ..Properties::default()
        }));
        assert_eq!(Entry::decode(&rich.encode()).unwrap(), rich);
    }

    #[test]
    fn every_truncation_and_damaged_header_is_an_error_not_a_panic() {
        let rich = entry(Some(Properties {
            content_type: Some("x".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        }))
        .encode();
        // Every prefix is an error, never a panic.
        for n in 0..rich.len() {
            assert!(Entry::decode(&rich[..n]).is_err());
        }
        let mut longer = rich.clone();
        longer.push(0);
        assert!(Entry::decode(&longer).is_err());
        let mut bad = rich.clone();
        bad[0] = 9;
        assert_eq!(Entry::decode(&bad), Err(EntryError::Version(9)));
        let mut bad = rich.clone();
        bad[HEADER] |= 0b11;
        assert_eq!(Entry::decode(&bad), Err(EntryError::Qos(3)));
        let mut bad = rich;
        bad[HEADER + 3] = b'+';
        assert!(matches!(Entry::decode(&bad), Err(EntryError::Topic(_))));
        // Every single byte flipped anywhere: no panic.
        let plain = entry(None).encode();
        for i in 0..plain.len() {
            for bit in 0..8 {
                let mut b = plain.clone();
                b[i] ^= 1 << bit;
                let _ = Entry::decode(&b);
            }
        }
    }
}
