//! The embedded broker and the few links the gateway holds to it.
//!
//! rumqttd runs in-process with no network listener; the gateway reaches it through
//! local links. A link's `send` blocks on a bounded router channel, so every link
//! lives on its own thread with a current-thread runtime, fed by a bounded queue: a
//! slow router slows the senders (back-pressure), never a tokio worker.
//!
//! - `uplinks`: a few links carrying device traffic into the broker; a device always
//!   uses the same one, so its messages stay in order. QoS 1 goes through the link as
//!   QoS 1 and the caller is told when the router acknowledged it.
//! - the downlink: one link subscribed to every device's commands, routing each to
//!   the device's session.
//! - a link per connected service, carrying its own subscriptions.

use crate::audit::{Audit, AuditEntry};
use crate::mailbox::Mailbox;
use crate::metrics::Metrics;
use crate::pipeline::{Message, Properties, QoS};
use crate::principal::PrincipalId;
use crate::topic::TopicName;
use bytes::{BufMut, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, Publish,
    PublishProperties, RetainForwardRule, Subscribe, Unsubscribe,
};
use rumqttd::{Config, Notification, RouterConfig};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker link: {0}")]
    Link(String),
    #[error("the broker has stopped")]
    Stopped,
}

/// A message delivered from the broker to a peer.
pub type Delivery = Message;

enum UplinkCmd {
    Publish(Message, Option<oneshot::Sender<()>>),
}

enum DownlinkCmd {
    Register(PrincipalId, Arc<Mailbox>),
    Unregister(PrincipalId, Arc<Mailbox>),
}

/// Commands from a service session to its link.
#[derive(Debug)]
pub enum ServiceCmd {
    /// `pkid` is the service's own packet id for QoS 1; the PUBACK comes back with it.
    Publish(Message, u16),
    Subscribe(Vec<(String, QoS)>),
    Unsubscribe(Vec<String>),
}

/// What a service link reports back to its session.
#[derive(Debug)]
pub enum ServiceEvent {
    Delivery(Delivery),
    PubAck(u16),
    /// The broker has the subscription in place.
    SubAck,
}

pub struct EmbeddedBroker {
    broker: rumqttd::Broker,
    uplinks: Vec<mpsc::Sender<UplinkCmd>>,
    downlink: mpsc::Sender<DownlinkCmd>,
    link_queue: usize,
    service_links: AtomicU64,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedBroker")
    }
}

fn router_config(cfg: &portcullis_config::Broker) -> Config {
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

fn link_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Link(e.to_string())
}

/// Build a rumqttd publish with the QoS and packet id set (its constructor only makes
/// QoS 0, but its serialized form is public and carries both).
fn build_publish(topic: &[u8], payload: &[u8], qos: QoS, retain: bool, pkid: u16) -> Publish {
    let mut buf = BytesMut::with_capacity(5 + topic.len() + payload.len());
    buf.put_u8(0b0011_0000 | retain as u8 | ((qos as u8) << 1));
    buf.put_u16(pkid);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    buf.put_slice(payload);
    Publish::deserialize(buf.freeze())
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

/// The user property that carries a QoS 2 message's QoS through the embedded broker,
/// which stamps every forward with the QoS of the link's subscription (at most 1).
/// Stripped before anything reaches a peer.
const QOS2_MARK: &str = "$portcullis.qos2";

/// The broker-side properties of a message: its own, plus the QoS 2 mark.
fn link_properties(msg: &Message) -> Option<PublishProperties> {
    if msg.properties.is_none() && msg.qos != QoS::ExactlyOnce {
        return None;
    }
    let mut out = PublishProperties::default();
    if let Some(p) = &msg.properties {
        out.payload_format_indicator = p.payload_format_utf8.map(u8::from);
        out.message_expiry_interval = p.message_expiry_secs;
        out.content_type = p.content_type.clone();
        out.response_topic = p.response_topic.as_ref().map(|t| t.as_str().to_string());
        out.correlation_data = p.correlation_data.clone();
        out.user_properties = p.user_properties.clone();
    }
    if msg.qos == QoS::ExactlyOnce {
        out.user_properties
            .push((QOS2_MARK.to_string(), String::new()));
    }
    Some(out)
}

const UNLIMITED: crate::topic::TopicLimits = crate::topic::TopicLimits {
    max_length: usize::MAX,
    max_depth: usize::MAX,
};

fn to_delivery(
    publish: Publish,
    properties: Option<PublishProperties>,
    link_qos: QoS,
) -> Option<Delivery> {
    let topic = std::str::from_utf8(&publish.topic).ok()?;
    let topic = TopicName::parse(topic, UNLIMITED).ok()?;
    let mut qos = link_qos;
    let properties = properties.and_then(|mut p| {
        if let Some(i) = p.user_properties.iter().position(|(k, _)| k == QOS2_MARK) {
            p.user_properties.remove(i);
            qos = QoS::ExactlyOnce;
        }
        let out = Properties {
            payload_format_utf8: p.payload_format_indicator.map(|v| v == 1),
            message_expiry_secs: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p
                .response_topic
                .and_then(|t| TopicName::parse(&t, UNLIMITED).ok()),
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
        };
        (out != Properties::default()).then(|| Arc::new(out))
    });
    Some(Delivery {
        topic,
        payload: publish.payload,
        qos,
        retain: publish.retain,
        properties,
    })
}

fn spawn_link_thread(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), BrokerError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(body)
        .map(|_| ())
        .map_err(link_err)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime needs no resources that can be missing")
}

