//! One MQTT connection, from CONNECT to close.
//!
//! Reads frames with a deadline, runs each through `strict` and the codec, asks the
//! core for a verdict and acts on it; delivers what the broker sends the peer; ends
//! the session when the peer goes silent, the gateway kicks it, or it misbehaves.
//! Every refusal is answered the protocol's way, audited and counted.

use crate::codec::{self, ConnectInfo, Incoming, Outgoing, PublishIn, reason};
use crate::strict::{self, ProtocolVersion, StrictError};
use bytes::BytesMut;
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::auth::{AuthRefusal, Authenticator, Credentials};
use portcullis_core::broker::{Delivery, EmbeddedBroker, ServiceCmd, ServiceEvent, Uplink};
use portcullis_core::metrics::Metrics;
use portcullis_core::pipeline::{self, Direction, Message, QoS, SessionPolicy, Verdict};
use portcullis_core::principal::PrincipalKind;
use portcullis_core::sessions::{KickReason, Sessions};
use portcullis_core::topic::{TopicFilter, TopicLimits, TopicName};
use rustls::pki_types::CertificateDer;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

/// Limits a session enforces.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_packet_size: usize,
    pub topic: TopicLimits,
    pub connect_timeout: Duration,
    pub max_subscribe_filters: usize,
    pub session_queue: usize,
    pub write_timeout: Duration,
}

/// What every session of one listener shares.
pub struct Context {
    pub kind: PrincipalKind,
    pub auth: Arc<Authenticator>,
    pub broker: Arc<EmbeddedBroker>,
    pub sessions: Arc<Sessions>,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub limits: SessionLimits,
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Strict(#[from] StrictError),
}

/// Buffers bytes from the peer and cuts them into complete frames.
struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    /// Cancel-safe: bytes read so far stay in the buffer.
    async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(len) = strict::frame_len(&self.buf, self.max)? {
                return Ok(self.buf.split_to(len));
            }
            self.buf.reserve(4096);
            if r.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }
}

fn protocol_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::V311 => "mqtt3.1.1",
        ProtocolVersion::V5 => "mqtt5",
    }
}

