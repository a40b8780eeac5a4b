//! Live sessions: who is connected, and the handle to end a session.
//!
//! Touched on connect, disconnect and admin commands only, never per message.

use crate::principal::{PrincipalId, PrincipalKind, PrincipalRef};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Why the gateway ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    Disabled,
    Removed,
    CredentialRotated,
    Operator,
    Banned,
    PolicyChanged,
    CertificateRevoked,
    TakenOver,
    Shutdown,
    /// Moved to another group (a registry sync): its ACL and limits are the new group's.
    GroupChanged,
}

impl KickReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KickReason::Disabled => "principal disabled",
            KickReason::Removed => "principal removed",
            KickReason::CredentialRotated => "credential rotated",
            KickReason::Operator => "kicked by operator",
            KickReason::Banned => "banned",
            KickReason::PolicyChanged => "group removed by a configuration reload",
            KickReason::CertificateRevoked => {
                "certificate no longer trusted (revoked or CA removed)"
            }
            KickReason::TakenOver => "session taken over",
            KickReason::Shutdown => "server shutting down",
            KickReason::GroupChanged => "moved to another group",
        }
    }
}

impl KickReason {
    /// Its code in a `KickCell` (0 is "not kicked"). Exhaustive: a new reason does
    /// not compile until it has a code, and `from_code` reads it back.
    fn code(self) -> u8 {
        match self {
            KickReason::Disabled => 1,
            KickReason::Removed => 2,
            KickReason::CredentialRotated => 3,
            KickReason::Operator => 4,
            KickReason::Banned => 5,
            KickReason::PolicyChanged => 6,
            KickReason::CertificateRevoked => 7,
            KickReason::TakenOver => 8,
            KickReason::Shutdown => 9,
            KickReason::GroupChanged => 10,
        }
    }

    fn from_code(code: u8) -> Option<KickReason> {
        Some(match code {
            1 => KickReason::Disabled,
            2 => KickReason::Removed,
            3 => KickReason::CredentialRotated,
            4 => KickReason::Operator,
            5 => KickReason::Banned,
            6 => KickReason::PolicyChanged,
            7 => KickReason::CertificateRevoked,
            8 => KickReason::TakenOver,
            9 => KickReason::Shutdown,
            10 => KickReason::GroupChanged,
            _ => return None,
        })
    }
}

/// How a session hears that the gateway ends it: a reason, set by the session table
/// (the latest one wins), and a wake-up. Every live session holds one, so it is an
/// atomic and a `Notify` (about 100 bytes) rather than a watch channel (about 350).
struct KickCell {
    reason: AtomicU8,
    notify: Notify,
    /// Told after each kick, for a session that does not wait on `Kicked::wait`. A
    /// lock, not a `OnceLock`: a kick and the hook's installation are then ordered,
    /// so a kick is either told to the hook or seen by the `reason` read after it.
    /// Called with the session table locked: a hook must not touch `Sessions`.
    hook: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

/// The session table's end of a session's kick.
pub(crate) struct Kick(Arc<KickCell>);

impl Kick {
    pub(crate) fn send(&self, reason: KickReason) {
        self.0.reason.store(reason.code(), Ordering::Release);
        self.0.notify.notify_waiters();
        if let Some(hook) = self
            .0
            .hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            hook();
        }
    }

    fn is_kicked(&self) -> bool {
        self.0.reason.load(Ordering::Acquire) != 0
    }
}

/// A session's end of its kick.
#[derive(Clone)]
pub struct Kicked(Arc<KickCell>);

impl Kicked {
    pub(crate) fn pair() -> (Kick, Kicked) {
        let cell = Arc::new(KickCell {
            reason: AtomicU8::new(0),
            notify: Notify::new(),
            hook: Mutex::new(None),
        });
        (Kick(cell.clone()), Kicked(cell))
    }

    /// Why the session was kicked, if it was.
    pub fn reason(&self) -> Option<KickReason> {
        KickReason::from_code(self.0.reason.load(Ordering::Acquire))
    }

