//! The embedded forwarder: rumqttd in-process, and the few links the gateway holds
//! to it. It implements the core's `Forwarder` seam (`portcullis_core::forward`).
//!
//! rumqttd runs in-process with no network listener; the gateway reaches it through
//! local links. Every link is a task on the gateway's runtime: rumqttd's router thread
//! is the only thread of its own, so a message crosses one thread boundary on its way
//! in and one on its way out, as with rumqttd's own network front end.
//!
//! A link's `send` pushes into the link's buffer and blocks while the router's event
//! channel is full, which a tokio worker must never do. So a link hands the router
//! packets through `hand_over`, which tells the router only when the buffer was empty:
//! the router takes a link's whole buffer on each such event, so at most one of them per
//! link waits in the channel, and a channel of 1000 events never fills with a handful
//! of links (`broker.uplinks` is bounded for this). Reading, and `wake` after
//! `Unschedule`, are asynchronous already.
//!
//! - `uplinks`: a few links carrying every peer's messages into the broker; a
//!   principal always uses the same one, so its messages stay in order. QoS 1 and 2
//!   go through the link as QoS 1 and the caller is told when the router acknowledged
//!   it. An uplink wakes the router once per round of the runtime, not once per
//!   message: it lets every session that is ready hand over its message first.
//! - the downlink: one link subscribed to every device's commands, routing each to
//!   the device's session.
//! - the fan-out: one link subscribed to everything, routing each message to the
//!   service sessions whose subscriptions match (`fanout`). Service sessions hold no
//!   link of their own, so a service's subscriptions cost the broker nothing.
//!
//! Messages cross the broker in an envelope (`seal`/`open`): the router stamps each
//! forward with its link subscription's QoS and clears the retain flag, and does not
//! say who published; the envelope keeps the message's own QoS and retain flag and, for
//! a service's publish, the service's id (for MQTT 5 No Local).

use bytes::{Buf, BufMut, BytesMut};
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::fanout::{Fanout, FanoutLimits, Routed, SubscribeError};
use portcullis_core::forward::{ForwardError, ForwardFuture, Forwarder, Taken, Uplink, UplinkItem};
use portcullis_core::mailbox::{Delivery, Mailbox};
use portcullis_core::message::{Message, Properties, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::PrincipalId;
use portcullis_core::subscription::{Subscription, SubscriptionKey};
use portcullis_core::topic::TopicName;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Filter, Packet, PubAck, PubAckReason, Publish, PublishProperties, RetainForwardRule, Subscribe,
};
use rumqttd::{Config, Notification, RouterConfig};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

enum DownlinkCmd {
    Register(PrincipalId, Arc<Mailbox>),
    Unregister(PrincipalId, Arc<Mailbox>),
}

/// What service sessions ask of the fan-out.
enum FanoutCmd {
    Attach(PrincipalId, Arc<Mailbox>),
    Detach(PrincipalId, Arc<Mailbox>),
    Online(PrincipalId, bool),
    /// Answered, per subscription, with whether it existed before (or why it was not
    /// added).
    Subscribe(
        PrincipalId,
        Vec<Subscription>,
        oneshot::Sender<Vec<Result<bool, SubscribeError>>>,
    ),
    /// Answered, per filter, with whether there was such a subscription.
    Unsubscribe(
        PrincipalId,
        Vec<SubscriptionKey>,
        oneshot::Sender<Vec<bool>>,
    ),
}

pub struct EmbeddedBroker {
    #[allow(dead_code)] // Owns the router: dropping it would stop the broker.
    broker: rumqttd::Broker,
    uplinks: Vec<mpsc::Sender<UplinkItem>>,
    /// The gateway's own id, whose uplink carries its events.
    gateway_id: PrincipalId,
    downlink: mpsc::Sender<DownlinkCmd>,
    fanout: mpsc::Sender<FanoutCmd>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedBroker")
    }
}

