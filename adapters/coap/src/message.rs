//! CoAP messages as the adapter reads them: one datagram of application data becomes a
//! typed message, every option that matters checked once, here, at the edge (coap-lite
//! decodes the bytes). And the answers, built so that a response to a non-confirmable
//! request takes a message id of its own (coap-lite's `CoapResponse::new` would reuse
//! the request's).
//!
//! The URI scheme (SPEC §4):
//! - `POST /t/{path}`: telemetry, published to `devices/{id}/{path}`;
//! - `GET /c` (with Observe): the device's commands.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

/// A request's message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reliability {
    Confirmable,
    NonConfirmable,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/t/{path}`: the topic suffix under `devices/{id}/`.
    Telemetry(String),
    /// `/c`: the device's commands.
    Commands,
    /// Anything else (answered 4.04).
    Unknown,
}

/// A Block1 option (block-wise upload, RFC 7959).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    /// Bytes per block: 16 to 1024.
    pub size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub reliability: Reliability,
    pub message_id: u16,
    pub token: Vec<u8>,
    pub method: RequestType,
    pub route: Route,
    /// Observe: 0 registers, 1 deregisters.
    pub observe: Option<u32>,
    pub block1: Option<Block>,
    /// `?ttd=N`: the device waits N seconds for a command in the response.
    pub ttd: Option<u32>,
    pub payload: Vec<u8>,
}

/// One datagram from a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// An empty confirmable message: a ping, answered with RST.
    Ping {
        message_id: u16,
    },
    Request(Request),
    /// The device acknowledged (or reset) a confirmable message of ours.
    Ack {
        message_id: u16,
    },
    Reset {
        message_id: u16,
    },
    /// A response from the device (we send no requests): ignored.
    Response,
}

/// Why a datagram was not read; `reset` is the message id to answer RST with (RFC 7252
/// §4.2: a confirmable message that cannot be processed is rejected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub reason: &'static str,
    pub reset: Option<u16>,
}

/// Longest `/t/` path taken (levels and bytes; the core checks the topic again).
const MAX_PATH: usize = 1024;

fn uint(bytes: &[u8]) -> Option<u32> {
    if bytes.len() > 4 {
        return None;
    }
    Some(bytes.iter().fold(0u32, |v, b| (v << 8) | u32::from(*b)))
}

/// Read one datagram.
pub fn parse(datagram: &[u8]) -> Result<Incoming, Malformed> {
    // The message id, if the header is there: what a rejection answers.
    // (A message of another version is ignored, not reset: RFC 7252 §3.)
    let confirmable_id = (datagram.len() >= 4 && datagram[0] >> 4 == 0x4)
        .then(|| u16::from_be_bytes([datagram[2], datagram[3]]));
    let bad = |reason| Malformed {
        reason,
        reset: confirmable_id,
    };
    if datagram.len() < 4 || datagram[0] >> 6 != 1 {
        return Err(bad("not a CoAP 1 message"));
    }
    let packet = Packet::from_bytes(datagram).map_err(|_| bad("malformed CoAP message"))?;
    let message_id = packet.header.message_id;
    let kind = packet.header.get_type();
    let method = match packet.header.code {
        MessageClass::Empty => {
            return match kind {
                MessageType::Confirmable if packet.payload.is_empty() => {
                    Ok(Incoming::Ping { message_id })
                }
                MessageType::Acknowledgement => Ok(Incoming::Ack { message_id }),
                MessageType::Reset => Ok(Incoming::Reset { message_id }),
                _ => Err(bad("an empty message that is not a ping, ACK or RST")),
            };
        }
        MessageClass::Request(method) => method,
        MessageClass::Response(_) => return Ok(Incoming::Response),
        MessageClass::Reserved(_) => return Err(bad("a reserved message code")),
    };
    let reliability = match kind {
        MessageType::Confirmable => Reliability::Confirmable,
        MessageType::NonConfirmable => Reliability::NonConfirmable,
        _ => return Err(bad("a request carried in an ACK or RST")),
    };
    let mut segments = Vec::new();
    let mut path_bytes = 0;
    if let Some(list) = packet.get_option(CoapOption::UriPath) {
        for s in list {
            path_bytes += s.len() + 1;
            if path_bytes > MAX_PATH {
                return Err(bad("Uri-Path too long"));
            }
            segments.push(std::str::from_utf8(s).map_err(|_| bad("Uri-Path not UTF-8"))?);
        }
    }
    let route = match segments.as_slice() {
        ["t", rest @ ..] if !rest.is_empty() => {
            if rest.iter().any(|s| s.is_empty()) {
                return Err(bad("an empty Uri-Path segment"));
            }
            Route::Telemetry(rest.join("/"))
        }
        ["c"] => Route::Commands,
        _ => Route::Unknown,
    };
    let observe = match packet.get_first_option(CoapOption::Observe) {
        None => None,
        Some(v) => Some(
            uint(v)
                .filter(|_| v.len() <= 3)
                .ok_or_else(|| bad("Observe longer than 3 bytes"))?,
        ),
    };
    let block1 = match packet.get_first_option(CoapOption::Block1) {
        None => None,
        Some(v) => {
            let v = uint(v)
                .filter(|_| v.len() <= 3)
                .ok_or_else(|| bad("Block1 longer than 3 bytes"))?;
            let szx = v & 0x7;
            if szx == 7 {
                return Err(bad("Block1 with the reserved size exponent 7"));
            }
            Some(Block {
                num: v >> 4,
                more: v & 0x8 != 0,
                size: 1 << (szx + 4),
            })
        }
    };
    let mut ttd = None;
    if let Some(list) = packet.get_option(CoapOption::UriQuery) {
        for q in list {
            if let Some(n) = q.strip_prefix(b"ttd=") {
                let n = std::str::from_utf8(n)
                    .ok()
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| bad("ttd is not a number of seconds"))?;
                ttd = Some(n);
            }
        }
    }
    Ok(Incoming::Request(Request {
        reliability,
        message_id,
        token: packet.get_token().to_vec(),
        method,
        route,
        observe,
        block1,
        ttd,
        payload: packet.payload,
    }))
}

/// RST for a confirmable message we will not process (or a ping).
pub fn reset(message_id: u16) -> Vec<u8> {
    let [a, b] = message_id.to_be_bytes();
    vec![0x70, 0x00, a, b]
}

/// An answer to `request`: piggybacked on the ACK of a confirmable request; a
/// non-confirmable response with its own `message_id` to a non-confirmable one.
/// `max_age` (seconds) tells a device refused for its rate when to try again;
/// a diagnostic payload says what was wrong (RFC 7252 §5.5.2).
pub fn response(
    request: &Request,
    code: ResponseType,
    payload: &[u8],
    max_age: Option<u32>,
    message_id: u16,
) -> Vec<u8> {
    let mut packet = Packet::new();
    match request.reliability {
        Reliability::Confirmable => {
            packet.header.set_type(MessageType::Acknowledgement);
            packet.header.message_id = request.message_id;
        }
        Reliability::NonConfirmable => {
            packet.header.set_type(MessageType::NonConfirmable);
            packet.header.message_id = message_id;
        }
    }
    packet.header.code = MessageClass::Response(code);
    packet.set_token(request.token.clone());
    if let Some(age) = max_age {
        packet.add_option(CoapOption::MaxAge, age.to_be_bytes().to_vec());
    }
    packet.payload = payload.to_vec();
    // Only options we set and a bounded payload: encoding cannot fail but for size.
    packet.to_bytes_unlimited().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: MessageType, method: RequestType, path: &[&str]) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = 0x1234;
        p.set_token(vec![1, 2, 3]);
        for s in path {
            p.add_option(CoapOption::UriPath, s.as_bytes().to_vec());
        }
        p
    }

    #[test]
    fn telemetry_commands_and_their_options_are_read() {
        let mut p = request(
            MessageType::Confirmable,
            RequestType::Post,
            &["t", "telemetry", "temp"],
        );
        p.add_option(CoapOption::UriQuery, b"ttd=30".to_vec());
        p.add_option(CoapOption::Block1, vec![0x2a]); // num 2, more, 64 bytes
        p.payload = b"21.5".to_vec();
        let Incoming::Request(r) = parse(&p.to_bytes().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(r.route, Route::Telemetry("telemetry/temp".into()));
        assert_eq!(
            (r.reliability, r.message_id, r.token.as_slice()),
            (Reliability::Confirmable, 0x1234, &[1u8, 2, 3][..])
        );
        assert_eq!(r.ttd, Some(30));
        assert_eq!(
            r.block1,
            Some(Block {
                num: 2,
                more: true,
                size: 64
            })
        );
        assert_eq!(r.payload, b"21.5");
        let mut g = request(MessageType::NonConfirmable, RequestType::Get, &["c"]);
        g.add_option(CoapOption::Observe, vec![]);
        let Incoming::Request(r) = parse(&g.to_bytes().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!((r.route, r.observe), (Route::Commands, Some(0)));
        let other = request(MessageType::Confirmable, RequestType::Get, &["x"]);
        let Incoming::Request(r) = parse(&other.to_bytes().unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(r.route, Route::Unknown);
    }

    #[test]
    fn pings_acks_and_resets_are_told_apart() {
        assert_eq!(
            parse(&[0x40, 0, 0, 7]),
            Ok(Incoming::Ping { message_id: 7 })
        );
        assert_eq!(parse(&[0x60, 0, 0, 8]), Ok(Incoming::Ack { message_id: 8 }));
        assert_eq!(
            parse(&[0x70, 0, 0, 9]),
            Ok(Incoming::Reset { message_id: 9 })
        );
        assert_eq!(reset(9), [0x70, 0, 0, 9]);
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reset_when_confirmable_never_a_panic() {
        for (bytes, reset) in [
            (&[0x40u8, 0x02][..], None),
            (&[0x80, 0x02, 0, 1][..], None),          // version 2
            (&[0x48, 0x02, 0, 1, 1][..], Some(1)),    // token length 8, 1 byte there
            (&[0x40, 0x02, 0, 1, 0xb1][..], Some(1)), // Uri-Path option cut short
            (&[0x50, 0x02, 0, 1, 0xb1][..], None),    // the same, non-confirmable
        ] {
            let err = parse(bytes).unwrap_err();
            assert_eq!(err.reset, reset, "{bytes:?}: {err:?}");
        }
        let mut p = request(MessageType::Confirmable, RequestType::Post, &["t", "x"]);
        p.add_option(CoapOption::Block1, vec![0x0f]); // SZX 7
        assert!(parse(&p.to_bytes().unwrap()).is_err());
        let empty_level = request(
            MessageType::Confirmable,
            RequestType::Post,
            &["t", "a", "", "b"],
        );
        assert!(parse(&empty_level.to_bytes().unwrap()).is_err());
        // Every prefix and every single-bit flip of a real request: an answer, no panic.
        let mut p = request(
            MessageType::Confirmable,
            RequestType::Post,
            &["t", "telemetry"],
        );
        p.add_option(CoapOption::UriQuery, b"ttd=5".to_vec());
        p.payload = b"{\"t\":21}".to_vec();
        let bytes = p.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            let _ = parse(&bytes[..cut]);
        }
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let _ = parse(&b);
        }
    }

    #[test]
    fn a_non_confirmable_request_gets_a_response_with_its_own_message_id() {
        let mut p = request(MessageType::NonConfirmable, RequestType::Post, &["t", "x"]);
        p.header.message_id = 77;
        let Incoming::Request(non) = parse(&p.to_bytes().unwrap()).unwrap() else {
            panic!()
        };
        let out =
            Packet::from_bytes(&response(&non, ResponseType::Changed, b"", None, 500)).unwrap();
        assert_eq!(out.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(out.header.message_id, 500);
        assert_eq!(out.get_token(), &[1, 2, 3]);
        let mut c = p.clone();
        c.header.set_type(MessageType::Confirmable);
        let Incoming::Request(con) = parse(&c.to_bytes().unwrap()).unwrap() else {
            panic!()
        };
        let out = Packet::from_bytes(&response(
            &con,
            ResponseType::TooManyRequests,
            b"rate",
            Some(3),
            500,
        ))
        .unwrap();
        assert_eq!(out.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(out.header.message_id, 77);
        assert_eq!(
            out.header.code,
            MessageClass::Response(ResponseType::TooManyRequests)
        );
        assert_eq!(
            out.get_first_option(CoapOption::MaxAge),
            Some(&vec![0, 0, 0, 3])
        );
        assert_eq!(out.payload, b"rate");
    }
}
