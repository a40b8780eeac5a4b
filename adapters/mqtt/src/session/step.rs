//! What the session's sans-IO handlers ask of the driver.
//!
//! A frame is handled without I/O and without waiting (`on_frame` takes the frame and
//! `now`; answers go into an output buffer). What needs the outside world comes back
//! as a `Step`: the driver sleeps, hands a message to the forwarder or changes a
//! service's fan-out, then calls back into the session. Tests drive the handlers
//! directly and read the steps (`session/tests.rs`).

use super::*;

/// What the driver does next for a frame.
#[derive(Debug)]
#[must_use]
pub(super) enum Step {
    /// Nothing: the answers (if any) are in the output buffer.
    Done,
    /// The core holds the message back: offer it again at `until`, reading nothing
    /// more from the peer meanwhile.
    Wait(Held),
    /// Hand a message to the forwarder.
    Forward(Forward),
    /// A service's subscriptions to add to the fan-out before its SUBACK.
    Subscribe(Subscribing),
    /// A service's subscriptions to take out of the fan-out before its UNSUBACK.
    Unsubscribe {
        pkid: u16,
        existed: Vec<bool>,
        removed: Vec<SubscriptionKey>,
    },
}

/// A publish the core holds back.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) offer: Offer,
    pub(super) until: Instant,
    pub(super) pkid: u16,
    pub(super) qos: u8,
}

/// A message for the forwarder, and what the peer is told.
#[derive(Debug)]
pub(super) struct Forward {
    pub(super) message: Message,
    pub(super) pkid: u16,
    pub(super) qos: u8,
    pub(super) why: Why,
}

/// Why a message goes to the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// The peer's own message, passed by every stage: its acknowledgement waits for
    /// the forwarder's (QoS 1 and 2).
    Clean { arrived: Instant },
    /// A quarantined device's message, diverted to the forensic topic: acknowledged as
    /// soon as it is handed on, as if delivered.
    Diverted,
}

/// A SUBSCRIBE whose filters passed every check, waiting for the fan-out.
#[derive(Debug)]
pub(super) struct Subscribing {
    pub(super) pkid: u16,
    /// The SUBACK's codes so far, in the order of the filters.
    pub(super) codes: Vec<Result<u8, u8>>,
    /// Per accepted filter, its place in `codes`.
    pub(super) accepted: Vec<(usize, Subscription)>,
}
