//! A small client-side MQTT 3.1.1 / 5 codec: what a simulated device or service sends,
//! and what it needs to read back. Encoding appends to a caller's buffer so a load
//! generator can batch many packets into one write; decoding borrows from the read
//! buffer and allocates nothing.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Version {
    #[serde(rename = "mqtt311")]
    V4,
    #[serde(rename = "mqtt5")]
    V5,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    RemainingLength,
    #[error("packet of {0} bytes is over the client's limit")]
    TooLarge(usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

/// Packets a client reads. Codes are the MQTT 3.1.1 return code or MQTT 5 reason code.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        code: u8,
    },
    Publish {
        topic: &'a str,
        qos: u8,
        pkid: u16,
        payload: &'a [u8],
    },
    PubAck {
        pkid: u16,
        code: u8,
    },
    SubAck {
        pkid: u16,
        codes: &'a [u8],
    },
    PingResp,
    Disconnect {
        code: u8,
    },
    /// Any other packet type (its first byte).
    Other(u8),
}

/// What a CONNECT carries.
#[derive(Debug, Clone, Default)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub keep_alive: u16,
    pub clean: bool,
}

fn put_len(buf: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

fn len_of_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn connect(buf: &mut Vec<u8>, v: Version, c: &Connect) {
    let props = if v == Version::V5 { 1 } else { 0 };
    let mut len = 10 + props + 2 + c.client_id.len();
    if let Some(u) = c.username {
        len += 2 + u.len();
    }
    if let Some(p) = c.password {
        len += 2 + p.len();
    }
    buf.push(0x10);
    put_len(buf, len);
    put_str(buf, b"MQTT");
    buf.push(if v == Version::V5 { 5 } else { 4 });
    let mut flags = 0u8;
    if c.clean {
        flags |= 0x02;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    buf.push(flags);
    buf.extend_from_slice(&c.keep_alive.to_be_bytes());
    if v == Version::V5 {
        buf.push(0); // no properties
    }
    put_str(buf, c.client_id.as_bytes());
    if let Some(u) = c.username {
        put_str(buf, u.as_bytes());
    }
    if let Some(p) = c.password {
        put_str(buf, p);
    }
}

/// Bytes a PUBLISH of this topic and payload takes on the wire.
pub fn publish_len(v: Version, topic: &str, qos: u8, payload: usize) -> usize {
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + (v == Version::V5) as usize + payload;
    1 + len_of_len(len) + len
}

pub fn publish(buf: &mut Vec<u8>, v: Version, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    let len =
        2 + topic.len() + if qos > 0 { 2 } else { 0 } + (v == Version::V5) as usize + payload.len();
    buf.push(0x30 | (qos << 1));
    put_len(buf, len);
    put_str(buf, topic.as_bytes());
    if qos > 0 {
        buf.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == Version::V5 {
        buf.push(0);
    }
    buf.extend_from_slice(payload);
}

pub fn subscribe(buf: &mut Vec<u8>, v: Version, pkid: u16, filters: &[(&str, u8)]) {
    let props = (v == Version::V5) as usize;
    let len = 2 + props + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
    buf.push(0x82);
    put_len(buf, len);
    buf.extend_from_slice(&pkid.to_be_bytes());
    if props == 1 {
        buf.push(0);
    }
    for (f, qos) in filters {
        put_str(buf, f.as_bytes());
        buf.push(*qos);
    }
}

pub fn puback(buf: &mut Vec<u8>, pkid: u16) {
    // Without a reason code: success, in both versions.
    buf.extend_from_slice(&[0x40, 2]);
    buf.extend_from_slice(&pkid.to_be_bytes());
}

pub fn pingreq(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0xC0, 0]);
}

pub fn disconnect(buf: &mut Vec<u8>) {
    // Normal disconnection in both versions.
    buf.extend_from_slice(&[0xE0, 0]);
}

/// Decode the first packet in `buf`: `Ok(None)` when more bytes are needed, otherwise
/// the packet and how many bytes it took.
pub fn decode(
    buf: &[u8],
    v: Version,
    max: usize,
) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(DecodeError::RemainingLength);
        }
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7F) as usize) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = i + len;
    if total > max {
        return Err(DecodeError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let first = buf[0];
    let body = &buf[i..total];
    let packet = match first >> 4 {
        2 => {
            let code = *body.get(1).ok_or(DecodeError::Malformed("CONNACK"))?;
            Packet::ConnAck { code }
        }
        3 => decode_publish(first, body, v)?,
        4 => {
            let pkid = u16_at(body, 0).ok_or(DecodeError::Malformed("PUBACK"))?;
            Packet::PubAck {
                pkid,
                code: body.get(2).copied().unwrap_or(0),
            }
        }
        9 => {
            let pkid = u16_at(body, 0).ok_or(DecodeError::Malformed("SUBACK"))?;
            let mut at = 2;
            if v == Version::V5 {
                at = skip_properties(body, at).ok_or(DecodeError::Malformed("SUBACK"))?;
            }
            Packet::SubAck {
                pkid,
                codes: &body[at..],
            }
        }
        13 => Packet::PingResp,
        14 => Packet::Disconnect {
            code: body.first().copied().unwrap_or(0),
        },
        _ => Packet::Other(first),
    };
    Ok(Some((packet, total)))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Skip an MQTT 5 property block starting at `at`; the index after it.
fn skip_properties(b: &[u8], mut at: usize) -> Option<usize> {
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let byte = *b.get(at)?;
        at += 1;
        len |= ((byte & 0x7F) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
        if shift > 21 {
            return None;
        }
    }
    let end = at.checked_add(len)?;
    (end <= b.len()).then_some(end)
}

fn decode_publish(first: u8, body: &[u8], v: Version) -> Result<Packet<'_>, DecodeError> {
    const BAD: DecodeError = DecodeError::Malformed("PUBLISH");
    let qos = (first >> 1) & 3;
    let tlen = u16_at(body, 0).ok_or(BAD)? as usize;
    let mut at = 2 + tlen;
    let topic = body.get(2..at).ok_or(BAD)?;
    let topic = std::str::from_utf8(topic).map_err(|_| BAD)?;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16_at(body, at).ok_or(BAD)?;
        at += 2;
    }
    if v == Version::V5 {
        at = skip_properties(body, at).ok_or(BAD)?;
    }
    Ok(Packet::Publish {
        topic,
        qos,
        pkid,
        payload: &body[at..],
    })
}

