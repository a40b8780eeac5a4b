//! The gateway's HTTP listeners (observability, and the admin API when it is on):
//! one accept loop that holds every peer to bounds, token or not.
//!
//! - At most [`Bounds::connections`] connections at once, and
//!   [`Bounds::per_source`] from one source (an IPv6 source is its prefix). A
//!   newcomer over either cap is not kept out: the oldest *idle* connection (no
//!   request being answered; one still sending its head, or its TLS handshake, is
//!   idle) is closed for it, of its own source first. Connections that say nothing,
//!   or trickle, cannot hold the listener against operators or the probes; only
//!   requests being answered are never cut, and they are bounded in time. One
//!   source churning connections only ever closes its own.
//! - A request head must arrive whole within [`Bounds::head`] of the moment the
//!   connection is ready for it (hyper's header read timeout, absolute: a byte now
//!   and then does not extend it). That also closes a kept-alive connection left
//!   idle. A head is at most 16 KiB and 32 header lines.
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
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// Connections one HTTP listener holds at most; the descriptor budget counts them
/// (`descriptors::connection_caps`).
pub const CONNECTIONS: usize = 64;

/// What one listener allows each peer.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one source.
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
    /// The bounds of the HTTP listeners: a few operators, a browser, a scraper and
    /// probes are all they serve. `connections` is what the descriptor budget gave.
    pub fn new(connections: usize, handshake: Duration, ipv6_prefix: u8) -> Bounds {
        let connections = connections.max(1);
        Bounds {
            connections,
            per_source: (connections / 4).clamp(1, 16),
            head: Duration::from_secs(10),
            stall: Duration::from_secs(30),
            handshake,
            ipv6_prefix,
        }
    }
}

/// The connections open on one listener, oldest first, each with its source and
/// how many of its requests are being answered.
#[derive(Clone)]
struct Pool(Arc<Mutex<Open>>);

struct Open {
    connections: usize,
    per_source: usize,
    next: u64,
    open: BTreeMap<u64, Conn>,
    sources: HashMap<SourceKey, usize>,
}

struct Conn {
    source: SourceKey,
    answering: usize,
    /// Dropped to close the connection.
    _shed: oneshot::Sender<()>,
}

/// One admitted connection's place; it leaves the pool when dropped.
struct Member {
    pool: Pool,
    id: u64,
}

/// A request being answered: its connection is not shed meanwhile.
struct Answering {
    pool: Pool,
    id: u64,
}

