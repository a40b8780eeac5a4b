//! One message as the outbox stores it: the message, when it was taken and when it
//! expires, in a small versioned binary form. Decoding checks every length and never
//! panics: a damaged entry is an error, not a crash.

use bytes::Bytes;
use portcullis_core::message::{Message, Properties, QoS};
use portcullis_core::topic::TopicName;
use std::sync::Arc;

const VERSION: u8 = 1;
const QOS_BITS: u8 = 0b0011;
const RETAIN: u8 = 0b0100;
const PROPS: u8 = 0b1000;
/// Version, flags, two timestamps, the topic's length.
const HEADER: usize = 1 + 1 + 8 + 8 + 2;

/// A message in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub message: Message,
    /// When the outbox took it, and when it is dropped if still undelivered (Unix ms).
    pub enqueued_ms: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry truncated ({0})")]
    Truncated(&'static str),
    #[error("unknown entry format {0}")]
    Version(u8),
    #[error("invalid QoS {0}")]
    Qos(u8),
    #[error("invalid topic: {0}")]
    Topic(String),
    #[error("invalid text in {0}")]
    Text(&'static str),
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let m = &self.message;
        let topic = m.topic.as_str().as_bytes();
        let mut out = Vec::with_capacity(HEADER + topic.len() + m.payload.len() + 8);
        out.push(VERSION);
        let mut flags = m.qos as u8;
        if m.retain {
            flags |= RETAIN;
        }
        if m.properties.is_some() {
            flags |= PROPS;
        }
        out.push(flags);
        out.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        // Topics are bounded far below 64 KiB by the limits that admitted them.
        out.extend_from_slice(&(topic.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        out.extend_from_slice(&topic[..topic.len().min(usize::from(u16::MAX))]);
        if let Some(p) = &m.properties {
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            encode_properties(p, &mut out);
            let len = (out.len() - at - 4) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        out.extend_from_slice(&m.payload);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        let mut r = Reader(bytes);
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(EntryError::Version(version));
        }
        let flags = r.u8("flags")?;
        let qos = QoS::from_u8(flags & QOS_BITS).ok_or(EntryError::Qos(flags & QOS_BITS))?;
        let enqueued_ms = r.u64("timestamp")?;
        let expires_ms = r.u64("expiry")?;
        let topic_len = usize::from(r.u16("topic length")?);
        let topic = r.str(topic_len, "topic")?;
        let topic =
            TopicName::parse_unlimited(topic).map_err(|e| EntryError::Topic(e.to_string()))?;
        let properties = if flags & PROPS != 0 {
            let len = r.u32("properties length")? as usize;
            let mut p = Reader(r.take(len, "properties")?);
            Some(Arc::new(decode_properties(&mut p)?))
        } else {
            None
        };
        Ok(Entry {
            message: Message {
                topic,
                payload: Bytes::copy_from_slice(r.0),
                qos,
                retain: flags & RETAIN != 0,
                properties,
            },
            enqueued_ms,
            expires_ms,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        None => out.push(0),
        Some(s) => {
            let s = &s[..s.len().min(usize::from(u16::MAX))];
            out.push(1);
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s);
        }
    }
}

fn encode_properties(p: &Properties, out: &mut Vec<u8>) {
    out.push(match p.payload_format_utf8 {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
    match p.message_expiry_secs {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            out.extend_from_slice(&s.to_be_bytes());
        }
    }
    put_str(out, p.content_type.as_deref().map(str::as_bytes));
    put_str(
        out,
        p.response_topic.as_ref().map(|t| t.as_str().as_bytes()),
    );
    put_str(out, p.correlation_data.as_deref());
    let n = p.user_properties.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for (k, v) in &p.user_properties[..n] {
        put_str(out, Some(k.as_bytes()));
        put_str(out, Some(v.as_bytes()));
    }
}

fn decode_properties(r: &mut Reader<'_>) -> Result<Properties, EntryError> {
    let payload_format_utf8 = match r.u8("payload format")? {
        0 => None,
        1 => Some(false),
        _ => Some(true),
    };
    let message_expiry_secs = match r.u8("expiry flag")? {
        0 => None,
        _ => Some(r.u32("message expiry")?),
    };
    let content_type = r.opt_str("content type")?.map(str::to_string);
    let response_topic = match r.opt_str("response topic")? {
        None => None,
        Some(t) => {
            Some(TopicName::parse_unlimited(t).map_err(|e| EntryError::Topic(e.to_string()))?)
        }
    };
    let correlation_data = r.opt_bytes("correlation data")?.map(Bytes::copy_from_slice);
    let n = r.u16("user properties")?;
    let mut user_properties = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        let k = r.opt_str("user property")?.unwrap_or_default().to_string();
        let v = r.opt_str("user property")?.unwrap_or_default().to_string();
        user_properties.push((k, v));
    }
    Ok(Properties {
        payload_format_utf8,
        message_expiry_secs,
        content_type,
        response_topic,
        correlation_data,
        user_properties,
    })
}

/// Reads a byte slice front to back; every read checks what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EntryError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(EntryError::Truncated(what))?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, EntryError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, EntryError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, EntryError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, EntryError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, n: usize, what: &'static str) -> Result<&'a str, EntryError> {
        std::str::from_utf8(self.take(n, what)?).map_err(|_| EntryError::Text(what))
    }
    fn opt_bytes(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, EntryError> {
        match self.u8(what)? {
            0 => Ok(None),
            _ => {
                let n = usize::from(self.u16(what)?);
                self.take(n, what).map(Some)
            }
        }
    }
    fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>, EntryError> {
        match self.opt_bytes(what)? {
            None => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(Some)
                .map_err(|_| EntryError::Text(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let rich = entry(Some(Properties {
            payload_format_utf8: Some(true),
            message_expiry_secs: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some(TopicName::parse_unlimited("devices/d1/r").unwrap()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("".into(), "".into())],
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
        // Every prefix decodes to an error or (past the header and properties) to a
        // shorter payload; none panics.
        for n in 0..rich.len() {
            let _ = Entry::decode(&rich[..n]);
        }
        assert!(Entry::decode(&rich[..HEADER - 1]).is_err());
        let mut bad = rich.clone();
        bad[0] = 9;
        assert_eq!(Entry::decode(&bad), Err(EntryError::Version(9)));
        let mut bad = rich.clone();
        bad[1] |= QOS_BITS;
        assert_eq!(Entry::decode(&bad), Err(EntryError::Qos(3)));
        let mut bad = rich;
        bad[HEADER] = b'+';
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
