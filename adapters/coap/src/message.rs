//! CoAP messages as the adapter reads them (RFC 7252, with Observe, RFC 7641, and
//! Block1, RFC 7959): one datagram of application data becomes a typed message, every
//! rule and every option that matters checked once, here, at the edge, by a
//! bounds-checked reader of our own (coap-lite's decoder lets a payload marker with no
//! payload through, and cannot say which options came in which order). And the
//! answers, encoded here so that they cannot fail: a response to a non-confirmable
//! request takes a message id of its own (coap-lite's `CoapResponse::new` would reuse
//! the request's).
//!
//! The URI scheme (SPEC §4):
//! - `POST /t/{path}`: telemetry, published to `devices/{id}/{path}`;
//! - `GET /c` (with Observe): the device's commands.

use crate::reply::{Exchange, Reply};
use coap_lite::{MessageClass, RequestType, ResponseType};

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
    /// `/r/{n}`: the result of command `n`, which asked for a response.
    Response(u32),
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

/// A request refused for one of its options before the rest of it is read (RFC 7252
/// §5.4.1): a critical option not understood, repeated though it may not be (§5.4.5),
/// or of a length outside its range (§5.4.3), is answered 4.02 Bad Option; a request
/// for a proxy, 5.05 Proxying Not Supported (§5.7.2).
#[derive(Debug, Clone, PartialEq)]
pub struct BadOption {
    pub reliability: Reliability,
    pub message_id: u16,
    pub token: Vec<u8>,
    /// The option's number.
    pub option: u16,
    /// `ResponseType::BadOption` or `ResponseType::ProxyingNotSupported`.
    pub code: ResponseType,
    /// Why, as the answer's diagnostic payload says it.
    pub reason: &'static str,
}

// `ResponseType` is a plain enum whose equality is total.
impl Eq for BadOption {}

impl BadOption {
    /// The answer: piggybacked on the ACK of a confirmable request; a non-confirmable
    /// response with its own `message_id` to a non-confirmable one.
    pub fn response(&self, message_id: u16) -> Vec<u8> {
        let exchange = Exchange {
            reliability: self.reliability,
            message_id: self.message_id,
            token: self.token.clone(),
        };
        Reply::refusal(self.code, self.reason).answer(&exchange, message_id)
    }
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
    /// A response from the device, not confirmable (we send no requests): ignored.
    Response,
}

/// Why a datagram was not read, and how it is answered: `reset` is the message id to
/// answer RST with (RFC 7252 §4.2: a confirmable message that cannot be processed is
/// rejected; anything else that cannot be, an ACK or RST above all, is ignored, §4.3);
/// `bad_option`, a request refused for an option, answered with its `response` (4.02
/// or 5.05; never with RST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub reason: &'static str,
    pub reset: Option<u16>,
    pub bad_option: Option<BadOption>,
}

/// Longest `/t/` path taken (levels and bytes; the core checks the topic again).
const MAX_PATH: usize = 1024;

/// Message types (RFC 7252 §3).
const CON: u8 = 0;
const NON: u8 = 1;
const ACK: u8 = 2;
const RST: u8 = 3;

/// Option numbers (RFC 7252 §5.10, RFC 7641, RFC 7959).
const URI_HOST: u16 = 3;
const OBSERVE: u16 = 6;
const URI_PORT: u16 = 7;
const URI_PATH: u16 = 11;
const URI_QUERY: u16 = 15;
const ACCEPT: u16 = 17;
const BLOCK2: u16 = 23;
const BLOCK1: u16 = 27;
const PROXY_URI: u16 = 35;
const PROXY_SCHEME: u16 = 39;

/// A message's fields as they are on the wire (RFC 7252 §3), every length checked.
struct Wire<'a> {
    kind: u8,
    code: u8,
    message_id: u16,
    token: &'a [u8],
    /// In the order they came, numbers ascending.
    options: Vec<(u16, &'a [u8])>,
    payload: &'a [u8],
}

