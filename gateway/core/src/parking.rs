//! Sessions that outlive their connection (MQTT 3.1.1 clean_session = 0, MQTT 5
//! session expiry; any protocol whose peers keep state between connections).
//!
//! One slot per principal; what a session keeps is the adapter's (`S`), with the
//! mailbox every session has. A connection holds its slot's lock for as long as it runs, so
//! a take-over waits for the old connection to put the session back before taking it:
//! the state is never shared by two connections. A parked session expires after the
//! interval it was granted; its mailbox keeps collecting commands until then.
//!
//! With a journal (devices), sessions are kept on disk too, and restored at start:
//! - parked: everything, queued commands and unacknowledged deliveries included, when
//!   it parks, and again whenever a command arrives for it;
//! - held by a connection: what it subscribed to, when it connects and when that
//!   changes (if the gateway dies, the device comes back to a session that still has
//!   its subscriptions; what was in flight to it at that moment is not kept).

use crate::mailbox::{Delivery, Mailbox};
use crate::principal::PrincipalId;
use crate::registry::now_unix_ms;
use crate::session_file::{Journal, Loaded, Snapshot, Source, Table};
use crate::wire::{self, Reader, WireError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

/// What a parked session holds: at least the mailbox that keeps collecting for it.
pub trait Parked: Send + 'static {
    fn mailbox(&self) -> &Arc<Mailbox>;
}

/// A session an adapter can keep on disk.
pub trait Persist: Parked + Sized {
    /// What the adapter keeps; with `in_flight`, the deliveries it has started and
    /// not seen finished too (a parked session's).
    fn encode(&self, out: &mut Vec<u8>, in_flight: bool);
    fn decode(bytes: &[u8], mailbox: Arc<Mailbox>) -> Result<Self, WireError>;
    /// When the device was registered (a session lives only as long as that
    /// registration).
    fn registered(&self) -> u64;
}

/// Version of the stored form of a session.
const RECORD_V1: u8 = 1;
const PARKED: u8 = 0;
const LIVE: u8 = 1;

/// Append a delivery: the message, then its subscription identifiers.
pub fn put_delivery(d: &Delivery, out: &mut Vec<u8>) {
    wire::put_message(&d.message, out);
    let ids = &d.subscription_ids[..d.subscription_ids.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(ids.len() as u16).to_be_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
}

/// Read a delivery written by `put_delivery`.
pub fn delivery(r: &mut Reader<'_>) -> Result<Delivery, WireError> {
    let message = wire::message(r)?;
    let n = r.u16("subscription identifiers")?;
    let mut subscription_ids = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        subscription_ids.push(r.u32("subscription identifier")?);
    }
    Ok(Delivery {
        message,
        subscription_ids,
    })
}

/// How a stored session comes back.
#[derive(Debug)]
pub struct Restored<S> {
    pub state: S,
    /// How long it has left.
    pub remaining: Duration,
    /// Queued messages with how long each has waited.
    pub queued: Vec<(Delivery, Duration)>,
}

/// The stored form of a session: parked (until `expires_at`, with its mailbox) or
/// live (held by a connection: it lives `expiry` from whenever it is restored).
pub fn encode_record<S: Persist>(state: &S, parked: Option<Instant>, expiry: Duration) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(RECORD_V1);
    let (now, now_ms) = (Instant::now(), now_unix_ms());
    match parked {
        Some(at) => {
            out.push(PARKED);
            let left = at.saturating_duration_since(now).as_millis() as u64;
            out.extend_from_slice(&now_ms.saturating_add(left).to_be_bytes());
        }
        None => {
            out.push(LIVE);
            out.extend_from_slice(
                &(expiry.as_secs().min(u64::from(u32::MAX)) as u32).to_be_bytes(),
            );
        }
    }
    let mut adapter = Vec::new();
    state.encode(&mut adapter, parked.is_some());
    wire::put_bytes32(&mut out, &adapter);
    let queued = if parked.is_some() {
        state.mailbox().snapshot()
    } else {
        Vec::new()
    };
    out.extend_from_slice(&(queued.len().min(u32::MAX as usize) as u32).to_be_bytes());
    for (d, at) in &queued {
        let waited = now.saturating_duration_since(*at).as_millis() as u64;
        out.extend_from_slice(&now_ms.saturating_sub(waited).to_be_bytes());
        put_delivery(d, &mut out);
    }
    out
}

