//! Accepting MQTT connections: plain TCP (loopback only) or TLS with optional client
//! certificates.
//!
//! Each connection gets its own task at once, so a peer that stalls its TLS
//! handshake or never sends CONNECT only ever holds its own task until its deadline;
//! other peers' handshakes proceed in parallel. Connection caps (in all and per
//! source) are enforced before any byte is read.

use crate::session::{self, Context, stopped};
use portcullis_core::audit::AuditEntry;
use portcullis_core::limit::{Rate, TokenBucket};
use portcullis_core::metrics::Metrics;
use portcullis_core::refusal::Refusal;
use portcullis_core::source_key::SourceKey;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Build the TLS acceptor of a listener. Clients may present a certificate from any of
/// `roots` (or none, and use a secret); which group may use which CA is checked at
/// CONNECT.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    roots: Arc<RootCertStore>,
) -> Result<TlsAcceptor, TlsSetupError> {
    let file_err = |path: &std::path::Path, reason: String| TlsSetupError::File {
        path: path.display().to_string(),
        reason,
    };
    let cert_bytes =
        std::fs::read(cert).map_err(|e| file_err(cert, format!("cannot read: {e}")))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in file".into()));
    }
    let key_bytes = std::fs::read(key).map_err(|e| file_err(key, format!("cannot read: {e}")))?;
    let private_key = rustls_pemfile::private_key(&mut key_bytes.as_slice())
        .map_err(|e| file_err(key, format!("bad PEM: {e}")))?
        .ok_or_else(|| file_err(key, "no private key in file".into()))?;
    let verifier = if roots.is_empty() {
        WebPkiClientVerifier::no_client_auth()
    } else {
        WebPkiClientVerifier::builder(roots)
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsSetupError::Config(e.to_string()))?
    };
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsSetupError::Config(format!("server certificate and key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Shared connection caps.
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    /// Connections not yet authenticated, oldest first; each holds the sender whose
    /// drop sheds it.
    unauthenticated: Mutex<Unauthenticated>,
    per_source_max: usize,
    per_source: Mutex<HashMap<SourceKey, usize>>,
    /// New connections per second from one source, before anything is read.
    rate: Rate,
    rates: Mutex<HashMap<SourceKey, TokenBucket>>,
    /// Prefix length of one IPv6 source (an IPv4 address is one source).
    ipv6_prefix: u8,
}

/// Sources whose connection rate is tracked at once; beyond it the table starts over
/// (a spray from very many addresses then meets only the per-source and total caps).
const MAX_RATE_SOURCES: usize = 100_000;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotAdmitted {
    TooMany,
    TooFast,
}

impl ConnectionLimits {
    pub fn new(
        total: usize,
        unauthenticated: usize,
        per_source: usize,
        rate: Rate,
        ipv6_prefix: u8,
    ) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            total: Arc::new(Semaphore::new(total)),
            unauthenticated: Mutex::new(Unauthenticated {
                cap: unauthenticated.max(1),
                next: 0,
                waiting: BTreeMap::new(),
            }),
            per_source_max: per_source,
            per_source: Mutex::new(HashMap::new()),
            rate,
            rates: Mutex::new(HashMap::new()),
            ipv6_prefix,
        })
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, NotAdmitted> {
        let ip = SourceKey::new(ip, self.ipv6_prefix);
        {
            let now = Instant::now();
            let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            if rates.len() >= MAX_RATE_SOURCES && !rates.contains_key(&ip) {
                rates.clear();
            }
            let bucket = rates
                .entry(ip)
                .or_insert_with(|| TokenBucket::new(self.rate, now));
            if bucket.take(1.0, now).is_err() {
                return Err(NotAdmitted::TooFast);
            }
        }
        self.admit_slot(ip).ok_or(NotAdmitted::TooMany)
    }

    fn admit_slot(self: &Arc<Self>, ip: SourceKey) -> Option<ConnectionSlot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_source_max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            limits: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// Connections that have not logged in yet, by age.
struct Unauthenticated {
    cap: usize,
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

impl ConnectionLimits {
    /// Count a new connection as not yet authenticated; at the cap, the oldest such
    /// connection is shed to make room (a flood of connections that never log in
    /// cannot keep a device out). Returns the new one's token, and whether one was shed.
    fn pre_auth(self: &Arc<Self>) -> (PreAuth, bool) {
        let (tx, rx) = oneshot::channel();
        let mut u = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut shed = false;
        while u.waiting.len() >= u.cap {
            // Dropping its sender wakes the connection, which ends.
            u.waiting.pop_first();
            shed = true;
        }
        let number = u.next;
        u.next += 1;
        u.waiting.insert(number, tx);
        (
            PreAuth {
                limits: Some(self.clone()),
                number,
                shed: rx,
            },
            shed,
        )
    }
}

/// Held by a connection until it authenticates (or ends): it counts against
/// `limits.max_unauthenticated`, and `shed` resolves when a newer one displaces it.
pub struct PreAuth {
    limits: Option<Arc<ConnectionLimits>>,
    number: u64,
    shed: oneshot::Receiver<()>,
}

impl PreAuth {
    /// Resolves when the connection is shed for a newer one. Cancel-safe.
    pub async fn shed(&mut self) {
        let _ = (&mut self.shed).await;
    }