/// A bounds-checked cursor over a datagram.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self, cut: &'static str) -> Result<u8, &'static str> {
        let b = *self.bytes.get(self.at).ok_or(cut)?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize, cut: &'static str) -> Result<&'a [u8], &'static str> {
        let end = self.at.checked_add(n).ok_or(cut)?;
        let taken = self.bytes.get(self.at..end).ok_or(cut)?;
        self.at = end;
        Ok(taken)
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at.min(self.bytes.len())..]
    }

    /// An option's delta or length: the nibble, extended by one or two bytes.
    fn extended(&mut self, nibble: u8, reserved: &'static str) -> Result<usize, &'static str> {
        const CUT: &str = "an option cut short";
        Ok(match nibble {
            13 => 13 + usize::from(self.byte(CUT)?),
            14 => {
                let b = self.take(2, CUT)?;
                269 + usize::from(u16::from_be_bytes([b[0], b[1]]))
            }
            15 => return Err(reserved),
            n => usize::from(n),
        })
    }
}

impl<'a> Wire<'a> {
    fn read(datagram: &'a [u8]) -> Result<Wire<'a>, &'static str> {
        let mut c = Cursor {
            bytes: datagram,
            at: 0,
        };
        let first = c.byte("not a CoAP 1 message")?;
        let code = c.byte("not a CoAP 1 message")?;
        let id = c.take(2, "not a CoAP 1 message")?;
        if first >> 6 != 1 {
            return Err("not a CoAP 1 message");
        }
        let tkl = usize::from(first & 0x0f);
        if tkl > 8 {
            return Err("a token length of 9 to 15 (reserved)");
        }
        let token = c.take(tkl, "a token cut short")?;
        let mut options = Vec::new();
        let mut number = 0usize;
        let mut payload: &[u8] = &[];
        while let Ok(b) = c.byte("") {
            if b == 0xff {
                payload = c.rest();
                if payload.is_empty() {
                    return Err("a payload marker with no payload");
                }
                break;
            }
            number += c.extended(b >> 4, "an option delta of 15 (reserved)")?;
            let length = c.extended(b & 0x0f, "an option length of 15 (reserved)")?;
            let value = c.take(length, "an option cut short")?;
            let number = u16::try_from(number).map_err(|_| "an option number past 65535")?;
            options.push((number, value));
        }
        Ok(Wire {
            kind: (first >> 4) & 0x3,
            code,
            message_id: u16::from_be_bytes([id[0], id[1]]),
            token,
            options,
            payload,
        })
    }

    fn all(&self, number: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.options
            .iter()
            .filter(move |(n, _)| *n == number)
            .map(|(_, v)| *v)
    }

    fn first(&self, number: u16) -> Option<&'a [u8]> {
        self.all(number).next()
    }

    /// The first option a request may not carry, by RFC 7252 §5.4: its number, the
    /// answer's code and why.
    fn bad_option(&self) -> Option<(u16, ResponseType, &'static str)> {
        let mut previous = None;
        for &(number, value) in &self.options {
            let repeated = previous == Some(number);
            previous = Some(number);
            // (Allowed length, repeatable) of the critical options understood here.
            let rule = match number {
                URI_HOST => Some((1..=255, false)),
                URI_PORT => Some((0..=2, false)),
                URI_PATH | URI_QUERY => Some((0..=255, true)),
                ACCEPT => Some((0..=2, false)),
                BLOCK2 | BLOCK1 => Some((0..=3, false)),
                _ => None,
            };
            match rule {
                Some((lengths, repeatable)) => {
                    if !lengths.contains(&value.len()) {
                        return Some((
                            number,
                            ResponseType::BadOption,
                            "a critical option of a length outside its range",
                        ));
                    }
                    if repeated && !repeatable {
                        return Some((
                            number,
                            ResponseType::BadOption,
                            "a critical option repeated that may appear once",
                        ));
                    }
                }
                None if number == PROXY_URI || number == PROXY_SCHEME => {
                    return Some((
                        number,
                        ResponseType::ProxyingNotSupported,
                        "this endpoint is not a proxy",
                    ));
                }
                // Odd numbers are critical (§5.4.6): one not understood refuses the
                // request. Even ones are elective: ignored when not understood.
                None if number % 2 == 1 => {
                    return Some((
                        number,
                        ResponseType::BadOption,
                        "a critical option not understood",
                    ));
                }
                None => {}
            }
        }
        None
    }
}

