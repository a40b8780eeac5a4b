//! The PROXY protocol, version 2 (HAProxy's "The PROXY protocol, Versions 1 & 2"):
//! the binary header a load balancer writes before a connection's first byte, naming
//! the client it accepted the connection from.
//!
//! Only a header from a configured load balancer is read (`LoadBalancers`); the
//! parser is written for hostile bytes all the same: it reads exactly the header and
//! nothing past it, never more than `MAX_BODY` bytes of addresses and TLVs, and
//! answers every malformed header with the error that names what was wrong. Version 1
//! (the text form) is refused: a balancer that can send v1 can send v2.

use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What a v1 (text) header starts with.
const V1_START: &[u8; 6] = b"PROXY ";
/// The fixed part: signature, version and command, family and transport, length.
pub const FIXED_LEN: usize = 16;
/// Most bytes of addresses and TLVs taken after the fixed part. IPv6 addresses take
/// 36; the rest is room for a balancer's TLVs (AWS, Azure, GCP and HAProxy send a few
/// dozen bytes). A longer header is refused, not read.
pub const MAX_BODY: usize = 512;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The balancer's own connection (a health check): no client behind it.
    Local,
    /// A client's connection: its address, and the address it connected to.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

/// The transport a listener takes: a header naming the other one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// Why a header was refused. The words go to the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("PROXY protocol version 1 (text) header: only version 2 is accepted")]
    Version1,
    #[error("no PROXY protocol v2 signature at the start of the connection")]
    BadSignature,
    #[error("PROXY protocol version {0} (only version 2 is accepted)")]
    Version(u8),
    #[error("PROXY protocol command {0:#x} (only LOCAL and PROXY exist)")]
    Command(u8),
    #[error("PROXY protocol address family {0:#x} is not defined")]
    Family(u8),
    #[error("PROXY protocol transport {0:#x} is not defined")]
    Protocol(u8),
    #[error(
        "PROXY header names no TCP or UDP client over IPv4 or IPv6 ({0}): a device's address is required"
    )]
    NoAddress(&'static str),
    #[error("PROXY header names a {got:?} connection on a {want:?} listener")]
    WrongTransport { got: Transport, want: Transport },
    #[error("PROXY header length {0} is over the bound of {MAX_BODY} bytes")]
    TooLong(usize),
    #[error("PROXY header length {len} is too short for its {family} addresses ({need} bytes)")]
    TooShort {
        len: usize,
        family: &'static str,
        need: usize,
    },
    #[error("PROXY header TLV at offset {0} runs past the header's length")]
    BadTlv(usize),
    #[error("connection closed within the PROXY header (after {0} bytes)")]
    Truncated(usize),
    #[error("reading the PROXY header failed: {0}")]
    Io(std::io::ErrorKind),
}

/// The fixed part, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fixed {
    local: bool,
    family: u8,
    transport: Option<Transport>,
    len: usize,
}

/// Whether `start` (a connection's first bytes, at least one) is, or begins, a PROXY
/// header of either version. Used on connections from sources that may not send one.
pub fn looks_like_header(start: &[u8]) -> bool {
    let prefix_of = |sig: &[u8]| {
        let n = start.len().min(sig.len());
        n > 0 && start[..n] == sig[..n]
    };
    prefix_of(&SIGNATURE) || prefix_of(V1_START)
}

/// Check the bytes of the fixed part received so far (any length up to 16): an error
/// as soon as they cannot start a valid header, so nothing more is waited for.
fn check_start(start: &[u8]) -> Result<(), HeaderError> {
    let n = start.len().min(SIGNATURE.len());
    if start[..n] != SIGNATURE[..n] {
        let v1 = n.min(V1_START.len());
        if n > 0 && start[..v1] == V1_START[..v1] {
            return Err(HeaderError::Version1);
        }
        return Err(HeaderError::BadSignature);
    }
    if let Some(&b) = start.get(12) {
        if b >> 4 != 2 {
            return Err(HeaderError::Version(b >> 4));
        }
        if b & 0x0F > 1 {
            return Err(HeaderError::Command(b & 0x0F));
        }
    }
    if let Some(&b) = start.get(13) {
        if b >> 4 > 3 {
            return Err(HeaderError::Family(b >> 4));
        }
        if b & 0x0F > 2 {
            return Err(HeaderError::Protocol(b & 0x0F));
        }
    }
    if start.len() >= FIXED_LEN {
        let len = usize::from(u16::from_be_bytes([start[14], start[15]]));
        if len > MAX_BODY {
            return Err(HeaderError::TooLong(len));
        }
    }
    Ok(())
}

