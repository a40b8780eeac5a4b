//! The link to the broker cluster: sends what the outbox committed, in order, and
//! removes an entry only when the broker acknowledged it; receives commands.
//!
//! The MQTT 5 client is ours, with rumqttc's packet codec: the outbox is the only
//! queue (rumqttc's client keeps its own in memory, cleared or replayed without DUP
//! across reconnections, and writes each publish with its own system call). One task
//! per connection reads the broker's packets and encodes publishes while there is room
//! in flight; a writer task sends what piled up in one write. What was not
//! acknowledged is still in the outbox, and every new connection sends the outbox
//! again from its oldest entry, with DUP on what was sent before. The broker's Receive
//! Maximum bounds what is in flight, and so does `max_inflight`.
//!
//! A link that goes silent is noticed by keep-alive: a PINGREQ every `keep_alive`, and
//! the link is given up when the next one is due with nothing heard since, so the next
//! connection sends everything unacknowledged again.

use crate::entry::Entry;
use crate::outbox::{Ctl, Outbox, unix_ms};
use crate::store::{DeadNote, Stored};
use bytes::Bytes;
use bytes::{BufMut, BytesMut};
use portcullis_config::BrokerUrl;
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::mailbox::{Delivery, Mailbox};
use portcullis_core::message::{Message, Properties, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::PrincipalId;
use portcullis_core::retained::RetainedCommands;
use portcullis_core::topic::TopicName;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Filter, Login, Packet, PingReq, PubAck,
    PubAckReason, PubComp, PubRec, Publish, PublishProperties, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as MqttError, QoS as MqttQoS};
