//! DTLS 1.2 with pre-shared keys over one UDP socket.
//!
//! One task owns the socket and the state of every peer (dimpl, which is sans-IO: this
//! task feeds it datagrams and the clock, and sends what it produces). No peer can hold
//! up another: nothing here waits on a peer, a stalled handshake only occupies its own
//! slot until its deadline.
//!
//! Bounds, before any state is made for a source:
//! - a datagram from an unknown address must start with a plaintext ClientHello record,
//!   else it is dropped without a word (no amplification: the first answer is dimpl's
//!   HelloVerifyRequest, no larger than the ClientHello);
//! - handshakes in progress are capped overall (`max_half_open`), and sessions per
//!   source address (`max_per_source`) and overall (`max_sessions`). dimpl's cookie
//!   secret is per instance, so an instance exists from the first ClientHello: these
//!   caps are what bound the memory spoofed ClientHellos can take (about 6 KB each);
//! - a handshake not done within `handshake_timeout`, and a session silent for
//!   `idle_timeout`, are dropped.
//!
//! dimpl does not say which PSK identity a peer used, so the resolver records the
//! identity it was asked for, and this task reads it right after handing the datagram
//! over. An unknown or malformed identity gets no key from the store, and dimpl then
//! completes the handshake with a random key: it fails at the client's Finished exactly
//! as a wrong key does, after the same work.

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, RefUnwindSafe, UnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest datagram read (a DTLS record fits an IPv6 minimum MTU path many times over;
/// anything longer is cut by the kernel and then fails its MAC).
const MAX_DATAGRAM: usize = 2048;
/// How often deadlines and dimpl's retransmission timers are looked at.
const TICK: Duration = Duration::from_millis(50);
/// DTLS content type of a handshake record, and the handshake type of a ClientHello:
/// the only thing an unknown address may send.
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
/// A DTLS record header: type, version, epoch, sequence number, length.
const RECORD_HEADER: usize = 13;

/// Whether a datagram starts with a plaintext (epoch 0) handshake record carrying a
/// ClientHello: what may make state for an address not seen before.
fn is_client_hello(datagram: &[u8]) -> bool {
    datagram.len() > RECORD_HEADER
        && datagram[0] == HANDSHAKE
        && datagram[3..5] == [0, 0]
        && datagram[RECORD_HEADER] == CLIENT_HELLO
}

/// The endpoint's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sessions, established or in handshake, at most.
    pub max_sessions: usize,
    /// Handshakes in progress at most, all sources together.
    pub max_half_open: usize,
    /// Sessions (established or in handshake) from one source address at most.
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// Events waiting for the CoAP layer. Beyond it, datagrams of application data are
    /// dropped and counted (CoAP retransmits); a session's start and end wait for room.
    pub queue: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_sessions: 10_000,
            max_half_open: 256,
            max_per_source: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            queue: 4096,
        }
    }
}

/// Where the pre-shared keys come from (the registry, in the gateway).
pub trait PskStore: Send + Sync + 'static {
    /// The key of `identity`, if it is a registered device with one.
    fn psk(&self, identity: &str) -> Option<Vec<u8>>;
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The handshake failed: a wrong key, an unknown identity, a protocol error. The
    /// identity the peer claimed, if it got that far.
    HandshakeFailed { identity: Option<String> },
    /// The handshake was not done within `handshake_timeout`.
    HandshakeTimeout { identity: Option<String> },
    /// Nothing heard for `idle_timeout`.
    Idle,
    /// The peer said close_notify.
    PeerClosed,
    /// A fatal error after the handshake (a record that breaks the protocol).
    Failed(String),
    /// Closed by the CoAP layer.
    Local,
}

/// What the endpoint tells the CoAP layer.
#[derive(Debug)]
pub enum Event {
    /// A handshake completed: the peer proved it holds `identity`'s key.
    Connected { peer: SocketAddr, identity: String },
    /// One datagram of application data from an established peer.
    Data { peer: SocketAddr, data: Vec<u8> },
    /// A session (or handshake) ended.
    Closed { peer: SocketAddr, why: Closed },
}

