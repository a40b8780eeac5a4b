//! The gateway's HTTP listeners (observability, and the admin API when it is on):
//! one accept loop that holds every peer to bounds, token or not.
//!
//! - At most [`Bounds::connections`] connections at once, and
//!   [`Bounds::per_source`] from one source (an IPv6 source is its prefix), so one
//!   host cannot take every slot: a connection over its source's share is closed
//!   before a byte of it is read.
//! - A request head must arrive whole within [`Bounds::head`] of the moment the
//!   connection is ready for it (hyper's header read timeout, absolute: a byte now
//!   and then does not extend it). That also closes a kept-alive connection left idle.
//! - A TLS handshake must finish within [`Bounds::handshake`].
//! - A write that makes no progress for [`Bounds::stall`] fails the connection: a
//!   peer that does not read its answer, or does not take a TLS close, holds nothing
//!   for long. Reads have no such timer, so a long-running request is never cut.
//!
//! A request body is read by the route itself, under its own deadline
//! (`admin::http::body`).

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_core::source_key::SourceKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

/// What one listener allows each peer.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once; more wait to be accepted.
    pub connections: usize,
    /// Connections open at once from one source; more are closed at once.
    pub per_source: usize,
    /// From ready for a request to its head read whole.
    pub head: Duration,
    /// A write pending this long fails the connection.
    pub stall: Duration,
    /// A TLS handshake from its first byte to its end.
    pub handshake: Duration,
    /// The IPv6 prefix length that makes one source.
    pub ipv6_prefix: u8,
}

impl Bounds {
    /// The bounds of both HTTP listeners: a few operators, a browser, a scraper and
    /// probes are all they serve.
    pub fn new(handshake: Duration, ipv6_prefix: u8) -> Bounds {
        Bounds {
            connections: 256,
            per_source: 16,
            head: Duration::from_secs(10),
            stall: Duration::from_secs(30),
            handshake,
            ipv6_prefix,
        }
    }
}

/// Connections open per source; a slot frees itself when dropped.
#[derive(Clone, Default)]
struct Sources(Arc<Mutex<HashMap<SourceKey, usize>>>);

struct Slot {
    sources: Sources,
    key: SourceKey,
}

impl Sources {
    /// A slot for `key`, unless it already holds `cap`.
    fn take(&self, key: SourceKey, cap: usize) -> Option<Slot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Serve `app` on `listener` until `stop` turns true, then let the open connections
/// finish what they are answering. With `tls`, each connection is first handshaken
/// with the acceptor current when it arrived (a reload sends a new one).
pub async fn serve(
    listener: TcpListener,
    tls: Option<watch::Receiver<TlsAcceptor>>,
    app: Router,
    bounds: Bounds,
    what: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(bounds.connections));
    let sources = Sources::default();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let key = SourceKey::new(peer.ip(), bounds.ipv6_prefix);
        let Some(slot) = sources.take(key, bounds.per_source) else {
            tracing::debug!(listener = what, %peer, cap = bounds.per_source, "connection over its source's cap closed");
            continue;
        };
        let acceptor = tls.as_ref().map(|rx| rx.borrow().clone());
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            let _ = tcp.set_nodelay(true);
            let io = Stalled::new(tcp, bounds.stall);
            match acceptor {
                None => connection(io, peer, app, bounds, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(bounds.handshake, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => connection(tls, peer, app, bounds, stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(listener = what, %peer, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    // Wait for the connections to finish (the caller bounds how long).
    let _ = permits.acquire_many(bounds.connections as u32).await;
}

/// Once `stop` is true (the watch's guard is not held across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// HTTP/1.1 on one connection, the peer's address given to the routes as
/// `ConnectInfo<SocketAddr>`.
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    bounds: Bounds,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        tower_service::Service::call(&mut app, request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.head)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A connection whose writes fail with `TimedOut` once one has been pending for
/// `stall` without a byte going out.
pub struct Stalled<S> {
    inner: S,
    stall: Duration,
    /// Set while a write, flush or shutdown waits; cleared by any progress.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Stalled<S> {
    pub fn new(inner: S, stall: Duration) -> Self {
        Stalled {
            inner,
            stall,
            deadline: None,
        }
    }

    /// A write op returned `poll`: pass it on, or time it out if it has waited too long.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let stall = self.stall;
                let deadline = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                if deadline.as_mut().poll(cx).is_ready() {
                    self.deadline = None;
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "HTTP peer took nothing for too long",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stalled<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalled<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that takes nothing: every write, flush and shutdown waits forever.
    struct Stuck;

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_flush_or_close_the_peer_never_takes_fails_after_the_stall_time() {
        let mut io = Stalled::new(Stuck, Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        let e = io.write(b"answer").await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(
            io.flush().await.unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
        assert_eq!(
            io.shutdown().await.unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
        assert_eq!(started.elapsed(), Duration::from_secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_timed_out() {
        // 64 bytes of room, drained 8 bytes every 20 s: each write waits, none 30 s.
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = Stalled::new(near, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                match far.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let answer = vec![7u8; 256];
        io.write_all(&answer).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), answer);
    }

    #[test]
    fn a_source_holds_at_most_its_cap_and_gets_its_slots_back() {
        let sources = Sources::default();
        let a = SourceKey::new("10.0.0.1".parse().unwrap(), 64);
        let b = SourceKey::new("10.0.0.2".parse().unwrap(), 64);
        let held: Vec<Slot> = (0..3).map(|_| sources.take(a, 3).unwrap()).collect();
        assert!(sources.take(a, 3).is_none());
        assert!(sources.take(b, 3).is_some());
        drop(held);
        assert!(sources.take(a, 3).is_some());
        assert!(
            sources.0.lock().unwrap().get(&a).is_none(),
            "no entry is kept for a source gone"
        );
    }
}
