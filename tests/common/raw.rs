//! A raw MQTT client for what real clients refuse to send: hand-made frames,
//! malformed packets, chosen source addresses.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::from(TcpStream::connect(addr).expect("connect"))
    }

    /// Connect, or None if nothing listens there (yet).
    pub fn try_connect(addr: SocketAddr) -> Option<Raw> {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .ok()
            .map(Raw::from)
    }

    /// Connect from a chosen loopback source address.
    pub fn connect_from(addr: SocketAddr, source: IpAddr) -> Raw {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(source, 0)).unwrap();
            socket.connect(addr).await.expect("connect")
        });
        let std = stream.into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        Raw::from(std)
    }

    fn from(stream: TcpStream) -> Raw {
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // The gateway may already have closed; the caller checks what comes back.
        let _ = self.stream.write_all(bytes);
    }

    pub fn send_v4(&mut self, packet: v4::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        self.send(&out);
    }

    pub fn send_v5(&mut self, packet: v5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        self.send(&out);
    }

    /// Read until a whole frame is buffered; None when the connection closed first
    /// or nothing came within the timeout.
    fn fill(&mut self, timeout: Duration, have_frame: impl Fn(&BytesMut) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if have_frame(&self.buf) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub fn recv_v4(&mut self, timeout: Duration) -> Option<v4::Packet> {
        let ok = self.fill(timeout, |b| {
            rumqttc::mqttbytes::check(b.iter(), usize::MAX).is_ok()
        });
        ok.then(|| v4::Packet::read(&mut self.buf, usize::MAX).expect("decodable frame"))
    }

    pub fn recv_v5(&mut self, timeout: Duration) -> Option<v5::Packet> {
        let ok = self.fill(timeout, |b| v5::check(b.iter(), None).is_ok());
        if !ok {
            return None;
        }
        // A DISCONNECT with no properties: rumqttc wants a body; read the code by hand.
        if self.buf.len() >= 3 && self.buf[0] == 0xE0 {
            let len = self.buf[1] as usize;
            let reason = self.buf[2];
            let _ = self.buf.split_to(2 + len);
            return Some(v5::Packet::Disconnect(v5::Disconnect {
                reason_code: reason_code(reason),
                properties: None,
            }));
        }
        Some(v5::Packet::read(&mut self.buf, None).expect("decodable frame"))
    }

    /// True when the gateway closes the connection within `timeout` (any frames it
    /// sends before closing are returned in `frames`).
    pub fn closed_within(&mut self, timeout: Duration) -> (bool, Vec<u8>) {
        let deadline = Instant::now() + timeout;
        let mut got = self.buf.to_vec();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (false, got);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return (true, got),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return (false, got);
                }
                Err(_) => return (true, got),
            }
        }
    }

    /// MQTT 3.1.1 CONNECT; returns the CONNACK return code byte.
    pub fn connect_v4(&mut self, client_id: &str, login: Option<(&str, &str)>) -> Option<u8> {
        let mut c = v4::Connect::new(client_id);
        c.keep_alive = 30;
        if let Some((u, p)) = login {
            c.set_login(u, p);
        }
        self.send_v4(v4::Packet::Connect(c));
        match self.recv_v4(Duration::from_secs(5)) {
            Some(v4::Packet::ConnAck(a)) => Some(a.code as u8),
            _ => None,
        }
    }

    /// MQTT 5 CONNECT with everything chosen by the caller; returns the CONNACK.
    pub fn connect_v5_full(
        &mut self,
        connect: v5::Connect,
        will: Option<v5::LastWill>,
        login: Option<(&str, &str)>,
    ) -> Option<v5::ConnAck> {
        let login = login.map(|(u, p)| v5::Login {
            username: u.to_string(),
            password: p.to_string(),
        });
        self.send_v5(v5::Packet::Connect(connect, will, login));
        match self.recv_v5(Duration::from_secs(5)) {
            Some(v5::Packet::ConnAck(a)) => Some(a),
            _ => None,
        }
    }

    /// MQTT 5 CONNECT; returns the CONNACK reason.
    pub fn connect_v5(
        &mut self,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> Option<v5::ConnectReturnCode> {
        let c = v5::Connect {
            keep_alive: 30,
            client_id: client_id.to_string(),
            clean_start: true,
            properties: None,
        };
        let login = login.map(|(u, p)| v5::Login {
            username: u.to_string(),
            password: p.to_string(),
        });
        self.send_v5(v5::Packet::Connect(c, None, login));
        match self.recv_v5(Duration::from_secs(5)) {
            Some(v5::Packet::ConnAck(a)) => Some(a.code),
            _ => None,
        }
    }
}

fn reason_code(code: u8) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match code {
        0x00 => D::NormalDisconnection,
        0x81 => D::MalformedPacket,
        0x82 => D::ProtocolError,
        0x84 => D::ImplementationSpecificError,
        0x87 => D::NotAuthorized,
        0x8B => D::ServerShuttingDown,
        0x8D => D::KeepAliveTimeout,
        0x8E => D::SessionTakenOver,
        0x90 => D::TopicNameInvalid,
        0x94 => D::TopicAliasInvalid,
        0x93 => D::ReceiveMaximumExceeded,
        0x95 => D::PacketTooLarge,
        0x96 => D::MessageRateTooHigh,
        0x97 => D::QuotaExceeded,
        0x98 => D::AdministrativeAction,
        _ => D::UnspecifiedError,
    }
}

/// A v4 PUBLISH frame with any topic bytes at all.
pub fn publish_v4_raw(topic: &[u8], payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

/// An MQTT 5 DISCONNECT frame with a reason code and raw properties (identifier,
/// value pairs), whatever their length.
pub fn disconnect_v5_raw(reason: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = vec![reason];
    body.extend(vbi(properties.len()));
    body.extend_from_slice(properties);
    frame(0xE0, &body)
}

/// A frame: its first byte, the remaining length, then the body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![first];
    frame.extend(vbi(body.len()));
    frame.extend_from_slice(body);
    frame
}

/// An MQTT variable byte integer.
fn vbi(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}