/// A name for an MQTT 5 reason code (or, where the two agree, a 3.1.1 return code), as
/// the report shows it.
pub fn reason_name(v: Version, code: u8) -> &'static str {
    if v == Version::V4 {
        return match code {
            0 => "success",
            1 => "unacceptable_protocol_version",
            2 => "identifier_rejected",
            3 => "server_unavailable",
            4 => "bad_user_name_or_password",
            5 => "not_authorized",
            0x80 => "failure",
            _ => "unknown",
        };
    }
    match code {
        0x00 => "success",
        0x01 => "granted_qos_1",
        0x02 => "granted_qos_2",
        0x04 => "disconnect_with_will",
        0x10 => "no_matching_subscribers",
        0x80 => "unspecified_error",
        0x81 => "malformed_packet",
        0x82 => "protocol_error",
        0x83 => "implementation_specific_error",
        0x84 => "unsupported_protocol_version",
        0x85 => "client_identifier_not_valid",
        0x86 => "bad_user_name_or_password",
        0x87 => "not_authorized",
        0x88 => "server_unavailable",
        0x89 => "server_busy",
        0x8A => "banned",
        0x8B => "server_shutting_down",
        0x8C => "bad_authentication_method",
        0x8D => "keep_alive_timeout",
        0x8E => "session_taken_over",
        0x8F => "topic_filter_invalid",
        0x90 => "topic_name_invalid",
        0x93 => "receive_maximum_exceeded",
        0x94 => "topic_alias_invalid",
        0x95 => "packet_too_large",
        0x96 => "message_rate_too_high",
        0x97 => "quota_exceeded",
        0x98 => "administrative_action",
        0x99 => "payload_format_invalid",
        0x9F => "connection_rate_exceeded",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8], v: Version) -> (Packet<'_>, usize) {
        decode(buf, v, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn publish_round_trips_in_both_versions() {
        for v in [Version::V4, Version::V5] {
            for qos in [0, 1] {
                let mut buf = Vec::new();
                publish(&mut buf, v, "devices/a/telemetry", qos, 7, b"{\"t\":1}");
                assert_eq!(buf.len(), publish_len(v, "devices/a/telemetry", qos, 7));
                let (p, used) = one(&buf, v);
                assert_eq!(used, buf.len());
                assert_eq!(
                    p,
                    Packet::Publish {
                        topic: "devices/a/telemetry",
                        qos,
                        pkid: if qos > 0 { 7 } else { 0 },
                        payload: b"{\"t\":1}"
                    }
                );
            }
        }
    }

    #[test]
    fn large_remaining_lengths_are_encoded_and_decoded() {
        let payload = vec![b'x'; 300_000];
        let mut buf = Vec::new();
        publish(&mut buf, Version::V5, "t", 1, 1, &payload);
        assert_eq!(buf.len(), publish_len(Version::V5, "t", 1, payload.len()));
        let (p, used) = one(&buf, Version::V5);
        assert_eq!(used, buf.len());
        assert!(matches!(p, Packet::Publish { payload: got, .. } if got.len() == 300_000));
        assert_eq!(
            decode(&buf, Version::V5, 1000),
            Err(DecodeError::TooLarge(buf.len()))
        );
    }

    #[test]
    fn partial_packets_ask_for_more() {
        let mut buf = Vec::new();
        publish(&mut buf, Version::V4, "a/b", 1, 1, b"hello");
        for cut in 0..buf.len() {
            assert_eq!(
                decode(&buf[..cut], Version::V4, 1 << 20),
                Ok(None),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn connect_is_what_a_broker_expects() {
        let mut buf = Vec::new();
        connect(
            &mut buf,
            Version::V5,
            &Connect {
                client_id: "dev-1",
                username: Some("dev-1"),
                password: Some(b"pw"),
                keep_alive: 30,
                clean: true,
            },
        );
        let expected: &[u8] = &[
            0x10, 29, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xC2, 0, 30, 0, 0, 5, b'd', b'e', b'v',
            b'-', b'1', 0, 5, b'd', b'e', b'v', b'-', b'1', 0, 2, b'p', b'w',
        ];
        assert_eq!(buf, expected);
    }

    #[test]
    fn acknowledgements_carry_their_reason_codes() {
        // v5 PUBACK with reason 0x97 and an empty property block.
        let (p, _) = one(&[0x40, 4, 0, 9, 0x97, 0], Version::V5);
        assert_eq!(
            p,
            Packet::PubAck {
                pkid: 9,
                code: 0x97
            }
        );
        assert_eq!(reason_name(Version::V5, 0x97), "quota_exceeded");
        // v5 PUBACK without a reason code means success.
        let (p, _) = one(&[0x40, 2, 0, 9], Version::V5);
        assert_eq!(p, Packet::PubAck { pkid: 9, code: 0 });
        // v5 SUBACK: properties skipped, codes kept.
        let (p, _) = one(&[0x90, 5, 0, 1, 0, 0x01, 0x87], Version::V5);
        assert_eq!(
            p,
            Packet::SubAck {
                pkid: 1,
                codes: &[0x01, 0x87]
            }
        );
        let (p, _) = one(&[0x20, 3, 0, 0x86, 0], Version::V5);
        assert_eq!(p, Packet::ConnAck { code: 0x86 });
        let (p, _) = one(&[0xE0, 2, 0x8E, 0], Version::V5);
        assert_eq!(p, Packet::Disconnect { code: 0x8E });
        let (p, _) = one(&[0x20, 2, 0, 4], Version::V4);
        assert_eq!(p, Packet::ConnAck { code: 4 });
        assert_eq!(reason_name(Version::V4, 4), "bad_user_name_or_password");
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(
            decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], Version::V4, 1 << 30),
            Err(DecodeError::RemainingLength)
        );
        assert_eq!(
            decode(&[0x30, 3, 0, 9, b'a'], Version::V4, 1 << 20),
            Err(DecodeError::Malformed("PUBLISH"))
        );
        assert_eq!(
            decode(&[0x40, 1, 0], Version::V4, 1 << 20),
            Err(DecodeError::Malformed("PUBACK"))
        );
    }
}