/// The router settings of the embedded broker, from the `[broker]` section: the one
/// place they are set (the benchmark's "rumqttd direct" baseline uses them too).
pub fn router_config(cfg: &portcullis_config::Broker) -> Config {
    Config {
        id: 0,
        router: RouterConfig {
            // rumqttd's default allows zero connections.
            max_connections: cfg.max_links,
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.max_segment_size,
            max_segment_count: cfg.max_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: None,
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

fn link_err(e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Link(e.to_string())
}

/// Envelope flags: the message's QoS (two bits), its retain flag, and whether the
/// publishing service's id follows.
const SEAL_QOS: u8 = 0b0011;
const SEAL_RETAIN: u8 = 0b0100;
const SEAL_ORIGIN: u8 = 0b1000;

/// A rumqttd publish carrying `message` in its envelope: the payload is the flags
/// byte, the origin (a length byte and the id) if any, then the message's payload.
/// `link_qos` and `pkid` are for the link's own acknowledgement. (rumqttd's
/// constructor only makes QoS 0, but its serialized form is public and carries both.)
fn seal(message: &Message, origin: Option<&PrincipalId>, link_qos: QoS, pkid: u16) -> Publish {
    let topic = message.topic.as_str().as_bytes();
    let origin = origin.map(|o| o.as_str().as_bytes());
    let envelope = 1 + origin.map_or(0, |o| 1 + o.len());
    let mut buf = BytesMut::with_capacity(5 + topic.len() + envelope + message.payload.len());
    buf.put_u8(0b0011_0000 | ((link_qos as u8) << 1));
    buf.put_u16(pkid);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    let mut flags = message.qos as u8 & SEAL_QOS;
    if message.retain {
        flags |= SEAL_RETAIN;
    }
    if origin.is_some() {
        flags |= SEAL_ORIGIN;
    }
    buf.put_u8(flags);
    if let Some(o) = origin {
        // Principal ids are at most 64 bytes.
        buf.put_u8(o.len() as u8);
        buf.put_slice(o);
    }
    buf.put_slice(&message.payload);
    Publish::deserialize(buf.freeze())
}

/// The message (and its publishing service) out of a forward's envelope. `None` for
/// anything that did not come sealed from an uplink.
fn open(
    publish: Publish,
    properties: Option<PublishProperties>,
) -> Option<(Message, Option<PrincipalId>)> {
    // Every publish the router forwards came sealed from an uplink, its topic a
    // `TopicName` already.
    let topic = TopicName::from_forwarded(std::str::from_utf8(&publish.topic).ok()?);
    let mut payload = publish.payload;
    let flags = *payload.first()?;
    payload.advance(1);
    let origin = if flags & SEAL_ORIGIN != 0 {
        let len = usize::from(*payload.first()?);
        let id = payload.get(1..1 + len)?;
        let id = PrincipalId::parse(std::str::from_utf8(id).ok()?).ok()?;
        payload.advance(1 + len);
        Some(id)
    } else {
        None
    };
    let properties = properties.map(|p| Properties {
        payload_format_utf8: p.payload_format_indicator.map(|v| v == 1),
        message_expiry_secs: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p
            .response_topic
            .and_then(|t| TopicName::parse(&t, UNLIMITED).ok()),
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    });
    let message = Message {
        topic,
        payload,
        qos: QoS::from_u8(flags & SEAL_QOS)?,
        retain: flags & SEAL_RETAIN != 0,
        properties: properties
            .filter(|p| *p != Properties::default())
            .map(Arc::new),
    };
    Some((message, origin))
}

/// QoS and packet id of a forwarded publish (rumqttd keeps them crate-private). The
/// router stamps forwards with the subscription's QoS; a QoS > 0 forward counts two
/// extra bytes for its packet id in `len()`.
fn forward_qos_pkid(publish: &Publish) -> (QoS, u16) {
    let plain = 2 + publish.topic.len() + publish.payload.len();
    if publish.len() == plain {
        return (QoS::AtMostOnce, 0);
    }
    let raw = publish.serialize();
    let pkid = u16::from_be_bytes([raw[1], raw[2]]);
    (QoS::AtLeastOnce, pkid)
}

/// What the router acknowledged on a link (its `Ack` type is crate-private, but
/// converts into the public `Packet`).
enum LinkAck {
    Pub(u16),
    Sub,
}

fn link_ack(notification: Notification) -> Option<LinkAck> {
    let packet: Option<Packet> = notification.into();
    match packet {
        Some(Packet::PubAck(ack, _)) => Some(LinkAck::Pub(ack.pkid)),
        Some(Packet::SubAck(..)) => Some(LinkAck::Sub),
        _ => None,
    }
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter {
        path: path.to_string(),
        qos: match qos {
            QoS::AtMostOnce => rumqttd::protocol::QoS::AtMostOnce,
            _ => rumqttd::protocol::QoS::AtLeastOnce,
        },
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    }
}

/// The broker-side properties of a message.
fn link_properties(msg: &Message) -> Option<PublishProperties> {
    let p = msg.properties.as_ref()?;
    Some(PublishProperties {
        payload_format_indicator: p.payload_format_utf8.map(u8::from),
        message_expiry_interval: p.message_expiry_secs,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.as_ref().map(|t| t.as_str().to_string()),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..PublishProperties::default()
    })
}

const UNLIMITED: portcullis_core::topic::TopicLimits = portcullis_core::topic::TopicLimits {
    max_length: usize::MAX,
    max_depth: usize::MAX,
};

impl EmbeddedBroker {
    /// Start the broker and its links, as tasks on the current runtime. (Opening a
    /// link waits for the router's answer, briefly, on this task: this runs once, before
    /// any peer is served.)
    pub async fn start(
        cfg: &portcullis_config::Broker,
        metrics: Arc<Metrics>,
        audit: Audit,
    ) -> Result<Arc<EmbeddedBroker>, ForwardError> {
        let broker = rumqttd::Broker::new(router_config(cfg));
        let lag = Arc::new(Lag::new(cfg));
        let mut uplinks = Vec::with_capacity(cfg.uplinks);
        for n in 0..cfg.uplinks {
            let (tx, rx) = broker
                .link(&format!("portcullis-uplink-{n}"))
                .map_err(link_err)?;
            let (cmd_tx, cmd_rx) = mpsc::channel(cfg.link_queue);
            tokio::spawn(run_uplink(tx, rx, cmd_rx, lag.clone()));
            uplinks.push(cmd_tx);
        }
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let (tx, rx) = broker.link("portcullis-downlink").map_err(link_err)?;
        let (downlink, cmd_rx) = mpsc::channel(cfg.link_queue);
        let (m, a, r) = (metrics.clone(), audit.clone(), ready_tx.clone());
        tokio::spawn(run_downlink(tx, rx, cmd_rx, m, a, r));
        let (tx, rx) = broker.link("portcullis-fanout").map_err(link_err)?;
        let (fanout, cmd_rx) = mpsc::channel(cfg.link_queue);
        let table = Fanout::new(FanoutLimits {
            max_retained_messages: cfg.max_retained_messages,
            max_retained_bytes: cfg.max_retained_bytes,
            max_subscriptions: cfg.max_subscriptions,
        });
        let link = FanoutLink { tx, rx, lag };
        tokio::spawn(run_fanout(link, cmd_rx, table, metrics, audit, ready_tx));
        // Both reading links subscribed before anything is published.
        for link in ["downlink", "fan-out"] {
            tokio::time::timeout(std::time::Duration::from_secs(10), ready.recv())
                .await
                .ok()
                .flatten()
                .ok_or_else(|| ForwardError::Link(format!("the {link} link did not subscribe")))?;
        }
        Ok(Arc::new(EmbeddedBroker {
            broker,
            gateway_id: PrincipalId::parse("portcullis").expect("a valid id"),
            uplinks,
            downlink,
            fanout,
        }))
    }

    fn uplink_index(&self, id: &PrincipalId) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        (h.finish() % self.uplinks.len() as u64) as usize
    }

    async fn to_fanout(&self, cmd: FanoutCmd) -> Result<(), ForwardError> {
        self.fanout
            .send(cmd)
            .await
            .map_err(|_| ForwardError::Stopped)
    }
}

impl Forwarder for EmbeddedBroker {
    fn uplink_for(&self, id: &PrincipalId) -> Uplink {
        Uplink::new(self.uplinks[self.uplink_index(id)].clone(), None)
    }

    fn service_uplink(&self, id: &PrincipalId) -> Uplink {
        Uplink::new(
            self.uplinks[self.uplink_index(id)].clone(),
            Some(id.clone()),
        )
    }

    fn events(&self) -> Uplink {
        self.uplink_for(&self.gateway_id)
    }

    fn register_device(
        &self,
        id: PrincipalId,
        mailbox: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>> {
        Box::pin(async move {
            self.downlink
                .send(DownlinkCmd::Register(id, mailbox))
                .await
                .map_err(|_| ForwardError::Stopped)
        })
    }

    fn unregister_device(&self, id: PrincipalId, mailbox: Arc<Mailbox>) -> ForwardFuture<'_, ()> {
        Box::pin(async move {
            let _ = self
                .downlink
                .send(DownlinkCmd::Unregister(id, mailbox))
                .await;
        })
    }

    fn attach_service(
        &self,
        id: PrincipalId,
        mailbox: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>> {
        Box::pin(self.to_fanout(FanoutCmd::Attach(id, mailbox)))
    }

    fn detach_service(&self, id: PrincipalId, mailbox: Arc<Mailbox>) -> ForwardFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.to_fanout(FanoutCmd::Detach(id, mailbox)).await;
        })
    }

    fn service_online(&self, id: PrincipalId, online: bool) -> ForwardFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.to_fanout(FanoutCmd::Online(id, online)).await;
        })
    }

    fn subscribe(
        &self,
        id: PrincipalId,
        subs: Vec<Subscription>,
    ) -> ForwardFuture<'_, Result<Vec<Result<bool, SubscribeError>>, ForwardError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.to_fanout(FanoutCmd::Subscribe(id, subs, tx)).await?;
            rx.await.map_err(|_| ForwardError::Stopped)
        })
    }

    fn unsubscribe(
        &self,
        id: PrincipalId,
        keys: Vec<SubscriptionKey>,
    ) -> ForwardFuture<'_, Result<Vec<bool>, ForwardError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.to_fanout(FanoutCmd::Unsubscribe(id, keys, tx)).await?;
            rx.await.map_err(|_| ForwardError::Stopped)
        })
    }
}

