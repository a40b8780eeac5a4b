//! A CoAP-over-DTLS client: what a constrained device does, for the simulator, the
//! benchmark and the tests. DTLS 1.2 with a pre-shared key (dimpl as the client, on
//! its own UDP socket), confirmable requests retransmitted per RFC 7252 until their
//! answer comes, and notifications acknowledged.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// RFC 7252 §4.8: the first retransmission after ACK_TIMEOUT, doubling, MAX_RETRANSMIT.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// dimpl's own handshake deadline. Every wait here is bounded by the caller's
/// `within`; dimpl's default (40 s) would end a handshake that a stalling device
/// resumes later (`stall`, `resume`).
const DTLS_HANDSHAKE_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Notifications kept for the caller at most (the oldest go first).
const MAX_KEPT: usize = 64;
/// How long the gateway's first flight may take to arrive whole, once it starts.
const FLIGHT_GAP: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("DTLS: {0}")]
    Dtls(String),
    #[error("no DTLS session within {0:?} (wrong key, unknown identity, or refused)")]
    HandshakeTimeout(Duration),
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error("not a CoAP message")]
    Malformed,
}

struct Key(Vec<u8>);

impl PskResolver for Key {
    fn resolve(&self, _: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

/// An answer (or a notification) from the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub kind: MessageType,
    pub message_id: u16,
    pub code: ResponseType,
    pub token: Vec<u8>,
    pub payload: Vec<u8>,
    /// Max-Age, if given.
    pub max_age: Option<u32>,
    /// Observe, if given.
    pub observe: Option<u32>,
    /// Location-Path segments, joined with `/`.
    pub location: String,
    /// Location-Query entries.
    pub query: Vec<String>,
}

impl Response {
    /// A datagram of application data read as a response, if it is one.
    pub fn read(datagram: &[u8]) -> Option<Response> {
        let p = Packet::from_bytes(datagram).ok()?;
        let MessageClass::Response(code) = p.header.code else {
            return None;
        };
        let uint = |v: &Vec<u8>| v.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b));
        let location = p
            .get_option(CoapOption::LocationPath)
            .map(|l| {
                l.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default();
        let query = p
            .get_option(CoapOption::LocationQuery)
            .map(|l| {
                l.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Some(Response {
            query,
            kind: p.header.get_type(),
            message_id: p.header.message_id,
            code,
            token: p.get_token().to_vec(),
            max_age: p.get_first_option(CoapOption::MaxAge).map(uint),
            observe: p.get_first_option(CoapOption::Observe).map(uint),
            payload: p.payload,
            location,
        })
    }
}

/// A request to send.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: RequestType,
    /// `t/telemetry/temp`, `c`: segments separated by `/`, a query after `?`.
    pub path: &'a str,
    pub payload: &'a [u8],
    pub confirmable: bool,
    pub observe: Option<u32>,
}

impl<'a> Request<'a> {
    pub fn post(path: &'a str, payload: &'a [u8]) -> Request<'a> {
        Request {
            method: RequestType::Post,
            path,
            payload,
            confirmable: true,
            observe: None,
        }
    }
}

/// A device's DTLS settings: its PSK identity and key. Building them takes
/// milliseconds (dimpl checks its crypto provider each time), so a device that
/// handshakes often, or a generator of many, makes them once.
#[derive(Clone)]
pub struct Credentials(Arc<Config>);

impl Credentials {
    pub fn new(identity: &str, key: &[u8]) -> Result<Credentials, ClientError> {
        let config = Config::builder()
            .with_psk_client(identity.as_bytes().to_vec(), Arc::new(Key(key.to_vec())))
            .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .handshake_timeout(DTLS_HANDSHAKE_LIMIT)
            .build()
            .map_err(|e| ClientError::Dtls(e.to_string()))?;
        Ok(Credentials(Arc::new(config)))
    }
}

/// One device's DTLS session with the gateway.
pub struct Client {
    dtls: Dtls,
    socket: UdpSocket,
    server: SocketAddr,
    buf: Vec<u8>,
    connected: bool,
    /// Datagrams of application data received and not yet read.
    inbox: VecDeque<Vec<u8>>,
    next_id: u16,
    next_token: u32,
    /// Every datagram this client put on the wire, if asked to keep them (a replay).
    pub captured: Option<Vec<Vec<u8>>>,
    /// Messages of the gateway's that came during an exchange and were not its
    /// answer (notifications), acknowledged if confirmable: for the caller to read.
    pub notifications: VecDeque<Response>,
    /// The gateway's first flight, received and not yet answered (`stall`).
    held: Vec<Vec<u8>>,
}

impl Client {
    /// Handshake with `server` as `identity` with `key`, from a new socket on loopback.
    pub async fn connect(
        server: SocketAddr,
        identity: &str,
        key: &[u8],
        within: Duration,
    ) -> Result<Client, ClientError> {
        let bind: SocketAddr = if server.is_ipv4() {
            ([127, 0, 0, 1], 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = UdpSocket::bind(bind).await?;
        let mut client = Client::start(socket, server, identity, key)?;
        client.handshake(within).await?;
        Ok(client)
    }

    /// A client on `socket` whose ClientHello is ready, the handshake not yet run
    /// (`handshake` runs it; a hostile device may stop midway instead).
    pub fn start(
        socket: UdpSocket,
        server: SocketAddr,
        identity: &str,
        key: &[u8],
    ) -> Result<Client, ClientError> {
        Client::start_with(socket, server, &Credentials::new(identity, key)?)
    }

    /// `start`, with credentials made before.
    pub fn start_with(
        socket: UdpSocket,
        server: SocketAddr,
        credentials: &Credentials,
    ) -> Result<Client, ClientError> {
        let now = Instant::now();
        let mut dtls = Dtls::new_12_psk(credentials.0.clone(), now);
        dtls.set_active(true);
        dtls.handle_timeout(now)
            .map_err(|e| ClientError::Dtls(e.to_string()))?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(Client {
            dtls,
            socket,
            server,
            buf: vec![0; 4096],
            connected: false,
            inbox: VecDeque::new(),
            next_id: seed as u16,
            next_token: seed,
            captured: None,
            notifications: VecDeque::new(),
            held: Vec::new(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Send what dimpl has for the wire; keep what it has for us.
    async fn flush(&mut self) -> Result<(), ClientError> {
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => {
                    if let Some(c) = &mut self.captured {
                        c.push(p.to_vec());
                    }
                    self.socket.send_to(p, self.server).await?;
                }
                Output::Connected => self.connected = true,
                Output::ApplicationData(d) => self.inbox.push_back(d.to_vec()),
                Output::Timeout(_) => return Ok(()),
                Output::CloseNotify => {
                    return Err(ClientError::Dtls("the gateway closed the session".into()));
                }
                _ => {}
            }
        }
    }

    /// Wait up to `within` for one datagram and feed it to dimpl (and its clock).
    async fn step(&mut self, within: Duration) -> Result<(), ClientError> {
        let mut buf = [0u8; 4096];
        if let Ok(r) = tokio::time::timeout(within, self.socket.recv_from(&mut buf)).await {
            let (n, _) = r?;
            // A record dimpl refuses (damaged, replayed) is dropped, as DTLS does.
            let _ = self.dtls.handle_packet(&buf[..n]);
        }
        self.dtls
            .handle_timeout(Instant::now())
            .map_err(|e| ClientError::Dtls(e.to_string()))?;
        self.flush().await
    }

    /// Run the handshake to its end, or fail after `within`.
    pub async fn handshake(&mut self, within: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + within;
        self.flush().await?;
        while !self.connected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::HandshakeTimeout(within));
            }
            self.step(left.min(Duration::from_millis(50))).await?;
        }
        Ok(())
    }

    /// Begin the handshake and stop where a stalling device stops: the ClientHello,
    /// the cookie exchange, then the gateway's first flight received and held,
    /// unanswered. True once that flight came within `within`: the gateway then holds
    /// a handshake for this client (until its deadline); false if it never answered.
    pub async fn stall(&mut self, within: Duration) -> Result<bool, ClientError> {
        let deadline = Instant::now() + within;
        self.flush().await?;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(r) = tokio::time::timeout(left, self.socket.recv_from(&mut buf)).await else {
                return Ok(false);
            };
            let d = &buf[..r?.0];
            // A handshake record (22): its first message's type after the 13-byte
            // record header. A HelloVerifyRequest (3) is answered; anything else is
            // the gateway's flight.
            if d.len() <= 13 || d[0] != 22 {
                continue;
            }
            if d[13] == 3 {
                let _ = self.dtls.handle_packet(d);
                self.flush().await?;
                continue;
            }
            self.held.push(d.to_vec());
            break;
        }
        // The rest of the flight, if it came in more than one datagram.
        while let Ok(r) = tokio::time::timeout(FLIGHT_GAP, self.socket.recv_from(&mut buf)).await {
            let n = r?.0;
            self.held.push(buf[..n].to_vec());
        }
        Ok(true)
    }