/// Run one connection to its end. `certs` is the verified TLS client chain, if any.
pub async fn run<S>(
    ctx: Arc<Context>,
    stream: S,
    peer: SocketAddr,
    certs: Option<Vec<CertificateDer<'static>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader {
        buf: BytesMut::with_capacity(1024),
        max: ctx.limits.max_packet_size,
    };
    let mut shutdown = ctx.shutdown.clone();
    let first = tokio::select! {
        r = tokio::time::timeout(ctx.limits.connect_timeout, reader.next(&mut rd)) => r,
        _ = stopped(&mut shutdown) => return,
    };
    let frame = match first {
        Err(_) => {
            refuse_connect(
                &ctx,
                peer,
                None,
                "connect_timeout",
                "no CONNECT within the deadline",
            );
            return;
        }
        Ok(Err(ReadError::Strict(e))) => {
            refuse_connect(&ctx, peer, None, "malformed_connect", &e.to_string());
            return;
        }
        Ok(Err(_)) => return,
        Ok(Ok(frame)) => frame,
    };
    let version = match strict::check_connect(&frame) {
        Ok(v) => v,
        Err(e) => {
            // An unsupported level gets the 3.1.1 answer that every client understands.
            if matches!(
                e,
                StrictError::UnsupportedProtocolLevel(_) | StrictError::BadProtocolName
            ) {
                let mut out = BytesMut::new();
                codec::encode(
                    &Outgoing::ConnAck {
                        code: reason::UNSUPPORTED_VERSION,
                        max_packet_size: 0,
                    },
                    ProtocolVersion::V311,
                    &mut out,
                );
                let _ = wr.write_all(&out).await;
            }
            refuse_connect(&ctx, peer, None, "malformed_connect", &e.to_string());
            return;
        }
    };
    let connect = match codec::decode(frame, version, ctx.limits.max_packet_size) {
        Ok(Incoming::Connect(c)) => c,
        Ok(_) => return,
        Err(e) => {
            refuse_connect(&ctx, peer, None, "malformed_connect", &e.to_string());
            return;
        }
    };
    // Enhanced authentication (MQTT 5 AUTH) is not offered.
    if connect.auth_method {
        let mut out = BytesMut::new();
        codec::encode(
            &Outgoing::ConnAck {
                code: reason::BAD_AUTH_METHOD,
                max_packet_size: 0,
            },
            version,
            &mut out,
        );
        let _ = wr.write_all(&out).await;
        refuse_connect(
            &ctx,
            peer,
            Some(&connect.client_id),
            "auth_method_unsupported",
            "enhanced authentication is not supported",
        );
        return;
    }
    let mut session = match authenticate(&ctx, &connect, version, peer, certs.as_deref()) {
        Ok(s) => s,
        Err(label) => {
            let mut out = BytesMut::new();
            codec::encode(
                &Outgoing::ConnAck {
                    code: reason::NOT_AUTHORIZED,
                    max_packet_size: 0,
                },
                version,
                &mut out,
            );
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
            refuse_connect(
                &ctx,
                peer,
                Some(&connect.client_id),
                label,
                "authentication refused",
            );
            return;
        }
    };
    let peer_link = match session.open_link(&ctx).await {
        Ok(link) => link,
        Err(e) => {
            tracing::error!(error = %e, "broker link unavailable");
            let mut out = BytesMut::new();
            codec::encode(
                &Outgoing::ConnAck {
                    code: reason::SERVER_UNAVAILABLE,
                    max_packet_size: 0,
                },
                version,
                &mut out,
            );
            let _ = wr.write_all(&out).await;
            return;
        }
    };
    session.link = Some(peer_link);
    let guard = ctx.sessions.register(
        session.policy.principal.clone(),
        session.generation,
        peer,
        protocol_name(version),
        session.method,
    );
    // A disable, removal or rotation that landed after authentication but before the
    // session could be kicked: refuse now.
    if !ctx
        .auth
        .still_current(&session.policy.principal, session.generation)
    {
        let mut out = BytesMut::new();
        codec::encode(
            &Outgoing::ConnAck {
                code: reason::NOT_AUTHORIZED,
                max_packet_size: 0,
            },
            version,
            &mut out,
        );
        let _ = wr.write_all(&out).await;
        refuse_connect(
            &ctx,
            peer,
            Some(&connect.client_id),
            "registry_changed",
            "registry changed during authentication",
        );
        return;
    }
    if let Some(Link::Device { .. }) = &session.link {
        let (tx, rx) = mpsc::channel(ctx.limits.session_queue);
        if ctx
            .broker
            .register_device(session.policy.principal.id.clone(), guard.number, tx)
            .await
            .is_err()
        {
            return;
        }
        session.device_rx = Some(rx);
    }
    Metrics::inc(&ctx.metrics.connections_accepted);
    ctx.metrics
        .connections_active
        .fetch_add(1, Ordering::Relaxed);
    ctx.audit.record(
        AuditEntry::new("connect", "allow")
            .principal(ctx.kind.as_str(), session.policy.principal.id.to_string())
            .source(peer)
            .protocol(protocol_name(version))
            .reason(session.method),
    );
    let mut out = BytesMut::new();
    codec::encode(
        &Outgoing::ConnAck {
            code: reason::SUCCESS,
            max_packet_size: ctx.limits.max_packet_size as u32,
        },
        version,
        &mut out,
    );
    let mut kicked = guard.kicked.clone();
    let end = if wr.write_all(&out).await.is_err() {
        End::Closed
    } else {
        session
            .serve(&ctx, &mut reader, &mut rd, &mut wr, &mut kicked)
            .await
    };
    // In-flight work completes on shutdown: publishes the broker is about to accept
    // still get their acknowledgement before the DISCONNECT.
    let mut out = BytesMut::new();
    if matches!(end, End::Kicked(KickReason::Shutdown)) {
        let drain = async {
            while let Some((pkid, qos, rx)) = session.pending_acks.pop_front() {
                if rx.await.is_ok() {
                    session.ack_publish(pkid, qos, reason::SUCCESS, &mut out);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    // Say why, where the protocol can.
    if let Some(code) = end.disconnect_reason() {
        codec::encode(&Outgoing::Disconnect { reason: code }, version, &mut out);
    }
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    if session.device_rx.is_some() {
        ctx.broker
            .unregister_device(session.policy.principal.id.clone(), guard.number)
            .await;
    }
    ctx.metrics
        .connections_active
        .fetch_sub(1, Ordering::Relaxed);
    ctx.audit.record(
        AuditEntry::new("disconnect", "allow")
            .principal(ctx.kind.as_str(), session.policy.principal.id.to_string())
            .source(peer)
            .protocol(protocol_name(version))
            .reason(end.describe()),
    );
    drop(guard);
}

fn refuse_connect(
    ctx: &Context,
    peer: SocketAddr,
    client_id: Option<&str>,
    label: &'static str,
    detail: &str,
) {
    ctx.metrics.refused("connect", label);
    let mut entry = AuditEntry::new("connect", "refuse")
        .source(peer)
        .reason(format!("{label}: {detail}"));
    if let Some(id) = client_id {
        // The claimed id is the peer's words, kept for the operator; it is not a secret.
        entry = entry.principal(ctx.kind.as_str(), truncate(id, 128));
    }
    ctx.audit.record(entry);
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn authenticate(
    ctx: &Context,
    connect: &ConnectInfo,
    version: ProtocolVersion,
    peer: SocketAddr,
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<Session, &'static str> {
    let creds = Credentials {
        client_id: &connect.client_id,
        username: connect.username.as_deref(),
        password: connect.password.as_deref(),
        certs,
    };
    let authed = ctx
        .auth
        .authenticate(ctx.kind, &creds, peer.ip(), Instant::now())
        .map_err(AuthRefusal::label)?;
    let policy = SessionPolicy {
        principal: authed.principal.clone(),
        acl: authed.acl.clone(),
    };
    // A Last Will is authorized like a publish, at CONNECT.
    if let Some(will) = &connect.will {
        let topic =
            TopicName::parse(&will.topic, ctx.limits.topic).map_err(|_| "will_topic_invalid")?;
        let msg = Message {
            topic,
            payload: will.payload.clone(),
            qos: QoS::from_u8(will.qos).unwrap_or(QoS::AtMostOnce),
            retain: will.retain,
        };
        if pipeline::admit(&policy, &msg, Direction::FromPeer) != Verdict::Accept {
            return Err("will_not_authorized");
        }
    }
    Ok(Session {
        version,
        peer,
        keep_alive: connect.keep_alive,
        policy,
        generation: authed.generation,
        method: authed.method,
        disconnect_on_refusal: authed.policy.disconnect_on_refusal,
        link: None,
        device_rx: None,
        subscriptions: Vec::new(),
        next_pkid: 0,
        pending_acks: VecDeque::new(),
        awaiting_rel: HashSet::new(),
        service_qos2: HashSet::new(),
    })
}

/// How the session talks to the broker.
enum Link {
    Device {
        uplink: Uplink,
    },
    Service {
        cmds: mpsc::Sender<ServiceCmd>,
        events: mpsc::Receiver<ServiceEvent>,
    },
}

struct Session {
    version: ProtocolVersion,
    peer: SocketAddr,
    keep_alive: u16,
    policy: SessionPolicy,
    generation: u64,
    method: &'static str,
    disconnect_on_refusal: bool,
    link: Option<Link>,
    device_rx: Option<mpsc::Receiver<Delivery>>,
    subscriptions: Vec<(TopicFilter, QoS)>,
    next_pkid: u16,
    /// Device QoS 1/2 publishes waiting for the broker's acceptance, in order.
    pending_acks: VecDeque<(u16, u8, oneshot::Receiver<()>)>,
    /// QoS 2 packet ids answered with PUBREC, waiting for PUBREL.
    awaiting_rel: HashSet<u16>,
    /// Service QoS 2 publishes whose broker ack must be answered with PUBREC.
    service_qos2: HashSet<u16>,
}

/// Why a session ended.
enum End {
    Closed,
    WriteTimeout,
    ClientDisconnect,
    KeepAlive,
    Kicked(KickReason),
    Protocol(u8, String),
    Refused(String),
    BrokerGone,
}

impl End {
    fn disconnect_reason(&self) -> Option<u8> {
        match self {
            End::Closed | End::ClientDisconnect | End::WriteTimeout => None,
            End::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::Kicked(KickReason::Shutdown) => Some(reason::SHUTTING_DOWN),
            End::Kicked(KickReason::TakenOver) => Some(reason::SESSION_TAKEN_OVER),
            End::Kicked(_) => Some(reason::ADMINISTRATIVE_ACTION),
            End::Protocol(code, _) => Some(*code),
            End::Refused(_) => Some(reason::NOT_AUTHORIZED),
            End::BrokerGone => Some(reason::SERVER_UNAVAILABLE),
        }
    }

    fn describe(&self) -> String {
        match self {
            End::Closed => "connection closed".into(),
            End::WriteTimeout => "peer stopped reading".into(),
            End::ClientDisconnect => "client disconnected".into(),
            End::KeepAlive => "keep-alive expired".into(),
            End::Kicked(r) => r.as_str().into(),
            End::Protocol(_, why) => format!("protocol error: {why}"),
            End::Refused(why) => format!("disconnected on refusal: {why}"),
            End::BrokerGone => "broker link closed".into(),
        }
    }
}

enum FromBroker {
    Delivery(Delivery),
    PubAck(u16),
    Gone,
}

impl Session {
    async fn open_link(&self, ctx: &Context) -> Result<Link, String> {
        match ctx.kind {
            PrincipalKind::Device => Ok(Link::Device {
                uplink: ctx.broker.uplink_for(&self.policy.principal.id),
            }),
            PrincipalKind::Service => {
                let (cmds, events) = ctx
                    .broker
                    .service_link(&self.policy.principal.id)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Link::Service { cmds, events })
            }
        }
    }
}

async fn from_broker(
    link: &mut Option<Link>,
    device_rx: &mut Option<mpsc::Receiver<Delivery>>,
) -> FromBroker {
    {
        match (link, device_rx) {
            (Some(Link::Service { events, .. }), _) => match events.recv().await {
                Some(ServiceEvent::Delivery(d)) => FromBroker::Delivery(d),
                Some(ServiceEvent::PubAck(pkid)) => FromBroker::PubAck(pkid),
                None => FromBroker::Gone,
            },
            (_, Some(rx)) => match rx.recv().await {
                Some(d) => FromBroker::Delivery(d),
                None => FromBroker::Gone,
            },
            _ => std::future::pending().await,
        }
    }
}

impl Session {
    async fn serve<R, W>(
        &mut self,
        ctx: &Context,
        reader: &mut FrameReader,
        rd: &mut R,
        wr: &mut W,
        kicked: &mut watch::Receiver<Option<KickReason>>,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // A silent client is dropped at 1.5 times its keep-alive.
        let keep_alive =
            (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        let mut deadline = keep_alive.map(|k| tokio::time::Instant::now() + k);
        let mut out = BytesMut::with_capacity(4096);
        loop {
            if let Some(reason) = *kicked.borrow() {
                return End::Kicked(reason);
            }
            out.clear();
            let step = tokio::select! {
                frame = reader.next(rd) => {
                    if let Some(k) = keep_alive {
                        deadline = Some(tokio::time::Instant::now() + k);
                    }
                    match frame {
                        Ok(frame) => self.on_frame(ctx, frame, &mut out).await,
                        Err(ReadError::Strict(e)) => {
                            ctx.metrics.refused("decode", "malformed_packet");
                            self.audit_refusal(ctx, "packet", None, &e.to_string());
                            Err(End::Protocol(e.reason_code(), e.to_string()))
                        }
                        Err(_) => Err(End::Closed),
                    }
                }
                Some(i) = front_ack(&mut self.pending_acks) => {
                    let (pkid, qos, result) = i;
                    self.pending_acks.pop_front();
                    match result {
                        Ok(()) => {
                            self.ack_publish(pkid, qos, reason::SUCCESS, &mut out);
                            Ok(())
                        }
                        Err(_) => Err(End::BrokerGone),
                    }
                }
                from = from_broker(&mut self.link, &mut self.device_rx) => match from {
                    FromBroker::Delivery(d) => { self.deliver(ctx, d, &mut out); Ok(()) }
                    FromBroker::PubAck(pkid) => {
                        let qos = if self.service_qos2.remove(&pkid) { 2 } else { 1 };
                        self.ack_publish(pkid, qos, reason::SUCCESS, &mut out);
                        Ok(())
                    }
                    FromBroker::Gone => Err(End::BrokerGone),
                },
                _ = kicked.changed() => continue,
                _ = sleep_until(deadline) => Err(End::KeepAlive),
            };
            if !out.is_empty() {
                match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return End::Closed,
                    Err(_) => return End::WriteTimeout,
                }
            }
            if let Err(end) = step {
                return end;
            }
        }
    }

    fn audit_refusal(&self, ctx: &Context, event: &'static str, topic: Option<&str>, why: &str) {
        let mut entry = AuditEntry::new(event, "refuse")
            .principal(ctx.kind.as_str(), self.policy.principal.id.to_string())
            .source(self.peer)
            .protocol(protocol_name(self.version))
            .reason(why.to_string());
        if let Some(t) = topic {
            entry = entry.topic(truncate(t, 256));
        }
        ctx.audit.record(entry);
    }

    fn ack_publish(&mut self, pkid: u16, qos: u8, code: u8, out: &mut BytesMut) {
        let packet = if qos == 2 {
            self.awaiting_rel.insert(pkid);
            Outgoing::PubRec { pkid, reason: code }
        } else {
            Outgoing::PubAck { pkid, reason: code }
        };
        codec::encode(&packet, self.version, out);
    }

    async fn on_frame(
        &mut self,
        ctx: &Context,
        frame: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        if let Err(e) = strict::check_frame(&frame, self.version) {
            ctx.metrics.refused("decode", "malformed_packet");
            self.audit_refusal(ctx, "packet", None, &e.to_string());
            return Err(End::Protocol(e.reason_code(), e.to_string()));
        }
        let packet = match codec::decode(frame, self.version, ctx.limits.max_packet_size) {
            Ok(p) => p,
            Err(e) => {
                ctx.metrics.refused("decode", "malformed_packet");
                self.audit_refusal(ctx, "packet", None, &e.to_string());
                return Err(End::Protocol(reason::MALFORMED, e.to_string()));
            }
        };
        match packet {
            Incoming::Publish(p) => self.on_publish(ctx, p, out).await,
            Incoming::PubRel(pkid) => {
                self.awaiting_rel.remove(&pkid);
                codec::encode(&Outgoing::PubComp { pkid }, self.version, out);
                Ok(())
            }
            Incoming::PubAck(_) | Incoming::PubComp(_) => Ok(()),
            Incoming::PubRec(pkid) => {
                codec::encode(&Outgoing::PubRel { pkid }, self.version, out);
                Ok(())
            }
            Incoming::Subscribe { pkid, filters } => {
                self.on_subscribe(ctx, pkid, filters, out).await
            }
            Incoming::Unsubscribe { pkid, filters } => {
                let count = filters.len();
                self.subscriptions
                    .retain(|(f, _)| !filters.iter().any(|g| g == f.as_str()));
                if let Some(Link::Service { cmds, .. }) = &self.link
                    && cmds.send(ServiceCmd::Unsubscribe(filters)).await.is_err()
                {
                    return Err(End::BrokerGone);
                }
                codec::encode(&Outgoing::UnsubAck { pkid, count }, self.version, out);
                Ok(())
            }
            Incoming::PingReq => {
                codec::encode(&Outgoing::PingResp, self.version, out);
                Ok(())
            }
            Incoming::Disconnect => Err(End::ClientDisconnect),
            Incoming::Connect(_) => Err(End::Protocol(
                reason::PROTOCOL_ERROR,
                "second CONNECT".into(),
            )),
        }
    }

    async fn on_publish(
        &mut self,
        ctx: &Context,
        p: PublishIn,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        if p.topic_alias.is_some() {
            ctx.metrics.refused("decode", "topic_alias");
            self.audit_refusal(ctx, "publish", Some(&p.topic), "topic alias not offered");
            return Err(End::Protocol(
                reason::TOPIC_ALIAS_INVALID,
                "topic alias not offered".into(),
            ));
        }
        let topic = match TopicName::parse(&p.topic, ctx.limits.topic) {
            Ok(t) => t,
            Err(e) => {
                ctx.metrics.refused("decode", "topic_invalid");
                self.audit_refusal(ctx, "publish", Some(&p.topic), &e.to_string());
                return Err(End::Protocol(reason::TOPIC_NAME_INVALID, e.to_string()));
            }
        };
        // QoS 2 retransmission: already accepted, answer again without forwarding twice.
        if p.qos == 2 && self.awaiting_rel.contains(&p.pkid) {
            codec::encode(
                &Outgoing::PubRec {
                    pkid: p.pkid,
                    reason: reason::SUCCESS,
                },
                self.version,
                out,
            );
            return Ok(());
        }
        let msg = Message {
            topic,
            payload: p.payload,
            qos: QoS::from_u8(p.qos).unwrap_or(QoS::AtMostOnce),
            retain: p.retain,
        };
        let mut verdict = pipeline::admit(&self.policy, &msg, Direction::FromPeer);
        // A Response Topic is where the answer will be published: authorized the same way.
        if let (Verdict::Accept, Some(rt)) = (verdict, &p.response_topic) {
            let ok = TopicName::parse(rt, ctx.limits.topic).is_ok_and(|t| {
                let probe = Message {
                    topic: t,
                    ..msg.clone()
                };
                pipeline::admit(&self.policy, &probe, Direction::FromPeer) == Verdict::Accept
            });
            if !ok {
                verdict = Verdict::Refuse(pipeline::RESPONSE_TOPIC_NOT_ALLOWED);
            }
        }
        if let Verdict::Refuse(refusal) = verdict {
            ctx.metrics.refused(refusal.stage.as_str(), refusal.reason);
            self.audit_refusal(
                ctx,
                "publish",
                Some(msg.topic.as_str()),
                &refusal.to_string(),
            );
            if self.version == ProtocolVersion::V311 && self.disconnect_on_refusal {
                return Err(End::Refused(refusal.to_string()));
            }
            // 3.1.1 cannot carry a reason: acknowledge so the client does not stall,
            // and drop. MQTT 5 says why.
            if p.qos > 0 {
                self.ack_publish(p.pkid, p.qos, reason::NOT_AUTHORIZED, out);
            }
            return Ok(());
        }
        Metrics::inc(&ctx.metrics.messages_accepted);
        ctx.metrics
            .bytes_accepted
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        match &self.link {
            Some(Link::Device { uplink }) => {
                if p.qos == 0 {
                    uplink.send(msg).await.map_err(|_| End::BrokerGone)?;
                } else {
                    let acked = uplink.send_acked(msg).await.map_err(|_| End::BrokerGone)?;
                    self.pending_acks.push_back((p.pkid, p.qos, acked));
                }
            }
            Some(Link::Service { cmds, .. }) => {
                if p.qos == 2 {
                    self.service_qos2.insert(p.pkid);
                }
                cmds.send(ServiceCmd::Publish(msg, p.pkid))
                    .await
                    .map_err(|_| End::BrokerGone)?;
            }
            None => return Err(End::BrokerGone),
        }
        Ok(())
    }

    async fn on_subscribe(
        &mut self,
        ctx: &Context,
        pkid: u16,
        filters: Vec<(String, u8)>,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        if filters.len() > ctx.limits.max_subscribe_filters {
            ctx.metrics.refused("subscribe", "too_many_filters");
            let codes = vec![Err(reason::QUOTA_EXCEEDED); filters.len()];
            codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
            return Ok(());
        }
        let mut codes = Vec::with_capacity(filters.len());
        let mut accepted = Vec::new();
        for (raw, qos) in filters {
            let filter = match TopicFilter::parse(&raw, ctx.limits.topic) {
                Ok(f) => f,
                Err(e) => {
                    ctx.metrics.refused("subscribe", "filter_invalid");
                    self.audit_refusal(ctx, "subscribe", Some(&raw), &e.to_string());
                    codes.push(Err(reason::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            if let Verdict::Refuse(refusal) = pipeline::admit_subscription(&self.policy, &filter) {
                ctx.metrics.refused(refusal.stage.as_str(), refusal.reason);
                self.audit_refusal(ctx, "subscribe", Some(&raw), &refusal.to_string());
                codes.push(Err(reason::NOT_AUTHORIZED));
                continue;
            }
            // The embedded broker carries QoS 0 and 1.
            let granted = QoS::from_u8(qos.min(1)).unwrap_or(QoS::AtMostOnce);
            self.subscriptions.retain(|(f, _)| f != &filter);
            self.subscriptions.push((filter.clone(), granted));
            accepted.push((filter.as_str().to_string(), granted));
            codes.push(Ok(granted as u8));
        }
        if let (Some(Link::Service { cmds, .. }), false) = (&self.link, accepted.is_empty()) {
            cmds.send(ServiceCmd::Subscribe(accepted))
                .await
                .map_err(|_| End::BrokerGone)?;
        }
        codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
        Ok(())
    }

    /// A message from the broker for this peer: through the pipeline, then out.
    fn deliver(&mut self, ctx: &Context, d: Delivery, out: &mut BytesMut) {
        let msg = Message {
            topic: d.topic,
            payload: d.payload,
            qos: d.qos,
            retain: d.retain,
        };
        if let Verdict::Refuse(refusal) = pipeline::admit(&self.policy, &msg, Direction::ToPeer) {
            ctx.metrics.refused(refusal.stage.as_str(), refusal.reason);
            return;
        }
        // The highest QoS among matching subscriptions, capped by the message's. The
        // embedded broker stamps forwards with the QoS its link subscribed at, so in
        // embedded mode a QoS 0 publish reaches a QoS 1 subscriber as QoS 1.
        let Some(sub_qos) = self
            .subscriptions
            .iter()
            .filter(|(f, _)| f.matches(&msg.topic))
            .map(|(_, q)| *q)
            .max()
        else {
            return;
        };
        let qos = sub_qos.min(msg.qos) as u8;
        let pkid = if qos > 0 {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            self.next_pkid
        } else {
            0
        };
        codec::encode(
            &Outgoing::Publish {
                topic: msg.topic.as_str(),
                payload: msg.payload,
                qos,
                retain: false,
                pkid,
            },
            self.version,
            out,
        );
        Metrics::inc(&ctx.metrics.messages_delivered);
    }
}

async fn front_ack(
    pending: &mut VecDeque<(u16, u8, oneshot::Receiver<()>)>,
) -> Option<(u16, u8, Result<(), oneshot::error::RecvError>)> {
    match pending.front_mut() {
        Some((pkid, qos, rx)) => {
            let result = rx.await;
            Some((*pkid, *qos, result))
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown is signalled (without holding the watch's guard).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
