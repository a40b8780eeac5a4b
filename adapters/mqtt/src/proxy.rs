//! PROXY protocol v2 on a device listener (`[proxy_protocol]`): the header of a load
//! balancer's connection, read before anything else (before TLS), and the refusal of
//! a header from anyone else. The parser is `portcullis_core::proxy_header`.

use crate::listener::{Link, handshake_failed, shed_unauthenticated};
use crate::session::{Context, stopped};
use portcullis_core::audit::AuditEntry;
use portcullis_core::proxy_header::{self, Header, HeaderWait, LoadBalancers};
use portcullis_core::refusal::Refusal;
use portcullis_core::source_gate::Admitted;
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Count and audit a connection refused over its PROXY header; the caller closes it.
pub(crate) fn refuse(ctx: &Context, peer: SocketAddr, refusal: Refusal, detail: &str) {
    ctx.metrics.refused(refusal);
    ctx.audit.record(
        AuditEntry::new("connect", "refuse")
            .source(peer)
            .protocol("proxy")
            .reason(format!("{}: {detail}", refusal.label())),
    );
}

/// Read the header of a connection from load balancer `balancer`, within the
/// header timeout. Returns the stream (positioned just past the header) and the
/// client it names; the balancer's own address for a LOCAL header (its health
/// check). None when the connection was refused (counted, audited) or the gateway
/// stops.
pub(crate) async fn from_balancer(
    ctx: &Context,
    mut stream: TcpStream,
    balancer: SocketAddr,
    lb: &LoadBalancers,
    mut waiting: HeaderWait,
    mut shutdown: watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr)> {
    let read = tokio::select! {
        read = tokio::time::timeout(lb.header_timeout, proxy_header::read(&mut stream)) => read,
        _ = waiting.shed() => {
            refuse(
                ctx,
                balancer,
                Refusal::UnauthenticatedShed,
                "no whole PROXY header before newer connections displaced it \
                 (limits.max_unauthenticated)",
            );
            return None;
        }
        _ = stopped(&mut shutdown) => return None,
    };
    drop(waiting);
    match read {
        Ok(Ok(Header::Proxy { source, .. })) => {
            tracing::debug!(%balancer, client = %source, "PROXY header");
            Some((stream, source))
        }
        Ok(Ok(Header::Local)) => Some((stream, balancer)),
        Ok(Err(e)) => {
            refuse(ctx, balancer, Refusal::ProxyHeaderInvalid, &e.to_string());
            None
        }
        Err(_) => {
            refuse(
                ctx,
                balancer,
                Refusal::ProxyHeaderTimeout,
                &format!(
                    "no whole PROXY header within {}s",
                    lb.header_timeout.as_secs()
                ),
            );
            None
        }
    }
}

/// On a listener with load balancers, a connection from any other source must not
/// start with a PROXY header (of either version): a device must never claim another
/// address. Waits for the first bytes (without taking them) within the deadline the
/// connection has anyway; false when the connection was refused or is gone.
pub(crate) async fn no_header_claimed(
    link: &Link,
    stream: &TcpStream,
    peer: SocketAddr,
    admitted: &mut Admitted,
) -> bool {
    let ctx = &link.ctx;
    let deadline = match link.tls {
        Some(_) => link.handshake_timeout,
        None => ctx.limits.connect_timeout,
    };
    let mut start = [0u8; proxy_header::SIGNATURE.len()];
    let mut shutdown = ctx.shutdown.clone();
    let peeked = tokio::select! {
        peeked = tokio::time::timeout(deadline, stream.peek(&mut start)) => peeked,
        _ = admitted.pre_auth.shed() => {
            shed_unauthenticated(ctx, peer);
            return false;
        }
        _ = stopped(&mut shutdown) => return false,
    };
    match peeked {
        // Closed, or a socket error: nothing to serve.
        Ok(Ok(0)) | Ok(Err(_)) => false,
        Ok(Ok(n)) if proxy_header::looks_like_header(&start[..n]) => {
            refuse(
                ctx,
                peer,
                Refusal::ProxyHeaderNotAllowed,
                "a PROXY header from a source not in this listener's proxy_protocol list",
            );
            false
        }
        Ok(Ok(_)) => true,
        // Silent until the deadline: refused as the handshake or CONNECT would be.
        Err(_) => {
            match link.tls {
                Some(_) => handshake_failed(ctx, peer, "handshake not finished in time"),
                None => {
                    ctx.metrics.refused(Refusal::ConnectTimeout);
                    ctx.audit.record(
                        AuditEntry::new("connect", "refuse")
                            .source(peer)
                            .reason("connect_timeout: no CONNECT within the deadline"),
                    );
                }
            }
            false
        }
    }
}