impl EmbeddedBroker {
    pub fn start(
        cfg: &portcullis_config::Broker,
        metrics: Arc<Metrics>,
        audit: Audit,
    ) -> Result<Arc<EmbeddedBroker>, BrokerError> {
        let broker = rumqttd::Broker::new(router_config(cfg));
        let mut uplinks = Vec::with_capacity(cfg.uplinks);
        for n in 0..cfg.uplinks {
            let (tx, rx) = broker
                .link(&format!("portcullis-uplink-{n}"))
                .map_err(link_err)?;
            let (cmd_tx, cmd_rx) = mpsc::channel(cfg.link_queue);
            spawn_link_thread(format!("uplink-{n}"), move || {
                runtime().block_on(run_uplink(tx, rx, cmd_rx))
            })?;
            uplinks.push(cmd_tx);
        }
        let (tx, rx) = broker.link("portcullis-downlink").map_err(link_err)?;
        let (downlink, cmd_rx) = mpsc::channel(cfg.link_queue);
        spawn_link_thread("downlink".into(), move || {
            runtime().block_on(run_downlink(tx, rx, cmd_rx, metrics, audit))
        })?;
        Ok(Arc::new(EmbeddedBroker {
            broker,
            uplinks,
            downlink,
            link_queue: cfg.link_queue,
            service_links: AtomicU64::new(0),
        }))
    }

    /// The uplink a principal always uses.
    pub fn uplink_for(&self, id: &PrincipalId) -> Uplink {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let n = (h.finish() % self.uplinks.len() as u64) as usize;
        Uplink {
            tx: self.uplinks[n].clone(),
        }
    }

    /// Route commands for `id` into this mailbox from now on (replacing any other).
    pub async fn register_device(
        &self,
        id: PrincipalId,
        mailbox: Arc<Mailbox>,
    ) -> Result<(), BrokerError> {
        self.downlink
            .send(DownlinkCmd::Register(id, mailbox))
            .await
            .map_err(|_| BrokerError::Stopped)
    }

    /// Stop routing commands for `id`, if they still go to this mailbox.
    pub async fn unregister_device(&self, id: PrincipalId, mailbox: Arc<Mailbox>) {
        let _ = self
            .downlink
            .send(DownlinkCmd::Unregister(id, mailbox))
            .await;
    }

    /// A link of the service's own. Blocks briefly while the router registers it.
    pub async fn service_link(
        self: &Arc<Self>,
        id: &PrincipalId,
    ) -> Result<(mpsc::Sender<ServiceCmd>, mpsc::Receiver<ServiceEvent>), BrokerError> {
        let n = self.service_links.fetch_add(1, Ordering::Relaxed);
        let name = format!("service-{id}-{n}");
        let this = self.clone();
        let link_name = name.clone();
        let (tx, rx) = tokio::task::spawn_blocking(move || {
            this.broker.link(&link_name).map_err(|e| e.to_string())
        })
        .await
        .map_err(link_err)?
        .map_err(link_err)?;
        let (cmd_tx, cmd_rx) = mpsc::channel(self.link_queue);
        let (event_tx, event_rx) = mpsc::channel(self.link_queue);
        spawn_link_thread(name, move || {
            runtime().block_on(run_service_link(tx, rx, cmd_rx, event_tx))
        })?;
        Ok((cmd_tx, event_rx))
    }
}

