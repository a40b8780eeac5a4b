//! A device's session opened the same way whatever protocol it came by (CoAP, serial):
//! registered with the core (taking over an earlier session of its identity, whatever
//! that one spoke), its parked state taken back (unless it expired, or belongs to an
//! earlier registration of the id), its rate limits resumed, its mailbox routed to,
//! and its uplink to the forwarder. What a protocol keeps between sessions is its own
//! (`DeviceState`); announcing the session (`Lifecycle::opened`) is left to the
//! adapter, which knows how to say where the device is.

use crate::admission::{Admission, Buckets};
use crate::forward::{Forwarder, Uplink};
use crate::mailbox::{Mailbox, MailboxLimits};
use crate::parking::{Parked, ParkedSessions, Slot};
use crate::peer::Lifecycle;
use crate::refusal::Refusal;
use crate::sessions::SessionGuard;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedMutexGuard, watch};

/// How long a new session waits for the one it takes over to put its state back.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// What a device's session keeps between its sessions, besides its mailbox.
pub trait DeviceState: Parked + Sized {
    /// A new session's state around `mailbox`, for the registration `registered`.
    fn fresh(mailbox: Arc<Mailbox>, registered: u64) -> Self;
    /// The registration it belongs to (`Authenticator::registered_since`).
    fn registered(&self) -> u64;
    /// Its rate limits as the last session left them.
    fn buckets(&mut self) -> &mut Option<Box<Buckets>>;
}

/// What opening a device's session needs.
pub struct Opener<'a, S> {
    pub lifecycle: &'a Lifecycle,
    pub parked: &'a ParkedSessions<S>,
    pub forwarder: &'a dyn Forwarder,
    pub shutdown: &'a watch::Receiver<bool>,
    pub mailbox: MailboxLimits,
    /// How long a state parked now is kept.
    pub expiry: Duration,
}

/// A device's session, open.
pub struct Opened<S> {
    pub admission: Admission,
    pub guard: SessionGuard,
    /// Held while the session runs: a take-over waits for it.
    pub slot: OwnedMutexGuard<Slot<S>>,
    pub state: S,
    pub uplink: Uplink,
    /// It took back a parked state.
    pub resumed: bool,
}

/// Why a session was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOpened {
    /// Refused (counted here; `SessionBusy` audited too).
    Refused(Refusal),
    /// Taken over meanwhile, the gateway stopping, or the broker link unavailable
    /// (the state, if any, is parked again).
    Ended,
}

impl<S: DeviceState> Opener<'_, S> {
    /// Open the session of an authenticated device (`generation` and `method` as
    /// authentication gave them).
    pub async fn open(
        &self,
        mut admission: Admission,
        generation: u64,
        method: &'static str,
    ) -> Result<Opened<S>, NotOpened> {
        let lc = self.lifecycle;
        let guard = lc
            .register(&admission, generation, method)
            .map_err(|refusal| {
                lc.metrics.refused(refusal);
                NotOpened::Refused(refusal)
            })?;
        // Registered after the shutdown's kicks went out: nothing would end it.
        if *self.shutdown.borrow() {
            return Err(NotOpened::Ended);
        }
        let principal = admission.peer().principal.clone();
        let slot = self.parked.slot(&principal.id);
        let Ok(mut slot) = tokio::time::timeout(SLOT_WAIT, slot.lock_owned()).await else {
            lc.metrics.refused(Refusal::SessionBusy);
            lc.audit.record(
                admission
                    .peer()
                    .entry("connect", "refuse")
                    .reason(Refusal::SessionBusy.to_string()),
            );
            return Err(NotOpened::Refused(Refusal::SessionBusy));
        };
        // Taken over while it waited for the slot: a newer session has the device.
        if guard.kicked.reason().is_some() {
            return Err(NotOpened::Ended);
        }
        let now = Instant::now();
        slot.epoch += 1;
        let registered = lc.auth.registered_since(&principal);
        let expired = slot.expires_at.is_some_and(|at| at <= now);
        slot.expires_at = None;
        let resumed = match slot.state.take() {
            Some(s) if !expired && s.registered() == registered => Some(*s),
            // Expired, or of an earlier registration of the id: what it held goes.
            Some(old) => {
                let dropped = old.mailbox().clear() as u64;
                lc.metrics
                    .queue_expired
                    .fetch_add(dropped, Ordering::Relaxed);
                None
            }
            None => None,
        };
        let was_resumed = resumed.is_some();
        let mut state =
            resumed.unwrap_or_else(|| S::fresh(Arc::new(Mailbox::new(self.mailbox)), registered));
        if let Some(buckets) = state.buckets().take() {
            admission.resume_buckets(*buckets, now);
        }
        let park = |mut state: S, admission: &Admission, slot: &mut Slot<S>| {
            *state.buckets() = Some(Box::new(admission.buckets()));
            slot.park(state, now + self.expiry);
        };
        // Commands for the device go to this mailbox from now on.
        if let Err(e) = self
            .forwarder
            .register_device(principal.id.clone(), state.mailbox().clone())
            .await
        {
            tracing::error!(error = %e, "broker link unavailable");
            park(state, &admission, &mut slot);
            return Err(NotOpened::Ended);
        }
        // Taken over meanwhile (by a session of another protocol, whose registration
        // this one may just have replaced): give the device back and stop.
        if guard.kicked.reason().is_some() {
            self.forwarder
                .unregister_device(principal.id.clone(), state.mailbox().clone())
                .await;
            park(state, &admission, &mut slot);
            return Err(NotOpened::Ended);
        }
        let uplink = self.forwarder.uplink_for(&principal.id);
        Ok(Opened {
            admission,
            guard,
            slot,
            state,
            uplink,
            resumed: was_resumed,
        })
    }
}