/// Read a stored session back, at `now_ms` (Unix milliseconds).
pub fn decode_record<S: Persist>(
    bytes: &[u8],
    mailbox: Arc<Mailbox>,
    now_ms: u64,
) -> Result<Restored<S>, WireError> {
    let mut r = Reader(bytes);
    let version = r.u8("version")?;
    if version != RECORD_V1 {
        return Err(WireError::Version(version));
    }
    let remaining = match r.u8("state")? {
        PARKED => Duration::from_millis(r.u64("expiry")?.saturating_sub(now_ms)),
        LIVE => Duration::from_secs(u64::from(r.u32("expiry")?)),
        _ => return Err(WireError::Invalid("session state")),
    };
    let state = S::decode(r.bytes32("adapter state")?, mailbox)?;
    let n = r.u32("queued messages")?;
    let mut queued = Vec::with_capacity((n as usize).min(1024));
    for _ in 0..n {
        let at = r.u64("queued at")?;
        let d = delivery(&mut r)?;
        queued.push((d, Duration::from_millis(now_ms.saturating_sub(at))));
    }
    if !r.is_empty() {
        return Err(WireError::Invalid("session record: bytes after the end"));
    }
    Ok(Restored {
        state,
        remaining,
        queued,
    })
}

#[derive(Debug)]
pub struct Slot<S> {
    /// The session, while parked (boxed: a slot whose session is live holds none).
    pub state: Option<Box<S>>,
    /// When a parked session expires.
    pub expires_at: Option<Instant>,
    /// Bumped by every connection that takes the slot: a delayed Last Will fires only
    /// if no connection came back in the meantime.
    pub epoch: u64,
}

impl<S> Default for Slot<S> {
    fn default() -> Self {
        Slot {
            state: None,
            expires_at: None,
            epoch: 0,
        }
    }
}

impl<S> Slot<S> {
    /// Take the parked session unless it has expired.
    pub fn resume(&mut self, now: Instant) -> Option<S> {
        let expired = self.expires_at.is_some_and(|at| at <= now);
        self.expires_at = None;
        let state = self.state.take()?;
        (!expired).then_some(*state)
    }

    pub fn park(&mut self, state: S, expires_at: Instant) {
        self.state = Some(Box::new(state));
        self.expires_at = Some(expires_at);
    }
}

/// Every principal's slot.
#[derive(Debug)]
pub struct ParkedSessions<S> {
    slots: Mutex<HashMap<PrincipalId, Arc<AsyncMutex<Slot<S>>>>>,
    /// Where sessions are kept on disk, if they are.
    journal: Option<Arc<Journal>>,
}

impl<S: Parked> ParkedSessions<S> {
    pub fn new() -> Arc<ParkedSessions<S>> {
        Arc::new(ParkedSessions {
            slots: Mutex::new(HashMap::new()),
            journal: None,
        })
    }

    /// Whether sessions are kept on disk.
    pub fn persistent(&self) -> bool {
        self.journal.is_some()
    }