fn fixed(bytes: &[u8; FIXED_LEN]) -> Result<Fixed, HeaderError> {
    check_start(bytes)?;
    Ok(Fixed {
        local: bytes[12] & 0x0F == 0,
        family: bytes[13] >> 4,
        transport: match bytes[13] & 0x0F {
            1 => Some(Transport::Stream),
            2 => Some(Transport::Datagram),
            _ => None,
        },
        len: usize::from(u16::from_be_bytes([bytes[14], bytes[15]])),
    })
}

/// The addresses and TLVs after the fixed part (`body` is exactly `fixed.len` bytes).
fn body(fixed: Fixed, body: &[u8], want: Transport) -> Result<Header, HeaderError> {
    // The balancer's own connection: the spec has the receiver discard the address
    // block, whatever it holds (its length is already bounded and read).
    if fixed.local {
        return Ok(Header::Local);
    }
    let (family, need) = match fixed.family {
        1 => ("INET", 12),
        2 => ("INET6", 36),
        0 => return Err(HeaderError::NoAddress("family UNSPEC")),
        _ => return Err(HeaderError::NoAddress("family UNIX")),
    };
    let Some(got) = fixed.transport else {
        return Err(HeaderError::NoAddress("transport UNSPEC"));
    };
    if got != want {
        return Err(HeaderError::WrongTransport { got, want });
    }
    if body.len() < need {
        return Err(HeaderError::TooShort {
            len: body.len(),
            family,
            need,
        });
    }
    // TLVs (type, 16-bit length, value) fill the rest; each must end within it.
    let mut at = need;
    while at < body.len() {
        let Some(&[_, hi, lo]) = body.get(at..at + 3) else {
            return Err(HeaderError::BadTlv(at));
        };
        let next = at + 3 + usize::from(u16::from_be_bytes([hi, lo]));
        if next > body.len() {
            return Err(HeaderError::BadTlv(at));
        }
        at = next;
    }
    let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
    let (source, destination) = if need == 12 {
        let ip = |o: usize| {
            IpAddr::V4(Ipv4Addr::new(
                body[o],
                body[o + 1],
                body[o + 2],
                body[o + 3],
            ))
        };
        (
            SocketAddr::new(ip(0), port(8)),
            SocketAddr::new(ip(4), port(10)),
        )
    } else {
        let ip = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[o..o + 16]);
            IpAddr::V6(Ipv6Addr::from(a)).to_canonical()
        };
        (
            SocketAddr::new(ip(0), port(32)),
            SocketAddr::new(ip(16), port(34)),
        )
    };
    Ok(Header::Proxy {
        source,
        destination,
    })
}

/// Parse a whole header at the start of `bytes` (a datagram, or a test's buffer).
/// Returns the header and how many bytes it took.
pub fn parse(bytes: &[u8], want: Transport) -> Result<(Header, usize), HeaderError> {
    let start = &bytes[..bytes.len().min(FIXED_LEN)];
    check_start(start)?;
    let Ok(head) = <&[u8; FIXED_LEN]>::try_from(start) else {
        return Err(HeaderError::Truncated(bytes.len()));
    };
    let f = fixed(head)?;
    let end = FIXED_LEN + f.len;
    let Some(rest) = bytes.get(FIXED_LEN..end) else {
        return Err(HeaderError::Truncated(bytes.len()));
    };
    Ok((body(f, rest, want)?, end))
}

/// Read one header from the start of a stream: exactly its bytes, nothing past them,
/// and never more than `FIXED_LEN + MAX_BODY`. Bytes that cannot start a header are
/// refused as soon as they arrive. The caller bounds the time.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, HeaderError> {
    let mut head = [0u8; FIXED_LEN];
    let mut got = 0;
    while got < FIXED_LEN {
        let n = r
            .read(&mut head[got..])
            .await
            .map_err(|e| HeaderError::Io(e.kind()))?;
        if n == 0 {
            return Err(HeaderError::Truncated(got));
        }
        got += n;
        check_start(&head[..got])?;
    }
    let f = fixed(&head)?;
    let mut rest = [0u8; MAX_BODY];
    let rest = &mut rest[..f.len];
    let mut got_body = 0;
    while got_body < rest.len() {
        let n = r
            .read(&mut rest[got_body..])
            .await
            .map_err(|e| HeaderError::Io(e.kind()))?;
        if n == 0 {
            return Err(HeaderError::Truncated(FIXED_LEN + got_body));
        }
        got_body += n;
    }
    body(f, rest, Transport::Stream)
}