    /// Resolves with the reason once the session is kicked (at once if it was); never
    /// once the session's table entry is gone without a kick.
    pub async fn wait(&self) -> KickReason {
        loop {
            // A `Notified` hears `notify_waiters` from its creation on: made before
            // the reason is read, a kick in between still wakes it.
            let notified = self.0.notify.notified();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }

    /// Call `hook` after every kick from now on (it replaces an earlier one). A kick
    /// before it is installed is not told to it: read `reason` after installing.
    pub fn on_kick(&self, hook: Box<dyn Fn() + Send + Sync>) {
        *self.0.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub kind: PrincipalKind,
    pub group: String,
    pub protocol: &'static str,
    pub source: String,
    pub since_unix: u64,
    pub auth: &'static str,
    #[serde(skip)]
    pub generation: u64,
    /// Messages accepted from the peer and delivered to it since it connected.
    pub messages_in: u64,
    pub messages_out: u64,
    /// Average messages per second from the peer since it connected.
    pub rate_in: f64,
}

/// Per-session counters, shared by the session (which counts) and the list.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// When the peer was last heard from, in milliseconds since `EPOCH`.
    heard_ms: AtomicU64,
}

/// The origin of `SessionStats::heard_ms`.
static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn epoch() -> std::time::Instant {
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl SessionStats {
    /// The peer sent something at `now`.
    pub fn heard(&self, now: std::time::Instant) {
        let ms = now.saturating_duration_since(epoch()).as_millis() as u64;
        self.heard_ms.store(ms, Ordering::Relaxed);
    }

    fn heard_at(&self) -> std::time::Instant {
        epoch() + std::time::Duration::from_millis(self.heard_ms.load(Ordering::Relaxed))
    }
}

/// A live session of the same identity that a new connection takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rival {
    /// When it took over an earlier session itself, if it did.
    pub took_over_at: Option<std::time::Instant>,
    /// When its peer was last heard from (its CONNECT at the latest).
    pub heard_at: std::time::Instant,
    /// Whether it came from the same address as the new connection.
    pub same_source: bool,
}

/// A rival last heard longer ago than this may be a connection that died silently
/// (its device reconnecting), not a second device.
pub const CLONE_ACTIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Two connections taking turns with one identity, from two places: the session taken
/// over came from another address, had itself taken over another within `window`,
/// and was heard from just now. A device that reconnects after losing its network
/// takes over a connection that went silent, usually from the same address; one that
/// does so twice within the window is still not a clone.
pub fn is_clone(
    rival: Option<Rival>,
    now: std::time::Instant,
    window: std::time::Duration,
) -> bool {
    rival.is_some_and(|r| {
        !r.same_source
            && r.took_over_at
                .is_some_and(|at| now.saturating_duration_since(at) < window)
            && now.saturating_duration_since(r.heard_at) <= CLONE_ACTIVE
    })
}

/// A live session. Kept small and boxed (the table holds a pointer per slot): a
/// gateway with many idle sessions pays for each one once. What `list` shows is made
/// from it when asked.
struct Entry {
    principal: PrincipalRef,
    protocol: &'static str,
    auth: &'static str,
    generation: u64,
    since_unix: u64,
    stats: Arc<SessionStats>,
    started: std::time::Instant,
    /// When this session took over an earlier one of the same principal.
    took_over_at: Option<std::time::Instant>,
    source: SocketAddr,
    kick: Kick,
}

impl Entry {
    fn info(&self) -> SessionInfo {
        let messages_in = self.stats.messages_in.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1.0);
        SessionInfo {
            id: self.principal.id.to_string(),
            kind: self.principal.kind,
            group: self.principal.group.to_string(),
            protocol: self.protocol,
            source: self.source.to_string(),
            since_unix: self.since_unix,
            auth: self.auth,
            generation: self.generation,
            messages_in,
            messages_out: self.stats.messages_out.load(Ordering::Relaxed),
            rate_in: (messages_in as f64 / secs * 10.0).round() / 10.0,
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    inner: Mutex<HashMap<u64, Box<Entry>>>,
}

/// Held by a session for its lifetime; unregisters on drop.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    pub number: u64,
    pub kicked: Kicked,
    pub stats: Arc<SessionStats>,
    /// The live session of the same identity this one took over, if any, and when
    /// (see `is_clone`).
    pub displaced: Option<Rival>,
    pub registered_at: std::time::Instant,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.number);
    }
}

impl Sessions {
    pub fn new() -> Arc<Sessions> {
        Arc::new(Sessions::default())
    }

    /// Register a new session. Earlier sessions of the same principal are taken over.
    pub fn register(
        self: &Arc<Self>,
        principal: PrincipalRef,
        generation: u64,
        source: SocketAddr,
        protocol: &'static str,
        auth: &'static str,
    ) -> SessionGuard {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (kick, kicked) = Kicked::pair();
        let stats = Arc::new(SessionStats::default());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let mut took_over = false;
        let mut displaced: Option<Rival> = None;
        for entry in inner.values() {
            if entry.principal.kind == principal.kind && entry.principal.id == principal.id {
                // One already ending (kicked) is not a live rival.
                if !entry.kick.is_kicked() {
                    took_over = true;
                    let rival = Rival {
                        took_over_at: entry.took_over_at,
                        heard_at: entry.stats.heard_at().max(entry.started),
                        same_source: entry.source.ip() == source.ip(),
                    };
                    if displaced.is_none_or(|d| rival.heard_at > d.heard_at) {
                        displaced = Some(rival);
                    }
                    // One already kicked keeps its reason (a ban clears its mailbox; a
                    // take-over would park it).
                    entry.kick.send(KickReason::TakenOver);
                }
            }
        }
        inner.insert(
            number,
            Box::new(Entry {
                principal,
                protocol,
                auth,
                generation,
                since_unix: crate::registry::now_unix(),
                kick,
                stats: stats.clone(),
                started: now,
                took_over_at: took_over.then_some(now),
                source,
            }),
        );
        SessionGuard {
            sessions: self.clone(),
            number,
            kicked,
            stats,
            displaced,
            registered_at: now,
        }
    }