/// Bytes the uplinks have handed to the router that the fan-out has not read yet.
///
/// rumqttd keeps a bounded log per topic (`max_segment_count` segments of
/// `max_segment_size`) and drops the oldest segment when a reader lags beyond it: a
/// message the fan-out had not read would be lost without a trace. So the uplinks stop
/// taking messages (their senders wait, and the peers' acknowledgements with them)
/// while the fan-out is further behind than all but one segment of a topic's log
/// (less a margin); with one segment, one message at a time. An uplink held back for
/// `LAG_STALL` while the fan-out reads nothing goes on anyway: a fan-out that stopped
/// must not stop the gateway.
#[derive(Debug)]
struct Lag {
    unread: AtomicUsize,
    /// Forwards the fan-out has read: whether it is moving at all.
    reads: AtomicU64,
    budget: usize,
}

const LAG_STALL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a held-back uplink looks at the fan-out's progress again.
const LAG_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Since when an uplink has been held back, and the fan-out's reads then.
type Held = Option<(Instant, u64)>;

impl Lag {
    fn new(cfg: &portcullis_config::Broker) -> Lag {
        Lag {
            unread: AtomicUsize::new(0),
            reads: AtomicU64::new(0),
            // The writer may start a new segment, dropping the oldest, while the
            // reader is still at that oldest segment's start: what is safe to leave
            // unread is the other segments, less a quarter for what the log counts
            // beyond topic and payload.
            budget: cfg
                .max_segment_size
                .saturating_mul(cfg.max_segment_count.saturating_sub(1))
                / 4
                * 3,
        }
    }