/// The load balancers one listener takes PROXY headers from, and how long it waits
/// for one.
#[derive(Debug)]
pub struct LoadBalancers {
    nets: Vec<IpNet>,
    pub header_timeout: Duration,
    /// Connections from the balancers whose header has not arrived yet: they hold no
    /// connection slot (the client is not known), so they are bounded here, oldest
    /// shed first for a newcomer (as `source_gate` does for connections that have not
    /// logged in): connections that never send a header cannot keep devices out.
    pending: Arc<Mutex<Waiting>>,
}

/// Connections waiting for their header, by age; each holds the sender whose drop
/// sheds it.
#[derive(Debug)]
struct Waiting {
    cap: usize,
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

impl LoadBalancers {
    /// None when `nets` is empty: the listener takes no header from anyone.
    pub fn new(nets: Vec<IpNet>, header_timeout: Duration, max_pending: usize) -> Option<Self> {
        (!nets.is_empty()).then(|| LoadBalancers {
            nets,
            header_timeout,
            pending: Arc::new(Mutex::new(Waiting {
                cap: max_pending.max(1),
                next: 0,
                waiting: BTreeMap::new(),
            })),
        })
    }

    /// Whether `ip` (the TCP peer) is one of the balancers.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// A place among the connections waiting for their header; at the bound the
    /// oldest waiting one is shed to make room (true when one was).
    pub fn pending(&self) -> (HeaderWait, bool) {
        let (tx, rx) = oneshot::channel();
        let mut w = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut shed = false;
        while w.waiting.len() >= w.cap {
            // Dropping its sender wakes the connection, which ends.
            w.waiting.pop_first();
            shed = true;
        }
        let number = w.next;
        w.next += 1;
        w.waiting.insert(number, tx);
        (
            HeaderWait {
                pending: self.pending.clone(),
                number,
                shed: rx,
            },
            shed,
        )
    }
}

/// Held by a balancer's connection until its header is read: it counts against the
/// bound, and `shed` resolves when a newer connection displaces it.
pub struct HeaderWait {
    pending: Arc<Mutex<Waiting>>,
    number: u64,
    shed: oneshot::Receiver<()>,
}

impl HeaderWait {
    /// Resolves when the connection is shed for a newer one. Cancel-safe.
    pub async fn shed(&mut self) {
        let _ = (&mut self.shed).await;
    }
}

impl Drop for HeaderWait {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .remove(&self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(cmd: u8, proto: u8, tlvs: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(0x10 | proto);
        h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[203, 0, 113, 7, 10, 0, 0, 1]);
        h.extend_from_slice(&4242u16.to_be_bytes());
        h.extend_from_slice(&1883u16.to_be_bytes());
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn a_v4_header_names_the_client_and_ends_where_it_says() {
        let mut bytes = v4(1, 1, &[]);
        let len = bytes.len();
        bytes.extend_from_slice(&[0x10, 0x0C]); // the CONNECT after it
        let (h, used) = parse(&bytes, Transport::Stream).unwrap();
        assert_eq!(used, len);
        assert_eq!(
            h,
            Header::Proxy {
                source: "203.0.113.7:4242".parse().unwrap(),
                destination: "10.0.0.1:1883".parse().unwrap(),
            }
        );
    }

    #[test]
    fn a_v6_header_and_a_v4_mapped_client() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "::ffff:192.0.2.9".parse().unwrap();
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&[0, 80, 0x22, 0xB3]);
        let (header, _) = parse(&h, Transport::Stream).unwrap();
        assert_eq!(
            header,
            Header::Proxy {
                source: "[2001:db8::7]:80".parse().unwrap(),
                // The mapped address is the IPv4 one, so IPv4 bans match it.
                destination: "192.0.2.9:8883".parse().unwrap(),
            }
        );
    }

    #[test]
    fn tlvs_are_skipped_within_the_length_and_one_that_overruns_is_refused() {
        let tlvs = [0x04, 0, 2, 0xAA, 0xBB, 0x05, 0, 0];
        let (h, used) = parse(&v4(1, 1, &tlvs), Transport::Stream).unwrap();
        assert!(matches!(h, Header::Proxy { .. }));
        assert_eq!(used, 16 + 12 + tlvs.len());
        // A TLV claiming 9 bytes where 2 remain.
        let err = parse(&v4(1, 1, &[0x04, 0, 9, 1, 2]), Transport::Stream).unwrap_err();
        assert_eq!(err, HeaderError::BadTlv(12));
        // Two bytes of a TLV's three-byte head.
        let err = parse(&v4(1, 1, &[0x04, 0]), Transport::Stream).unwrap_err();
        assert_eq!(err, HeaderError::BadTlv(12));
    }

