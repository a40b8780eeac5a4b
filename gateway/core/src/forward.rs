//! The forwarder seam: where clean traffic leaves the pipeline and commands come in.
//!
//! A `Forwarder` is what the gateway forwards to: the embedded broker by default
//! (`portcullis-embedded`), or an external broker cluster. The core and the adapters see
//! only this trait and the `Uplink` handle, never a broker.
//!
//! What every forwarder promises:
//! - **Order per principal.** Messages sent through one principal's uplink leave in the
//!   order they were sent (`uplink_for` and `service_uplink` always give a principal the
//!   same channel).
//! - **Responsibility on acknowledgement.** The receiver `send_acked` returns fires once
//!   the forwarder has taken responsibility for the message (the embedded broker's
//!   router has it; an upstream forwarder has committed it to its durable outbox). Only
//!   then is the peer acknowledged. It may instead say the forwarder had no room for it
//!   (`Taken::Full`, a full outbox): the peer is told so and keeps the message. A
//!   dropped receiver means the forwarder stopped.
//! - **Back-pressure, not loss.** `send` and `send_acked` wait for room in a bounded
//!   channel; a slow forwarder slows the senders.
//! - **Commands and service links.** Commands for a device are routed into the mailbox
//!   it registered; what a service's subscriptions match goes into the mailbox it
//!   attached, from the moment `subscribe` returns.
//!
//! The per-message path is one bounded-channel send; the other calls are made once per
//! connection or subscription, and return boxed futures so the trait can be a `dyn`.

use crate::fanout::SubscribeError;
use crate::mailbox::Mailbox;
use crate::message::Message;
use crate::principal::PrincipalId;
use crate::subscription::{Subscription, SubscriptionKey};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("forwarder link: {0}")]
    Link(String),
    #[error("the forwarder has stopped")]
    Stopped,
}

/// A boxed future, for the trait's per-connection calls.
pub type ForwardFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A forwarder's answer to a QoS 1/2 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The forwarder has it (the router has it; it is on disk).
    Yes,
    /// The forwarder had no room for it within its wait (a full outbox): the peer is
    /// told (MQTT 5: quota exceeded) and may send it again.
    Full,
}

/// One message on its way to the forwarder.
#[derive(Debug)]
pub struct UplinkItem {
    pub message: Message,
    /// Told when the forwarder has taken responsibility for it (QoS 1 and 2).
    pub ack: Option<oneshot::Sender<Taken>>,
    /// The publishing service, if a service published it (for MQTT 5 No Local).
    pub origin: Option<PrincipalId>,
}

/// A handle to one uplink: the sending end of a forwarder's bounded channel.
#[derive(Debug, Clone)]
pub struct Uplink {
    tx: mpsc::Sender<UplinkItem>,
    origin: Option<PrincipalId>,
}

impl Uplink {
    /// An uplink over `tx`; its messages carry `origin` (a service's id) if given.
    pub fn new(tx: mpsc::Sender<UplinkItem>, origin: Option<PrincipalId>) -> Uplink {
        Uplink { tx, origin }
    }

    /// Hand a QoS 0 message on (waits only for channel room).
    pub async fn send(&self, message: Message) -> Result<(), ForwardError> {
        self.tx
            .send(UplinkItem {
                message,
                ack: None,
                origin: self.origin.clone(),
            })
            .await
            .map_err(|_| ForwardError::Stopped)
    }

    /// Hand a QoS 1/2 message on; the receiver fires when the forwarder has taken
    /// responsibility for it, or found no room for it.
    pub async fn send_acked(
        &self,
        message: Message,
    ) -> Result<oneshot::Receiver<Taken>, ForwardError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(UplinkItem {
                message,
                ack: Some(tx),
                origin: self.origin.clone(),
            })
            .await
            .map_err(|_| ForwardError::Stopped)?;
        Ok(rx)
    }
}

/// What the gateway forwards to.
pub trait Forwarder: Send + Sync {
    /// The uplink a device always uses.
    fn uplink_for(&self, id: &PrincipalId) -> Uplink;

    /// The uplink a service always uses; its messages carry its id, so that its own
    /// No Local subscriptions pass them over.
    fn service_uplink(&self, id: &PrincipalId) -> Uplink;

    /// The uplink of the gateway's own events (`portcullis/events/…`: audit
    /// checkpoints, quarantine transitions, auth-failure alerts).
    fn events(&self) -> Uplink;

    /// Route commands for `id` into this mailbox from now on (replacing any other).
    fn register_device(
        &self,
        id: PrincipalId,
        mailbox: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>>;

    /// Stop routing commands for `id`, if they still go to this mailbox.
    fn unregister_device(&self, id: PrincipalId, mailbox: Arc<Mailbox>) -> ForwardFuture<'_, ()>;

    /// Route to this mailbox what the service's subscriptions match. A resumed session
    /// attaches its mailbox again and keeps its subscriptions; another mailbox starts the
    /// service afresh, with none.
    fn attach_service(
        &self,
        id: PrincipalId,
        mailbox: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>>;

    /// The service's session is gone for good: its subscriptions go too (if this
    /// mailbox is still the attached one).
    fn detach_service(&self, id: PrincipalId, mailbox: Arc<Mailbox>) -> ForwardFuture<'_, ()>;

    /// Whether the service has a connection (a parked persistent session has none).
    fn service_online(&self, id: PrincipalId, online: bool) -> ForwardFuture<'_, ()>;

    /// Add or replace subscriptions of an attached service. Once this returns, every
    /// message forwarded afterwards is matched against them, and the retained messages
    /// they asked for are in the mailbox. Per subscription: whether it existed before,
    /// or why it was not added.
    fn subscribe(
        &self,
        id: PrincipalId,
        subs: Vec<Subscription>,
    ) -> ForwardFuture<'_, Result<Vec<Result<bool, SubscribeError>>, ForwardError>>;

    /// Remove subscriptions of a service; per filter, whether there was one.
    fn unsubscribe(
        &self,
        id: PrincipalId,
        keys: Vec<SubscriptionKey>,
    ) -> ForwardFuture<'_, Result<Vec<bool>, ForwardError>>;
}