/// A handle to one uplink.
#[derive(Debug, Clone)]
pub struct Uplink {
    tx: mpsc::Sender<UplinkCmd>,
}

impl Uplink {
    /// Hand a QoS 0 message to the broker (waits only for queue room).
    pub async fn send(&self, msg: Message) -> Result<(), BrokerError> {
        self.tx
            .send(UplinkCmd::Publish(msg, None))
            .await
            .map_err(|_| BrokerError::Stopped)
    }

    /// Hand a QoS 1/2 message to the broker; the receiver fires when the router has
    /// accepted it.
    pub async fn send_acked(&self, msg: Message) -> Result<oneshot::Receiver<()>, BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(UplinkCmd::Publish(msg, Some(tx)))
            .await
            .map_err(|_| BrokerError::Stopped)?;
        Ok(rx)
    }
}

/// QoS 1 publishes one uplink may have waiting for the router's acknowledgement.
const MAX_PENDING: usize = 60_000;

/// Packets handed to the router in one go.
const BATCH: usize = 256;

/// Hand `batch` to the router with one wake-up: all but the last go straight into the
/// link's buffer, the last through `send`, which tells the router to take them all.
/// Each wake-up is a context switch; under load, one per packet cost more than the
/// routing itself.
async fn send_batch(
    tx: &mut LinkTx,
    batch: &mut Vec<Packet>,
) -> Result<(), rumqttd::local::LinkError> {
    let Some(last) = batch.pop() else {
        return Ok(());
    };
    if !batch.is_empty() {
        tx.buffer().extend(batch.drain(..));
    }
    tx.send(last).await.map(|_| ())
}

async fn run_uplink(mut tx: LinkTx, mut rx: LinkRx, mut cmds: mpsc::Receiver<UplinkCmd>) {
    let mut pending: HashMap<u16, oneshot::Sender<()>> = HashMap::new();
    let mut next_pkid: u16 = 0;
    let mut batch: Vec<Packet> = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            // Taking commands first, router notifications next, and handing the batch
            // over when neither has more right now.
            biased;
            // Packet ids are 16 bits: with that many awaiting the router, wait for acks
            // before taking more (the senders feel it as back-pressure).
            cmd = cmds.recv(), if pending.len() < MAX_PENDING && batch.len() < BATCH => {
                let Some(UplinkCmd::Publish(msg, ack)) = cmd else {
                    // Closing: what was accepted still goes to the router.
                    let _ = send_batch(&mut tx, &mut batch).await;
                    break;
                };
                let (qos, pkid) = match &ack {
                    None => (QoS::AtMostOnce, 0),
                    Some(_) => {
                        // Packet ids in flight are few (acks come back within a router
                        // round); skip any still pending.
                        loop {
                            next_pkid = next_pkid.wrapping_add(1).max(1);
                            if !pending.contains_key(&next_pkid) {
                                break;
                            }
                        }
                        (QoS::AtLeastOnce, next_pkid)
                    }
                };
                let publish = build_publish(msg.topic.as_str().as_bytes(), &msg.payload, qos, msg.retain, pkid);
                batch.push(Packet::Publish(publish, link_properties(&msg)));
                if let Some(ack) = ack {
                    pending.insert(pkid, ack);
                }
            }
            n = rx.next() => match n {
                Ok(Some(n @ Notification::DeviceAck(_))) => {
                    if let Some(LinkAck::Pub(pkid)) = link_ack(n)
                        && let Some(waiter) = pending.remove(&pkid) {
                            let _ = waiter.send(());
                        }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() { break; }
                }
                Ok(_) => {}
                Err(_) => break,
            },
            _ = std::future::ready(()), if !batch.is_empty() => {
                if send_batch(&mut tx, &mut batch).await.is_err() {
                    break;
                }
            }
        }
    }
}