/// Counters, for the metrics and the tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub handshakes_started: AtomicU64,
    pub handshakes_completed: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub handshakes_timed_out: AtomicU64,
    /// First datagrams dropped by a cap (half-open, per source, total).
    pub refused_capped: AtomicU64,
    /// Datagrams from unknown addresses that were not handshake records.
    pub dropped_stray: AtomicU64,
    /// Application data dropped because the CoAP layer's queue was full.
    pub dropped_queue_full: AtomicU64,
    pub sessions: AtomicU64,
    pub half_open: AtomicU64,
}

enum Command {
    Send { peer: SocketAddr, data: Vec<u8> },
    Close { peer: SocketAddr },
}

/// The CoAP layer's handle: send to and close established peers.
#[derive(Clone)]
pub struct Sender {
    commands: mpsc::UnboundedSender<Command>,
}

impl Sender {
    /// Send one datagram of application data to an established peer (dropped if the
    /// peer is gone).
    pub fn send(&self, peer: SocketAddr, data: Vec<u8>) {
        let _ = self.commands.send(Command::Send { peer, data });
    }

    pub fn close(&self, peer: SocketAddr) {
        let _ = self.commands.send(Command::Close { peer });
    }
}

/// A bound endpoint: its address, the sender, the events, the counters.
pub struct Endpoint {
    pub local: SocketAddr,
    pub sender: Sender,
    pub events: mpsc::Receiver<Event>,
    pub stats: Arc<Stats>,
}

#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    #[error("DTLS listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("DTLS configuration: {0}")]
    Config(String),
}

/// The resolver dimpl asks for a key: it looks the identity up and remembers it.
struct Resolver {
    store: AssertUnwindSafe<Arc<dyn PskStore>>,
    asked: Mutex<Option<Vec<u8>>>,
}

// The store is only read; a panic inside it leaves nothing half-changed here.
impl UnwindSafe for Resolver {}
impl RefUnwindSafe for Resolver {}

impl PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        *self.asked.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.to_vec());
        std::str::from_utf8(identity)
            .ok()
            .and_then(|id| self.store.psk(id))
    }
}

impl Resolver {
    fn take_asked(&self) -> Option<String> {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|id| shown_identity(&id))
    }
}