    #[test]
    fn local_is_the_balancers_own_connection() {
        let (h, _) = parse(&v4(0, 1, &[]), Transport::Stream).unwrap();
        assert_eq!(h, Header::Local);
        // LOCAL with no address block at all.
        let mut bare = SIGNATURE.to_vec();
        bare.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&bare, Transport::Stream).unwrap().0, Header::Local);
    }

    #[test]
    fn framing_errors_are_named() {
        let good = v4(1, 1, &[]);
        let with = |at: usize, b: u8| {
            let mut h = good.clone();
            h[at] = b;
            parse(&h, Transport::Stream).unwrap_err()
        };
        assert_eq!(with(3, b'X'), HeaderError::BadSignature);
        assert_eq!(with(12, 0x11), HeaderError::Version(1));
        assert_eq!(with(12, 0x31), HeaderError::Version(3));
        assert_eq!(with(12, 0x22), HeaderError::Command(2));
        assert_eq!(with(13, 0x41), HeaderError::Family(4));
        assert_eq!(with(13, 0x13), HeaderError::Protocol(3));
        assert_eq!(with(13, 0x10), HeaderError::NoAddress("transport UNSPEC"));
        assert_eq!(with(13, 0x01), HeaderError::NoAddress("family UNSPEC"));
        assert_eq!(
            with(13, 0x12),
            HeaderError::WrongTransport {
                got: Transport::Datagram,
                want: Transport::Stream
            }
        );
        let mut long = good.clone();
        long[14..16].copy_from_slice(&600u16.to_be_bytes());
        assert_eq!(
            parse(&long, Transport::Stream).unwrap_err(),
            HeaderError::TooLong(600)
        );
        let mut short = good.clone();
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert!(matches!(
            parse(&short, Transport::Stream).unwrap_err(),
            HeaderError::TooShort {
                len: 4,
                need: 12,
                ..
            }
        ));
        assert_eq!(
            parse(&good[..20], Transport::Stream).unwrap_err(),
            HeaderError::Truncated(20)
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Transport::Stream).unwrap_err(),
            HeaderError::Version1
        );
        // An MQTT CONNECT where the header should be.
        assert_eq!(
            parse(&[0x10, 0x0C, 0, 4, b'M'], Transport::Stream).unwrap_err(),
            HeaderError::BadSignature
        );
    }

    #[test]
    fn looks_like_header_knows_both_versions_from_their_first_byte() {
        assert!(looks_like_header(&SIGNATURE[..1]));
        assert!(looks_like_header(&v4(1, 1, &[])));
        assert!(looks_like_header(b"PRO"));
        assert!(looks_like_header(b"PROXY TCP4 "));
        assert!(!looks_like_header(&[0x10, 0x0C])); // MQTT CONNECT
        assert!(!looks_like_header(&[0x16, 0x03, 0x01])); // TLS ClientHello
        assert!(!looks_like_header(b"PRX"));
        assert!(!looks_like_header(b""));
    }

    #[tokio::test]
    async fn read_takes_exactly_the_header_and_refuses_early() {
        let mut bytes = v4(1, 1, &[0x04, 0, 1, 9]);
        bytes.extend_from_slice(b"rest");
        let mut r = &bytes[..];
        let h = read(&mut r).await.unwrap();
        assert!(matches!(h, Header::Proxy { .. }));
        assert_eq!(r, b"rest");
        // A v1 header is refused on its first bytes; nothing after them is consumed.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut tx, b"PROX")
            .await
            .unwrap();
        assert_eq!(read(&mut rx).await.unwrap_err(), HeaderError::Version1);
        // Closed in the middle.
        let mut cut = &bytes[..30];
        assert_eq!(
            read(&mut cut).await.unwrap_err(),
            HeaderError::Truncated(30)
        );
    }

    #[test]
    fn no_input_panics_the_parser() {
        // Every prefix of a valid header and every one-byte change of it.
        let good = v4(1, 1, &[0x04, 0, 2, 1, 2]);
        for n in 0..=good.len() {
            let _ = parse(&good[..n], Transport::Stream);
        }
        for at in 0..good.len() {
            for b in [0u8, 1, 0x0F, 0x10, 0x7F, 0x80, 0xFF] {
                let mut h = good.clone();
                h[at] = b;
                let _ = parse(&h, Transport::Stream);
                let _ = parse(&h, Transport::Datagram);
            }
        }
    }

    #[test]
    fn balancers_match_by_network_and_mapped_addresses() {
        let lb = LoadBalancers::new(
            vec![
                "10.1.0.0/16".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ],
            Duration::from_secs(1),
            4,
        )
        .unwrap();
        assert!(lb.allows("10.1.200.3".parse().unwrap()));
        assert!(lb.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!lb.allows("127.0.0.2".parse().unwrap()));
        assert!(LoadBalancers::new(Vec::new(), Duration::from_secs(1), 4).is_none());
    }
}