    /// The peer logged in: it no longer counts as unauthenticated.
    pub fn authenticated(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(limits) = self.limits.take() {
            limits
                .unauthenticated
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .waiting
                .remove(&self.number);
        }
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        self.release();
    }
}

struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: SourceKey,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self
            .limits
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accept connections until shutdown. Returns when the listener stops accepting;
/// sessions already running finish on their own (they watch the same signal).
pub async fn serve(
    listener: TcpListener,
    tls: Option<watch::Receiver<TlsAcceptor>>,
    handshake_timeout: Duration,
    ctx: Arc<Context>,
    limits: Arc<ConnectionLimits>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        // A banned source is closed before a byte is read.
        if let Some(ban) = ctx.auth.source_ban(peer.ip()) {
            ctx.metrics.refused(Refusal::Banned);
            ctx.audit.record(
                AuditEntry::new("connect", "refuse")
                    .source(peer)
                    .reason(format!("banned: {ban}")),
            );
            drop(stream);
            continue;
        }
        let slot = match limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                let refusal = match why {
                    NotAdmitted::TooMany => Refusal::ConnectionLimit,
                    NotAdmitted::TooFast => Refusal::ConnectionRate,
                };
                ctx.metrics.refused(refusal);
                ctx.audit.record(
                    AuditEntry::new("connect", "refuse")
                        .source(peer)
                        .reason(format!("{}: {}", refusal.label(), refusal.detail())),
                );
                drop(stream);
                continue;
            }
        };
        let (mut pre_auth, shed) = limits.pre_auth();
        if shed {
            ctx.metrics.refused(Refusal::UnauthenticatedShed);
        }
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        // The acceptor of the moment: a reload swaps in a new certificate or CAs.
        let tls = tls.as_ref().map(|rx| rx.borrow().clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                // Boxed: a plain connection does not carry the (larger) state of a
                // TLS one, and the task itself stays small.
                None => Box::pin(session::run(ctx, stream, peer, None, pre_auth)).await,
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        done = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)) => done,
                        _ = pre_auth.shed() => {
                            shed_unauthenticated(&ctx, peer);
                            return;
                        }
                    };
                    match handshake {
                        Ok(Ok(tls_stream)) => {
                            let certs = tls_stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                            Box::pin(session::run(ctx, tls_stream, peer, certs, pre_auth)).await
                        }
                        Ok(Err(e)) => handshake_failed(&ctx, peer, &e.to_string()),
                        Err(_) => handshake_failed(&ctx, peer, "handshake not finished in time"),
                    }
                }
            }
        });
    }
}

/// A connection that had not logged in was shed for a newer one.
pub(crate) fn shed_unauthenticated(ctx: &Context, peer: SocketAddr) {
    ctx.audit.record(
        AuditEntry::new("connect", "refuse")
            .source(peer)
            .reason("unauthenticated_shed: not logged in, shed for a newer connection at limits.max_unauthenticated"),
    );
}

fn handshake_failed(ctx: &Context, peer: SocketAddr, why: &str) {
    Metrics::inc(&ctx.metrics.handshake_failures);
    ctx.metrics.refused(Refusal::TlsHandshakeFailed);
    ctx.audit.record(
        AuditEntry::new("handshake", "refuse")
            .source(peer)
            .protocol("tls")
            .reason(why.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(unauthenticated: usize) -> Arc<ConnectionLimits> {
        let rate = Rate {
            per_second: 1000.0,
            burst: 1000.0,
        };
        ConnectionLimits::new(100, unauthenticated, 100, rate, 64)
    }

    fn is_shed(token: &mut PreAuth) -> bool {
        matches!(
            token.shed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        )
    }

    #[test]
    fn a_connection_past_the_cap_sheds_the_oldest_unauthenticated_one() {
        let limits = limits(2);
        let (mut oldest, shed) = limits.pre_auth();
        assert!(!shed);
        let (mut middle, _) = limits.pre_auth();
        let (mut newest, shed) = limits.pre_auth();
        assert!(shed);
        assert!(is_shed(&mut oldest));
        assert!(!is_shed(&mut middle));
        assert!(!is_shed(&mut newest));
    }

    #[test]
    fn an_authenticated_connection_no_longer_counts_and_is_never_shed() {
        let limits = limits(1);
        let (first, _) = limits.pre_auth();
        first.authenticated();
        let (mut second, shed) = limits.pre_auth();
        assert!(!shed);
        assert!(!is_shed(&mut second));
        drop(second);
        let (_third, shed) = limits.pre_auth();
        assert!(!shed, "an ended connection frees its place");
    }
}