/// An identity as logs and events may show it: printable, bounded.
fn shown_identity(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(64)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

struct Peer {
    dtls: Dtls,
    identity: Option<String>,
    connected: bool,
    started: Instant,
    heard: Instant,
    /// When dimpl wants `handle_timeout` next.
    timer: Option<Instant>,
}

impl Peer {
    /// Why the session ends on a fatal dimpl error (`timer`: raised by a timeout).
    fn failure(&self, e: &dimpl::Error, timer: bool) -> Closed {
        let identity = self.identity.clone();
        match (self.connected, timer) {
            (true, _) => Closed::Failed(e.to_string()),
            (false, true) => Closed::HandshakeTimeout { identity },
            (false, false) => Closed::HandshakeFailed { identity },
        }
    }
}

struct Task {
    socket: UdpSocket,
    config: Arc<Config>,
    resolver: Arc<Resolver>,
    settings: Settings,
    peers: HashMap<SocketAddr, Peer>,
    per_source: HashMap<IpAddr, usize>,
    half_open: usize,
    events: mpsc::Sender<Event>,
    stats: Arc<Stats>,
    out: Vec<u8>,
}

/// Bind `addr` and start the endpoint's task.
pub async fn bind(
    addr: SocketAddr,
    settings: Settings,
    store: Arc<dyn PskStore>,
) -> Result<Endpoint, DtlsError> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| DtlsError::Bind { addr, source })?;
    let local = socket
        .local_addr()
        .map_err(|source| DtlsError::Bind { addr, source })?;
    let resolver = Arc::new(Resolver {
        store: AssertUnwindSafe(store),
        asked: Mutex::new(None),
    });
    // Built once: dimpl checks its crypto provider here, which takes milliseconds.
    let config = Config::builder()
        .with_psk_server(None, resolver.clone())
        .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
        .dtls13_cipher_suites(&[])
        .handshake_timeout(settings.handshake_timeout)
        .build()
        .map_err(|e| DtlsError::Config(e.to_string()))?;
    let (events_tx, events) = mpsc::channel(settings.queue.max(1));
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Stats::default());
    let task = Task {
        socket,
        config: Arc::new(config),
        resolver,
        settings,
        peers: HashMap::new(),
        per_source: HashMap::new(),
        half_open: 0,
        events: events_tx,
        stats: stats.clone(),
        out: vec![0; MAX_DATAGRAM],
    };
    tokio::spawn(task.run(commands_rx));
    Ok(Endpoint {
        local,
        sender: Sender { commands },
        events,
        stats,
    })
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => {
                        let datagram = buf[..n].to_vec();
                        self.datagram(peer, &datagram).await;
                    }
                    Err(e) => {
                        // ICMP errors surface here on some systems: not fatal.
                        tracing::debug!(error = %e, "DTLS socket read");
                    }
                },
                c = commands.recv() => match c {
                    Some(Command::Send { peer, data }) => self.send(peer, &data).await,
                    Some(Command::Close { peer }) => {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            let _ = p.dtls.close();
                            self.flush(peer).await;
                        }
                        self.drop_peer(peer, Closed::Local).await;
                    }
                    // The CoAP layer is gone: so is the endpoint.
                    None => return,
                },
                _ = tick.tick() => self.timers().await,
            }
        }
    }

    fn count_open(&mut self, ip: IpAddr) {
        *self.per_source.entry(ip).or_default() += 1;
        self.half_open += 1;
        self.stats
            .half_open
            .store(self.half_open as u64, Ordering::Relaxed);
        self.stats
            .sessions
            .store(self.peers.len() as u64, Ordering::Relaxed);
    }

    async fn datagram(&mut self, peer: SocketAddr, datagram: &[u8]) {
        let now = Instant::now();
        if !self.peers.contains_key(&peer) {
            if !is_client_hello(datagram) {
                self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let from_source = self.per_source.get(&peer.ip()).copied().unwrap_or(0);
            if self.half_open >= self.settings.max_half_open
                || self.peers.len() >= self.settings.max_sessions
                || from_source >= self.settings.max_per_source
            {
                self.stats.refused_capped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let dtls = Dtls::new_12_psk(self.config.clone(), now.into_std());
            self.peers.insert(
                peer,
                Peer {
                    dtls,
                    identity: None,
                    connected: false,
                    started: now,
                    heard: now,
                    timer: None,
                },
            );
            self.count_open(peer.ip());
            self.stats
                .handshakes_started
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.heard = now;
        // The resolver's slot belongs to this call only.
        let _ = self.resolver.take_asked();
        let fed = p
            .dtls
            .handle_timeout(now.into_std())
            .and_then(|()| p.dtls.handle_packet(datagram));
        if let Some(id) = self.resolver.take_asked() {
            p.identity = Some(id);
        }
        if let Err(e) = fed {
            let why = p.failure(&e, false);
            self.drop_peer(peer, why).await;
            return;
        }
        self.flush(peer).await;
    }

    async fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if !p.connected {
            return;
        }
        if let Err(e) = p.dtls.send_application_data(data) {
            self.drop_peer(peer, Closed::Failed(e.to_string())).await;
            return;
        }
        self.flush(peer).await;
    }

    /// Send what the peer's state has for the wire, and pass on what it has for us.
    async fn flush(&mut self, peer: SocketAddr) {
        let mut closed = None;
        let mut packets = Vec::new();
        let mut events = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            loop {
                match p.dtls.poll_output(&mut self.out) {
                    Output::Packet(bytes) => packets.push(bytes.to_vec()),
                    Output::BufferTooSmall { needed } => {
                        // dimpl's records are bounded by its MTU; never more than this.
                        if needed > 16 * MAX_DATAGRAM {
                            closed = Some(Closed::Failed("record too large".into()));
                            break;
                        }
                        self.out.resize(needed, 0);
                    }
                    Output::Connected => {
                        // A handshake with no identity asked for proved no key.
                        let Some(identity) = p.identity.clone() else {
                            closed = Some(Closed::HandshakeFailed { identity: None });
                            break;
                        };
                        p.connected = true;
                        events.push(Event::Connected { peer, identity });
                    }
                    Output::ApplicationData(bytes) => events.push(Event::Data {
                        peer,
                        data: bytes.to_vec(),
                    }),
                    Output::CloseNotify => {
                        closed = Some(Closed::PeerClosed);
                        break;
                    }
                    Output::Timeout(at) => {
                        p.timer = Some(Instant::from_std(at));
                        break;
                    }
                    _ => {}
                }
            }
        }
        for bytes in packets {
            let _ = self.socket.send_to(&bytes, peer).await;
        }
        for event in events {
            if let Event::Connected { .. } = event {
                self.half_open = self.half_open.saturating_sub(1);
                self.stats
                    .half_open
                    .store(self.half_open as u64, Ordering::Relaxed);
                self.stats
                    .handshakes_completed
                    .fetch_add(1, Ordering::Relaxed);
            }
            match event {
                // Data may be dropped when the CoAP layer is behind (CoAP retransmits);
                // a session's start may not.
                Event::Data { .. } => {
                    if self.events.try_send(event).is_err() {
                        self.stats
                            .dropped_queue_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    let _ = self.events.send(event).await;
                }
            }
        }
        if let Some(why) = closed {
            self.drop_peer(peer, why).await;
        }
    }

    /// Deadlines, and dimpl's retransmissions.
    async fn timers(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut due = Vec::new();
        for (addr, p) in &self.peers {
            if !p.connected && now.duration_since(p.started) >= self.settings.handshake_timeout {
                expired.push((
                    *addr,
                    Closed::HandshakeTimeout {
                        identity: p.identity.clone(),
                    },
                ));
            } else if p.connected && now.duration_since(p.heard) >= self.settings.idle_timeout {
                expired.push((*addr, Closed::Idle));
            } else if p.timer.is_some_and(|t| t <= now) {
                due.push(*addr);
            }
        }
        for (addr, why) in expired {
            self.drop_peer(addr, why).await;
        }
        for addr in due {
            let Some(p) = self.peers.get_mut(&addr) else {
                continue;
            };
            p.timer = None;
            let _ = self.resolver.take_asked();
            let fed = p.dtls.handle_timeout(now.into_std());
            if let Some(id) = self.resolver.take_asked() {
                p.identity = Some(id);
            }
            if let Err(e) = fed {
                let why = p.failure(&e, true);
                self.drop_peer(addr, why).await;
                continue;
            }
            self.flush(addr).await;
        }
    }

    async fn drop_peer(&mut self, peer: SocketAddr, why: Closed) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        if let Some(n) = self.per_source.get_mut(&peer.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&peer.ip());
            }
        }
        if !p.connected {
            self.half_open = self.half_open.saturating_sub(1);
        }
        match &why {
            Closed::HandshakeFailed { .. } => {
                self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            }
            Closed::HandshakeTimeout { .. } => {
                self.stats
                    .handshakes_timed_out
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.stats
            .half_open
            .store(self.half_open as u64, Ordering::Relaxed);
        self.stats
            .sessions
            .store(self.peers.len() as u64, Ordering::Relaxed);
        // Never dropped: the CoAP layer must hear of every session that ends (it holds
        // the session's slot and state). It only routes, so the wait is short.
        let _ = self.events.send(Event::Closed { peer, why }).await;
    }
}
