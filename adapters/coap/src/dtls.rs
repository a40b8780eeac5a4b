//! DTLS 1.2 with pre-shared keys over one UDP socket.
//!
//! One task owns the socket and the state of every peer (dimpl, which is sans-IO: this
//! task feeds it datagrams and the clock, and sends what it produces). No peer can hold
//! up another: nothing here waits on a peer, a stalled handshake only occupies its own
//! slot until its deadline.
//!
//! No state for an address until it proves it receives what is sent to it. A
//! ClientHello without a good cookie is answered here with a HelloVerifyRequest whose
//! cookie is an HMAC, under a key of this endpoint, of the client's random, its address
//! and a 30-second time slice; nothing is kept (the answer is no larger than the
//! ClientHello: no amplification). Only a ClientHello carrying such a cookie makes
//! state: spoofed ClientHellos, however many, take no slot. dimpl's cookie secret is
//! per instance and not configurable; so that the instance made then takes this cookie
//! as its own, its HMAC provider computes our cookie for a ClientHello handed over
//! under a `cookie::Binding` (see `cookie`). Why not the alternatives: a seeded RNG
//! (`dangerously_set_rng_seed`) would share the secret but also fix server randoms,
//! AEAD nonces and the decoy key, so a recorded handshake could be replayed; a second
//! HelloVerifyRequest from the instance is refused by wolfSSL clients and by dimpl's
//! own; a short-lived pool of instances made before the cookie is emptied by a flood
//! faster than a device's round trip.
//!
//! Then, before a state is made: the caps (handshakes in progress overall,
//! `max_half_open`; sessions per source, an IPv4 address or an IPv6 /64, and overall)
//! and the gate (`Admit`: bans and connection rates, decided by the gateway). A
//! handshake not done within `handshake_timeout`, and a session from which nothing
//! authenticated came for `idle_timeout`, are dropped.
//!
//! A device that reboots handshakes again from the address its old session still
//! holds: that handshake runs beside the old session (the "next" state of the
//! address), and replaces it only once it completes (`Closed::Replaced`, then
//! `Connected`). The address's events belong to its session: a failed re-handshake
//! is counted, not reported.
//!
//! dimpl does not say which PSK identity a peer used, so the resolver records the
//! identity it was asked for, and this task reads it right after handing the datagram
//! over. An unknown or malformed identity gets no key from the store, and dimpl then
//! completes the handshake with a random key: it fails at the client's Finished exactly
//! as a wrong key does, after the same work.
//!
//! Every call into dimpl is made under `catch_unwind`: a panic drops that one peer
//! (`Closed::Failed("internal error")`), never the task.
//!
//! Behind a UDP load balancer (`Settings::balancers`), each datagram from a listed
//! balancer starts with a PROXY protocol v2 header naming the client it came from
//! (`proxy_header`). That client is the peer for everything above: the session, the
//! cookie, the caps, the gate. Only the wire differs: what is sent to the peer goes to
//! the balancer that carried its datagrams (`Peer::route`), without a header. The
//! route is set when the handshake begins and moves only with a datagram that
//! authenticated, so a forged datagram cannot redirect a session's answers. A
//! datagram from a balancer without a valid header, and one from any other source
//! that carries a header, is dropped and reported (`Admit::header_refused`).

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};
use portcullis_core::proxy_header::{self, Header, HeaderError, LoadBalancers, Transport};
use portcullis_core::source_key::{DEFAULT_IPV6_PREFIX, SourceKey};
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
/// A DTLS record header: type, version, epoch, sequence number, length.
const RECORD_HEADER: usize = 13;
/// Datagrams dimpl holds for a peer while it waits for an earlier one (a client's
/// flight is three records at most).
const RX_QUEUE: usize = 8;
/// The highest handshake message_seq a ClientHello may have (each HelloVerifyRequest
/// the client got adds one).
const MAX_HELLO_SEQ: u16 = 3;
/// Steps of dimpl output taken for one datagram at most (a datagram holds at most a
/// few records; more means dimpl is looping).
const MAX_OUTPUTS: usize = 256;

/// The source a peer counts against: its IPv4 address, or its IPv6 /64.
fn source_of(ip: IpAddr) -> SourceKey {
    SourceKey::new(ip, DEFAULT_IPV6_PREFIX)
}

/// The endpoint's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Addresses with a session, established or in handshake, at most.
    pub max_sessions: usize,
    /// Handshakes in progress at most, all sources together.
    pub max_half_open: usize,
    /// Addresses with a session (established or in handshake) from one source at most:
    /// an IPv4 address, or an IPv6 /64.
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// Events waiting for the CoAP layer, and the CoAP layer's commands waiting for this
    /// task. Beyond it, datagrams of application data and the ends of handshakes are
    /// dropped and counted (CoAP retransmits); an established session's start and end
    /// wait for room.
    pub queue: usize,
    /// The load balancers whose datagrams each start with a PROXY v2 header; None: no
    /// header is taken from anyone.
    pub balancers: Option<Arc<LoadBalancers>>,
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
            balancers: None,
        }
    }
}

/// Where the pre-shared keys come from (the registry, in the gateway).
pub trait PskStore: Send + Sync + 'static {
    /// The key of `identity`, if it is a registered device with one.
    fn psk(&self, identity: &str) -> Option<Vec<u8>>;
}

/// The gateway's say on a source, before any state is made for it: asked once when an
/// address that proved it receives (a good cookie) is about to get a handshake.
pub trait Admit: Send + Sync + 'static {
    /// `None` refuses (the datagram is dropped without a word). The token returned is
    /// held as long as the address's handshake or session lives, and dropped with it.
    fn admit(&self, peer: SocketAddr) -> Option<Box<dyn Send + Sync>>;

    /// A datagram from `from` dropped over its PROXY header (only with
    /// `Settings::balancers`): for the gateway to count and audit.
    fn header_refused(&self, from: SocketAddr, why: HeaderRefused<'_>);
}

/// Why a datagram was dropped over its PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRefused<'a> {
    /// From a listed balancer, without a valid v2 header for a datagram.
    Invalid(&'a HeaderError),
    /// From a source that is not a listed balancer, starting with a header.
    NotAllowed,
}