    /// The size the router's log counts for a publish, on both sides.
    fn size(publish: &Publish) -> usize {
        publish.topic.len() + publish.payload.len()
    }

    /// Whether an uplink may hand the router more now. (One message may take it past
    /// the budget: the budget keeps a margin for it.) `held` is the uplink's own
    /// record of when it was first held back; the clock is read only while held.
    fn open(&self, held: &mut Held, now: impl FnOnce() -> Instant) -> bool {
        if self.unread.load(Ordering::Relaxed) <= self.budget {
            *held = None;
            return true;
        }
        let reads = self.reads.load(Ordering::Relaxed);
        match *held {
            Some((since, seen)) if seen == reads => now().duration_since(since) > LAG_STALL,
            _ => {
                *held = Some((now(), reads));
                false
            }
        }
    }

    fn sent(&self, size: usize) {
        self.unread.fetch_add(size, Ordering::Relaxed);
    }

    fn read(&self, size: usize) {
        let _ = self
            .unread
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(size))
            });
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// QoS 1 publishes one uplink may have waiting for the router's acknowledgement.
const MAX_PENDING: usize = 60_000;

/// Packets handed to the router in one go.
const BATCH: usize = 256;

/// Hand `batch` to the router, telling it only if the link's buffer was empty: the
/// router takes the whole buffer each time it is told, so if it held packets, the
/// router has been told and has not taken them yet, and will take these with them.
/// So at most one event per link waits in the router's channel, and the `send` that
/// tells it (which would block on a full channel) never waits. Each telling wakes the
/// router thread: once per batch, not once per packet.
async fn hand_over(
    tx: &mut LinkTx,
    batch: &mut Vec<Packet>,
) -> Result<(), rumqttd::local::LinkError> {
    let Some(last) = batch.pop() else {
        return Ok(());
    };
    {
        let mut buffer = tx.buffer();
        let told = !buffer.is_empty();
        buffer.extend(batch.drain(..));
        if told {
            buffer.push_back(last);
            return Ok(());
        }
    }
    tx.send(last).await.map(|_| ())
}