use rustls_pki_types::ServerName;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
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

    /// One connection, from CONNECT until it is lost.
    async fn connection(&self, target: &BrokerUrl, attempts: &mut HashMap<u64, u32>) -> Lost {
        let opened = tokio::time::timeout(self.settings.connect_timeout, self.open(target)).await;
        let (mut rd, wr, mut inbuf, connack) = match opened {
            Ok(Ok(c)) => c,
            Ok(Err(why)) => return Lost::Connect(why),
            Err(_) => {
                return Lost::Connect(format!(
                    "no CONNACK within {:?} (upstream.connect_timeout)",
                    self.settings.connect_timeout
                ));
            }
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
        // Writes go through their own task, in batches: the loop below never waits on
        // the socket, so it always reads the broker's acknowledgements.
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let written = Arc::new(Written::default());
        let mut writer = tokio::spawn(write_loop(wr, out_rx, written.clone()));
        let mut s = Sending {
            cursor: 0,
            buffer: VecDeque::new(),
            inflight: HashMap::new(),
            next_pkid: 0,
            // Packet ids 0 and the SUBSCRIBE's are never a publish's.
            window: usize::from(
                self.settings
                    .max_inflight
                    .min(receive_max.unwrap_or(u16::MAX))
                    .clamp(1, u16::MAX - 2),
            ),
            written,
            max_packet,
            out: BytesMut::new(),
            remove: Vec::new(),
            dead: Vec::new(),
            expired: 0,
            incoming_qos2: HashSet::new(),
        };
        let lost = self
            .serve(&mut rd, &mut inbuf, &out_tx, &mut writer, &mut s, attempts)
            .await;
        self.lose(&mut s, attempts);
        self.flush(&mut s);
        writer.abort();
        lost
    }

    /// TCP (and TLS), CONNECT and CONNACK.
    async fn open(
        &self,
        target: &BrokerUrl,
    ) -> Result<(ReadHalf<Stream>, WriteHalf<Stream>, BytesMut, ConnAck), String> {
        let st = &self.settings;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("TCP: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream: Stream = match (target.tls, &st.tls) {
            (true, Some(tls)) => {
                let name = ServerName::try_from(target.host.clone())
                    .map_err(|e| format!("TLS server name {}: {e}", target.host))?;
                let tls = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::new(tls)
            }
            (true, None) => return Err("mqtts:// without a TLS configuration".into()),
            (false, _) => Box::new(tcp),
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut props = ConnectProperties::new();
        // The broker keeps the command subscription (and queues commands) while the
        // link is down.
        props.session_expiry_interval = Some(st.session_expiry);
        props.max_packet_size = Some(st.max_incoming_packet);
        let connect = Packet::Connect(
            Connect {
                keep_alive: st.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
                client_id: st.client_id.clone(),
                clean_start: false,
                properties: Some(props),
            },
            None,
            st.credentials
                .as_ref()
                .map(|(user, password)| Login::new(user.clone(), password.clone())),
        );
        let mut out = BytesMut::new();
        connect
            .write(&mut out, None)
            .map_err(|e| format!("encoding CONNECT: {e}"))?;
        wr.write_all(&out)
            .await
            .map_err(|e| format!("sending CONNECT: {e}"))?;
        wr.flush()
            .await
            .map_err(|e| format!("sending CONNECT: {e}"))?;
        let mut inbuf = BytesMut::with_capacity(64 * 1024);
        let packet = loop {
            match Packet::read(&mut inbuf, Some(st.max_incoming_packet)) {
                Ok(p) => break p,
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("reading CONNACK: {e}")),
            }
            match rd.read_buf(&mut inbuf).await {
                Ok(0) => return Err("closed by the broker before CONNACK".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading CONNACK: {e}")),
            }
        };
        let connack = match packet {
            Packet::ConnAck(ack) => ack,
            other => return Err(format!("expected CONNACK, got {other:?}")),
        };
        if connack.code != ConnectReturnCode::Success {
            return Err(format!("refused by the broker: {:?}", connack.code));
        }
        let mut filter = Filter::new(command_filter(&st.prefix), MqttQoS::AtLeastOnce);
        // A retained command stays one (it is kept for devices that subscribe later).
        filter.preserve_retain = true;
        let mut filters = vec![filter];
        if self.commands.control.is_some() {
            let mut f = Filter::new(control_filter(&st.prefix), MqttQoS::AtLeastOnce);
            // Not its own back (MQTT 5 No Local).
            f.nolocal = true;
            filters.push(f);
        }
        // SUBSCRIBE_PKID is never a publish's (`allocate_pkid` skips it).
        let mut out = BytesMut::new();
        Packet::Subscribe(Subscribe {
            pkid: SUBSCRIBE_PKID,
            filters,
            properties: None,
        })
        .write(&mut out, None)
        .map_err(|e| format!("encoding SUBSCRIBE: {e}"))?;
        wr.write_all(&out)
            .await
            .map_err(|e| format!("subscribing to commands: {e}"))?;
        wr.flush()
            .await
            .map_err(|e| format!("subscribing to commands: {e}"))?;
        Ok((rd, wr, inbuf, connack))
    }

    async fn serve(
        &self,
        rd: &mut ReadHalf<Stream>,
        inbuf: &mut BytesMut,
        out_tx: &mpsc::UnboundedSender<BytesMut>,
        writer: &mut tokio::task::JoinHandle<Result<(), String>>,
        s: &mut Sending,
        attempts: &mut HashMap<u64, u32>,
    ) -> Lost {
        // Removals asked before this connection are committed before the outbox is
        // read again: an entry acknowledged on the last link is not sent twice.
        self.outbox.barrier().await;
        let mut committed = self.outbox.committed.clone();
        // Keep-alive: a PINGREQ every `keep_alive`; one still unanswered when the next
        // is due means the link is gone, however quiet it looks.
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + self.settings.keep_alive,
            self.settings.keep_alive,
        );
        // A loop held up past a tick must not find two due at once (and give up a
        // link that answered).
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_out = false;
        // Anything read counts as an answer (a broker busy sending is alive).
        let mut heard = false;
        loop {
            // Packets already read (the CONNACK's read may have taken more).
            loop {
                match Packet::read(inbuf, Some(self.settings.max_incoming_packet)) {
                    Ok(p) => {
                        if let Err(why) = self.on_packet(p, s, attempts) {
                            return Lost::Link(why);
                        }
                    }
                    Err(MqttError::InsufficientBytes(_)) => break,
                    Err(e) => return Lost::Link(format!("malformed packet from the broker: {e}")),
                }
            }
            let upto = *committed.borrow_and_update();
            if let Err(why) = self.fill(s, upto).await {
                return Lost::Link(why);
            }
            self.submit(s, attempts);
            if !s.out.is_empty() {
                s.written.bytes.fetch_add(s.out.len(), Ordering::Relaxed);
                if out_tx.send(s.out.split()).is_err() {
                    return Lost::Link("the link's writer stopped".into());
                }
            }
            self.flush(s);
            let waiting_for_more = s.buffer.is_empty() && s.cursor >= upto;
            // Entries that need no acknowledgement (QoS 0, expired, dead) leave room in
            // flight: read on at once rather than wait for the broker.
            let more = s.room() && s.buffer.is_empty() && s.cursor < upto;
            let writes_full = s.writes_full();
            if inbuf.capacity() - inbuf.len() < 16 * 1024 {
                inbuf.reserve(64 * 1024);
            }
            tokio::select! {
                biased;
                read = rd.read_buf(inbuf) => match read {
                    Ok(0) => return Lost::Link("closed by the broker".into()),
                    Ok(_) => heard = true,
                    Err(e) => return Lost::Link(format!("reading: {e}")),
                },
                changed = committed.changed(), if waiting_for_more => {
                    if changed.is_err() {
                        return Lost::Stopped;
                    }
                }
                _ = ping.tick() => {
                    if ping_out && !heard {
                        return Lost::Link("no answer to keep-alive (PINGREQ unanswered)".into());
                    }
                    heard = false;
                    ping_out = true;
                    let _ = Packet::PingReq(PingReq).write(&mut s.out, None);
                }
                done = &mut *writer => {
                    return Lost::Link(match done {
                        Ok(Err(why)) => why,
                        _ => "the link's writer stopped".into(),
                    });
                }
                _ = s.written.progress.notified(), if writes_full => {}
                _ = std::future::ready(()), if more => {}
            }
        }
    }

    /// Read what comes next from the outbox into the buffer, while there is room in
    /// flight: from the in-memory tail while the link keeps up, else from the file.
    async fn fill(&self, s: &mut Sending, upto: u64) -> Result<(), String> {
        if !s.buffer.is_empty() || s.cursor >= upto || !s.room() {
            return Ok(());
        }
        if let Some(rows) = self.outbox.tail.take_from(s.cursor, READ_BATCH)
            && !rows.is_empty()
        {
            s.cursor = rows.last().map_or(s.cursor, |r| r.0 + 1);
            s.buffer.extend(rows);
            return Ok(());
        }
        let store = self.outbox.store.clone();
        let from = s.cursor;
        match tokio::task::spawn_blocking(move || store.read(from, READ_BATCH)).await {
            Ok(Ok(rows)) => {
                s.cursor = rows.last().map_or(upto, |r| r.0 + 1).max(s.cursor);
                if rows.is_empty() {
                    s.cursor = upto;
                }
                s.buffer.extend(rows);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("reading the outbox: {e}")),
            Err(e) => Err(format!("reading the outbox: {e}")),
        }
    }

    /// Encode entries for the writer while there is room in flight.
    fn submit(&self, s: &mut Sending, attempts: &mut HashMap<u64, u32>) {
        let now_ms = unix_ms();
        while s.room() {
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
            let qos1 = entry.message.qos != QoS::AtMostOnce;
            let pkid = if qos1 { s.allocate_pkid() } else { 0 };
            // A QoS 1 message sent before, on this link or another, carries DUP.
            let dup = qos1 && tries > 0;
            let at = s.out.len();
            if let Err(size) =
                self.encode_publish(&entry, now_ms, pkid, dup, s.max_packet, &mut s.out)
            {
                s.out.truncate(at);
                let max = s.max_packet.unwrap_or(u32::MAX);
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
            let m = &self.metrics.outbox;
            Metrics::inc(if tries > 0 { &m.resent } else { &m.sent });
            if qos1 {
                s.inflight.insert(pkid, seq);
            } else {
                // Handed to the socket: a QoS 0 message is done with.
                s.remove.push(seq);
                attempts.remove(&seq);
            }
        }
    }

    /// Append the PUBLISH of an entry; `Err(size)` if it is over the broker's Maximum
    /// Packet Size. The common case (no properties) is written directly; a message
    /// with properties goes through the MQTT codec.
    fn encode_publish(
        &self,
        entry: &Entry,
        now_ms: u64,
        pkid: u16,
        dup: bool,
        max_packet: Option<u32>,
        out: &mut BytesMut,
    ) -> Result<(), usize> {
        let m = &entry.message;
        let prefix = self.settings.prefix.as_bytes();
        let topic = m.topic.as_str().as_bytes();
        let qos = if pkid == 0 { 0u8 } else { 1u8 };
        if m.properties.is_some() {
            let (topic, q, retain, payload, props) = self.publish_parts(entry, now_ms);
            let mut p = Publish::new(topic, q, payload, props);
            p.retain = retain;
            p.pkid = pkid;
            p.dup = dup;
            let packet = Packet::Publish(p);
            let size = packet.size();
            return packet.write(out, max_packet).map(|_| ()).map_err(|_| size);
        }
        let topic_len = prefix.len() + topic.len();
        let remaining = 2 + topic_len + if qos == 1 { 2 } else { 0 } + 1 + m.payload.len();
        let size = 1 + varint_len(remaining) + remaining;
        if topic_len > usize::from(u16::MAX) || max_packet.is_some_and(|max| size > max as usize) {
            return Err(size);
        }
        out.reserve(size);
        out.put_u8(0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(m.retain));
        let mut n = remaining;
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            if n == 0 {
                out.put_u8(byte);
                break;
            }
            out.put_u8(byte | 0x80);
        }
        out.put_u16(topic_len as u16);
        out.put_slice(prefix);
        out.put_slice(topic);
        if qos == 1 {
            out.put_u16(pkid);
        }
        // No properties.
        out.put_u8(0);
        out.put_slice(&m.payload);
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

    /// A packet from the broker.
    fn on_packet(
        &self,
        packet: Packet,
        s: &mut Sending,
        attempts: &mut HashMap<u64, u32>,
    ) -> Result<(), String> {
        let m = &self.metrics.outbox;
        match packet {
            Packet::PubAck(ack) => {
                let Some(seq) = s.inflight.remove(&ack.pkid) else {
                    return Ok(());
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
            Packet::Publish(p) => {
                let (pkid, qos) = (p.pkid, p.qos);
                match qos {
                    MqttQoS::AtMostOnce => self.command(p),
                    MqttQoS::AtLeastOnce => {
                        self.command(p);
                        let _ = Packet::PubAck(PubAck::new(pkid, None)).write(&mut s.out, None);
                    }
                    MqttQoS::ExactlyOnce => {
                        // Delivered once: a retransmission before PUBREL is not.
                        if s.incoming_qos2.insert(pkid) {
                            self.command(p);
                        }
                        let _ = Packet::PubRec(PubRec::new(pkid, None)).write(&mut s.out, None);
                    }
                }
            }
            Packet::PubRel(rel) => {
                s.incoming_qos2.remove(&rel.pkid);
                let _ = Packet::PubComp(PubComp::new(rel.pkid, None)).write(&mut s.out, None);
            }
            Packet::SubAck(ack) => {
                let refused: Vec<String> = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .map(|c| format!("{c:?}"))
                    .collect();
                if !refused.is_empty() {
                    tracing::error!(codes = ?refused, "the broker refused the command subscription");
                    self.audit
                        .record(AuditEntry::new("upstream", "refuse").reason(format!(
                            "the broker refused the command subscription: {}",
                            refused.join(", ")
                        )));
                }
            }
            Packet::PingResp(_) => {}
            Packet::Disconnect(d) => {
                return Err(format!("disconnected by the broker: {:?}", d.reason_code));
            }
            other => return Err(format!("unexpected packet from the broker: {other:?}")),
        }
        Ok(())
    }

    /// The link is gone: what was written and not acknowledged counts one attempt.
    fn lose(&self, s: &mut Sending, attempts: &mut HashMap<u64, u32>) {
        for seq in s.inflight.values() {
            *attempts.entry(*seq).or_default() += 1;
        }
        s.inflight.clear();
        s.buffer.clear();
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

/// A connection to the broker, plain or TLS.
type Stream = Box<dyn AsyncStream>;

trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// The SUBSCRIBE's packet id, kept out of the publishes' range by `allocate_pkid`.
const SUBSCRIBE_PKID: u16 = u16::MAX;

/// Bytes of an MQTT variable byte integer.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Bytes handed to the writer task and not yet written, at most (QoS 0 messages take
/// no room in flight: this bounds what they hold in memory).
const MAX_UNWRITTEN: usize = 1 << 20;

/// What the writer task has still to write, and a wake-up when it wrote some.
#[derive(Debug, Default)]
struct Written {
    bytes: std::sync::atomic::AtomicUsize,
    progress: tokio::sync::Notify,
}

/// Write what the loop encodes, coalescing what piled up meanwhile into one write.
async fn write_loop(
    mut wr: WriteHalf<Stream>,
    mut rx: mpsc::UnboundedReceiver<BytesMut>,
    written: Arc<Written>,
) -> Result<(), String> {
    while let Some(mut buf) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            buf.unsplit(more);
        }
        wr.write_all(&buf)
            .await
            .map_err(|e| format!("writing: {e}"))?;
        wr.flush().await.map_err(|e| format!("writing: {e}"))?;
        written.bytes.fetch_sub(buf.len(), Ordering::Relaxed);
        written.progress.notify_one();
    }
    Ok(())
}

/// One connection's sending state.
struct Sending {
    /// The next sequence number to read from the outbox.
    cursor: u64,
    /// Read, not yet sent.
    buffer: VecDeque<(u64, Stored, u64)>,
    /// Sent, waiting for PUBACK: packet id → sequence number.
    inflight: HashMap<u16, u64>,
    next_pkid: u16,
    /// At most this many in flight: `max_inflight` and the broker's Receive Maximum.
    window: usize,
    max_packet: Option<u32>,
    /// Encoded, for the writer.
    out: BytesMut,
    remove: Vec<u64>,
    dead: Vec<(u64, DeadNote)>,
    expired: u64,
    /// QoS 2 commands received and not yet released (PUBREL).
    incoming_qos2: HashSet<u16>,
    written: Arc<Written>,
}

impl Sending {
    fn room(&self) -> bool {
        self.inflight.len() < self.window && !self.writes_full()
    }

    fn writes_full(&self) -> bool {
        self.written.bytes.load(Ordering::Relaxed) >= MAX_UNWRITTEN
    }

    /// A packet id not in flight (the window is kept below the 65 534 there are).
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            let id = self.next_pkid;
            if id != 0 && id != SUBSCRIBE_PKID && !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Settings;
    use crate::store::{Sealer, Store};
    use portcullis_core::forward::UplinkItem;
    use tokio::net::TcpListener;

    /// A broker that accepts, answers CONNECT, and counts the PUBLISH packets it gets
    /// (it never acknowledges one and never answers a PINGREQ).
    async fn counting_broker() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let mut connack = BytesMut::new();
            Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
                properties: None,
            })
            .write(&mut connack, None)
            .unwrap();
            loop {
                match Packet::read(&mut buf, None) {
                    Ok(Packet::Connect(..)) => sock.write_all(&connack).await.unwrap(),
                    Ok(Packet::Publish(_)) => {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(MqttError::InsufficientBytes(_)) => {
                        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
        (port, count)
    }

    #[tokio::test]
    async fn a_backlog_of_messages_that_take_no_room_in_flight_is_sent_without_waiting_for_the_broker()
     {
        let (port, sent) = counting_broker().await;
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) =
            Store::open(&dir.path().join("outbox.redb"), Sealer::derive(&[1; 32])).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (audit, _audit_rx) = Audit::detached(1024, metrics.clone());
        let outbox = Outbox::start(
            store,
            loaded,
            Settings {
                max_bytes: 1 << 30,
                when_full: portcullis_config::WhenFull::BackPressure,
                full_wait: Duration::from_secs(5),
                message_ttl: Duration::from_secs(3600),
                queue: 8192,
            },
            metrics.clone(),
            audit.clone(),
        );
        // More QoS 0 messages than one read of the outbox takes, before the link starts.
        let n = 3 * READ_BATCH;
        for i in 0..n {
            outbox
                .appends
                .send(UplinkItem {
                    message: Message {
                        topic: TopicName::parse_unlimited("devices/d/telemetry").unwrap(),
                        payload: Bytes::from(i.to_string()),
                        qos: QoS::AtMostOnce,
                        retain: false,
                        properties: None,
                    },
                    ack: None,
                    origin: None,
                })
                .await
                .unwrap();
        }
        let mut committed = outbox.committed.clone();
        while *committed.borrow_and_update() < n as u64 {
            committed.changed().await.unwrap();
        }
        let link = Link {
            settings: LinkSettings {
                urls: vec![BrokerUrl::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap()],
                client_id: "gw".into(),
                tls: None,
                credentials: None,
                // Long: a stalled link would move on only at the next keep-alive.
                keep_alive: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(5),
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(1),
                prefix: String::new(),
                max_inflight: 100,
                session_expiry: 60,
                max_attempts: 5,
                max_incoming_packet: 1 << 20,
            },
            outbox,
            commands: Arc::new(Commands {
                routes: Mutex::new(HashMap::new()),
                retained: Arc::new(RetainedCommands::new(4)),
                control: None,
            }),
            metrics,
            audit,
        };
        tokio::spawn(link.run());
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sent.load(Ordering::Relaxed), n, "every QoS 0 message sent");
    }
}