/// A gate that admits every source.
pub struct AdmitAll;

impl Admit for AdmitAll {
    fn admit(&self, _: SocketAddr) -> Option<Box<dyn Send + Sync>> {
        Some(Box::new(()))
    }

    fn header_refused(&self, _: SocketAddr, _: HeaderRefused<'_>) {}
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The handshake failed: a wrong key, an unknown identity, a protocol error. The
    /// identity the peer claimed, if it got that far.
    HandshakeFailed { identity: Option<String> },
    /// The handshake was not done within `handshake_timeout`.
    HandshakeTimeout { identity: Option<String> },
    /// Nothing authenticated heard for `idle_timeout`.
    Idle,
    /// The peer said close_notify.
    PeerClosed,
    /// A fatal error after the handshake (a record that breaks the protocol), or
    /// "internal error" when the DTLS state panicked.
    Failed(String),
    /// Closed by the CoAP layer.
    Local,
    /// A new handshake from the same address completed (a device that rebooted), or
    /// began while this one was still in handshake.
    Replaced,
}

/// How a peer proved the identity it claims (or, plain, what it claims with).
pub enum Proof {
    /// Its DTLS handshake, with the identity's pre-shared key.
    PreSharedKey,
    /// Plain CoAP on loopback: the secret its first request carried, for the
    /// authenticator to check.
    Secret(Vec<u8>),
}

impl std::fmt::Debug for Proof {
    // A secret is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proof::PreSharedKey => f.write_str("PreSharedKey"),
            Proof::Secret(_) => f.write_str("Secret(..)"),
        }
    }
}

/// What the endpoint tells the CoAP layer.
#[derive(Debug)]
pub enum Event {
    /// A handshake completed: the peer proved it holds `identity`'s key. `session`
    /// names this DTLS session: sends and closes carry it, so that nothing meant for
    /// it reaches a later session at the same address.
    Connected {
        peer: SocketAddr,
        identity: String,
        session: u64,
        proof: Proof,
    },
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
    /// Handshakes refused by a cap (half-open, per source, total).
    pub refused_capped: AtomicU64,
    /// Handshakes refused by the gate (`Admit`).
    pub refused_gate: AtomicU64,
    /// Datagrams from addresses without state that were not a ClientHello.
    pub dropped_stray: AtomicU64,
    /// HelloVerifyRequests sent (no state kept for them).
    pub hello_verify_sent: AtomicU64,
    /// ClientHellos whose cookie did not verify (forged, for another address, expired).
    pub cookie_refused: AtomicU64,
    /// Application data dropped because the CoAP layer's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Ends of handshakes not reported because the CoAP layer's queue was full.
    pub dropped_closed: AtomicU64,
    /// Sends of the CoAP layer dropped because this task's queue was full.
    pub dropped_commands: AtomicU64,
    /// Sessions or handshakes replaced by a new handshake from the same address.
    pub replaced: AtomicU64,
    /// Peers dropped because their DTLS state panicked.
    pub panics: AtomicU64,
    /// Datagrams dropped over their PROXY header (`HeaderRefused`).
    pub header_refused: AtomicU64,
    /// Addresses with a session, established or in handshake.
    pub sessions: AtomicU64,
    /// Handshakes in progress (a re-handshake beside a session included).
    pub half_open: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) enum Command {
    Send {
        peer: SocketAddr,
        session: u64,
        data: Vec<u8>,
    },
}

/// The CoAP layer's handle: send to and close established peers.
#[derive(Clone)]
pub struct Sender {
    commands: mpsc::Sender<Command>,
    /// Closes have a queue of their own, never full: one lost would leave a DTLS
    /// session open with nothing behind it (there are at most as many as sessions).
    closes: mpsc::UnboundedSender<(SocketAddr, u64)>,
    stats: Arc<Stats>,
}

impl Sender {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        closes: mpsc::UnboundedSender<(SocketAddr, u64)>,
        stats: Arc<Stats>,
    ) -> Sender {
        Sender {
            commands,
            closes,
            stats,
        }
    }

    /// Send one datagram of application data to DTLS session `session` at `peer`
    /// (dropped if that session is gone, or counted in `dropped_commands` if the
    /// endpoint is that far behind).
    pub fn send(&self, peer: SocketAddr, session: u64, data: Vec<u8>) {
        self.command(Command::Send {
            peer,
            session,
            data,
        });
    }

    /// Close DTLS session `session` at `peer` (not a later one at the same address).
    pub fn close(&self, peer: SocketAddr, session: u64) {
        let _ = self.closes.send((peer, session));
    }

    fn command(&self, command: Command) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.commands.try_send(command) {
            count(&self.stats.dropped_commands);
        }
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

/// A dimpl call panicked.
struct Panicked;

/// A call into dimpl (or the gateway's gate) whose panic is contained.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| Panicked)
}

/// The ClientHello, alone in its datagram: all that is read before state exists.
mod hello {
    use super::{MAX_HELLO_SEQ, RECORD_HEADER};

    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const HELLO_VERIFY_REQUEST: u8 = 3;
    /// A handshake message header: type, length, message_seq, fragment offset, length.
    const MESSAGE_HEADER: usize = 12;
    /// Where the message_seq of the datagram's handshake message is.
    pub(super) const MESSAGE_SEQ_AT: usize = RECORD_HEADER + 4;
    /// DTLS 1.0, the version a HelloVerifyRequest carries (RFC 6347 §4.2.1).
    const DTLS_1_0: [u8; 2] = [254, 255];
    pub(super) const COOKIE: usize = 32;
    /// A HelloVerifyRequest with a cookie of `COOKIE` bytes, record and all.
    pub(super) const HELLO_VERIFY_LEN: usize = RECORD_HEADER + MESSAGE_HEADER + 3 + COOKIE;