    /// After `stall`: answer the held flight and run the handshake on, for up to
    /// `within`. It completes only if the gateway still holds the handshake.
    pub async fn resume(&mut self, within: Duration) -> Result<(), ClientError> {
        for d in std::mem::take(&mut self.held) {
            let _ = self.dtls.handle_packet(&d);
        }
        self.handshake(within).await
    }

    /// Send one datagram of application data as it is.
    pub async fn send_raw(&mut self, datagram: &[u8]) -> Result<(), ClientError> {
        self.dtls
            .send_application_data(datagram)
            .map_err(|e| ClientError::Dtls(e.to_string()))?;
        self.flush().await
    }

    /// Put bytes on the wire to the gateway as they are (no DTLS): a replayed record.
    pub async fn send_wire(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.socket.send_to(bytes, self.server).await?;
        Ok(())
    }

    /// The next datagram of application data within `within`.
    pub async fn recv(&mut self, within: Duration) -> Result<Option<Vec<u8>>, ClientError> {
        let deadline = Instant::now() + within;
        while self.inbox.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.step(left.min(Duration::from_millis(50))).await?;
        }
        Ok(self.inbox.pop_front())
    }

    /// Encode a request with a new message id and token.
    pub fn encode(&mut self, r: &Request<'_>) -> (u16, Vec<u8>, Vec<u8>) {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_token = self.next_token.wrapping_add(1);
        let token = self.next_token.to_be_bytes().to_vec();
        let mut p = Packet::new();
        p.header.set_type(if r.confirmable {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        });
        p.header.code = MessageClass::Request(r.method);
        p.header.message_id = self.next_id;
        p.set_token(token.clone());
        let (path, query) = r.path.split_once('?').unwrap_or((r.path, ""));
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        for q in query.split('&').filter(|q| !q.is_empty()) {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if let Some(o) = r.observe {
            let bytes = o.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            p.add_option(CoapOption::Observe, bytes[skip..].to_vec());
        }
        p.payload = r.payload.to_vec();
        let bytes = p.to_bytes().unwrap_or_default();
        (self.next_id, token, bytes)
    }

    /// Send a request and wait for its answer: a confirmable one is sent again per
    /// RFC 7252 until it is acknowledged; a separate response (after an empty ACK) is
    /// waited for and acknowledged. `within` bounds the whole exchange.
    pub async fn request(
        &mut self,
        r: &Request<'_>,
        within: Duration,
    ) -> Result<Response, ClientError> {
        let (id, token, bytes) = self.encode(r);
        self.exchange(id, &token, &bytes, r.confirmable, within)
            .await
    }

    /// Send an encoded request (`encode`) and wait for its answer.
    pub async fn exchange(
        &mut self,
        id: u16,
        token: &[u8],
        bytes: &[u8],
        confirmable: bool,
        within: Duration,
    ) -> Result<Response, ClientError> {
        let deadline = Instant::now() + within;
        self.send_raw(bytes).await?;
        let mut timeout = ACK_TIMEOUT;
        let mut next = Instant::now() + timeout;
        let mut sends = 1;
        let mut acked = !confirmable;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::NoAnswer(within));
            }
            if !acked && now >= next && sends <= MAX_RETRANSMIT {
                self.send_raw(bytes).await?;
                sends += 1;
                timeout *= 2;
                next = now + timeout;
            }
            let wait = deadline.min(next).saturating_duration_since(now);
            let Some(d) = self.recv(wait.max(Duration::from_millis(1))).await? else {
                continue;
            };
            // An empty ACK: the answer comes separately.
            if d.len() == 4 && d[0] >> 4 == 0x6 && u16::from_be_bytes([d[2], d[3]]) == id {
                acked = true;
                continue;
            }
            let Some(resp) = Response::read(&d) else {
                continue;
            };
            if resp.token != token {
                // Not ours (a notification): acknowledged if confirmable, and kept.
                if resp.kind == MessageType::Confirmable {
                    self.ack(resp.message_id).await?;
                }
                if self.notifications.len() == MAX_KEPT {
                    self.notifications.pop_front();
                }
                self.notifications.push_back(resp);
                continue;
            }
            if resp.kind == MessageType::Confirmable {
                self.ack(resp.message_id).await?;
            }
            return Ok(resp);
        }
    }

    /// Acknowledge a confirmable message of the gateway's.
    pub async fn ack(&mut self, message_id: u16) -> Result<(), ClientError> {
        let [a, b] = message_id.to_be_bytes();
        self.send_raw(&[0x60, 0x00, a, b]).await
    }

    /// Reset a confirmable message of the gateway's (a device that forgot it).
    pub async fn reset(&mut self, message_id: u16) -> Result<(), ClientError> {
        let [a, b] = message_id.to_be_bytes();
        self.send_raw(&[0x70, 0x00, a, b]).await
    }

    /// The next notification (or other message) from the gateway within `within`,
    /// acknowledged if confirmable and `ack` is set.
    pub async fn next_message(
        &mut self,
        within: Duration,
        ack: bool,
    ) -> Result<Option<Response>, ClientError> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(d) = self.recv(left).await? else {
                return Ok(None);
            };
            let Some(resp) = Response::read(&d) else {
                continue;
            };
            if ack && resp.kind == MessageType::Confirmable {
                self.ack(resp.message_id).await?;
            }
            return Ok(Some(resp));
        }
    }

    /// Close the session (close_notify).
    pub async fn close(mut self) {
        let _ = self.dtls.close();
        let _ = self.flush().await;
    }
}
