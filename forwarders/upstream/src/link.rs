//! The link to the broker cluster: sends what the outbox committed, in order, and
//! removes an entry only when the broker acknowledged it; receives commands.
//!
//! rumqttc is the MQTT 5 client, used for one connection at a time: each connection
//! gets a fresh client and event loop, so nothing of rumqttc's own in-memory queue
//! (cleared or replayed without DUP across reconnections) carries over. What was not
//! acknowledged is still in the outbox, and every new connection sends the outbox
//! again from its oldest entry. The broker's Receive Maximum bounds what is in flight
//! (rumqttc holds requests back past it), and so does `max_inflight`.
//!
//! A link that goes silent is noticed by keep-alive: rumqttc sends PINGREQ every
//! `keep_alive` and gives up when the previous one is still unanswered, and the next
//! connection sends everything unacknowledged again.

use crate::entry::Entry;
use crate::outbox::{Ctl, Outbox, unix_ms};
use crate::store::{DeadNote, Stored};
use bytes::Bytes;
use portcullis_config::BrokerUrl;
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::mailbox::{Delivery, Mailbox};
use portcullis_core::message::{Message, Properties, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::PrincipalId;
use portcullis_core::retained::RetainedCommands;
use portcullis_core::topic::TopicName;
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Entries read from the outbox at a time.
const READ_BATCH: usize = 1024;

/// How the link connects, from `[upstream]`.
#[derive(Clone)]
pub struct LinkSettings {
    pub urls: Vec<BrokerUrl>,
    pub client_id: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Empty, or ending in `/`.
    pub prefix: String,
    pub max_inflight: u16,
    pub session_expiry: u32,
    pub max_attempts: u32,
    /// Largest packet taken from the broker.
    pub max_incoming_packet: u32,
}

impl std::fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("LinkSettings")
            .field("urls", &self.urls)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Where commands from the cluster go: the mailbox of each device with a session
/// here, and the retained commands.
#[derive(Debug)]
pub struct Commands {
    pub routes: Mutex<HashMap<PrincipalId, Arc<Mailbox>>>,
    pub retained: Arc<RetainedCommands>,
    /// Replicas: control payloads go here (unchecked) when the key is configured.
    pub control: Option<mpsc::Sender<Bytes>>,
}

/// The control topics, under the prefix.
pub fn control_filter(prefix: &str) -> String {
    format!("{prefix}portcullis/control/#")
}

/// The command topics a replica subscribes to, under the prefix.
pub fn command_filter(prefix: &str) -> String {
    format!("{prefix}devices/+/commands/#")
}

pub struct Link {
    pub settings: LinkSettings,
    pub outbox: Outbox,
    pub commands: Arc<Commands>,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
}

/// Why a connection ended.
enum Lost {
    Connect(String),
    Link(String),
    /// The gateway is stopping.
    Stopped,
}

impl Link {
    /// Connect, send, reconnect: until the outbox's writer is gone.
    pub async fn run(self) {
        let mut backoff = self.settings.reconnect_min;
        // Sends without an acknowledgement, per entry (kept across connections).
        let mut attempts: HashMap<u64, u32> = HashMap::new();
        let mut url = 0;
        // The cluster is known to be away (audited once, not at every retry).
        let mut down = false;
        loop {
            let target = self.settings.urls[url % self.settings.urls.len()].clone();
            let lost = self.connection(&target, &mut attempts).await;
            let m = &self.metrics.outbox;
            m.connected.store(0, Ordering::Relaxed);
            match lost {
                Lost::Stopped => return,
                Lost::Connect(why) => {
                    if !down {
                        down = true;
                        tracing::warn!(broker = %target, %why, "upstream broker unreachable; messages wait in the outbox");
                        self.audit.record(
                            AuditEntry::new("upstream", "refuse")
                                .reason(format!("cannot connect to {target}: {why}")),
                        );
                    }
                    // The next broker of the cluster, after a growing pause.
                    url += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.settings.reconnect_max);
                }
                Lost::Link(why) => {
                    down = true;
                    Metrics::inc(&m.disconnects);
                    tracing::warn!(broker = %target, %why, "upstream link lost; unacknowledged messages will be sent again");
                    self.audit.record(
                        AuditEntry::new("upstream", "refuse")
                            .reason(format!("link to {target} lost: {why}")),
                    );
                    backoff = self.settings.reconnect_min;
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    fn options(&self, target: &BrokerUrl) -> MqttOptions {
        let s = &self.settings;
        let mut o = MqttOptions::new(s.client_id.clone(), target.host.clone(), target.port);
        o.set_keep_alive(s.keep_alive)
            // The broker keeps the command subscription (and queues commands) while
            // the link is down.
            .set_clean_start(false)
            .set_session_expiry_interval(Some(s.session_expiry))
            .set_connection_timeout(s.connect_timeout.as_secs().max(1))
            .set_outgoing_inflight_upper_limit(s.max_inflight)
            .set_max_packet_size(Some(s.max_incoming_packet))
            // Room for everything in flight: `try_publish` never finds it full.
            .set_request_channel_capacity(usize::from(s.max_inflight) + 64);
        if let Some((user, password)) = &s.credentials {
            o.set_credentials(user.clone(), password.clone());
        }
        if target.tls
            && let Some(tls) = &s.tls
        {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        o
    }

    /// One connection, from CONNECT until it is lost.
    async fn connection(&self, target: &BrokerUrl, attempts: &mut HashMap<u64, u32>) -> Lost {
        let options = self.options(target);
        let cap = usize::from(self.settings.max_inflight) + 64;
        let (client, mut eventloop) = AsyncClient::new(options, cap);
        // The first poll connects: CONNECT, CONNACK.
        let connack = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => ack,
            Ok(other) => return Lost::Connect(format!("expected CONNACK, got {other:?}")),
            Err(e) => return Lost::Connect(describe(&e)),
        };
        let (receive_max, max_packet) = connack
            .properties
            .as_ref()
            .map_or((None, None), |p| (p.receive_max, p.max_packet_size));
        let m = &self.metrics.outbox;
        Metrics::inc(&m.connects);
        m.connected.store(1, Ordering::Relaxed);
        tracing::info!(
            broker = %target,
            session_present = connack.session_present,
            receive_maximum = receive_max.unwrap_or(u16::MAX),
            "upstream broker connected"
        );
        self.audit
            .record(AuditEntry::new("upstream", "allow").reason(format!(
                "connected to {target} (receive maximum {})",
                receive_max.unwrap_or(u16::MAX)
            )));
        // The event loop runs on its own task: rumqttc's `poll` must not be dropped
        // half-way, and the sending side must not wait on it.
        let (ev_tx, mut events) = mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                let r = eventloop.poll().await;
                let end = r.is_err();
                if ev_tx.send(r).is_err() || end {
                    break;
                }
            }
            drop(eventloop);
        });
        let lost = self.serve(&client, &mut events, max_packet, attempts).await;
        poller.abort();
        lost
    }

    async fn serve(
        &self,
        client: &AsyncClient,
        events: &mut mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        max_packet: Option<u32>,
        attempts: &mut HashMap<u64, u32>,
    ) -> Lost {
        let filter = {
            let mut f = Filter::new(command_filter(&self.settings.prefix), MqttQoS::AtLeastOnce);
            // A retained command stays one (it is kept for devices that subscribe later).
            f.preserve_retain = true;
            f
        };
        let mut filters = vec![filter];
        if self.commands.control.is_some() {
            let mut f = Filter::new(control_filter(&self.settings.prefix), MqttQoS::AtLeastOnce);
            // Not its own back (MQTT 5 No Local).
            f.nolocal = true;
            filters.push(f);
        }
        if let Err(e) = client.try_subscribe_many(filters) {
            return Lost::Link(format!("subscribing to commands: {e}"));
        }
        // Removals asked before this connection are committed before the outbox is
        // read again: an entry acknowledged on the last link is not sent twice.
        self.outbox.barrier().await;
        let mut committed = self.outbox.committed.clone();
        let mut s = Sending {
            cursor: 0,
            buffer: VecDeque::new(),
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            max_packet,
            remove: Vec::new(),
            dead: Vec::new(),
            expired: 0,
        };
        loop {
            let upto = *committed.borrow_and_update();
            if s.buffer.is_empty() && s.cursor < upto && s.room(&self.settings) {
                // What was just committed, from memory, while the link keeps up.
                if let Some(rows) = self.outbox.tail.take_from(s.cursor, READ_BATCH)
                    && !rows.is_empty()
                {
                    s.cursor = rows.last().map_or(s.cursor, |r| r.0 + 1);
                    s.buffer.extend(rows);
                }
            }
            if s.buffer.is_empty() && s.cursor < upto && s.room(&self.settings) {
                let store = self.outbox.store.clone();
                let from = s.cursor;
                match tokio::task::spawn_blocking(move || store.read(from, READ_BATCH)).await {
                    Ok(Ok(rows)) => {
                        s.cursor = rows.last().map_or(upto, |r| r.0 + 1).max(s.cursor);
                        if rows.is_empty() {
                            s.cursor = upto;
                        }
                        s.buffer.extend(rows);
                    }
                    Ok(Err(e)) => return Lost::Link(format!("reading the outbox: {e}")),
                    Err(e) => return Lost::Link(format!("reading the outbox: {e}")),
                }
            }
            if let Err(why) = self.submit(client, &mut s, attempts) {
                return Lost::Link(why);
            }
            self.flush(&mut s);
            let waiting_for_more = s.buffer.is_empty() && s.cursor >= upto;
            tokio::select! {
                ev = events.recv() => match ev {
                    None => return Lost::Link("event loop ended".into()),
                    Some(Err(e)) => {
                        self.lose(&mut s, attempts);
                        return Lost::Link(describe(&e));
                    }
                    Some(Ok(ev)) => {
                        self.on_event(ev, &mut s, attempts);
                        // Take what else is ready before sending more.
                        while let Ok(ev) = events.try_recv() {
                            match ev {
                                Ok(ev) => self.on_event(ev, &mut s, attempts),
                                Err(e) => {
                                    self.lose(&mut s, attempts);
                                    self.flush(&mut s);
                                    return Lost::Link(describe(&e));
                                }
                            }
                        }
                    }
                },
                changed = committed.changed(), if waiting_for_more => {
                    if changed.is_err() {
                        self.flush(&mut s);
                        return Lost::Stopped;
                    }
                }
            }
        }
    }

    /// Hand entries to rumqttc while there is room in flight.
    fn submit(
        &self,
        client: &AsyncClient,
        s: &mut Sending,
        attempts: &mut HashMap<u64, u32>,
    ) -> Result<(), String> {
        let now_ms = unix_ms();
        while s.room(&self.settings) {
            let Some((seq, stored, _size)) = s.buffer.pop_front() else {
                break;
            };
            let entry = match stored {
                Stored::Entry(e) => e,
                Stored::Corrupt { reason, .. } => {
                    s.dead
                        .push((seq, note(format!("unreadable entry: {reason}"), 0)));
                    continue;
                }
            };
            if entry.expires_ms <= now_ms {
                s.remove.push(seq);
                s.expired += 1;
                attempts.remove(&seq);
                continue;
            }
            let tries = attempts.get(&seq).copied().unwrap_or(0);
            if tries >= self.settings.max_attempts {
                attempts.remove(&seq);
                s.dead.push((
                    seq,
                    note(
                        format!("not acknowledged by the broker after {tries} sends"),
                        tries,
                    ),
                ));
                continue;
            }
            let (topic, qos, retain, payload, props) = self.publish_parts(&entry, now_ms);
            if let Some(max) = s.max_packet {
                let size = Publish::new(topic.as_str(), qos, payload.clone(), props.clone()).size();
                if size > max as usize {
                    s.dead.push((
                        seq,
                        note(
                            format!(
                                "{size} bytes, larger than the broker's Maximum Packet Size ({max})"
                            ),
                            tries,
                        ),
                    ));
                    continue;
                }
            }
            let sent = match props {
                Some(p) => client.try_publish_with_properties(topic, qos, retain, payload, p),
                None => client.try_publish(topic, qos, retain, payload),
            };
            if let Err(e) = sent {
                return Err(format!("handing a message to the MQTT client: {e}"));
            }
            let m = &self.metrics.outbox;
            Metrics::inc(if tries > 0 { &m.resent } else { &m.sent });
            s.fifo.push_back((seq, qos));
        }
        Ok(())
    }

    fn publish_parts(
        &self,
        entry: &Entry,
        now_ms: u64,
    ) -> (String, MqttQoS, bool, Bytes, Option<PublishProperties>) {
        let m = &entry.message;
        let topic = format!("{}{}", self.settings.prefix, m.topic.as_str());
        let qos = match m.qos {
            QoS::AtMostOnce => MqttQoS::AtMostOnce,
            _ => MqttQoS::AtLeastOnce,
        };
        let props = m.properties.as_deref().map(|p| {
            // The expiry counts from when the device sent it: the wait is taken off.
            let waited = (now_ms.saturating_sub(entry.enqueued_ms) / 1000) as u32;
            PublishProperties {
                payload_format_indicator: p.payload_format_utf8.map(u8::from),
                message_expiry_interval: p
                    .message_expiry_secs
                    .map(|s| s.saturating_sub(waited).max(1)),
                topic_alias: None,
                response_topic: p
                    .response_topic
                    .as_ref()
                    .map(|t| format!("{}{}", self.settings.prefix, t.as_str())),
                correlation_data: p.correlation_data.clone(),
                user_properties: p.user_properties.clone(),
                subscription_identifiers: Vec::new(),
                content_type: p.content_type.clone(),
            }
        });
        (topic, qos, m.retain, m.payload.clone(), props)
    }

    fn on_event(&self, ev: Event, s: &mut Sending, attempts: &mut HashMap<u64, u32>) {
        let m = &self.metrics.outbox;
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some((seq, qos)) = s.fifo.pop_front() else {
                    return;
                };
                if qos == MqttQoS::AtMostOnce {
                    // Written: a QoS 0 message is done with.
                    s.remove.push(seq);
                    attempts.remove(&seq);
                } else {
                    s.inflight.insert(pkid, seq);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(seq) = s.inflight.remove(&ack.pkid) else {
                    return;
                };
                let tries = attempts.remove(&seq).unwrap_or(0);
                match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                        Metrics::inc(&m.acknowledged);
                        s.remove.push(seq);
                    }
                    refused => s.dead.push((
                        seq,
                        note(format!("refused by the broker: {refused:?}"), tries + 1),
                    )),
                }
            }
            Event::Incoming(Packet::Publish(p)) => self.command(p),
            _ => {}
        }
    }

    /// The link is gone: what was written and not acknowledged counts one attempt.
    fn lose(&self, s: &mut Sending, attempts: &mut HashMap<u64, u32>) {
        for seq in s.inflight.values() {
            *attempts.entry(*seq).or_default() += 1;
        }
        s.inflight.clear();
        s.fifo.clear();
    }

    /// Tell the writer what is done with, and count what expired.
    fn flush(&self, s: &mut Sending) {
        if !s.remove.is_empty() {
            let _ = self
                .outbox
                .ctl
                .send(Ctl::Remove(std::mem::take(&mut s.remove)));
        }
        if !s.dead.is_empty() {
            for (seq, n) in &s.dead {
                tracing::warn!(seq, reason = %n.reason, "outbox entry moved to the dead letters");
                self.audit.record(
                    AuditEntry::new("outbox", "refuse")
                        .reason(format!("message {seq} to the dead letters: {}", n.reason)),
                );
            }
            let _ = self.outbox.ctl.send(Ctl::Dead(std::mem::take(&mut s.dead)));
        }
        if s.expired > 0 {
            let n = std::mem::take(&mut s.expired);
            self.metrics.outbox.expired.fetch_add(n, Ordering::Relaxed);
            self.audit
                .record(AuditEntry::new("outbox", "refuse").reason(format!(
                    "{n} message(s) expired in the outbox before the broker took them"
                )));
        }
    }

    /// A command from the cluster: to the device's mailbox, if it has a session here.
    fn command(&self, p: Publish) {
        let m = &self.metrics;
        let Ok(topic) = std::str::from_utf8(&p.topic) else {
            return;
        };
        let Some(topic) = topic.strip_prefix(self.settings.prefix.as_str()) else {
            return;
        };
        if topic.starts_with("portcullis/control/") {
            if let Some(control) = &self.commands.control
                && control.try_send(p.payload).is_err()
            {
                Metrics::inc(&m.outbox.control_refused);
            }
            return;
        }
        Metrics::inc(&m.outbox.commands);
        let Ok(topic) = TopicName::parse_unlimited(topic) else {
            return;
        };
        let Some(device) = topic
            .as_str()
            .split('/')
            .nth(1)
            .and_then(|id| PrincipalId::parse(id).ok())
        else {
            return;
        };
        let message = Message {
            topic,
            payload: p.payload,
            qos: match p.qos {
                MqttQoS::AtMostOnce => QoS::AtMostOnce,
                _ => QoS::AtLeastOnce,
            },
            retain: p.retain,
            properties: p
                .properties
                .map(|p| Arc::new(properties(p, &self.settings.prefix))),
        };
        if message.retain {
            // Kept for the device's next subscription (a refusal is the store's
            // bounds, which its counters report).
            let _ = self.commands.retained.set(&device, message.clone());
        }
        let mailbox = self
            .commands
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&device)
            .cloned();
        let Some(mailbox) = mailbox else {
            Metrics::inc(&m.commands_undeliverable);
            return;
        };
        if message.payload.is_empty() && message.retain {
            return;
        }
        let delivery = Delivery::from(Message {
            retain: false,
            ..message
        });
        if let Err(overflow) = mailbox.push(delivery, Instant::now()) {
            Metrics::inc(&m.queue_overflow);
            if mailbox.first_refusal() {
                self.audit.record(
                    AuditEntry::new("queue", "refuse")
                        .principal("device", device.to_string())
                        .reason(overflow.as_str()),
                );
            }
        }
    }
}