    /// A datagram of exactly one plaintext record holding one whole ClientHello.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct ClientHello<'a> {
        pub record_seq: [u8; 6],
        pub message_seq: u16,
        pub random: [u8; 32],
        pub cookie: &'a [u8],
        /// Where the cookie's bytes are in the datagram.
        pub cookie_at: usize,
    }

    fn u16_at(b: &[u8], at: usize) -> usize {
        usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
    }

    fn u24_at(b: &[u8], at: usize) -> usize {
        usize::from(b[at]) << 16 | u16_at(b, at + 1)
    }

    impl ClientHello<'_> {
        pub(super) fn read(d: &[u8]) -> Option<ClientHello<'_>> {
            if d.len() < RECORD_HEADER + MESSAGE_HEADER
                || d[0] != HANDSHAKE
                || d[3..5] != [0, 0]
                || RECORD_HEADER + u16_at(d, 11) != d.len()
            {
                return None;
            }
            let m = &d[RECORD_HEADER..];
            let length = u24_at(m, 1);
            let message_seq = u16::from_be_bytes([m[4], m[5]]);
            if m[0] != CLIENT_HELLO
                || message_seq > MAX_HELLO_SEQ
                || u24_at(m, 6) != 0
                || u24_at(m, 9) != length
                || MESSAGE_HEADER + length != m.len()
            {
                return None;
            }
            // Body: version (2), random (32), session id (1 + n), cookie (1 + n), ...
            let body = &m[MESSAGE_HEADER..];
            let random: [u8; 32] = body.get(2..34)?.try_into().ok()?;
            let session_id = usize::from(*body.get(34)?);
            let at = 35 + session_id;
            let cookie_len = usize::from(*body.get(at)?);
            let cookie = body.get(at + 1..at + 1 + cookie_len)?;
            let mut record_seq = [0; 6];
            record_seq.copy_from_slice(&d[5..11]);
            Some(ClientHello {
                record_seq,
                message_seq,
                random,
                cookie,
                cookie_at: RECORD_HEADER + MESSAGE_HEADER + at + 1,
            })
        }
    }

    /// The HelloVerifyRequest answering `hello`: its record sequence number and
    /// message_seq are the ClientHello's, so that nothing need be remembered (RFC 6347
    /// §4.2.1, §4.2.2).
    pub(super) fn verify_request(
        hello: &ClientHello,
        cookie: &[u8; COOKIE],
    ) -> [u8; HELLO_VERIFY_LEN] {
        let mut out = [0u8; HELLO_VERIFY_LEN];
        let body = 3 + COOKIE;
        let message = MESSAGE_HEADER + body;
        out[0] = HANDSHAKE;
        out[1..3].copy_from_slice(&DTLS_1_0);
        out[5..11].copy_from_slice(&hello.record_seq);
        out[11..13].copy_from_slice(&(message as u16).to_be_bytes());
        let m = &mut out[RECORD_HEADER..];
        m[0] = HELLO_VERIFY_REQUEST;
        m[2..4].copy_from_slice(&(body as u16).to_be_bytes());
        m[4..6].copy_from_slice(&hello.message_seq.to_be_bytes());
        m[10..12].copy_from_slice(&(body as u16).to_be_bytes());
        m[12..14].copy_from_slice(&DTLS_1_0);
        m[14] = COOKIE as u8;
        m[15..].copy_from_slice(cookie);
        out
    }
}

/// The stateless cookie, and the hook that has dimpl take it as its own.
///
/// dimpl computes its cookie as HMAC-SHA256(per-instance secret, client random)
/// through the configured HMAC provider, and checks a ClientHello's cookie the same
/// way. The provider given to dimpl here is its own, except while a ClientHello is
/// handed to a state under a `Binding` (set by this task, on this thread, for that one
/// call): then an HMAC-SHA256 with a 32-byte key of 32 bytes of data, which is what
/// the cookie is, comes out as our cookie for that address. The ClientHello alone is
/// processed in that call (no key schedule runs); were dimpl to change how it makes
/// cookies, handshakes would fail, never pass: the tests would show it.
mod cookie {
    use super::hello::{COOKIE, ClientHello};
    use dimpl::CryptoError;
    use dimpl::crypto::{CryptoProvider, HashAlgorithm, HmacProvider};
    use std::cell::Cell;
    use std::net::SocketAddr;
    use std::sync::OnceLock;
    use tokio::time::Instant;

    /// Seconds of one time slice: a cookie is good in its slice and the next.
    const SLICE: u64 = 30;
    /// What the cookie's HMAC covers: the client's random, its address (IPv6 form and
    /// port), the time slice.
    const MATERIAL: usize = 32 + 16 + 2 + 8;

    thread_local! {
        static BOUND: Cell<Option<Binding>> = const { Cell::new(None) };
    }

    /// The key and the clock of this endpoint's cookies.
    pub(in super::super) struct Jar {
        key: [u8; 32],
        born: Instant,
        hmac: &'static dyn HmacProvider,
    }