/// The next packet id for a QoS 1 publish: packet ids in flight are few (acks come
/// back within a router round), so any still pending is skipped.
fn next_pkid(next: &mut u16, pending: &HashMap<u16, oneshot::Sender<Taken>>) -> u16 {
    loop {
        *next = next.wrapping_add(1).max(1);
        if !pending.contains_key(next) {
            return *next;
        }
    }
}

/// Seal one message into the uplink's batch, with a packet id if it is to be
/// acknowledged.
fn take(
    UplinkItem {
        message,
        ack,
        origin,
    }: UplinkItem,
    pkid: &mut u16,
    pending: &mut HashMap<u16, oneshot::Sender<Taken>>,
    batch: &mut Vec<Packet>,
    lag: &Lag,
) {
    let (qos, id) = match ack {
        None => (QoS::AtMostOnce, 0),
        Some(ack) => {
            let id = next_pkid(pkid, pending);
            pending.insert(id, ack);
            (QoS::AtLeastOnce, id)
        }
    };
    let publish = seal(&message, origin.as_ref(), qos, id);
    lag.sent(Lag::size(&publish));
    batch.push(Packet::Publish(publish, link_properties(&message)));
}

async fn run_uplink(
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut cmds: mpsc::Receiver<UplinkItem>,
    lag: Arc<Lag>,
) {
    let mut pending: HashMap<u16, oneshot::Sender<Taken>> = HashMap::new();
    let mut pkid: u16 = 0;
    let mut batch: Vec<Packet> = Vec::with_capacity(BATCH);
    let mut held: Held = None;
    // Acknowledged by the router, not yet told.
    let mut acked: Vec<oneshot::Sender<Taken>> = Vec::new();
    loop {
        let open = lag.open(&mut held, Instant::now);
        // Packet ids are 16 bits: with that many awaiting the router, wait for acks
        // before taking more (the senders feel it as back-pressure). And while the
        // fan-out is too far behind (`Lag`), take nothing either.
        let room = if open {
            BATCH.min(MAX_PENDING.saturating_sub(pending.len()))
        } else {
            0
        };
        tokio::select! {
            // Acknowledgements first: they free packet ids.
            biased;
            n = rx.next() => match n {
                Ok(Some(n @ Notification::DeviceAck(_))) => {
                    if let Some(LinkAck::Pub(pkid)) = link_ack(n)
                        && let Some(waiter) = pending.remove(&pkid) {
                            acked.push(waiter);
                        }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() { break; }
                }
                Ok(_) => {}
                Err(_) => break,
            },
            // The router's acknowledgements are told to the peers' sessions once the
            // runtime has nothing else ready: the same router round forwarded these
            // messages, and their delivery to subscribers goes first (acknowledging is
            // a write to each publisher; the subscriber should not wait behind them).
            _ = std::future::ready(()), if !acked.is_empty() => {
                tokio::task::yield_now().await;
                for waiter in acked.drain(..) {
                    let _ = waiter.send(Taken::Yes);
                }
            }
            item = cmds.recv(), if room > 0 => {
                let Some(item) = item else {
                    // Closing: what was accepted went to the router already.
                    break;
                };
                take(item, &mut pkid, &mut pending, &mut batch, &lag);
                // Before waking the router, every session that is ready now hands over
                // its message too (the runtime comes back here once it has nothing
                // else ready), so that a burst from many peers costs one wake-up, not
                // one each. The fan-out's lag is looked at for every message.
                let mut yielded = false;
                while batch.len() < room && lag.open(&mut held, Instant::now) {
                    match cmds.try_recv() {
                        Ok(item) => take(item, &mut pkid, &mut pending, &mut batch, &lag),
                        Err(mpsc::error::TryRecvError::Empty) if !yielded => {
                            yielded = true;
                            tokio::task::yield_now().await;
                        }
                        Err(_) => break,
                    }
                }
                if hand_over(&mut tx, &mut batch).await.is_err() {
                    break;
                }
            }
            // Held back by the fan-out: look again shortly.
            _ = tokio::time::sleep(LAG_WAIT), if !open => {}
        }
    }
    // The router has these: their senders are told so, whatever ended the link.
    for waiter in acked {
        let _ = waiter.send(Taken::Yes);
    }
}