fn note(reason: String, attempts: u32) -> DeadNote {
    DeadNote {
        reason,
        attempts,
        dead_ms: unix_ms(),
    }
}

fn properties(p: PublishProperties, prefix: &str) -> Properties {
    Properties {
        payload_format_utf8: p.payload_format_indicator.map(|v| v == 1),
        message_expiry_secs: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p
            .response_topic
            .as_deref()
            .map(|t| t.strip_prefix(prefix).unwrap_or(t))
            .and_then(|t| TopicName::parse_unlimited(t).ok()),
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::MqttState(rumqttc::v5::StateError::AwaitPingResp) => {
            "no answer to keep-alive (PINGREQ unanswered)".into()
        }
        other => other.to_string(),
    }
}

/// One connection's sending state.
struct Sending {
    /// The next sequence number to read from the outbox.
    cursor: u64,
    /// Read, not yet handed to rumqttc.
    buffer: VecDeque<(u64, Stored, u64)>,
    /// Handed to rumqttc, in order, waiting for it to write them (and name the packet
    /// id).
    fifo: VecDeque<(u64, MqttQoS)>,
    /// Written, waiting for PUBACK: packet id → sequence number.
    inflight: HashMap<u16, u64>,
    max_packet: Option<u32>,
    remove: Vec<u64>,
    dead: Vec<(u64, DeadNote)>,
    expired: u64,
}

impl Sending {
    fn room(&self, settings: &LinkSettings) -> bool {
        self.fifo.len() + self.inflight.len() < usize::from(settings.max_inflight)
    }
}