    /// A ClientHello from `peer`, handed to dimpl, whose cookie is ours of `slice`.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Binding {
        key: [u8; 32],
        peer: SocketAddr,
        slice: u64,
        hmac: &'static dyn HmacProvider,
    }

    fn material(random: &[u8], peer: SocketAddr, slice: u64) -> [u8; MATERIAL] {
        let mut m = [0u8; MATERIAL];
        m[..32].copy_from_slice(random);
        let ip = match peer.ip() {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
            std::net::IpAddr::V6(a) => a,
        };
        m[32..48].copy_from_slice(&ip.octets());
        m[48..50].copy_from_slice(&peer.port().to_be_bytes());
        m[50..].copy_from_slice(&slice.to_be_bytes());
        m
    }

    fn compute(
        hmac: &dyn HmacProvider,
        key: &[u8; 32],
        random: &[u8],
        peer: SocketAddr,
        slice: u64,
    ) -> Option<[u8; COOKIE]> {
        hmac.hmac_sha256(key, &material(random, peer, slice)).ok()
    }

    impl Jar {
        /// A fresh key from `provider`'s secure random; `provider` is dimpl's own.
        pub(in super::super) fn new(provider: &CryptoProvider) -> Result<Jar, String> {
            let mut key = [0u8; 32];
            provider
                .secure_random
                .fill(&mut key)
                .map_err(|e| format!("cookie key: {e}"))?;
            Ok(Jar {
                key,
                born: Instant::now(),
                hmac: provider.hmac_provider,
            })
        }

        fn slice(&self, now: Instant) -> u64 {
            now.duration_since(self.born).as_secs() / SLICE
        }

        /// The cookie for `hello` from `peer`, now.
        pub(in super::super) fn make(
            &self,
            hello: &ClientHello,
            peer: SocketAddr,
            now: Instant,
        ) -> Option<[u8; COOKIE]> {
            compute(self.hmac, &self.key, &hello.random, peer, self.slice(now))
        }

        /// The time slice whose cookie `hello` carries, if it carries one of ours for
        /// `peer` that has not expired.
        pub(in super::super) fn verify(
            &self,
            hello: &ClientHello,
            peer: SocketAddr,
            now: Instant,
        ) -> Option<u64> {
            if hello.cookie.len() != COOKIE {
                return None;
            }
            let slice = self.slice(now);
            [slice, slice.saturating_sub(1)].into_iter().find(|&s| {
                compute(self.hmac, &self.key, &hello.random, peer, s).is_some_and(|c| {
                    // Constant time: every byte is looked at.
                    c.iter()
                        .zip(hello.cookie)
                        .fold(0u8, |d, (a, b)| d | (a ^ b))
                        == 0
                })
            })
        }

        pub(in super::super) fn binding(&self, peer: SocketAddr, slice: u64) -> Binding {
            Binding {
                key: self.key,
                peer,
                slice,
                hmac: self.hmac,
            }
        }
    }

    /// In force until dropped (a panic included).
    pub(in super::super) struct Bound(());

    pub(in super::super) fn bind(binding: Binding) -> Bound {
        BOUND.set(Some(binding));
        Bound(())
    }

    impl Drop for Bound {
        fn drop(&mut self) {
            BOUND.set(None);
        }
    }

    /// dimpl's HMAC provider, but for a cookie computed under a `Binding`.
    #[derive(Debug)]
    struct Hook {
        inner: &'static dyn HmacProvider,
    }

    static HOOK: OnceLock<Hook> = OnceLock::new();

    impl HmacProvider for Hook {
        fn hmac(
            &self,
            hash: HashAlgorithm,
            key: &[u8],
            data: &[u8],
            out: &mut [u8],
        ) -> Result<usize, CryptoError> {
            if let Some(b) = BOUND.get()
                && hash == HashAlgorithm::SHA256
                && key.len() == 32
                && data.len() == 32
            {
                return b
                    .hmac
                    .hmac(hash, &b.key, &material(data, b.peer, b.slice), out);
            }
            self.inner.hmac(hash, key, data, out)
        }
    }

    /// `provider` with the hook in place of its HMAC (the first provider's HMAC is the
    /// one every endpoint's hook wraps: dimpl's default, the same for all).
    pub(in super::super) fn hooked(provider: &CryptoProvider) -> CryptoProvider {
        let hook = HOOK.get_or_init(|| Hook {
            inner: provider.hmac_provider,
        });
        let mut hooked = provider.clone();
        hooked.hmac_provider = hook;
        hooked
    }
}

use hello::ClientHello;

/// Which of an address's two states: its session (or handshake), or a new handshake
/// from the same address running beside an established session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Current,
    Next,
}

type Key = (SocketAddr, Slot);

struct Peer {
    dtls: Dtls,
    /// This DTLS session's number (`Event::Connected`).
    session: u64,
    identity: Option<String>,
    connected: bool,
    started: Instant,
    /// When something authenticated last came.
    heard: Instant,
    /// When dimpl wants `handle_timeout` next.
    timer: Option<Instant>,
    /// The ClientHello's random: it tells a retransmission from a new handshake.
    random: [u8; 32],
    /// The time slice of the cookie this handshake began with.
    cookie_slice: u64,
    source: SourceKey,
    /// Where its datagrams go: its own address, or the balancer that carried its
    /// ClientHello or, later, its last datagram that authenticated.
    route: SocketAddr,
    /// The gate's token, dropped with the state.
    _admitted: Box<dyn Send + Sync>,
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

/// What one round of dimpl output held, besides packets and data.
#[derive(Default)]
struct Drained {
    connected: bool,
    /// Something authenticated came (application data, close_notify).
    authenticated: bool,
    end: Option<Closed>,
    /// Where the packets go (the peer's route).
    to: Option<SocketAddr>,
}

struct Task {
    socket: UdpSocket,
    config: Arc<Config>,
    resolver: Arc<Resolver>,
    cookies: cookie::Jar,
    gate: Arc<dyn Admit>,
    settings: Settings,
    /// Boxed: dimpl's state is kilobytes, and a table of them inline would reserve
    /// that for every empty bucket too.
    peers: HashMap<Key, Box<Peer>>,
    /// The next DTLS session's number.
    next_session: u64,
    per_source: HashMap<SourceKey, usize>,
    /// Addresses with a `Current` state.
    sessions: usize,
    half_open: usize,
    events: mpsc::Sender<Event>,
    stats: Arc<Stats>,
    /// dimpl's output buffer.
    out: Vec<u8>,
    /// One round's packets, back to back, and where each ends; its data.
    wire: Vec<u8>,
    wire_ends: Vec<usize>,
    data: Vec<Vec<u8>>,
    /// The timers' lists, kept between ticks.
    expired: Vec<(Key, Closed)>,
    due: Vec<Key>,
}

/// Bind `addr` and start the endpoint's task.
pub async fn bind(
    addr: SocketAddr,
    settings: Settings,
    store: Arc<dyn PskStore>,
    gate: Arc<dyn Admit>,
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
    let builder = || {
        Config::builder()
            .with_psk_server(None, resolver.clone())
            .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .handshake_timeout(settings.handshake_timeout)
            .max_queue_rx(RX_QUEUE)
    };
    let config_error = |e: dimpl::Error| DtlsError::Config(e.to_string());
    // Built once per endpoint, first to learn dimpl's crypto provider, then with the
    // cookie hook in it (dimpl checks the provider each time: milliseconds).
    let plain = builder().build().map_err(config_error)?;
    let cookies = cookie::Jar::new(plain.crypto_provider()).map_err(DtlsError::Config)?;
    let config = builder()
        .with_crypto_provider(cookie::hooked(plain.crypto_provider()))
        .build()
        .map_err(config_error)?;
    let (events_tx, events) = mpsc::channel(settings.queue.max(1));
    let (commands, commands_rx) = mpsc::channel(settings.queue.max(1));
    let (closes, closes_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Stats::default());
    let task = Task {
        socket,
        config: Arc::new(config),
        resolver,
        cookies,
        gate,
        settings,
        peers: HashMap::new(),
        next_session: 1,
        per_source: HashMap::new(),
        sessions: 0,
        half_open: 0,
        events: events_tx,
        stats: stats.clone(),
        out: vec![0; MAX_DATAGRAM],
        wire: Vec::with_capacity(MAX_DATAGRAM),
        wire_ends: Vec::new(),
        data: Vec::new(),
        expired: Vec::new(),
        due: Vec::new(),
    };
    let running = tokio::spawn(task.run(commands_rx, closes_rx));
    // The task contains dimpl's panics; one of its own ends every session: say so.
    tokio::spawn(async move {
        if let Err(e) = running.await
            && e.is_panic()
        {
            let payload = e.into_panic();
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%local, panic = %why, "the DTLS endpoint's task panicked: every CoAP session on it has ended");
        }
    });
    Ok(Endpoint {
        local,
        sender: Sender {
            commands,
            closes,
            stats: stats.clone(),
        },
        events,
        stats,
    })
}