    /// End the sessions of one principal whose credential generation is below
    /// `below_generation` (all of them with `u64::MAX`). Returns how many.
    pub fn kick(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        below_generation: u64,
        reason: KickReason,
    ) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for entry in inner.values() {
            if entry.principal.kind == kind
                && &entry.principal.id == id
                && entry.generation < below_generation
            {
                entry.kick.send(reason);
                n += 1;
            }
        }
        n
    }

    /// End the sessions whose source address `matches`. Returns how many.
    pub fn kick_sources(
        &self,
        matches: impl Fn(std::net::IpAddr) -> bool,
        reason: KickReason,
    ) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for entry in inner.values() {
            if matches(entry.source.ip()) {
                entry.kick.send(reason);
                n += 1;
            }
        }
        n
    }

    pub fn kick_all(&self, reason: KickReason) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for entry in inner.values() {
            entry.kick.send(reason);
        }
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = inner.values().map(|e| e.info()).collect();
        out.sort_by(|a, b| (a.kind as u8, &a.id).cmp(&(b.kind as u8, &b.id)));
        out
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::GroupName;

    fn p(id: &str) -> PrincipalRef {
        PrincipalRef {
            kind: PrincipalKind::Device,
            id: PrincipalId::parse(id).unwrap(),
            group: GroupName::parse("default").unwrap(),
        }
    }

    #[test]
    fn every_kick_reason_survives_its_code() {
        use KickReason::*;
        for r in [
            Disabled,
            Removed,
            CredentialRotated,
            Operator,
            Banned,
            PolicyChanged,
            CertificateRevoked,
            TakenOver,
            Shutdown,
        ] {
            assert_ne!(r.code(), 0);
            assert_eq!(KickReason::from_code(r.code()), Some(r));
        }
        assert_eq!(KickReason::from_code(0), None);
    }

    #[tokio::test]
    async fn a_kick_wakes_every_waiting_clone_and_the_hook() {
        let (kick, kicked) = Kicked::pair();
        let told = Arc::new(AtomicU64::new(0));
        let t = told.clone();
        kicked.on_kick(Box::new(move || {
            t.fetch_add(1, Ordering::SeqCst);
        }));
        let a = tokio::spawn({
            let k = kicked.clone();
            async move { k.wait().await }
        });
        let b = tokio::spawn({
            let k = kicked.clone();
            async move { k.wait().await }
        });
        tokio::task::yield_now().await;
        kick.send(KickReason::Operator);
        assert_eq!(a.await.unwrap(), KickReason::Operator);
        assert_eq!(b.await.unwrap(), KickReason::Operator);
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_kick_before_the_hook_is_seen_by_reason_and_wait() {
        let (kick, kicked) = Kicked::pair();
        kick.send(KickReason::Banned);
        kicked.on_kick(Box::new(|| {
            panic!("told of a kick from before it was installed")
        }));
        assert_eq!(kicked.reason(), Some(KickReason::Banned));
        assert_eq!(kicked.wait().await, KickReason::Banned);
    }

    #[test]
    fn a_session_already_kicked_keeps_its_reason_when_taken_over() {
        let s = Sessions::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let first = s.register(p("a"), 0, addr, "mqtt", "certificate");
        s.kick(
            PrincipalKind::Device,
            &first_id(),
            u64::MAX,
            KickReason::Banned,
        );
        let _second = s.register(p("a"), 0, addr, "mqtt", "certificate");
        assert_eq!(first.kicked.reason(), Some(KickReason::Banned));
    }

    fn first_id() -> PrincipalId {
        PrincipalId::parse("a").unwrap()
    }

    #[test]
    fn second_session_takes_over_the_first() {
        let s = Sessions::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let first = s.register(p("a"), 0, addr, "mqtt", "certificate");
        let other = s.register(p("b"), 0, addr, "mqtt", "certificate");
        let second = s.register(p("a"), 0, addr, "mqtt", "certificate");
        assert_eq!(first.kicked.reason(), Some(KickReason::TakenOver));
        assert_eq!(second.kicked.reason(), None);
        assert_eq!(other.kicked.reason(), None);
        drop(first);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn rotation_kicks_only_older_generations() {
        let s = Sessions::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let old = s.register(p("a"), 0, addr, "mqtt", "secret");
        let id = PrincipalId::parse("a").unwrap();
        assert_eq!(
            s.kick(PrincipalKind::Device, &id, 1, KickReason::CredentialRotated),
            1
        );
        assert_eq!(old.kicked.reason(), Some(KickReason::CredentialRotated));
    }
}