impl Pool {
    fn new(connections: usize, per_source: usize) -> Pool {
        Pool(Arc::new(Mutex::new(Open {
            connections,
            per_source,
            next: 0,
            open: BTreeMap::new(),
            sources: HashMap::new(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `source`, making room by closing the oldest idle
    /// connection (of `source` first, when it is at its cap); None when every
    /// connection in the way is answering a request. The receiver fires when this
    /// connection is shed in turn.
    fn admit(&self, source: SourceKey) -> Option<(Member, oneshot::Receiver<()>)> {
        let mut open = self.lock();
        if open.sources.get(&source).copied().unwrap_or(0) >= open.per_source
            && !open.shed_oldest_idle(Some(source))
        {
            return None;
        }
        if open.open.len() >= open.connections && !open.shed_oldest_idle(None) {
            return None;
        }
        let id = open.next;
        open.next += 1;
        let (tx, rx) = oneshot::channel();
        open.open.insert(
            id,
            Conn {
                source,
                answering: 0,
                _shed: tx,
            },
        );
        *open.sources.entry(source).or_insert(0) += 1;
        Some((
            Member {
                pool: self.clone(),
                id,
            },
            rx,
        ))
    }
}

impl Open {
    fn shed_oldest_idle(&mut self, of: Option<SourceKey>) -> bool {
        let oldest = self
            .open
            .iter()
            .find(|(_, c)| c.answering == 0 && of.is_none_or(|s| c.source == s))
            .map(|(id, _)| *id);
        match oldest {
            Some(id) => {
                self.leave(id);
                true
            }
            None => false,
        }
    }

    /// Take `id` out (its sender dropped: the connection closes, if it is not gone).
    fn leave(&mut self, id: u64) {
        if let Some(conn) = self.open.remove(&id)
            && let Some(n) = self.sources.get_mut(&conn.source)
        {
            *n -= 1;
            if *n == 0 {
                self.sources.remove(&conn.source);
            }
        }
    }
}

impl Member {
    fn answering(&self) -> Answering {
        if let Some(c) = self.pool.lock().open.get_mut(&self.id) {
            c.answering += 1;
        }
        Answering {
            pool: self.pool.clone(),
            id: self.id,
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.pool.lock().leave(self.id);
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Some(c) = self.pool.lock().open.get_mut(&self.id) {
            c.answering = c.answering.saturating_sub(1);
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
    let pool = Pool::new(bounds.connections, bounds.per_source);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
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
        // Reap what has finished, so the set holds only what runs.
        while tasks.try_join_next().is_some() {}
        let source = SourceKey::new(peer.ip(), bounds.ipv6_prefix);
        let Some((member, shed)) = pool.admit(source) else {
            tracing::debug!(listener = what, %peer, "every connection in the way is answering: closed");
            continue;
        };
        let acceptor = tls.as_ref().map(|rx| rx.borrow().clone());
        let (app, stop) = (app.clone(), stop.clone());
        tasks.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let io = Stalled::new(tcp, bounds.stall);
            let member = Arc::new(member);
            let served = async {
                match acceptor {
                    None => connection(io, peer, app, bounds, member.clone(), stop).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(bounds.handshake, acceptor.accept(io)).await {
                            Ok(Ok(tls)) => {
                                connection(tls, peer, app, bounds, member.clone(), stop).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(listener = what, %peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => {
                                tracing::debug!(listener = what, %peer, "TLS handshake timed out")
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = served => {}
                // Closed to make room for a newcomer (the connection drops here).
                _ = shed => tracing::debug!(listener = what, %peer, "idle connection closed for a newcomer"),
            }
        });
    }
    // No new connections: the socket is closed now, not after the drain.
    drop(listener);
    while tasks.join_next().await.is_some() {}
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
    member: Arc<Member>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        // Not shed while the answer is being made; once made, writing it out is
        // bounded by the stall deadline (and the connection is idle again).
        let answering = member.answering();
        async move {
            let response = tower_service::Service::call(&mut app, request).await;
            drop(answering);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.head)
        .max_buf_size(16 * 1024)
        .max_headers(32)
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

    fn key(ip: &str) -> SourceKey {
        SourceKey::new(ip.parse().unwrap(), 64)
    }

    #[test]
    fn a_source_at_its_cap_sheds_its_own_oldest_idle_connection() {
        let pool = Pool::new(8, 2);
        let (a1, mut shed_a1) = pool.admit(key("10.0.0.1")).unwrap();
        let (_a2, mut shed_a2) = pool.admit(key("10.0.0.1")).unwrap();
        let (_b1, mut shed_b1) = pool.admit(key("10.0.0.2")).unwrap();
        // A third from 10.0.0.1 closes its first, not 10.0.0.2's older one.
        let (_a3, _) = pool.admit(key("10.0.0.1")).unwrap();
        assert_eq!(
            shed_a1.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(shed_a2.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert_eq!(shed_b1.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        drop(a1);
        assert_eq!(pool.lock().open.len(), 3);
        assert_eq!(pool.lock().sources[&key("10.0.0.1")], 2);
    }

    #[test]
    fn a_full_listener_sheds_the_oldest_idle_and_never_one_answering() {
        let pool = Pool::new(2, 2);
        let (a, mut shed_a) = pool.admit(key("10.0.0.1")).unwrap();
        let (b, mut shed_b) = pool.admit(key("10.0.0.2")).unwrap();
        let answering = a.answering();
        let (c, _) = pool.admit(key("10.0.0.3")).expect("room made");
        assert_eq!(
            shed_a.try_recv(),
            Err(oneshot::error::TryRecvError::Empty),
            "answering: kept"
        );
        assert_eq!(
            shed_b.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "idle: shed"
        );
        let c_answering = c.answering();
        assert!(
            pool.admit(key("10.0.0.4")).is_none(),
            "all answering: the newcomer is refused"
        );
        drop((answering, c_answering));
        assert!(
            pool.admit(key("10.0.0.4")).is_some(),
            "idle again: room is made"
        );
        drop(b);
        // Everything dropped: nothing is left behind.
        drop((a, c));
        assert!(pool.lock().open.is_empty() && pool.lock().sources.is_empty());
    }
}