impl Task {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut closes: mpsc::UnboundedReceiver<(SocketAddr, u64)>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => match self.settings.balancers.clone() {
                        None => self.datagram(from, from, &buf[..n]).await,
                        Some(lb) => self.proxied(&lb, from, &buf[..n]).await,
                    },
                    Err(e) => {
                        // ICMP errors surface here on some systems: not fatal.
                        tracing::debug!(error = %e, "DTLS socket read");
                    }
                },
                c = commands.recv() => match c {
                    Some(Command::Send { peer, session, data }) => {
                        self.send(peer, session, &data).await
                    }
                    // The CoAP layer is gone: so is the endpoint.
                    None => return,
                },
                Some((peer, session)) = closes.recv() => self.close(peer, session).await,
                _ = tick.tick() => self.timers().await,
            }
        }
    }

    fn publish(&self) {
        self.stats
            .half_open
            .store(self.half_open as u64, Ordering::Relaxed);
        self.stats
            .sessions
            .store(self.sessions as u64, Ordering::Relaxed);
    }

    /// The handshake in progress at `peer`'s address, if any.
    fn half_open_at(&self, peer: SocketAddr) -> Option<Key> {
        let next = (peer, Slot::Next);
        if self.peers.contains_key(&next) {
            return Some(next);
        }
        let current = (peer, Slot::Current);
        self.peers
            .get(&current)
            .filter(|p| !p.connected)
            .map(|_| current)
    }

    /// A datagram on a listener behind balancers: the peer its header names, or the
    /// source itself if it is not a balancer; dropped and reported if its header is
    /// wrong or not allowed.
    async fn proxied(&mut self, lb: &LoadBalancers, from: SocketAddr, datagram: &[u8]) {
        let error;
        let refused = if !lb.allows(from.ip()) {
            if !proxy_header::looks_like_header(datagram) {
                return self.datagram(from, from, datagram).await;
            }
            HeaderRefused::NotAllowed
        } else {
            match proxy_header::parse(datagram, Transport::Datagram) {
                Ok((Header::Proxy { source, .. }, len)) => {
                    return self.datagram(source, from, &datagram[len..]).await;
                }
                // The balancer's own datagram (a health check).
                Ok((Header::Local, len)) => {
                    return self.datagram(from, from, &datagram[len..]).await;
                }
                Err(e) => {
                    error = e;
                    HeaderRefused::Invalid(&error)
                }
            }
        };
        count(&self.stats.header_refused);
        let gate = &self.gate;
        let _ = guarded(|| gate.header_refused(from, refused));
    }

    /// One datagram from `peer`, which came from `from` (the balancer that carried
    /// it, or `peer` itself).
    async fn datagram(&mut self, peer: SocketAddr, from: SocketAddr, datagram: &[u8]) {
        let now = Instant::now();
        if let Some(hello) = ClientHello::read(datagram) {
            self.client_hello(peer, from, &hello, datagram, now).await;
            return;
        }
        let current = (peer, Slot::Current);
        let next = (peer, Slot::Next);
        if !self.peers.contains_key(&current) {
            count(&self.stats.dropped_stray);
            return;
        }
        // Plaintext records go to a handshake; a protected one to the session first,
        // and to a handshake beside it if the session could not read it.
        let plaintext = datagram.len() >= RECORD_HEADER && datagram[3..5] == [0, 0];
        if plaintext && self.peers.contains_key(&next) {
            self.feed(next, from, datagram, now, false).await;
            return;
        }
        let read = self.feed(current, from, datagram, now, false).await;
        if !plaintext && !read && self.peers.contains_key(&next) {
            self.feed(next, from, datagram, now, false).await;
        }
    }

    async fn client_hello(
        &mut self,
        peer: SocketAddr,
        from: SocketAddr,
        hello: &ClientHello<'_>,
        datagram: &[u8],
        now: Instant,
    ) {
        // A retransmission within a handshake in progress is that handshake's.
        if let Some(key) = self.half_open_at(peer)
            && self.peers[&key].random == hello.random
        {
            self.feed(key, from, datagram, now, true).await;
            return;
        }
        // A late copy of the ClientHello that began the session: nothing new.
        if self
            .peers
            .get(&(peer, Slot::Current))
            .is_some_and(|p| p.connected && p.random == hello.random)
        {
            return;
        }
        let Some(slice) = self.cookies.verify(hello, peer, now) else {
            if !hello.cookie.is_empty() {
                count(&self.stats.cookie_refused);
            }
            self.hello_verify(peer, from, hello, datagram.len(), now)
                .await;
            return;
        };
        // The address proved it receives what is sent to it: a handshake may begin.
        if let Some(key) = self.half_open_at(peer) {
            count(&self.stats.replaced);
            self.drop_peer(key, Closed::Replaced).await;
        }
        let Some(key) = self.admit(peer, from, hello, slice, now) else {
            return;
        };
        if let Err(why) = self.prime(key, hello, datagram, now) {
            self.drop_peer(key, why).await;
            return;
        }
        self.feed(key, from, datagram, now, true).await;
    }

    /// Answer a ClientHello without a good cookie, by way of `from`; nothing is kept.
    async fn hello_verify(
        &mut self,
        peer: SocketAddr,
        from: SocketAddr,
        hello: &ClientHello<'_>,
        received: usize,
        now: Instant,
    ) {
        // Never more bytes out than in.
        if received < hello::HELLO_VERIFY_LEN {
            count(&self.stats.dropped_stray);
            return;
        }
        let Some(cookie) = self.cookies.make(hello, peer, now) else {
            return;
        };
        let answer = hello::verify_request(hello, &cookie);
        count(&self.stats.hello_verify_sent);
        let _ = self.socket.send_to(&answer, from).await;
    }

    /// The caps, then the gate; the state, if both admit it.
    fn admit(
        &mut self,
        peer: SocketAddr,
        from: SocketAddr,
        hello: &ClientHello<'_>,
        cookie_slice: u64,
        now: Instant,
    ) -> Option<Key> {
        // Beside an established session, a device that rebooted: it takes no more of
        // its source's share than the session it replaces.
        let slot = match self.peers.get(&(peer, Slot::Current)) {
            Some(p) if p.connected => Slot::Next,
            _ => Slot::Current,
        };
        let source = source_of(peer.ip());
        let from_source = self.per_source.get(&source).copied().unwrap_or(0);
        if self.half_open >= self.settings.max_half_open
            || (slot == Slot::Current
                && (self.sessions >= self.settings.max_sessions
                    || from_source >= self.settings.max_per_source))
        {
            count(&self.stats.refused_capped);
            return None;
        }
        let gate = &self.gate;
        let Ok(Some(admitted)) = guarded(|| gate.admit(peer)) else {
            count(&self.stats.refused_gate);
            return None;
        };
        let config = self.config.clone();
        let Ok(dtls) = guarded(|| Dtls::new_12_psk(config, now.into_std())) else {
            count(&self.stats.panics);
            return None;
        };
        let session = self.next_session;
        self.next_session += 1;
        self.peers.insert(
            (peer, slot),
            Box::new(Peer {
                dtls,
                session,
                identity: None,
                connected: false,
                started: now,
                heard: now,
                timer: None,
                random: hello.random,
                cookie_slice,
                source,
                route: from,
                _admitted: admitted,
            }),
        );
        if slot == Slot::Current {
            *self.per_source.entry(source).or_default() += 1;
            self.sessions += 1;
        }
        self.half_open += 1;
        self.publish();
        count(&self.stats.handshakes_started);
        Some((peer, slot))
    }

    /// Bring a new state to where the client is: dimpl expects a handshake's first
    /// ClientHello to have message_seq 0, and the client's has one more for each
    /// HelloVerifyRequest it got. The same ClientHello with each earlier message_seq
    /// and no good cookie makes dimpl answer (unsent) and move on, as the client did.
    fn prime(
        &mut self,
        key: Key,
        hello: &ClientHello<'_>,
        datagram: &[u8],
        now: Instant,
    ) -> Result<(), Closed> {
        let internal = || Closed::Failed("internal error".into());
        let Some(p) = self.peers.get_mut(&key) else {
            return Ok(());
        };
        let mut earlier = datagram.to_vec();
        earlier[hello.cookie_at..hello.cookie_at + hello.cookie.len()].fill(0);
        let binding = self.cookies.binding(key.0, p.cookie_slice);
        let out = &mut self.out;
        for seq in 0..hello.message_seq {
            let at = hello::MESSAGE_SEQ_AT;
            earlier[at..at + 2].copy_from_slice(&seq.to_be_bytes());
            let fed = guarded(|| {
                p.dtls.handle_timeout(now.into_std())?;
                let _bound = cookie::bind(binding);
                p.dtls.handle_packet(&earlier)
            })
            .map_err(|Panicked| internal())?;
            if let Err(e) = fed {
                return Err(p.failure(&e, false));
            }
            // What dimpl answers the client already has: drop it.
            for _ in 0..MAX_OUTPUTS {
                let step = guarded(|| match p.dtls.poll_output(out) {
                    Output::Timeout(_) => Some(0),
                    Output::BufferTooSmall { needed } => Some(needed),
                    _ => None,
                })
                .map_err(|Panicked| internal())?;
                match step {
                    Some(0) => break,
                    Some(needed) if needed <= 16 * MAX_DATAGRAM => out.resize(needed, 0),
                    Some(_) => return Err(Closed::Failed("record too large".into())),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// Hand one datagram, which came from `from`, to a state; whether something
    /// authenticated came of it.
    async fn feed(
        &mut self,
        key: Key,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        hello: bool,
    ) -> bool {
        let Some(p) = self.peers.get_mut(&key) else {
            return false;
        };
        let binding = hello.then(|| self.cookies.binding(key.0, p.cookie_slice));
        // The resolver's slot belongs to this call only. dimpl asks it only during a
        // handshake: an established session's data takes no lock for it.
        let asking = !p.connected;
        if asking {
            let _ = self.resolver.take_asked();
        }
        let fed = guarded(|| {
            p.dtls.handle_timeout(now.into_std())?;
            let _bound = binding.map(cookie::bind);
            p.dtls.handle_packet(datagram)
        });
        if asking && let Some(id) = self.resolver.take_asked() {
            p.identity = Some(id);
        }
        match fed {
            Err(Panicked) => {
                self.panicked(key).await;
                return false;
            }
            // dimpl dropped the datagram; what it holds stays.
            Ok(Err(dimpl::Error::ReceiveQueueFull)) => return false,
            Ok(Err(e)) => {
                let why = p.failure(&e, false);
                self.drop_peer(key, why).await;
                return false;
            }
            Ok(Ok(())) => {}
        }
        self.flush(key, Some(from), now).await
    }

    async fn send(&mut self, peer: SocketAddr, session: u64, data: &[u8]) {
        let key = (peer, Slot::Current);
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if !p.connected || p.session != session {
            return;
        }
        match guarded(|| p.dtls.send_application_data(data)) {
            Err(Panicked) => return self.panicked(key).await,
            Ok(Err(e)) => return self.drop_peer(key, Closed::Failed(e.to_string())).await,
            Ok(Ok(_)) => {}
        }
        self.flush(key, None, Instant::now()).await;
    }

    async fn close(&mut self, peer: SocketAddr, session: u64) {
        let key = (peer, Slot::Current);
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if p.session != session {
            return;
        }
        // close_notify, if it can be said.
        if let Ok(Ok(())) = guarded(|| p.dtls.close()) {
            self.flush(key, None, Instant::now()).await;
        }
        self.drop_peer(key, Closed::Local).await;
    }

    /// Take what the state has for the wire and for the CoAP layer; `from`: where the
    /// datagram just handed over came from.
    fn drain(&mut self, key: Key, from: Option<SocketAddr>, now: Instant) -> Drained {
        self.wire.clear();
        self.wire_ends.clear();
        self.data.clear();
        let mut drained = Drained::default();
        let Some(p) = self.peers.get_mut(&key) else {
            return drained;
        };
        drained.to = Some(p.route);
        enum Step {
            More,
            Grow(usize),
            Connected,
            CloseNotify,
            Timeout(std::time::Instant),
        }
        let (out, wire, ends, data) = (
            &mut self.out,
            &mut self.wire,
            &mut self.wire_ends,
            &mut self.data,
        );
        for _ in 0..MAX_OUTPUTS {
            let step = guarded(|| match p.dtls.poll_output(out) {
                Output::Packet(bytes) => {
                    wire.extend_from_slice(bytes);
                    ends.push(wire.len());
                    Step::More
                }
                Output::BufferTooSmall { needed } => Step::Grow(needed),
                Output::Connected => Step::Connected,
                Output::ApplicationData(bytes) => {
                    data.push(bytes.to_vec());
                    Step::More
                }
                Output::CloseNotify => Step::CloseNotify,
                Output::Timeout(at) => Step::Timeout(at),
                _ => Step::More,
            });
            match step {
                Err(Panicked) => {
                    count(&self.stats.panics);
                    drained.end = Some(Closed::Failed("internal error".into()));
                    return drained;
                }
                Ok(Step::More) => {}
                Ok(Step::Grow(needed)) => {
                    // dimpl's records are bounded by its MTU; never more than this.
                    if needed > 16 * MAX_DATAGRAM {
                        drained.end = Some(Closed::Failed("record too large".into()));
                        return drained;
                    }
                    out.resize(needed, 0);
                }
                Ok(Step::Connected) => {
                    // A handshake with no identity asked for proved no key.
                    if p.identity.is_none() {
                        drained.end = Some(Closed::HandshakeFailed { identity: None });
                        return drained;
                    }
                    p.connected = true;
                    p.heard = now;
                    drained.connected = true;
                }
                Ok(Step::CloseNotify) => {
                    drained.authenticated = true;
                    drained.end = Some(Closed::PeerClosed);
                    return drained;
                }
                Ok(Step::Timeout(at)) => {
                    p.timer = Some(Instant::from_std(at));
                    break;
                }
            }
        }
        if !data.is_empty() {
            drained.authenticated = true;
            p.heard = now;
            // Authenticated: the way it came is the way back, if it came the same
            // kind of way (through a balancer, or straight): a record captured on
            // the device's own network and raced to the gateway straight cannot
            // take a session that runs through a balancer off it, nor the reverse.
            let balancer = |a: SocketAddr| {
                self.settings
                    .balancers
                    .as_ref()
                    .is_some_and(|lb| lb.allows(a.ip()))
            };
            if let Some(from) = from.filter(|f| balancer(*f) == balancer(p.route)) {
                p.route = from;
                drained.to = Some(from);
            }
        }
        drained
    }

    /// Send what the state has for the wire, and pass on what it has for the CoAP
    /// layer; whether something authenticated came. `from`: as `drain`.
    async fn flush(&mut self, mut key: Key, from: Option<SocketAddr>, now: Instant) -> bool {
        let drained = self.drain(key, from, now);
        let to = drained.to.unwrap_or(key.0);
        let mut start = 0;
        for &end in &self.wire_ends {
            let _ = self.socket.send_to(&self.wire[start..end], to).await;
            start = end;
        }
        if drained.connected {
            self.half_open = self.half_open.saturating_sub(1);
            self.publish();
            count(&self.stats.handshakes_completed);
            if key.1 == Slot::Next {
                // The device's new session replaces its old one, which ends first.
                count(&self.stats.replaced);
                self.drop_peer((key.0, Slot::Current), Closed::Replaced)
                    .await;
                key = (key.0, Slot::Current);
            }
            // The identity goes to the session; the peer keeps none once connected.
            if let Some((identity, session)) = self
                .peers
                .get_mut(&key)
                .and_then(|p| Some((p.identity.take()?, p.session)))
            {
                // A session's start is never dropped: the CoAP layer only routes, so
                // the wait is short.
                let _ = self
                    .events
                    .send(Event::Connected {
                        peer: key.0,
                        identity,
                        session,
                        proof: Proof::PreSharedKey,
                    })
                    .await;
            }
        }
        let mut data = std::mem::take(&mut self.data);
        for bytes in data.drain(..) {
            // Data may be dropped when the CoAP layer is behind (CoAP retransmits).
            let event = Event::Data {
                peer: key.0,
                data: bytes,
            };
            if self.events.try_send(event).is_err() {
                count(&self.stats.dropped_queue_full);
            }
        }
        self.data = data;
        if let Some(why) = drained.end {
            self.drop_peer(key, why).await;
        }
        drained.authenticated
    }

    /// Deadlines, and dimpl's retransmissions.
    async fn timers(&mut self) {
        let now = Instant::now();
        let mut expired = std::mem::take(&mut self.expired);
        let mut due = std::mem::take(&mut self.due);
        for (key, p) in &self.peers {
            if !p.connected && now.duration_since(p.started) >= self.settings.handshake_timeout {
                let identity = p.identity.clone();
                expired.push((*key, Closed::HandshakeTimeout { identity }));
            } else if p.connected && now.duration_since(p.heard) >= self.settings.idle_timeout {
                expired.push((*key, Closed::Idle));
            } else if p.timer.is_some_and(|t| t <= now) {
                due.push(*key);
            }
        }
        for (key, why) in expired.drain(..) {
            self.drop_peer(key, why).await;
        }
        for key in due.drain(..) {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            p.timer = None;
            let asking = !p.connected;
            if asking {
                let _ = self.resolver.take_asked();
            }
            let fed = guarded(|| p.dtls.handle_timeout(now.into_std()));
            if asking && let Some(id) = self.resolver.take_asked() {
                p.identity = Some(id);
            }
            match fed {
                Err(Panicked) => self.panicked(key).await,
                Ok(Err(e)) => {
                    let why = p.failure(&e, true);
                    self.drop_peer(key, why).await;
                }
                Ok(Ok(())) => {
                    self.flush(key, None, now).await;
                }
            }
        }
        self.expired = expired;
        self.due = due;
    }

    async fn panicked(&mut self, key: Key) {
        count(&self.stats.panics);
        tracing::error!(peer = %key.0, "the DTLS state of a peer panicked: that peer is dropped");
        self.drop_peer(key, Closed::Failed("internal error".into()))
            .await;
    }

    async fn drop_peer(&mut self, key: Key, why: Closed) {
        let Some(p) = self.peers.remove(&key) else {
            return;
        };
        let (peer, slot) = key;
        if !p.connected {
            self.half_open = self.half_open.saturating_sub(1);
        }
        match &why {
            Closed::HandshakeFailed { .. } => count(&self.stats.handshakes_failed),
            Closed::HandshakeTimeout { .. } => count(&self.stats.handshakes_timed_out),
            _ => {}
        }
        if slot == Slot::Current {
            // A handshake beside the session takes the address's place.
            if let Some(next) = self.peers.remove(&(peer, Slot::Next)) {
                self.peers.insert((peer, Slot::Current), next);
            } else {
                self.sessions = self.sessions.saturating_sub(1);
                if let Some(n) = self.per_source.get_mut(&p.source) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.per_source.remove(&p.source);
                    }
                }
            }
        }
        self.publish();
        // The gate's token goes with the state, before anyone hears of its end.
        let connected = p.connected;
        drop(p);
        let event = Event::Closed { peer, why };
        match slot {
            // The address's events are its session's: a failed re-handshake is only
            // counted.
            Slot::Next => {}
            // The CoAP layer holds an established session's slot and state: it must
            // hear of its end. It only routes, so the wait is short.
            Slot::Current if connected => {
                let _ = self.events.send(event).await;
            }
            // A handshake's end may be dropped: a flood of failing handshakes must not
            // stall the socket behind a slow CoAP layer.
            Slot::Current => {
                if self.events.try_send(event).is_err() {
                    count(&self.stats.dropped_closed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hello::{self, ClientHello};
    use super::*;

    /// A ClientHello record as a client sends it: `cookie`, `message_seq`.
    fn client_hello(cookie: &[u8], message_seq: u16) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend((0..32).map(|i| i as u8));
        body.push(0); // session id
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0xa8, 1, 0]); // one suite, null compression
        let mut m = vec![1, 0, 0, body.len() as u8];
        m.extend_from_slice(&message_seq.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0, 0, body.len() as u8]);
        m.extend_from_slice(&body);
        let mut d = vec![22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 5];
        d.extend_from_slice(&(m.len() as u16).to_be_bytes());
        d.extend_from_slice(&m);
        d
    }

    #[test]
    fn a_client_hello_alone_in_its_datagram_is_read_and_anything_else_is_not() {
        let d = client_hello(&[7; 32], 1);
        let h = ClientHello::read(&d).unwrap();
        assert_eq!((h.message_seq, h.record_seq), (1, [0, 0, 0, 0, 0, 5]));
        assert_eq!(h.random[31], 31);
        assert_eq!(
            (h.cookie, &d[h.cookie_at..h.cookie_at + 32]),
            (&[7u8; 32][..], &[7u8; 32][..])
        );
        let mut epoch1 = d.clone();
        epoch1[4] = 1;
        let mut fragment = d.clone();
        fragment[RECORD_HEADER + 8] = 1;
        let mut two_records = d.clone();
        two_records.extend_from_slice(&d);
        let mut late = client_hello(&[], MAX_HELLO_SEQ + 1);
        assert!(ClientHello::read(&late).is_none());
        late = client_hello(&[], MAX_HELLO_SEQ);
        assert!(ClientHello::read(&late).is_some());
        for bad in [epoch1, fragment, two_records, d[..d.len() - 1].to_vec()] {
            assert!(ClientHello::read(&bad).is_none(), "{bad:?}");
        }
        // Every cut and every single-bit flip: read or refused, never a panic.
        for cut in 0..d.len() {
            let _ = ClientHello::read(&d[..cut]);
        }
        for i in 0..d.len() * 8 {
            let mut b = d.clone();
            b[i / 8] ^= 1 << (i % 8);
            let _ = ClientHello::read(&b);
        }
    }

    #[test]
    fn a_hello_verify_request_echoes_the_sequence_numbers_and_is_no_larger_than_a_hello() {
        let d = client_hello(&[], 0);
        let h = ClientHello::read(&d).unwrap();
        let hvr = hello::verify_request(&h, &[9; 32]);
        assert!(hvr.len() <= d.len());
        assert_eq!(hvr[..3], [22, 254, 255]);
        assert_eq!(hvr[5..11], h.record_seq);
        assert_eq!(
            usize::from(u16::from_be_bytes([hvr[11], hvr[12]])),
            hvr.len() - 13
        );
        // HelloVerifyRequest, 35 bytes, message_seq 0, whole; DTLS 1.0; the cookie.
        assert_eq!(hvr[13..25], [3, 0, 0, 35, 0, 0, 0, 0, 0, 0, 0, 35]);
        assert_eq!(hvr[25..28], [254, 255, 32]);
        assert_eq!(hvr[28..], [9; 32]);
    }

    #[test]
    fn ipv6_peers_in_one_slash_64_count_as_one_source() {
        let a = source_of("2001:db8:1:2::1".parse().unwrap());
        let b = source_of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = source_of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(
            source_of("192.0.2.1".parse().unwrap()),
            source_of("192.0.2.2".parse().unwrap())
        );
    }
}
