//! Plain CoAP on loopback (`[listeners] coap`, off by default): for a process on the
//! gateway's own machine that cannot do DTLS. The configuration refuses any address
//! but a loopback one, as it does for plain MQTT.
//!
//! With no DTLS handshake to prove a key, a device proves its identity the way a plain
//! MQTT client does, with its secret: the first request from an address carries the
//! device id (option 65001) and the device's secret (option 65003), both from the
//! experimental range (RFC 7252 §12.2) and critical, so a server that does not know
//! them refuses the request rather than ignoring them. The address then has a session,
//! handed to the CoAP layer as a DTLS session would be (the secret in place of the
//! handshake's proof), until it is idle for `idle_timeout` or the CoAP layer closes
//! it.
//!
//! UDP has no connection to tie later requests to the login (a port the device's
//! client left may be bound by another local process), so every request must carry
//! both options again, checked against the session's (a keyed digest of the secret,
//! compared in constant time); a request without them is answered 4.01 and not read,
//! one naming another device or another secret starts a new login. The options are
//! taken out of each request before the CoAP layer reads it; a request that cannot be
//! re-encoded without them is dropped. Messages that cannot carry options (ACKs,
//! resets, pings) pass as they are, and no Observe relation is kept over plain CoAP
//! (a registration is answered as a poll), so nothing is sent to an address unasked.

use crate::dtls::{Admit, Closed, Command, DtlsError, Endpoint, Event, Proof, Sender, Stats};
use crate::reply::{Exchange, Reply};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use hmac::{KeyInit, Mac};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The option carrying the device id.
pub const DEVICE_ID_OPTION: u16 = 65001;
/// The option carrying the device's secret.
pub const SECRET_OPTION: u16 = 65003;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;
/// Longest secret taken (the registry's secrets are far shorter).
const MAX_SECRET: usize = 256;
/// How often idle sessions are looked for.
const TICK: Duration = Duration::from_secs(1);

/// The endpoint's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Addresses with a session at most.
    pub max_sessions: usize,
    pub idle_timeout: Duration,
    /// Events waiting for the CoAP layer, and its commands waiting for this task.
    pub queue: usize,
}

struct Peer {
    session: u64,
    heard: Instant,
    /// The device the session is for, and its secret's digest under `Task::key`.
    id: String,
    digest: [u8; 32],
    _admitted: Box<dyn Send + Sync>,
}

struct Task {
    socket: UdpSocket,
    settings: Settings,
    gate: Arc<dyn Admit>,
    peers: HashMap<SocketAddr, Peer>,
    next_session: u64,
    events: mpsc::Sender<Event>,
    stats: Arc<Stats>,
    /// Random, this endpoint's own: the key of the secrets' digests.
    key: [u8; 32],
}

type Hmac = hmac::Hmac<sha2::Sha256>;

/// `secret`'s digest under `key`.
fn digest(key: &[u8; 32], id: &str, secret: &[u8]) -> [u8; 32] {
    let Ok(mut mac) = <Hmac as KeyInit>::new_from_slice(key) else {
        return [0; 32];
    };
    mac.update(id.as_bytes());
    mac.update(&[0]);
    mac.update(secret);
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Bind a plain CoAP endpoint (the caller has checked the address is loopback).
pub async fn bind(
    addr: SocketAddr,
    settings: Settings,
    gate: Arc<dyn Admit>,
) -> Result<Endpoint, DtlsError> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| DtlsError::Bind { addr, source })?;
    let local = socket
        .local_addr()
        .map_err(|source| DtlsError::Bind { addr, source })?;
    let (events_tx, events) = mpsc::channel(settings.queue.max(1));
    let (commands, commands_rx) = mpsc::channel(settings.queue.max(1));
    let (closes, closes_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Stats::default());
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(|e| DtlsError::Config(format!("plain CoAP: no randomness: {e}")))?;
    let task = Task {
        socket,
        settings,
        gate,
        peers: HashMap::new(),
        next_session: 1,
        events: events_tx,
        stats: stats.clone(),
        key,
    };
    tokio::spawn(task.run(commands_rx, closes_rx));
    Ok(Endpoint {
        local,
        sender: Sender::new(commands, closes, stats.clone()),
        events,
        stats,
    })
}

/// What a request says about who sent it.
#[derive(PartialEq, Eq)]
enum Claim {
    /// The id and the secret, and the request without them.
    Credentials {
        id: String,
        secret: Vec<u8>,
        request: Vec<u8>,
    },
    /// A request without both (or with a malformed one): the answer, 4.01.
    Refused(Option<Vec<u8>>),
    /// Not a request: nothing to answer.
    Ignored,
}

