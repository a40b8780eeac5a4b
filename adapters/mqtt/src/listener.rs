//! Accepting MQTT connections: plain TCP (loopback only) or TLS with optional client
//! certificates.
//!
//! Each connection gets its own task at once, so a peer that stalls its TLS
//! handshake or never sends CONNECT only ever holds its own task until its deadline;
//! other peers' handshakes proceed in parallel. Connection caps (in all and per
//! source) are enforced before any byte is read.

use crate::proxy;
use crate::session::{self, Context, stopped};
use portcullis_core::audit::AuditEntry;
use portcullis_core::metrics::Metrics;
use portcullis_core::proxy_header::LoadBalancers;
use portcullis_core::refusal::Refusal;
use portcullis_core::source_gate::{Admitted, ConnectionLimits, SourceGate};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::{Error as PemError, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in file".into()));
    }
    let key_bytes = std::fs::read(key).map_err(|e| file_err(key, format!("cannot read: {e}")))?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
        PemError::NoItemsFound => file_err(key, "no private key in file".into()),
        e => file_err(key, format!("bad PEM: {e}")),
    })?;
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

/// Accept connections until shutdown. Returns when the listener stops accepting;
/// sessions already running finish on their own (they watch the same signal).
pub async fn serve(
    listener: TcpListener,
    tls: Option<watch::Receiver<TlsAcceptor>>,
    handshake_timeout: Duration,
    ctx: Arc<Context>,
    limits: Arc<ConnectionLimits>,
    shutdown: watch::Receiver<bool>,
) {
    serve_behind(
        listener,
        tls,
        handshake_timeout,
        ctx,
        limits,
        None,
        shutdown,
    )
    .await
}

/// `serve`, on a listener that may have load balancers in front of it: a connection
/// from one of `balancers` starts with a PROXY protocol v2 header, and the client it
/// names is the connection's peer from then on (bans, caps, rates, back-off, audit,
/// the behaviour model). A header from any other source is refused. `None`: no
/// header is taken from anyone (the bytes are then MQTT or TLS, as on any listener).
pub async fn serve_behind(
    listener: TcpListener,
    tls: Option<watch::Receiver<TlsAcceptor>>,
    handshake_timeout: Duration,
    ctx: Arc<Context>,
    limits: Arc<ConnectionLimits>,
    balancers: Option<Arc<LoadBalancers>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = SourceGate {
        limits,
        auth: ctx.auth.clone(),
        metrics: ctx.metrics.clone(),
        audit: ctx.audit.clone(),
    };
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
        let _ = stream.set_nodelay(true);
        // The acceptor of the moment: a reload swaps in a new certificate or CAs.
        let acceptor = tls.as_ref().map(|rx| rx.borrow().clone());
        let link = Link {
            ctx: ctx.clone(),
            tls: acceptor,
            handshake_timeout,
        };
        if let Some(lb) = balancers.as_ref().filter(|lb| lb.allows(peer.ip())) {
            // The client is not known until the header is read: the gate is passed
            // after it, with the client's address.
            // At the bound the oldest connection still waiting for its header is
            // shed (it says so as it ends): one that never sends a header cannot
            // keep a device out.
            let (waiting, _shed) = lb.pending();
            let (lb, gate, shutdown) = (lb.clone(), gate.clone(), shutdown.clone());
            tokio::spawn(async move {
                let Some((stream, client)) =
                    proxy::from_balancer(&link.ctx, stream, peer, &lb, waiting, shutdown).await
                else {
                    return;
                };
                // A banned client, or one over the caps, is closed before it is read.
                let Ok(admitted) = gate.admit(client) else {
                    return;
                };
                link.run(stream, client, admitted).await;
            });
            continue;
        }
        // A banned source, or one over the caps, is closed before a byte is read.
        let Ok(mut admitted) = gate.admit(peer) else {
            drop(stream);
            continue;
        };
        let check_header = balancers.is_some();
        tokio::spawn(async move {
            let mut link = link;
            if check_header {
                let started = std::time::Instant::now();
                if !proxy::no_header_claimed(&link, &stream, peer, &mut admitted).await {
                    return;
                }
                // The wait for the first bytes is part of the handshake's time.
                link.handshake_timeout = link.handshake_timeout.saturating_sub(started.elapsed());
            }
            link.run(stream, peer, admitted).await;
        });
    }
}

/// What a connection needs once its peer is known and admitted.
pub(crate) struct Link {
    pub(crate) ctx: Arc<Context>,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) handshake_timeout: Duration,
}

impl Link {
    /// The TLS handshake if any, then the session.
    async fn run(self, stream: TcpStream, peer: SocketAddr, admitted: Admitted) {
        let Admitted { slot, pre_auth } = admitted;
        let mut pre_auth = pre_auth;
        let _slot = slot;
        let ctx = self.ctx;
        match self.tls {
            // Boxed: a plain connection does not carry the (larger) state of a
            // TLS one, and the task itself stays small.
            None => Box::pin(session::run(ctx, stream, peer, None, pre_auth)).await,
            Some(acceptor) => {
                let handshake = tokio::select! {
                    done = tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)) => done,
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
    }
}

/// A connection that had not logged in was shed for a newer one.
pub(crate) fn shed_unauthenticated(ctx: &Context, peer: SocketAddr) {
    SourceGate::audit_shed(&ctx.audit, peer);
}

pub(crate) fn handshake_failed(ctx: &Context, peer: SocketAddr, why: &str) {
    Metrics::inc(&ctx.metrics.handshake_failures);
    ctx.metrics.refused(Refusal::TlsHandshakeFailed);
    ctx.audit.record(
        AuditEntry::new("handshake", "refuse")
            .source(peer)
            .protocol("tls")
            .reason(why.to_string()),
    );
}