    pub fn slot(&self, id: &PrincipalId) -> Arc<AsyncMutex<Slot<S>>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_default()
            .clone()
    }

    /// Drop parked sessions whose time is up, and slots nobody uses. Returns the
    /// mailboxes of the dropped sessions, for the caller to stop routing to.
    pub fn expire(&self, now: Instant) -> Vec<(PrincipalId, Arc<Mailbox>)> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        slots.retain(|id, slot| {
            // A slot in use by a connection (or by a pending Will) is left alone.
            let Ok(mut s) = slot.try_lock() else {
                return true;
            };
            if s.expires_at.is_some_and(|at| at <= now) {
                s.expires_at = None;
                if let Some(state) = s.state.take() {
                    gone.push((id.clone(), state.mailbox().clone()));
                }
            }
            s.state.is_some() || Arc::strong_count(slot) > 1
        });
        drop(slots);
        for (id, _) in &gone {
            self.forget(id);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Forget the session kept on disk for `id`.
    pub fn forget(&self, id: &PrincipalId) {
        if let Some(j) = &self.journal {
            j.forget(Table::Sessions, id.as_str());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Persist> ParkedSessions<S> {
    /// Sessions kept on disk through `journal`.
    pub fn with_journal(journal: Arc<Journal>) -> Arc<ParkedSessions<S>> {
        let store = Arc::new(ParkedSessions {
            slots: Mutex::new(HashMap::new()),
            journal: Some(journal.clone()),
        });
        let source: Arc<dyn Source> = store.clone();
        journal.set_source(Table::Sessions, Arc::downgrade(&source));
        store
    }

    /// A command queued for `id` from now on marks its kept session changed.
    fn watch(&self, id: &PrincipalId, mailbox: &Mailbox) {
        if let Some(j) = &self.journal {
            let (journal, key) = (Arc::downgrade(j), id.to_string());
            mailbox.watch(move || {
                if let Some(j) = Weak::upgrade(&journal) {
                    j.mark(Table::Sessions, &key);
                }
            });
        }
    }

    /// Park a session in its slot (held by the caller), and keep it on disk.
    pub fn park(&self, id: &PrincipalId, slot: &mut Slot<S>, state: S, expires_at: Instant) {
        if let Some(j) = &self.journal {
            self.watch(id, state.mailbox());
            let record = encode_record(&state, Some(expires_at), Duration::ZERO);
            j.write(Table::Sessions, id.as_str(), record);
        }
        slot.park(state, expires_at);
    }

    /// A connection holds the session, which lives `expiry` after it ends: keep what
    /// it subscribed to (call again when that changes).
    pub fn live(&self, id: &PrincipalId, state: &S, expiry: Duration) {
        if let Some(j) = &self.journal {
            j.write(
                Table::Sessions,
                id.as_str(),
                encode_record(state, None, expiry),
            );
        }
    }

    /// Put the kept sessions back in their slots, each living at most `max_expiry`
    /// from now (the configured cap, which may have been lowered since; zero keeps
    /// none). `registered` says when a device was registered (`None`: it is not).
    /// Returns the restored sessions' mailboxes (for the caller to route commands to
    /// again), and how many records were dropped: damaged, expired, or of a device
    /// removed (or re-registered) since.
    pub fn restore(
        &self,
        records: Vec<Loaded>,
        max_expiry: Duration,
        new_mailbox: impl Fn() -> Arc<Mailbox>,
        registered: impl Fn(&PrincipalId) -> Option<u64>,
    ) -> (Vec<(PrincipalId, Arc<Mailbox>)>, u64) {
        let (now, now_ms) = (Instant::now(), now_unix_ms());
        let mut restored = Vec::new();
        let mut dropped = 0;
        for (key, value) in records {
            let id = PrincipalId::parse(&key).ok();
            let decoded = value.map_err(|e| e.to_string()).and_then(|bytes| {
                decode_record::<S>(&bytes, new_mailbox(), now_ms).map_err(|e| e.to_string())
            });
            let decoded = decoded.map(|mut r| {
                r.remaining = r.remaining.min(max_expiry);
                r
            });
            let why = match (&id, &decoded) {
                (None, _) => Some("not a device id".to_string()),
                (_, Err(e)) => Some(e.clone()),
                (Some(id), Ok(r)) if registered(id) != Some(r.state.registered()) => {
                    Some("the device is no longer registered as it was".to_string())
                }
                (_, Ok(r)) if r.remaining.is_zero() => Some("expired".to_string()),
                _ => None,
            };
            let (Some(id), Ok(r), None) = (id, decoded, &why) else {
                tracing::warn!(session = %key, reason = why.as_deref().unwrap_or(""), "kept session dropped");
                if let Some(j) = &self.journal {
                    j.forget(Table::Sessions, &key);
                }
                dropped += 1;
                continue;
            };
            let mailbox = r.state.mailbox().clone();
            for (d, waited) in r.queued {
                // Queued at `now - waited` where the clock allows; after a reboot the
                // monotonic clock may not reach back that far: then the message's own
                // expiry interval is counted down now and its age starts again.
                let queued = match now.checked_sub(waited) {
                    Some(at) => Some((d, at)),
                    None => d.aged(waited).map(|d| (d, now)),
                };
                if let Some((d, at)) = queued {
                    let _ = mailbox.push(d, at);
                }
            }
            let slot = self.slot(&id);
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            self.park(&id, &mut slot, r.state, now + r.remaining);
            restored.push((id, mailbox));
        }
        (restored, dropped)
    }
}

impl<S: Persist> Source for ParkedSessions<S> {
    fn snapshot(&self, key: &str) -> Snapshot {
        let Ok(id) = PrincipalId::parse(key) else {
            return Snapshot::Delete;
        };
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let Some(slot) = slot else {
            return Snapshot::Delete;
        };
        let Ok(s) = slot.try_lock() else {
            // Held by a connection: it writes what it keeps itself.
            return Snapshot::Keep;
        };
        match (&s.state, s.expires_at) {
            (Some(state), Some(at)) => {
                Snapshot::Write(encode_record(&**state, Some(at), Duration::ZERO))
            }
            _ => Snapshot::Delete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::MailboxLimits;
    use std::time::Duration;

    struct State(Arc<Mailbox>);

    impl Parked for State {
        fn mailbox(&self) -> &Arc<Mailbox> {
            &self.0
        }
    }

    /// Stored as its registration time only.
    impl Persist for State {
        fn encode(&self, out: &mut Vec<u8>, _in_flight: bool) {
            out.extend_from_slice(&7u64.to_be_bytes());
        }
        fn decode(bytes: &[u8], mailbox: Arc<Mailbox>) -> Result<Self, WireError> {
            let mut r = Reader(bytes);
            match r.u64("registered")? {
                7 => Ok(State(mailbox)),
                _ => Err(WireError::Invalid("registered")),
            }
        }
        fn registered(&self) -> u64 {
            7
        }
    }

    type SessionStore = ParkedSessions<State>;

    fn state() -> State {
        State(Arc::new(Mailbox::new(MailboxLimits {
            max_messages: 4,
            max_bytes: 1024,
            max_age: Duration::from_secs(60),
        })))
    }

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_parked_session_resumes_before_it_expires() {
        let store = SessionStore::new();
        let t0 = Instant::now();
        let slot = store.slot(&id("a"));
        slot.lock()
            .await
            .park(state(), t0 + Duration::from_secs(10));
        assert!(store.expire(t0 + Duration::from_secs(5)).is_empty());
        let resumed = slot.lock().await.resume(t0 + Duration::from_secs(9));
        assert!(resumed.is_some());
    }

    #[tokio::test]
    async fn an_expired_session_is_not_resumed() {
        let store = SessionStore::new();
        let t0 = Instant::now();
        let slot = store.slot(&id("a"));
        slot.lock()
            .await
            .park(state(), t0 + Duration::from_secs(10));
        assert!(
            slot.lock()
                .await
                .resume(t0 + Duration::from_secs(10))
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_sweep_drops_expired_sessions_and_unused_slots() {
        let store = SessionStore::new();
        let t0 = Instant::now();
        store
            .slot(&id("a"))
            .lock()
            .await
            .park(state(), t0 + Duration::from_secs(10));
        store
            .slot(&id("b"))
            .lock()
            .await
            .park(state(), t0 + Duration::from_secs(100));
        let gone = store.expire(t0 + Duration::from_secs(11));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, id("a"));
        assert_eq!(store.len(), 1, "b is still parked; a's slot is gone");
    }

    #[tokio::test]
    async fn a_slot_in_use_is_never_swept() {
        let store = SessionStore::new();
        let t0 = Instant::now();
        let slot = store.slot(&id("a"));
        let mut held = slot.lock().await;
        held.park(state(), t0);
        assert!(store.expire(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(store.len(), 1);
    }

    fn command(payload: &'static str) -> Delivery {
        Delivery::from(crate::message::Message {
            topic: crate::topic::TopicName::parse_unlimited("devices/a/commands/x").unwrap(),
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            qos: crate::message::QoS::AtLeastOnce,
            retain: false,
            properties: None,
        })
    }

    #[tokio::test]
    async fn kept_sessions_come_back_with_their_queue_and_the_rest_are_dropped_and_counted() {
        let t0 = Instant::now();
        let parked = state();
        parked.0.push(command("first"), t0).unwrap();
        parked.0.push(command("second"), t0).unwrap();
        let good = encode_record(&parked, Some(t0 + Duration::from_secs(60)), Duration::ZERO);
        let expired = encode_record(&state(), Some(t0), Duration::ZERO);
        let live = encode_record(&state(), None, Duration::from_secs(30));
        let mut damaged = good.clone();
        damaged.truncate(good.len() - 1);
        let records = vec![
            ("a".to_string(), Ok(good.clone())),
            ("b".to_string(), Ok(expired)),
            ("c".to_string(), Ok(damaged)),
            ("d".to_string(), Err("MAC does not match".to_string())),
            ("e".to_string(), Ok(good)),
            ("f".to_string(), Ok(live)),
        ];
        let store = SessionStore::new();
        // e is no longer registered.
        let (restored, dropped) = store.restore(
            records,
            Duration::from_secs(3600),
            || state().0,
            |id| (id.as_str() != "e").then_some(7),
        );
        let ids: Vec<&str> = restored.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "f"]);
        assert_eq!(dropped, 4);
        let a = &restored[0].1;
        let got: Vec<_> = std::iter::from_fn(|| a.pop(Instant::now()))
            .map(|d| d.message.payload)
            .collect();
        assert_eq!(got, ["first", "second"], "the queue, in order");
        // Parked with what they had left: a's minute, f's full 30 s.
        let slot = store.slot(&id("f"));
        let mut s = slot.lock().await;
        assert!(s.expires_at.unwrap() > Instant::now() + Duration::from_secs(29));
        assert!(s.resume(Instant::now()).is_some());
    }
}