fn uint(bytes: &[u8]) -> Option<u32> {
    if bytes.len() > 4 {
        return None;
    }
    Some(bytes.iter().fold(0u32, |v, b| (v << 8) | u32::from(*b)))
}

/// Whether a Uri-Path segment would change a topic's meaning: a level separator,
/// a wildcard, or a control character (NUL included).
fn unsafe_segment(segment: &str) -> bool {
    segment
        .chars()
        .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
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
        bad_option: None,
    };
    let wire = Wire::read(datagram).map_err(bad)?;
    let message_id = wire.message_id;
    let method = match MessageClass::from(wire.code) {
        MessageClass::Empty => {
            // An empty message is its 4-byte header alone (§4.1).
            if datagram.len() != 4 {
                return Err(bad("an empty message with a token, options or payload"));
            }
            return match wire.kind {
                CON => Ok(Incoming::Ping { message_id }),
                ACK => Ok(Incoming::Ack { message_id }),
                RST => Ok(Incoming::Reset { message_id }),
                _ => Err(bad("an empty non-confirmable message")),
            };
        }
        MessageClass::Request(method) => method,
        MessageClass::Response(_) => {
            return match wire.kind {
                RST => Err(bad("a reset that is not empty")),
                // We send no requests: a confirmable response answers none (§5.3.2).
                CON => Err(bad("a confirmable response to no request of ours")),
                _ => Ok(Incoming::Response),
            };
        }
        // A method code we do not know is still a request: it is answered 4.05
        // (RFC 7252 §5.8), not reset.
        MessageClass::Reserved(code) if code >> 5 == 0 => RequestType::UnKnown,
        MessageClass::Reserved(_) => return Err(bad("a reserved message code")),
    };
    let reliability = match wire.kind {
        CON => Reliability::Confirmable,
        NON => Reliability::NonConfirmable,
        _ => return Err(bad("a request carried in an ACK or RST")),
    };
    if let Some((option, code, reason)) = wire.bad_option() {
        return Err(Malformed {
            reason,
            reset: None,
            bad_option: Some(BadOption {
                reliability,
                message_id,
                token: wire.token.to_vec(),
                option,
                code,
                reason,
            }),
        });
    }
    let mut segments = Vec::new();
    let mut path_bytes = 0;
    for s in wire.all(URI_PATH) {
        path_bytes += s.len() + 1;
        if path_bytes > MAX_PATH {
            return Err(bad("Uri-Path too long"));
        }
        let s = std::str::from_utf8(s).map_err(|_| bad("Uri-Path not UTF-8"))?;
        if unsafe_segment(s) {
            return Err(bad(
                "a Uri-Path segment with '/', '+', '#' or a control character",
            ));
        }
        segments.push(s);
    }
    let route = match segments.as_slice() {
        ["t", rest @ ..] if !rest.is_empty() => {
            if rest.iter().any(|s| s.is_empty()) {
                return Err(bad("an empty Uri-Path segment"));
            }
            Route::Telemetry(rest.join("/"))
        }
        ["c"] => Route::Commands,
        ["r", n] => match n.parse() {
            Ok(n) => Route::Response(n),
            Err(_) => Route::Unknown,
        },
        _ => Route::Unknown,
    };
    let observe = match wire.first(OBSERVE) {
        None => None,
        Some(v) if v.len() <= 3 => uint(v),
        Some(_) => return Err(bad("Observe longer than 3 bytes")),
    };
    let block1 = match wire.first(BLOCK1) {
        None => None,
        // At most 3 bytes: longer is a bad option, refused above.
        Some(v) => {
            let v = uint(v).unwrap_or_default();
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
    for q in wire.all(URI_QUERY) {
        if let Some(n) = q.strip_prefix(b"ttd=") {
            let n = std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| bad("ttd is not a number of seconds"))?;
            ttd = Some(n);
        }
    }
    Ok(Incoming::Request(Request {
        reliability,
        message_id,
        token: wire.token.to_vec(),
        method,
        route,
        observe,
        block1,
        ttd,
        payload: wire.payload.to_vec(),
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
///
/// Never empty: encoding cannot fail. A token longer than 8 bytes (which `parse`
/// never makes) cannot be sent: the answer is then a 5.00 without a token, on the
/// same message id (a confirmable request's ACK still stops its retransmissions).
pub fn response(
    request: &Request,
    code: ResponseType,
    payload: &[u8],
    max_age: Option<u32>,
    message_id: u16,
) -> Vec<u8> {
    let exchange = Exchange::of(request);
    let mut reply = Reply::refusal(code, "");
    reply.payload = payload.to_vec();
    if let Some(age) = max_age {
        reply = reply.max_age(age);
    }
    reply.answer(&exchange, message_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::{CoapOption, MessageType, Packet};

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
        for (path, route) in [
            (&["r", "7"][..], Route::Response(7)),
            (&["r", "x"][..], Route::Unknown),
            (&["r"][..], Route::Unknown),
        ] {
            let p = request(MessageType::Confirmable, RequestType::Post, path);
            let Ok(Incoming::Request(r)) = parse(&p.to_bytes().unwrap()) else {
                panic!("{path:?}");
            };
            assert_eq!(r.route, route, "{path:?}");
        }
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
        assert_eq!(out.get_first_option(CoapOption::MaxAge), Some(&vec![3]));
        assert_eq!(out.payload, b"rate");
    }

    /// `request(...)` with options added as (number, value).
    fn with_options(kind: MessageType, options: &[(u16, &[u8])]) -> Vec<u8> {
        let mut p = request(kind, RequestType::Post, &["t", "x"]);
        for (n, v) in options {
            p.add_option(CoapOption::from(*n), v.to_vec());
        }
        p.to_bytes().unwrap()
    }

    #[test]
    fn a_critical_option_not_understood_is_answered_bad_option_never_processed() {
        // If-Match, If-None-Match, OSCORE, Q-Block1, and numbers nobody assigned.
        for n in [1u16, 5, 9, 19, 61, 2049] {
            let err = parse(&with_options(MessageType::Confirmable, &[(n, b"v")])).unwrap_err();
            assert_eq!(err.reset, None, "never RST for a request: {n}");
            let bad = err
                .bad_option
                .clone()
                .unwrap_or_else(|| panic!("{n}: {err:?}"));
            assert_eq!((bad.option, bad.code), (n, ResponseType::BadOption));
            let out = Packet::from_bytes(&bad.response(900)).unwrap();
            assert_eq!(out.header.get_type(), MessageType::Acknowledgement);
            assert_eq!(out.header.message_id, 0x1234);
            assert_eq!(out.get_token(), &[1, 2, 3]);
            assert_eq!(
                out.header.code,
                MessageClass::Response(ResponseType::BadOption)
            );
            assert_eq!(out.payload, bad.reason.as_bytes());
        }
        // Non-confirmable: a response of its own.
        let err = parse(&with_options(MessageType::NonConfirmable, &[(1, b"")])).unwrap_err();
        let out = Packet::from_bytes(&err.bad_option.unwrap().response(900)).unwrap();
        assert_eq!(out.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(out.header.message_id, 900);
        // A request for a proxy: 5.05.
        for n in [35u16, 39] {
            let err = parse(&with_options(MessageType::Confirmable, &[(n, b"coap")])).unwrap_err();
            let bad = err.bad_option.unwrap();
            assert_eq!(bad.code, ResponseType::ProxyingNotSupported);
            let out = Packet::from_bytes(&bad.response(1)).unwrap();
            assert_eq!(
                out.header.code,
                MessageClass::Response(ResponseType::ProxyingNotSupported)
            );
        }
    }

    #[test]
    fn critical_options_understood_are_taken_and_elective_ones_unknown_ignored() {
        let ok = with_options(
            MessageType::Confirmable,
            &[
                (3, b"gw.example"), // Uri-Host
                (4, b"etag"),       // ETag, elective
                (7, &[22, 51]),     // Uri-Port
                (12, &[50]),        // Content-Format
                (17, &[50]),        // Accept
                (23, &[0x02]),      // Block2
                (60, &[1, 0]),      // Size1
                (258, &[2]),        // No-Response
                (2048, b"x"),       // unassigned, even: elective
            ],
        );
        let Ok(Incoming::Request(r)) = parse(&ok) else {
            panic!("{:?}", parse(&ok))
        };
        assert_eq!(r.route, Route::Telemetry("x".into()));
    }

    #[test]
    fn a_critical_option_repeated_or_of_a_length_out_of_range_is_a_bad_option() {
        for options in [
            &[(27u16, &[0x02][..]), (27, &[0x12][..])][..], // Block1 twice
            &[(3, b"a"), (3, b"b")],                        // Uri-Host twice
            &[(7, &[0, 0, 1][..])],                         // Uri-Port of 3 bytes
            &[(27, &[0, 0, 0, 2][..])],                     // Block1 of 4 bytes
            &[(3, b"")],                                    // Uri-Host empty
            &[(17, &[0, 0, 50][..])],                       // Accept of 3 bytes
        ] {
            let err = parse(&with_options(MessageType::Confirmable, options)).unwrap_err();
            let bad = err
                .bad_option
                .clone()
                .unwrap_or_else(|| panic!("{options:?}: {err:?}"));
            assert_eq!(bad.code, ResponseType::BadOption, "{options:?}");
        }
        // Uri-Path and Uri-Query repeat.
        let mut p = request(
            MessageType::Confirmable,
            RequestType::Post,
            &["t", "a", "b"],
        );
        p.add_option(CoapOption::UriQuery, b"ttd=1".to_vec());
        p.add_option(CoapOption::UriQuery, b"x=2".to_vec());
        assert!(matches!(
            parse(&p.to_bytes().unwrap()),
            Ok(Incoming::Request(_))
        ));
    }

    #[test]
    fn a_confirmable_message_that_is_no_request_is_reset_and_a_bad_option_in_it_too() {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.header.message_id = 77;
        p.add_option(CoapOption::IfMatch, vec![1]);
        let err = parse(&p.to_bytes().unwrap()).unwrap_err();
        assert_eq!((err.reset, err.bad_option), (Some(77), None));
        // Non-confirmable, or piggybacked on an ACK: ignored.
        p.header.set_type(MessageType::NonConfirmable);
        assert_eq!(parse(&p.to_bytes().unwrap()), Ok(Incoming::Response));
        p.header.set_type(MessageType::Acknowledgement);
        assert_eq!(parse(&p.to_bytes().unwrap()), Ok(Incoming::Response));
    }

    #[test]
    fn an_unknown_method_is_a_request_to_answer_4_05_not_a_datagram_to_reset() {
        let mut p = request(MessageType::Confirmable, RequestType::Get, &["t", "a"]);
        p.header.code = MessageClass::Reserved(0x08);
        match parse(&p.to_bytes().unwrap()) {
            Ok(Incoming::Request(r)) => assert_eq!(r.method, RequestType::UnKnown),
            other => panic!("expected a request, got {other:?}"),
        }
        // A code of a reserved class is no request: reset.
        p.header.code = MessageClass::Reserved(0xE0);
        assert_eq!(
            parse(&p.to_bytes().unwrap()).unwrap_err().reset,
            Some(0x1234)
        );
    }

    #[test]
    fn uri_path_segments_that_would_change_a_topic_are_refused() {
        for segment in [
            "a/b",
            "a+b",
            "#",
            "x#",
            "a\0b",
            "\x7f",
            "\u{85}",
            "tab\there",
        ] {
            let p = request(MessageType::Confirmable, RequestType::Post, &["t", segment]);
            let err = parse(&p.to_bytes().unwrap()).unwrap_err();
            assert!(
                err.reason.contains("Uri-Path segment"),
                "{segment:?}: {err:?}"
            );
            assert_eq!(err.reset, Some(0x1234));
        }
        let fine = request(
            MessageType::Confirmable,
            RequestType::Post,
            &["t", "é-ok_1.2"],
        );
        assert!(matches!(
            parse(&fine.to_bytes().unwrap()),
            Ok(Incoming::Request(_))
        ));
    }

    #[test]
    fn an_ack_or_reset_with_anything_after_its_header_is_ignored_never_reset() {
        for bytes in [
            &[0x61, 0, 0, 8, 1][..],       // ACK with a token
            &[0x60, 0, 0, 8, 0xff, 1][..], // ACK with a payload
            &[0x60, 0, 0, 8, 0x11, 0][..], // ACK with an option
            &[0x71, 0, 0, 9, 1][..],       // RST with a token
            &[0x70, 0, 0, 9, 0xff, 1][..], // RST with a payload
            &[0x70, 0x45, 0, 9][..],       // RST that is a response
            &[0x70, 0x01, 0, 9][..],       // RST that is a request
        ] {
            let err = parse(bytes).unwrap_err();
            assert_eq!(
                (err.reset, err.bad_option.is_some()),
                (None, false),
                "{bytes:?}"
            );
        }
        // A confirmable empty message with bytes after its header: rejected.
        assert_eq!(parse(&[0x41, 0, 0, 5, 1]).unwrap_err().reset, Some(5));
        assert_eq!(parse(&[0x40, 0, 0, 5, 0xff, 1]).unwrap_err().reset, Some(5));
    }

    #[test]
    fn a_payload_marker_with_no_payload_or_a_reserved_nibble_is_malformed() {
        for bytes in [
            &[0x40, 0x02, 0, 1, 0xff][..],    // marker, no payload
            &[0x40, 0x02, 0, 1, 0xf1, 0][..], // delta 15
            &[0x40, 0x02, 0, 1, 0xbf][..],    // length 15
            &[0x49, 0x02, 0, 1][..],          // token length 9
        ] {
            assert_eq!(parse(bytes).unwrap_err().reset, Some(1), "{bytes:?}");
        }
    }

    #[test]
    fn max_age_takes_the_shortest_integer() {
        let p = request(MessageType::Confirmable, RequestType::Post, &["t", "x"]);
        let Ok(Incoming::Request(r)) = parse(&p.to_bytes().unwrap()) else {
            panic!()
        };
        for (age, bytes) in [
            (0u32, &[][..]),
            (1, &[1][..]),
            (255, &[255][..]),
            (256, &[1, 0][..]),
            (65_536, &[1, 0, 0][..]),
            (u32::MAX, &[255, 255, 255, 255][..]),
        ] {
            let out = response(&r, ResponseType::TooManyRequests, b"", Some(age), 1);
            let out = Packet::from_bytes(&out).unwrap();
            assert_eq!(
                out.get_first_option(CoapOption::MaxAge).map(Vec::as_slice),
                Some(bytes),
                "{age}"
            );
        }
    }

    #[test]
    fn a_response_is_never_empty_even_when_the_request_cannot_be_answered_as_asked() {
        let p = request(MessageType::Confirmable, RequestType::Post, &["t", "x"]);
        let Ok(Incoming::Request(mut r)) = parse(&p.to_bytes().unwrap()) else {
            panic!()
        };
        // A code that is no response code: 5.00 instead.
        let out = Packet::from_bytes(&response(&r, ResponseType::UnKnown, b"", None, 1)).unwrap();
        assert_eq!(
            out.header.code,
            MessageClass::Response(ResponseType::InternalServerError)
        );
        // A token no message can carry (only a hand-made request has one): 5.00 on
        // the request's ACK, without a token.
        r.token = vec![7; 9];
        let out = response(&r, ResponseType::Changed, b"ok", None, 1);
        assert_eq!(out, [0x60, 0xa0, 0x12, 0x34]);
    }

    /// A small xorshift: deterministic cases without another crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Valid messages of every kind, to mutate.
    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = vec![
            vec![0x40, 0, 0, 1],
            vec![0x60, 0, 0, 2],
            vec![0x70, 0, 0, 3],
        ];
        let mut p = request(
            MessageType::Confirmable,
            RequestType::Post,
            &["t", "a", "b"],
        );
        p.add_option(CoapOption::UriQuery, b"ttd=5".to_vec());
        p.add_option(CoapOption::Block1, vec![0x1a]);
        p.payload = b"{\"t\":21.5}".to_vec();
        seeds.push(p.to_bytes().unwrap());
        let mut g = request(MessageType::NonConfirmable, RequestType::Get, &["c"]);
        g.add_option(CoapOption::Observe, vec![]);
        g.add_option(CoapOption::Accept, vec![50]);
        seeds.push(g.to_bytes().unwrap());
        seeds.push(with_options(
            MessageType::Confirmable,
            &[(1, b"e"), (35, b"coap://x")],
        ));
        seeds.push(with_options(
            MessageType::Confirmable,
            &[(2048, &[0; 300][..])],
        ));
        let mut r = Packet::new();
        r.header.set_type(MessageType::Acknowledgement);
        r.header.code = MessageClass::Response(ResponseType::Content);
        r.payload = b"x".to_vec();
        seeds.push(r.to_bytes().unwrap());
        seeds
    }

    /// Whatever `parse` makes of a datagram, never a panic; and every answer it calls
    /// for is a whole message. Which answer it was: request, bad option, RST, none.
    fn check(datagram: &[u8], rng: &mut Rng) -> usize {
        let (kind, answer) = match parse(datagram) {
            Ok(Incoming::Request(r)) => {
                let max_age = rng.next().is_multiple_of(2).then(|| rng.next() as u32);
                (
                    0,
                    response(&r, ResponseType::Changed, b"diagnostic", max_age, 7),
                )
            }
            Err(Malformed {
                bad_option: Some(b),
                ..
            }) => (1, b.response(7)),
            Err(Malformed {
                reset: Some(id), ..
            }) => (2, reset(id)),
            _ => return 3,
        };
        assert!(answer.len() >= 4, "{datagram:?}");
        assert!(Wire::read(&answer).is_ok(), "{datagram:?} -> {answer:?}");
        kind
    }

    #[test]
    fn a_hundred_thousand_random_and_mutated_datagrams_never_panic_and_get_whole_answers() {
        let mut rng = Rng(0x853c_49e6_748f_ea9b);
        let seeds = seeds();
        let mut d = Vec::with_capacity(512);
        let mut outcomes = [0usize; 4];
        for case in 0..120_000 {
            d.clear();
            if case % 3 == 0 {
                // Random bytes, most of them with a CoAP 1 header.
                let len = rng.below(48);
                d.extend((0..len).map(|_| rng.next() as u8));
                if !d.is_empty() && case % 2 == 0 {
                    d[0] = 0x40 | (d[0] & 0x3f);
                }
            } else {
                d.extend_from_slice(&seeds[rng.below(seeds.len())]);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(d.len().max(1));
                    match rng.below(5) {
                        0 if !d.is_empty() => d[at] ^= 1 << rng.below(8),
                        1 if !d.is_empty() => d[at] = rng.next() as u8,
                        2 => d.truncate(at),
                        3 => d.insert(at.min(d.len()), rng.next() as u8),
                        _ => d.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
                    }
                }
            }
            outcomes[check(&d, &mut rng)] += 1;
        }
        // Each kind of answer was called for many times over.
        let [requests, bad_options, resets, _] = outcomes;
        assert!(
            requests > 5_000 && bad_options > 1_000 && resets > 5_000,
            "{outcomes:?}"
        );
    }
}
