//! Sessions that outlive their connection (MQTT 3.1.1 clean_session = 0, MQTT 5
//! session expiry; any protocol whose peers keep state between connections).
//!
//! One slot per principal; what a session keeps is the adapter's (`S`), with the
//! mailbox every session has. A connection holds its slot's lock for as long as it runs, so
//! a take-over waits for the old connection to put the session back before taking it:
//! the state is never shared by two connections. A parked session expires after the
//! interval it was granted; its mailbox keeps collecting commands until then.

use crate::mailbox::Mailbox;
use crate::principal::PrincipalId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Mutex as AsyncMutex;

/// What a parked session holds: at least the mailbox that keeps collecting for it.
pub trait Parked: Send + 'static {
    fn mailbox(&self) -> &Arc<Mailbox>;
}

#[derive(Debug)]
pub struct Slot<S> {
    /// The session, while parked (or held by the connection using it).
    pub state: Option<S>,
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
        (!expired).then_some(state)
    }

    pub fn park(&mut self, state: S, expires_at: Instant) {
        self.state = Some(state);
        self.expires_at = Some(expires_at);
    }
}

/// Every principal's slot.
#[derive(Debug)]
pub struct ParkedSessions<S> {
    slots: Mutex<HashMap<PrincipalId, Arc<AsyncMutex<Slot<S>>>>>,
}

impl<S: Parked> ParkedSessions<S> {
    pub fn new() -> Arc<ParkedSessions<S>> {
        Arc::new(ParkedSessions {
            slots: Mutex::new(HashMap::new()),
        })
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
        gone
    }

    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
}