/// Subscribe a reading link and wait for the router's SUBACK; then tell `ready`. The
/// gateway does not start taking messages before its reading links are in place:
/// what the router takes before a filter exists is forwarded to nobody.
async fn subscribe_link(
    tx: &mut LinkTx,
    rx: &mut LinkRx,
    path: &str,
    qos: QoS,
    ready: mpsc::UnboundedSender<()>,
) -> bool {
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![filter(path, qos)],
    };
    if tx.send(Packet::Subscribe(subscribe, None)).await.is_err() {
        return false;
    }
    loop {
        match rx.next().await {
            Ok(Some(n @ Notification::DeviceAck(_))) => {
                if let Some(LinkAck::Sub) = link_ack(n) {
                    let _ = ready.send(());
                    return true;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return false;
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

async fn run_downlink(
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut cmds: mpsc::Receiver<DownlinkCmd>,
    metrics: Arc<Metrics>,
    audit: Audit,
    ready: mpsc::UnboundedSender<()>,
) {
    if !subscribe_link(
        &mut tx,
        &mut rx,
        "devices/+/commands/#",
        QoS::AtLeastOnce,
        ready,
    )
    .await
    {
        return;
    }
    let mut routes: HashMap<PrincipalId, Arc<Mailbox>> = HashMap::new();
    let mut acks = Vec::with_capacity(1);
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => break,
                Some(DownlinkCmd::Register(id, mailbox)) => {
                    routes.insert(id, mailbox);
                }
                Some(DownlinkCmd::Unregister(id, mailbox)) => {
                    if routes.get(&id).is_some_and(|m| Arc::ptr_eq(m, &mailbox)) {
                        routes.remove(&id);
                    }
                }
            },
            n = rx.next() => match n {
                Ok(Some(Notification::Forward(forward))) => {
                    // Reading the link's cache never waits, and tokio does not count it:
                    // under a steady stream this task gives the worker back now and then.
                    tokio::task::consume_budget().await;
                    let (link_qos, pkid) = forward_qos_pkid(&forward.publish);
                    let target = std::str::from_utf8(&forward.publish.topic)
                        .ok()
                        .and_then(|t| t.split('/').nth(1))
                        .and_then(|id| PrincipalId::parse(id).ok());
                    // A live command: its retain flag is not the device's business
                    // (retained commands reach it when it subscribes).
                    let delivery = open(forward.publish, forward.properties).map(|(message, _)| {
                        Delivery::from(Message { retain: false, ..message })
                    });
                    // A device with no session (never connected, clean session ended,
                    // or expired) has nothing to deliver to: the command is dropped.
                    let mailbox = target.as_ref().and_then(|id| routes.get(id));
                    if mailbox.is_none() {
                        Metrics::inc(&metrics.commands_undeliverable);
                    }
                    if let (Some(id), Some(delivery), Some(mailbox)) = (target, delivery, mailbox)
                        && let Err(overflow) = mailbox.push(delivery, Instant::now())
                    {
                        Metrics::inc(&metrics.queue_overflow);
                        if mailbox.first_refusal() {
                            audit.record(
                                AuditEntry::new("queue", "refuse")
                                    .principal("device", id.to_string())
                                    .reason(overflow.as_str()),
                            );
                        }
                    }
                    if link_qos != QoS::AtMostOnce {
                        let ack = PubAck { pkid, reason: PubAckReason::Success };
                        acks.push(Packet::PubAck(ack, None));
                        if hand_over(&mut tx, &mut acks).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() { break; }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

/// Count and audit what a routing step could not place.
fn report(routed: Routed, topic: &str, metrics: &Metrics, audit: &Audit) {
    for (id, overflow, first) in routed.overflows {
        Metrics::inc(&metrics.queue_overflow);
        // One line per run of refusals: a consumer that falls behind is counted per
        // message (portcullis_queue_overflow_total) but audited once until it has room.
        if first {
            audit.record(
                AuditEntry::new("queue", "refuse")
                    .principal("service", id.to_string())
                    .topic(topic.to_string())
                    .reason(overflow.as_str()),
            );
        }
    }
    if routed.retained_refused {
        Metrics::inc(&metrics.retained_refused);
        audit.record(
            AuditEntry::new("retain", "refuse")
                .topic(topic.to_string())
                .reason("retained messages at their limit (broker.max_retained_messages / max_retained_bytes): delivered, not retained"),
        );
    }
}

/// The fan-out link's ends.
struct FanoutLink {
    tx: LinkTx,
    rx: LinkRx,
    /// What the uplinks sent that this link has not read.
    lag: Arc<Lag>,
}

async fn run_fanout(
    link: FanoutLink,
    mut cmds: mpsc::Receiver<FanoutCmd>,
    mut table: Fanout,
    metrics: Arc<Metrics>,
    audit: Audit,
    ready: mpsc::UnboundedSender<()>,
) {
    let FanoutLink {
        mut tx,
        mut rx,
        lag,
    } = link;
    // Everything, at QoS 0: the table decides each session's QoS, and nothing waits
    // for acknowledgements on this link.
    if !subscribe_link(&mut tx, &mut rx, "#", QoS::AtMostOnce, ready).await {
        return;
    }
    loop {
        tokio::select! {
            // Session requests first: a SUBSCRIBE is answered before more traffic is
            // routed, so nothing the broker takes after its SUBACK misses it.
            biased;
            cmd = cmds.recv() => {
                let now = Instant::now();
                match cmd {
                    None => break,
                    Some(FanoutCmd::Attach(id, mailbox)) => table.attach(&id, mailbox),
                    Some(FanoutCmd::Detach(id, mailbox)) => {
                        table.detach(&id, &mailbox);
                    }
                    Some(FanoutCmd::Online(id, online)) => table.set_online(&id, online),
                    Some(FanoutCmd::Subscribe(id, subs, reply)) => {
                        let mut existed = Vec::with_capacity(subs.len());
                        for sub in subs {
                            let filter = sub.key.to_string();
                            match table.subscribe(&id, sub, now) {
                                Ok(done) => {
                                    existed.push(Ok(done.existed));
                                    report(done.routed, &filter, &metrics, &audit);
                                }
                                Err(e) => existed.push(Err(e)),
                            }
                        }
                        let _ = reply.send(existed);
                    }
                    Some(FanoutCmd::Unsubscribe(id, keys, reply)) => {
                        let existed = keys.iter().map(|k| table.unsubscribe(&id, k)).collect();
                        let _ = reply.send(existed);
                    }
                }
                metrics
                    .service_subscriptions
                    .store(table.subscription_count() as u64, Ordering::Relaxed);
            }
            n = rx.next() => match n {
                Ok(Some(Notification::Forward(forward))) => {
                    // As in the downlink: give the worker back now and then.
                    tokio::task::consume_budget().await;
                    lag.read(Lag::size(&forward.publish));
                    let Some((message, origin)) = open(forward.publish, forward.properties) else {
                        continue;
                    };
                    let routed = table.publish(&message, origin.as_ref(), Instant::now());
                    if !routed.overflows.is_empty() || routed.retained_refused {
                        report(routed, message.topic.as_str(), &metrics, &audit);
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() { break; }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn an_uplink_waits_for_a_lagging_fan_out_but_not_for_a_stopped_one() {
        let cfg = portcullis_config::Broker {
            max_segment_size: 4000,
            max_segment_count: 2,
            ..portcullis_config::Broker::default()
        };
        let lag = Lag::new(&cfg);
        assert_eq!(lag.budget, 3000);
        let t0 = Instant::now();
        let at = |ms: u64| move || t0 + std::time::Duration::from_millis(ms);
        let mut held = None;
        lag.sent(3000);
        assert!(lag.open(&mut held, at(0)), "within the budget");
        lag.sent(1);
        assert!(!lag.open(&mut held, at(0)), "past it");
        // The fan-out reads: still behind, held again from then.
        lag.read(1);
        lag.sent(1);
        assert!(!lag.open(&mut held, at(900)));
        assert!(!lag.open(&mut held, at(1800)), "it read 0.9 s ago");
        // No read for over a second: stopped, not slow.
        assert!(lag.open(&mut held, at(1901)));
        // Caught up: open, and the clock starts again at the next hold.
        lag.read(3000);
        assert!(lag.open(&mut held, at(5000)));
        lag.sent(4000);
        assert!(
            !lag.open(&mut held, at(9000)),
            "a quiet spell is not a stall"
        );
        // Reads of what was never counted do not take it below zero.
        lag.read(100_000);
        assert_eq!(lag.unread.load(Ordering::Relaxed), 0);
    }

    fn message(qos: QoS, retain: bool, payload: &'static [u8]) -> Message {
        Message {
            topic: TopicName::parse_unlimited("devices/a/telemetry").unwrap(),
            payload: Bytes::from_static(payload),
            qos,
            retain,
            properties: None,
        }
    }

    #[test]
    fn a_sealed_message_opens_with_its_own_qos_retain_flag_and_origin() {
        let origin = PrincipalId::parse("analytics").unwrap();
        for (qos, retain, from) in [
            (QoS::AtMostOnce, false, None),
            (QoS::AtLeastOnce, true, Some(&origin)),
            (QoS::ExactlyOnce, false, Some(&origin)),
        ] {
            let m = message(qos, retain, b"{\"t\":1}");
            let p = seal(&m, from, QoS::AtLeastOnce, 513);
            assert_eq!(forward_qos_pkid(&p), (QoS::AtLeastOnce, 513));
            assert!(!p.retain, "the broker never keeps a retained copy");
            let (opened, who) = open(p, None).unwrap();
            assert_eq!(opened, m);
            assert_eq!(who.as_ref(), from);
        }
        let p = seal(
            &message(QoS::AtMostOnce, false, b""),
            None,
            QoS::AtMostOnce,
            0,
        );
        assert_eq!(forward_qos_pkid(&p), (QoS::AtMostOnce, 0));
        assert_eq!(open(p, None).unwrap().0.payload, Bytes::new());
    }

    #[test]
    fn a_publish_without_an_envelope_is_not_opened() {
        let mut p = seal(
            &message(QoS::AtMostOnce, false, b""),
            None,
            QoS::AtMostOnce,
            0,
        );
        p.payload = Bytes::new();
        assert!(open(p.clone(), None).is_none());
        p.payload = Bytes::from_static(&[SEAL_ORIGIN, 9, b'x']);
        assert!(open(p, None).is_none(), "origin longer than what follows");
    }
}