async fn run_downlink(
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut cmds: mpsc::Receiver<DownlinkCmd>,
    metrics: Arc<Metrics>,
    audit: Audit,
) {
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![filter("devices/+/commands/#", QoS::AtLeastOnce)],
    };
    if tx.send(Packet::Subscribe(subscribe, None)).await.is_err() {
        return;
    }
    let mut routes: HashMap<PrincipalId, Arc<Mailbox>> = HashMap::new();
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
                    let (link_qos, pkid) = forward_qos_pkid(&forward.publish);
                    let target = std::str::from_utf8(&forward.publish.topic)
                        .ok()
                        .and_then(|t| t.split('/').nth(1))
                        .and_then(|id| PrincipalId::parse(id).ok());
                    let delivery = to_delivery(forward.publish, forward.properties, link_qos);
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
                        audit.record(
                            AuditEntry::new("queue", "refuse")
                                .principal("device", id.to_string())
                                .reason(overflow.as_str()),
                        );
                    }
                    if link_qos != QoS::AtMostOnce {
                        let ack = PubAck { pkid, reason: PubAckReason::Success };
                        if tx.send(Packet::PubAck(ack, None)).await.is_err() { break; }
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

async fn run_service_link(
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut cmds: mpsc::Receiver<ServiceCmd>,
    events: mpsc::Sender<ServiceEvent>,
) {
    let mut sub_pkid: u16 = 0;
    // Packets for the router (the service's commands, acknowledgements of what was
    // forwarded to it), handed over in batches.
    let mut acks: Vec<Packet> = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            // Up to a batch of commands at a time, so deliveries are not starved by a
            // service that publishes without pause.
            cmd = cmds.recv(), if acks.len() < BATCH => {
                let packet = match cmd {
                    None => break,
                    Some(ServiceCmd::Publish(msg, pkid)) => {
                        let qos = if msg.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                        let publish = build_publish(msg.topic.as_str().as_bytes(), &msg.payload, qos, msg.retain, pkid);
                        Packet::Publish(publish, link_properties(&msg))
                    }
                    Some(ServiceCmd::Subscribe(filters)) => {
                        sub_pkid = sub_pkid.wrapping_add(1).max(1);
                        let filters = filters.iter().map(|(f, q)| filter(f, *q)).collect();
                        Packet::Subscribe(Subscribe { pkid: sub_pkid, filters }, None)
                    }
                    Some(ServiceCmd::Unsubscribe(filters)) => {
                        sub_pkid = sub_pkid.wrapping_add(1).max(1);
                        Packet::Unsubscribe(Unsubscribe { pkid: sub_pkid, filters }, None)
                    }
                };
                acks.push(packet);
            }
            // A notification is taken only when the session has room for it, so a
            // full session queue never stops this loop from taking the session's
            // commands (which would deadlock the two). Meanwhile the broker keeps the
            // backlog in its commit log.
            (permit, n) = async { (events.reserve().await, rx.next().await) }, if acks.len() < BATCH => {
                let Ok(permit) = permit else { break };
                match n {
                Ok(Some(Notification::Forward(forward))) => {
                    let (qos, pkid) = forward_qos_pkid(&forward.publish);
                    if let Some(delivery) = to_delivery(forward.publish, forward.properties, qos) {
                        permit.send(ServiceEvent::Delivery(delivery));
                    }
                    if qos != QoS::AtMostOnce {
                        acks.push(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None));
                    }
                }
                Ok(Some(n @ Notification::DeviceAck(_))) => {
                    match link_ack(n) {
                        Some(LinkAck::Pub(pkid)) => permit.send(ServiceEvent::PubAck(pkid)),
                        Some(LinkAck::Sub) => permit.send(ServiceEvent::SubAck),
                        None => {}
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() { break; }
                }
                Ok(_) => {}
                Err(_) => break,
                }
            }
            _ = std::future::ready(()), if !acks.is_empty() => {
                if send_batch(&mut tx, &mut acks).await.is_err() {
                    break;
                }
            }
        }
    }
    // What was gathered still goes to the router, then tell it this link is gone, so
    // its slot and subscriptions are freed.
    let _ = send_batch(&mut tx, &mut acks).await;
    let disconnect = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    let _ = tx.send(Packet::Disconnect(disconnect, None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_publish_carries_qos_and_packet_id() {
        let p = build_publish(b"a/b", b"xyz", QoS::AtLeastOnce, false, 513);
        assert_eq!(forward_qos_pkid(&p), (QoS::AtLeastOnce, 513));
        let p = build_publish(b"a/b", b"xyz", QoS::AtMostOnce, true, 0);
        assert_eq!(forward_qos_pkid(&p), (QoS::AtMostOnce, 0));
        assert!(p.retain);
    }
}
