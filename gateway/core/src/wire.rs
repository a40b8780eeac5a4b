//! Messages in a small binary form, for the stores that keep them on disk: the
//! upstream outbox, parked sessions and retained commands.
//!
//! Every read checks what is left, so decoding damaged bytes gives an error naming
//! what was wrong, never a panic. Lengths are bounded by the field that carries them.

use crate::message::{Message, Properties, QoS};
use crate::topic::TopicName;
use bytes::Bytes;
use std::sync::Arc;

const QOS_BITS: u8 = 0b0011;
const RETAIN: u8 = 0b0100;
const PROPS: u8 = 0b1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated ({0})")]
    Truncated(&'static str),
    #[error("unknown format {0}")]
    Version(u8),
    #[error("invalid QoS {0}")]
    Qos(u8),
    #[error("invalid topic: {0}")]
    Topic(String),
    #[error("invalid text in {0}")]
    Text(&'static str),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Append a message: flags, topic, properties if any, then the payload with its
/// length (so that messages can follow one another).
pub fn put_message(m: &Message, out: &mut Vec<u8>) {
    let mut flags = m.qos as u8;
    if m.retain {
        flags |= RETAIN;
    }
    if m.properties.is_some() {
        flags |= PROPS;
    }
    out.push(flags);
    put_str(out, m.topic.as_str().as_bytes());
    if let Some(p) = &m.properties {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        put_properties(p, out);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    put_bytes32(out, &m.payload);
}

/// Read a message written by `put_message`.
pub fn message(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let flags = r.u8("flags")?;
    let qos = QoS::from_u8(flags & QOS_BITS).ok_or(WireError::Qos(flags & QOS_BITS))?;
    let topic = r.string("topic")?;
    let topic = TopicName::parse_unlimited(topic).map_err(|e| WireError::Topic(e.to_string()))?;
    let properties = if flags & PROPS != 0 {
        let len = r.u32("properties length")? as usize;
        let mut p = Reader(r.take(len, "properties")?);
        Some(Arc::new(properties(&mut p)?))
    } else {
        None
    };
    let payload = Bytes::copy_from_slice(r.bytes32("payload")?);
    Ok(Message {
        topic,
        payload,
        qos,
        retain: flags & RETAIN != 0,
        properties,
    })
}

/// Append bytes with a 16-bit length (longer input is cut at 64 KiB; every caller's
/// input is bounded far below that by the limits that admitted it).
pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Append bytes with a 32-bit length.
pub fn put_bytes32(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u32::MAX as usize)];
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_properties(p: &Properties, out: &mut Vec<u8>) {
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
    put_opt(out, p.content_type.as_deref().map(str::as_bytes));
    put_opt(
        out,
        p.response_topic.as_ref().map(|t| t.as_str().as_bytes()),
    );
    put_opt(out, p.correlation_data.as_deref());
    let n = p.user_properties.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for (k, v) in &p.user_properties[..n] {
        put_str(out, k.as_bytes());
        put_str(out, v.as_bytes());
    }
}

fn properties(r: &mut Reader<'_>) -> Result<Properties, WireError> {
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
            Some(TopicName::parse_unlimited(t).map_err(|e| WireError::Topic(e.to_string()))?)
        }
    };
    let correlation_data = r.opt_bytes("correlation data")?.map(Bytes::copy_from_slice);
    let n = r.u16("user properties")?;
    let mut user_properties = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        let k = r.string("user property")?.to_string();
        let v = r.string("user property")?.to_string();
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
#[derive(Debug)]
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(WireError::Truncated(what))?;
        self.0 = rest;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_be_bytes(a))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }

    /// Bytes written by `put_str`.
    pub fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }

    /// Bytes written by `put_bytes32`.
    pub fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    /// Text written by `put_str`.
    pub fn string(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes16(what)?).map_err(|_| WireError::Text(what))
    }

    fn opt_bytes(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            _ => self.bytes16(what).map(Some),
        }
    }

    fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>, WireError> {
        match self.opt_bytes(what)? {
            None => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(Some)
                .map_err(|_| WireError::Text(what)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_with(props: Option<Properties>) -> Message {
        Message {
            topic: TopicName::parse_unlimited("devices/d1/telemetry/t").unwrap(),
            payload: Bytes::from_static(b"{\"n\":1}"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: props.map(Arc::new),
        }
    }

    fn rich() -> Message {
        message_with(Some(Properties {
            payload_format_utf8: Some(true),
            message_expiry_secs: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some(TopicName::parse_unlimited("devices/d1/r").unwrap()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("".into(), "".into())],
        }))
    }

    fn roundtrip(m: &Message) -> Message {
        let mut out = Vec::new();
        put_message(m, &mut out);
        let mut r = Reader(&out);
        let back = message(&mut r).unwrap();
        assert!(r.is_empty(), "nothing left over");
        back
    }

    #[test]
    fn messages_come_back_as_they_were_written_one_after_another() {
        for m in [message_with(None), rich()] {
            assert_eq!(roundtrip(&m), m);
        }
        let mut out = Vec::new();
        put_message(&rich(), &mut out);
        put_message(&message_with(None), &mut out);
        let mut r = Reader(&out);
        assert_eq!(message(&mut r).unwrap(), rich());
        assert_eq!(message(&mut r).unwrap(), message_with(None));
        assert!(r.is_empty());
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_an_error_or_a_message_never_a_panic() {
        let mut out = Vec::new();
        put_message(&rich(), &mut out);
        for n in 0..out.len() {
            assert!(
                message(&mut Reader(&out[..n])).is_err(),
                "a prefix of {n} bytes must not decode"
            );
        }
        for i in 0..out.len() {
            for bit in 0..8 {
                let mut b = out.clone();
                b[i] ^= 1 << bit;
                let _ = message(&mut Reader(&b));
            }
        }
        let mut bad = out.clone();
        bad[0] |= QOS_BITS;
        assert_eq!(message(&mut Reader(&bad)), Err(WireError::Qos(3)));
        let mut bad = out;
        bad[3] = b'+';
        assert!(matches!(
            message(&mut Reader(&bad)),
            Err(WireError::Topic(_))
        ));
    }
}