impl std::fmt::Debug for Claim {
    // The secret is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Credentials { id, .. } => write!(f, "Credentials {{ id: {id:?}, .. }}"),
            Claim::Refused(a) => write!(f, "Refused({})", a.is_some()),
            Claim::Ignored => f.write_str("Ignored"),
        }
    }
}

/// Take the credential options out of `packet` (read from `datagram`, once): the
/// datagram without them, and their values; `None` when they are in it but it cannot
/// be written again without them.
type Stripped = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

fn strip(mut packet: Packet, datagram: &[u8]) -> Option<Stripped> {
    let take = |p: &mut Packet, n: u16| {
        let v = p
            .get_option(CoapOption::Unknown(n))
            .and_then(|values| values.front().cloned());
        p.clear_option(CoapOption::Unknown(n));
        v
    };
    let id = take(&mut packet, DEVICE_ID_OPTION);
    let secret = take(&mut packet, SECRET_OPTION);
    if id.is_none() && secret.is_none() {
        return Some((datagram.to_vec(), None, None));
    }
    let bytes = packet.to_bytes_with_limit(MAX_DATAGRAM).ok()?;
    Some((bytes, id, secret))
}

fn claim(datagram: &[u8]) -> Claim {
    let Ok(packet) = Packet::from_bytes(datagram) else {
        return Claim::Ignored;
    };
    if !matches!(packet.header.code, MessageClass::Request(_))
        || packet.header.get_type() == MessageType::Acknowledgement
        || packet.header.get_type() == MessageType::Reset
    {
        return Claim::Ignored;
    }
    let exchange = Exchange::of_packet(&packet);
    // A non-confirmable answer has an id of its own.
    let own_id = packet.header.message_id.wrapping_add(0x8000);
    let refused = move || {
        Claim::Refused(exchange.map(|e| {
            Reply::refusal(
                ResponseType::Unauthorized,
                "plain CoAP: give the device id (option 65001) and its secret (option 65003)",
            )
            .answer(&e, own_id)
        }))
    };
    // The packet is read once: stripped from what was parsed here.
    let Some((request, id, secret)) = strip(packet, datagram) else {
        return Claim::Ignored;
    };
    let (Some(id), Some(secret)) = (id, secret) else {
        return refused();
    };
    let Ok(id) = String::from_utf8(id) else {
        return refused();
    };
    if id.is_empty() || secret.is_empty() || secret.len() > MAX_SECRET {
        return refused();
    }
    Claim::Credentials {
        id,
        secret,
        request,
    }
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
            // Biased: the CoAP layer's sends and closes, and the idle sweep, before more
            // input (a flood of datagrams cannot hold them off).
            tokio::select! {
                biased;
                c = commands.recv() => match c {
                    Some(Command::Send { peer, session, data }) => {
                        if self.peers.get(&peer).is_some_and(|p| p.session == session) {
                            let _ = self.socket.send_to(&data, peer).await;
                        }
                    }
                    None => return,
                },
                Some((peer, session)) = closes.recv() => {
                    // What the session sent before it closed goes out first (its 4.01).
                    while let Ok(Command::Send { peer, session, data }) = commands.try_recv() {
                        if self.peers.get(&peer).is_some_and(|p| p.session == session) {
                            let _ = self.socket.send_to(&data, peer).await;
                        }
                    }
                    if self.peers.get(&peer).is_some_and(|p| p.session == session) {
                        self.end(peer, Closed::Local).await;
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let idle: Vec<SocketAddr> = self
                        .peers
                        .iter()
                        .filter(|(_, p)| now.saturating_duration_since(p.heard) >= self.settings.idle_timeout)
                        .map(|(a, _)| *a)
                        .collect();
                    for peer in idle {
                        self.end(peer, Closed::Idle).await;
                    }
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => self.datagram(peer, &buf[..n]).await,
                    Err(e) => tracing::debug!(error = %e, "plain CoAP socket read"),
                },
            }
        }
    }

    /// Hand a request of an established session to the CoAP layer.
    fn forward(&mut self, peer: SocketAddr, data: Vec<u8>) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.heard = Instant::now();
        }
        if self.events.try_send(Event::Data { peer, data }).is_err() {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn end(&mut self, peer: SocketAddr, why: Closed) {
        if self.peers.remove(&peer).is_some() {
            self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
            let _ = self.events.send(Event::Closed { peer, why }).await;
        }
    }

    async fn datagram(&mut self, peer: SocketAddr, datagram: &[u8]) {
        if self.peers.contains_key(&peer) {
            match claim(datagram) {
                // The session's own device and secret: read it.
                Claim::Credentials {
                    id,
                    secret,
                    request,
                } if self.peers.get(&peer).is_some_and(|p| {
                    p.id == id && same(&p.digest, &digest(&self.key, &id, &secret))
                }) =>
                {
                    self.forward(peer, request);
                    return;
                }
                // Another device, or another secret: the session ends, and this is a
                // new login.
                Claim::Credentials { .. } => {
                    self.end(peer, Closed::Replaced).await;
                }
                Claim::Refused(answer) => {
                    self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                    if let Some(answer) = answer {
                        let _ = self.socket.send_to(&answer, peer).await;
                    }
                    return;
                }
                // What carries no options (an ACK, a reset, a ping) or is no CoAP the
                // session reads as it is.
                Claim::Ignored => {
                    self.forward(peer, datagram.to_vec());
                    return;
                }
            }
        }
        let (id, secret, request) = match claim(datagram) {
            Claim::Credentials {
                id,
                secret,
                request,
            } => (id, secret, request),
            Claim::Refused(answer) => {
                self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                if let Some(answer) = answer {
                    let _ = self.socket.send_to(&answer, peer).await;
                }
                return;
            }
            Claim::Ignored => {
                self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if self.peers.len() >= self.settings.max_sessions {
            self.stats.refused_capped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Bans, the per-source caps and rate, as for every new connection.
        let Some(admitted) = self.gate.admit(peer) else {
            self.stats.refused_gate.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let session = self.next_session;
        self.next_session += 1;
        self.peers.insert(
            peer,
            Peer {
                session,
                heard: Instant::now(),
                digest: digest(&self.key, &id, &secret),
                id: id.clone(),
                _admitted: admitted,
            },
        );
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats
            .handshakes_completed
            .fetch_add(1, Ordering::Relaxed);
        // The session's start is never dropped, and its first request follows it.
        let _ = self
            .events
            .send(Event::Connected {
                peer,
                identity: id,
                session,
                proof: Proof::Secret(secret),
            })
            .await;
        let _ = self
            .events
            .send(Event::Data {
                peer,
                data: request,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::RequestType;

    fn request(options: &[(u16, &[u8])]) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = 9;
        p.set_token(vec![1]);
        p.add_option(CoapOption::UriPath, b"t".to_vec());
        for (n, v) in options {
            p.add_option(CoapOption::Unknown(*n), v.to_vec());
        }
        p.payload = b"{}".to_vec();
        p.to_bytes().unwrap()
    }

    #[test]
    fn a_first_request_with_both_options_is_a_claim_and_loses_them() {
        let d = request(&[(DEVICE_ID_OPTION, b"dev-1"), (SECRET_OPTION, b"s3cret")]);
        match claim(&d) {
            Claim::Credentials {
                id,
                secret,
                request,
            } => {
                assert_eq!((id.as_str(), secret.as_slice()), ("dev-1", &b"s3cret"[..]));
                let p = Packet::from_bytes(&request).unwrap();
                assert!(p.get_option(CoapOption::Unknown(SECRET_OPTION)).is_none());
                assert!(
                    p.get_option(CoapOption::Unknown(DEVICE_ID_OPTION))
                        .is_none()
                );
                assert_eq!(p.payload, b"{}");
            }
            other => panic!("expected credentials, got {other:?}"),
        }
    }

    #[test]
    fn a_first_request_without_a_secret_is_answered_4_01() {
        let d = request(&[(DEVICE_ID_OPTION, b"dev-1")]);
        let Claim::Refused(Some(answer)) = claim(&d) else {
            panic!("expected a refusal with an answer");
        };
        let p = Packet::from_bytes(&answer).unwrap();
        assert_eq!(
            p.header.code,
            MessageClass::Response(ResponseType::Unauthorized)
        );
        assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
    }

    #[test]
    fn what_is_no_request_is_not_answered() {
        assert_eq!(claim(b"\x00"), Claim::Ignored);
        let mut p = Packet::new();
        p.header.set_type(MessageType::Acknowledgement);
        assert_eq!(claim(&p.to_bytes().unwrap()), Claim::Ignored);
    }
}
