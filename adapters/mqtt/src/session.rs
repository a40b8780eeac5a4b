//! One MQTT connection, from CONNECT to close.
//!
//! Reads frames with a deadline, decodes each once (`strict`, through the codec), asks the
//! core for a verdict and acts on it; delivers what the broker sends the peer; ends
//! the session when the peer goes silent, the gateway kicks it, or it misbehaves.
//! Every refusal is answered the protocol's way, audited and counted. Session state
//! that outlives a connection (subscriptions, unacknowledged messages, the mailbox)
//! lives in `state` and is parked in `store` between connections.

use crate::codec::{
    self, ConnAckProps, ConnectInfo, Incoming, Outgoing, PublishIn, RawProps, SubscribeFilter,
    reason,
};
use crate::state::{KeepAlive, Send as Outbound, SessionState, will_delay};
use crate::state::{SessionStore, Slot};
use crate::strict::{self, ProtocolVersion, StrictError};
use bytes::BytesMut;
use portcullis_core::admission::{self, Admission, Offer, Peer, Rules, Verdict};
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::auth::{AuthRefusal, Authenticator, Credential, Credentials};
use portcullis_core::auth_alert;
use portcullis_core::content;
use portcullis_core::forward::{Forwarder, Uplink};
use portcullis_core::limit::{GlobalBucket, PrincipalRates, Rate, TokenBucket};
use portcullis_core::mailbox::{Delivery, Mailbox, MailboxLimits};
use portcullis_core::message::{Message, Properties, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::peer::{Closed, Ended, Lifecycle, Protocol, until_kicked};
use portcullis_core::principal::{PrincipalId, PrincipalKind, PrincipalRef};
use portcullis_core::quarantine::Behaviours;
use portcullis_core::refusal::{Refusal, Stage};
use portcullis_core::retained::RetainedCommands;
use portcullis_core::sessions::{KickReason, SessionStats, Sessions};
use portcullis_core::subscription::{
    RetainHandling, Subscription, SubscriptionKey, SubscriptionOptions,
};
use portcullis_core::topic::{TopicLimits, TopicName};
use portcullis_core::validate::Validator;
use rustls::pki_types::CertificateDer;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedMutexGuard, oneshot, watch};

/// Largest CONNECT accepted (before the peer is authenticated).
const MAX_CONNECT_SIZE: usize = 64 * 1024;

/// Limits a session enforces.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_packet_size: usize,
    pub topic: TopicLimits,
    pub connect_timeout: Duration,
    pub max_subscribe_filters: usize,
    pub write_timeout: Duration,
    pub max_session_expiry: u32,
    /// A device's command mailbox, and a service's delivery queue.
    pub mailbox: MailboxLimits,
    pub service_mailbox: MailboxLimits,
    pub max_inflight: u16,
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    pub max_keep_alive: u16,
    pub max_user_properties: usize,
    pub max_subscriptions: usize,
    /// New topic filters a session may add, per second and at once.
    pub subscribe_rate: Rate,
}

/// What a configuration reload replaces for live sessions (ACLs and CAs come from the
/// authenticator's policies, swapped at the same time).
#[derive(Debug)]
pub struct Live {
    pub config: Arc<portcullis_config::Config>,
    pub validator: Arc<Validator>,
}

/// What every session of one listener shares.
pub struct Context {
    pub kind: PrincipalKind,
    /// The settings that a configuration reload replaces; each session watches it.
    pub live: watch::Receiver<Arc<Live>>,
    /// The gateway-wide ingress cap.
    pub global: Arc<GlobalBucket>,
    pub auth: Arc<Authenticator>,
    /// Where clean traffic goes, and commands and service deliveries come from.
    pub forwarder: Arc<dyn Forwarder>,
    pub sessions: Arc<Sessions>,
    pub store: Arc<SessionStore>,
    pub retained: Arc<RetainedCommands>,
    /// Per-device behaviour models and quarantine (devices only).
    pub behaviours: Arc<Behaviours>,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub limits: SessionLimits,
    pub shutdown: watch::Receiver<bool>,
}

impl Context {
    /// What a peer's life touches, for `peer::Lifecycle`.
    fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            sessions: self.sessions.clone(),
            auth: self.auth.clone(),
            behaviours: self.behaviours.clone(),
            metrics: self.metrics.clone(),
            audit: self.audit.clone(),
        }
    }

    /// A new, empty mailbox with the bounds of this listener's principals.
    fn new_mailbox(&self) -> Arc<Mailbox> {
        Arc::new(Mailbox::new(match self.kind {
            PrincipalKind::Device => self.limits.mailbox,
            PrincipalKind::Service => self.limits.service_mailbox,
        }))
    }
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
    /// Bytes reserved for the next read: small while a peer is quiet (an idle
    /// connection holds little), doubled each time a read fills it, up to 64 KiB.
    want: usize,
}

const READ_MIN: usize = 256;
const READ_MAX: usize = 64 * 1024;

impl FrameReader {
    /// A whole frame is already buffered (reading it will not wait).
    fn has_frame(&self) -> bool {
        matches!(strict::frame_len(&self.buf, self.max), Ok(Some(_)))
    }

    /// Cancel-safe: bytes read so far stay in the buffer.
    async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(len) = strict::frame_len(&self.buf, self.max)? {
                return Ok(self.buf.split_to(len));
            }
            if self.buf.is_empty() && self.buf.capacity() > 4 * self.want {
                // A burst is over: its buffer is not kept while the peer is quiet.
                self.buf = BytesMut::new();
            }
            self.buf.reserve(self.want);
            let spare = self.buf.capacity() - self.buf.len();
            let n = r.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            if n == spare {
                self.want = (self.want * 2).min(READ_MAX);
            } else if n < spare / 4 {
                self.want = (self.want / 2).max(READ_MIN);
            }
        }
    }
}

/// A refusal's CONNACK, written within the write deadline (a peer that does not read
/// it holds nothing).
async fn refusal_connack<W: AsyncWrite + Unpin>(
    wr: &mut W,
    code: u8,
    version: ProtocolVersion,
    deadline: Duration,
) {
    let _ = tokio::time::timeout(deadline, wr.write_all(&connack(code, version))).await;
}

fn connack(code: u8, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    codec::encode(
        &Outgoing::ConnAck {
            code,
            session_present: false,
            props: ConnAckProps::default(),
        },
        version,
        &mut out,
    );
    out
}

/// Run one connection to its end. `certs` is the verified TLS client chain, if any.
pub async fn run<S>(
    ctx: Arc<Context>,
    stream: S,
    peer: SocketAddr,
    certs: Option<Vec<CertificateDer<'static>>>,
    mut pre_auth: portcullis_core::source_gate::PreAuth,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Before authentication a peer gets a small frame budget: a CONNECT with a
    // moderate Will fits, a memory-exhausting one does not.
    let mut reader = FrameReader {
        buf: BytesMut::with_capacity(READ_MIN),
        want: READ_MIN,
        max: ctx.limits.max_packet_size.min(MAX_CONNECT_SIZE),
    };
    let mut shutdown = ctx.shutdown.clone();
    let first = tokio::select! {
        r = tokio::time::timeout(ctx.limits.connect_timeout, reader.next(&mut rd)) => r,
        _ = stopped(&mut shutdown) => return,
        _ = pre_auth.shed() => {
            crate::listener::shed_unauthenticated(&ctx, peer);
            return;
        }
    };
    let frame = match first {
        Err(_) => {
            refuse_connect(
                &ctx,
                peer,
                None,
                Refusal::ConnectTimeout,
                "no CONNECT within the deadline",
            );
            return;
        }
        Ok(Err(ReadError::Strict(e))) => {
            refuse_connect(&ctx, peer, None, Refusal::MalformedConnect, &e.to_string());
            return;
        }
        Ok(Err(_)) => return,
        Ok(Ok(frame)) => frame,
    };
    let (version, connect) = match codec::decode_connect(frame) {
        Ok(decoded) => decoded,
        Err(e) => {
            // An unsupported level gets the 3.1.1 answer that every client understands.
            if matches!(
                e,
                StrictError::UnsupportedProtocolLevel(_) | StrictError::BadProtocolName
            ) {
                refusal_connack(
                    &mut wr,
                    reason::UNSUPPORTED_VERSION,
                    ProtocolVersion::V311,
                    ctx.limits.write_timeout,
                )
                .await;
            }
            refuse_connect(&ctx, peer, None, Refusal::MalformedConnect, &e.to_string());
            return;
        }
    };
    // Enhanced authentication (MQTT 5 AUTH) is not offered.
    if connect.auth_method {
        refusal_connack(
            &mut wr,
            reason::BAD_AUTH_METHOD,
            version,
            ctx.limits.write_timeout,
        )
        .await;
        refuse_connect(
            &ctx,
            peer,
            Some(&connect.client_id),
            Refusal::AuthMethodUnsupported,
            "enhanced authentication is not supported",
        );
        return;
    }
    let mut session = match authenticate(&ctx, &connect, version, peer, certs.as_deref()) {
        Ok(s) => s,
        Err(refusal) => {
            refusal_connack(
                &mut wr,
                reason::NOT_AUTHORIZED,
                version,
                ctx.limits.write_timeout,
            )
            .await;
            let _ = tokio::time::timeout(ctx.limits.write_timeout, wr.shutdown()).await;
            refuse_connect(
                &ctx,
                peer,
                Some(&connect.client_id),
                refusal,
                "authentication refused",
            );
            return;
        }
    };
    pre_auth.authenticated();
    // Registering ends an earlier session of the same identity (take-over).
    let lifecycle = ctx.lifecycle();
    let guard = match lifecycle.register(&session.admission, session.generation, session.method) {
        Ok(guard) => guard,
        Err(refusal) => {
            refusal_connack(
                &mut wr,
                reason::NOT_AUTHORIZED,
                version,
                ctx.limits.write_timeout,
            )
            .await;
            refuse_connect(
                &ctx,
                peer,
                Some(&connect.client_id),
                refusal,
                "registry changed during authentication",
            );
            return;
        }
    };
    session.stats = guard.stats.clone();
    // The session's slot: wait for a taken-over connection to put the state back.
    let slot = ctx.store.slot(&session.principal().id);
    let Ok(mut slot) = tokio::time::timeout(Duration::from_secs(5), slot.lock_owned()).await else {
        refusal_connack(
            &mut wr,
            reason::SERVER_BUSY,
            version,
            ctx.limits.write_timeout,
        )
        .await;
        refuse_connect(
            &ctx,
            peer,
            Some(&connect.client_id),
            Refusal::SessionBusy,
            "previous session did not end",
        );
        return;
    };
    slot.epoch += 1;
    let now = Instant::now();
    // Clean Start discards; otherwise a parked session resumes, if it belongs to this
    // registration of the device (not to one removed and added again since).
    let registered = ctx.auth.registered_since(session.principal());
    let resumed = if connect.clean_start {
        None
    } else {
        slot.resume(now).filter(|s| s.registered == registered)
    };
    if resumed.is_none()
        && let Some(old) = slot.state.take()
    {
        old.mailbox.clear();
    }
    let session_present = resumed.is_some();
    let state = resumed.unwrap_or_else(|| {
        let mut state = SessionState::new(ctx.new_mailbox());
        state.registered = registered;
        state
    });
    if let Err(e) = session.open_link(&ctx, state).await {
        tracing::error!(error = %e, "broker link unavailable");
        // What the session held (queued commands, unacknowledged messages) stays
        // parked for the next connection.
        if session_present || !connect.clean_start {
            let state = std::mem::replace(&mut session.state, SessionState::new(ctx.new_mailbox()));
            slot.park(state, now + Duration::from_secs(u64::from(session.expiry)));
        }
        refusal_connack(
            &mut wr,
            reason::SERVER_UNAVAILABLE,
            version,
            ctx.limits.write_timeout,
        )
        .await;
        return;
    }
    // The model hears of the connection once it is open (and of its end below).
    lifecycle.opened(
        &session.admission,
        &guard,
        session.method,
        if session_present {
            ", session resumed"
        } else {
            ""
        },
    );
    let mut out = BytesMut::new();
    codec::encode(
        &Outgoing::ConnAck {
            code: reason::SUCCESS,
            session_present,
            props: session.connack_props(&ctx, &connect),
        },
        version,
        &mut out,
    );
    // A resumed session first finishes what the last connection left unacknowledged.
    session.resend(&ctx, &mut out);
    reader.max = ctx.limits.max_packet_size;
    let mut kicked = guard.kicked.clone();
    // Every write has a deadline, this one too: a resumed session's resend can be
    // megabytes, and a peer holding the credential may never read it.
    let work = async {
        match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => {
                session
                    .serve(&ctx, &mut reader, &mut rd, &mut wr, &mut kicked)
                    .await
            }
            Ok(Err(_)) => End::Closed,
            Err(_) => End::WriteTimeout,
        }
    };
    let grace = ctx.limits.write_timeout.min(KICK_GRACE);
    let (end, cut_off) = match until_kicked(work, guard.kicked.clone(), grace).await {
        Ended::Finished(end) => (end, false),
        Ended::Panicked(why) => (End::Internal(why), false),
        Ended::CutOff(reason) => (End::Kicked(reason), true),
    };
    if let End::Internal(why) = &end {
        tracing::error!(peer = %peer, error = %why, "session failed; its state is kept");
    }
    // A peer that is not reading gets no farewell: writing one would only wait.
    let farewell = if cut_off || matches!(end, End::WriteTimeout) {
        Duration::ZERO
    } else {
        Duration::from_secs(1)
    };
    // In-flight work completes on shutdown: publishes the broker is about to accept
    // still get their acknowledgement before the DISCONNECT.
    let mut out = BytesMut::new();
    if matches!(end, End::Kicked(KickReason::Shutdown)) {
        let drain = async {
            while let Some(pending) = session.pending_acks.pop_front() {
                let ready = match pending.rx {
                    Some(rx) => rx.await.is_ok(),
                    None => true,
                };
                if ready {
                    session.ack_publish(pending.pkid, pending.qos, pending.code, &mut out);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    // Say why, where the protocol can.
    if let Some(code) = end.disconnect_reason() {
        codec::encode(&Outgoing::Disconnect { reason: code }, version, &mut out);
    }
    if !out.is_empty() && !farewell.is_zero() {
        let _ = tokio::time::timeout(farewell, wr.write_all(&out)).await;
    }
    if !farewell.is_zero() {
        let _ = tokio::time::timeout(farewell, wr.shutdown()).await;
    }
    // A peer still sending (the rest of an oversized packet, say) would get a reset
    // on close, and a reset can destroy the DISCONNECT before the peer reads why:
    // after a protocol error, what it still sends is read and dropped for a moment.
    if matches!(end, End::Protocol(..) | End::Refused(_)) {
        let drain = async {
            let mut scratch = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            while total < 4 << 20 {
                match rd.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    }
    // A packet that broke the protocol (malformed, oversized) is a failed validation
    // too, as far as the device's behaviour goes.
    let broke_protocol = matches!(end, End::Protocol(code, _)
        if code != reason::MESSAGE_RATE_TOO_HIGH && code != reason::RECEIVE_MAXIMUM_EXCEEDED);
    lifecycle.closed(
        &session.admission,
        &Closed {
            why: end.describe(),
            taken_over: matches!(end, End::Kicked(KickReason::TakenOver)),
            broke_protocol,
        },
    );
    session.finish(&ctx, &end, slot).await;
    drop(guard);
}

/// How long a kicked session may take to end by itself (flushing what it owes)
/// before it is cut off, at most.
const KICK_GRACE: Duration = Duration::from_secs(1);

fn protocol(version: ProtocolVersion) -> Protocol {
    match version {
        ProtocolVersion::V311 => Protocol::Mqtt311,
        ProtocolVersion::V5 => Protocol::Mqtt5,
    }
}

fn refuse_connect(
    ctx: &Context,
    peer: SocketAddr,
    client_id: Option<&str>,
    refusal: Refusal,
    detail: &str,
) {
    ctx.metrics.refused(refusal);
    let mut entry = AuditEntry::new("connect", "refuse")
        .source(peer)
        .reason(format!("{}: {detail}", refusal.label()));
    if let Some(id) = client_id {
        // The claimed id is the peer's words, kept for the operator; it is not a secret.
        entry = entry.principal(ctx.kind.as_str(), truncate(id, 128));
    }
    ctx.audit.record(entry);
}

/// Failed logins naming a device never change how the device is treated (they are
/// the sources' doing, and the back-off answers them): enough of them in a window
/// raise one alert, audited, counted and published on
/// `portcullis/events/auth_failures/{id}` with the sources named.
fn note_auth_failure(ctx: &Context, client_id: &str, refusal: AuthRefusal, peer: SocketAddr) {
    if ctx.kind != PrincipalKind::Device {
        return;
    }
    let Some(alert) = ctx
        .auth
        .note_failure(client_id, refusal, peer.ip(), Instant::now())
    else {
        return;
    };
    let Ok(id) = PrincipalId::parse(client_id) else {
        return;
    };
    Metrics::inc(&ctx.metrics.auth_failure_alerts);
    ctx.audit.record(
        AuditEntry::new("auth_failures", "alert")
            .principal("device", id.to_string())
            .reason(alert.reason()),
    );
    tracing::warn!(device = %id, sources = %alert.sources_text(), failures = alert.failures, "failed logins naming a device");
    let Some(topic) = auth_alert::event_topic(&id) else {
        return;
    };
    let payload = alert.event(&id, portcullis_core::registry::now_unix());
    let uplink = ctx.forwarder.events();
    tokio::spawn(async move {
        let _ = uplink
            .send(Message {
                topic,
                payload: payload.into(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: None,
            })
            .await;
    });
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// What a publish (or Will) carries, for `content::check`.
fn carried<'a>(raw: &'a RawProps, payload: &'a [u8]) -> content::Carried<'a> {
    content::Carried {
        response_topic: raw.response_topic.as_deref(),
        content_type: raw.content_type.as_deref(),
        user_properties: &raw.user_properties,
        payload_utf8: raw.payload_format == Some(1),
        payload,
    }
}

/// Validated MQTT 5 properties of a publish (or will): the response topic must be a
/// valid topic name, user properties are capped.
fn properties(raw: &RawProps, limits: &SessionLimits) -> Result<Option<Arc<Properties>>, Refusal> {
    if raw.user_properties.len() > limits.max_user_properties {
        return Err(Refusal::TooManyUserProperties);
    }
    let response_topic = match &raw.response_topic {
        Some(t) => {
            Some(TopicName::parse(t, limits.topic).map_err(|_| Refusal::ResponseTopicInvalid)?)
        }
        None => None,
    };
    let p = Properties {
        payload_format_utf8: raw.payload_format.map(|v| v == 1),
        message_expiry_secs: raw.message_expiry,
        content_type: raw.content_type.clone(),
        response_topic,
        correlation_data: raw.correlation_data.clone(),
        // Names under `$portcullis` are the gateway's own marks: a peer cannot set them.
        user_properties: raw
            .user_properties
            .iter()
            .filter(|(k, _)| !k.starts_with("$portcullis"))
            .cloned()
            .collect(),
    };
    Ok((p != Properties::default()).then(|| Arc::new(p)))
}

/// A Last Will, authorized at CONNECT, waiting for an unexpected disconnect.
struct Will {
    message: Message,
    delay_secs: u32,
}

fn authenticate(
    ctx: &Context,
    connect: &ConnectInfo,
    version: ProtocolVersion,
    peer: SocketAddr,
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<Session, Refusal> {
    let now = Instant::now();
    let refused = |refusal: AuthRefusal| {
        note_auth_failure(ctx, &connect.client_id, refusal, peer);
        Refusal::from(refusal)
    };
    // MQTT's rule: a secret is the password of the user name that is the client id
    // (MQTT 5 allows a password alone; the registry does not).
    let username = connect.username.as_deref();
    let password = connect.password.as_deref();
    if username.is_some_and(|u| u != connect.client_id)
        || (password.is_some() && username.is_none())
    {
        let refusal = ctx.auth.refuse_early(
            &connect.client_id,
            AuthRefusal::UsernameMismatch,
            peer.ip(),
            now,
        );
        return Err(refused(refusal));
    }
    let mut presented = Vec::with_capacity(2);
    if let Some(secret) = password {
        presented.push(Credential::Secret(secret));
    }
    if let Some(chain) = certs {
        presented.push(Credential::Certificate(chain));
    }
    let creds = Credentials {
        id: &connect.client_id,
        presented,
    };
    let authed = ctx
        .auth
        .authenticate(ctx.kind, &creds, peer.ip(), now)
        .map_err(refused)?;
    let live = ctx.live.borrow().clone();
    let principal = authed.principal.clone();
    let admission = Admission::new(
        Peer {
            principal: principal.clone(),
            source: peer,
            protocol: protocol(version),
        },
        rules(ctx, &live, &principal, authed.acl.clone()),
        admission::Shared {
            global: ctx.global.clone(),
            retained: ctx.retained.clone(),
            behaviours: ctx.behaviours.clone(),
            directory: ctx.auth.clone(),
            metrics: ctx.metrics.clone(),
            audit: ctx.audit.clone(),
        },
        now,
    );
    // A Last Will is authorized like a publish, at CONNECT (and again when it fires).
    let will = match &connect.will {
        None => None,
        Some(w) => {
            let topic = TopicName::parse(&w.topic, ctx.limits.topic)
                .map_err(|_| Refusal::WillTopicInvalid)?;
            if content::check(&w.topic, &carried(&w.props, &w.payload)).is_err() {
                return Err(Refusal::WillContentInvalid);
            }
            let message = Message {
                topic,
                payload: w.payload.clone(),
                qos: QoS::from_u8(w.qos).unwrap_or(QoS::AtMostOnce),
                retain: w.retain,
                properties: properties(&w.props, &ctx.limits).map_err(|r| match r {
                    Refusal::ResponseTopicInvalid => Refusal::WillResponseTopicInvalid,
                    _ => Refusal::WillTooManyUserProperties,
                })?,
            };
            admission.check_will(&message)?;
            Some(Will {
                message,
                delay_secs: w.delay,
            })
        }
    };
    let expiry = connect.session_expiry.min(ctx.limits.max_session_expiry);
    let keep_alive = KeepAlive::effective(connect.keep_alive, ctx.limits.max_keep_alive);
    let window = connect
        .receive_maximum
        .unwrap_or(u16::MAX)
        .min(ctx.limits.max_inflight)
        .max(1);
    Ok(Session {
        version,
        peer,
        keep_alive,
        expiry,
        window: usize::from(window),
        peer_max_packet: connect.max_packet_size.map_or(usize::MAX, |m| m as usize),
        will,
        generation: authed.generation,
        method: authed.method,
        disconnect_on_refusal: authed.policy.disconnect_on_refusal,
        link: None,
        state: SessionState::new(ctx.new_mailbox()),
        staged: VecDeque::new(),
        pending_acks: VecDeque::new(),
        aliases: HashMap::new(),
        out_aliases: HashMap::new(),
        // The peer may allow up to 65 535; the gateway keeps no more than its own cap.
        out_alias_max: connect
            .topic_alias_maximum
            .min(ctx.limits.topic_alias_maximum),
        admission,
        certs: certs.map(<[_]>::to_vec),
        stats: Arc::new(SessionStats::default()),
        subscribes: TokenBucket::new(ctx.limits.subscribe_rate, now),
        subscribe_rate_audited: None,
        next_pump: None,
        pump_more: false,
    })
}

/// The rules a principal is admitted under, from the settings in force.
fn rules(
    ctx: &Context,
    live: &Live,
    principal: &PrincipalRef,
    acl: Arc<portcullis_core::acl::Acl>,
) -> Rules {
    let rates = live.config.rates_for(
        ctx.kind.as_str(),
        principal.group.as_str(),
        principal.id.as_str(),
    );
    Rules {
        acl,
        validator: live.validator.clone(),
        rates: PrincipalRates::from_config(&rates),
        behaviour: ctx.behaviours.policy(&principal.group),
    }
}

struct Session {
    version: ProtocolVersion,
    peer: SocketAddr,
    keep_alive: u16,
    /// Granted session expiry, seconds (0: clean).
    expiry: u32,
    /// Outgoing QoS 1/2 window.
    window: usize,
    peer_max_packet: usize,
    will: Option<Will>,
    generation: u64,
    method: &'static str,
    disconnect_on_refusal: bool,
    /// The broker uplink the peer's messages go through, once the session is open.
    link: Option<Uplink>,
    state: SessionState,
    /// Messages taken from the mailbox in a batch and not yet sent; they go back to
    /// the mailbox if the session ends first.
    staged: VecDeque<Delivery>,
    /// Acknowledgements owed to the peer, in the order its publishes arrived; each
    /// waits for the broker's acceptance (or is ready at once, for a refusal).
    pending_acks: VecDeque<PendingAck>,
    /// MQTT 5 topic aliases the peer defined on this connection.
    aliases: HashMap<u16, TopicName>,
    /// Topic aliases the gateway defined towards the peer on this connection, and how
    /// many the peer allows (its Topic Alias Maximum; 0: none).
    out_aliases: HashMap<TopicName, u16>,
    out_alias_max: u16,
    /// The pipeline's state for this peer: every stage decides there.
    admission: Admission,
    /// The certificate chain it authenticated with, re-checked on reload.
    certs: Option<Vec<CertificateDer<'static>>>,
    /// Counters shown by `portcullis clients list`.
    stats: Arc<SessionStats>,
    /// New subscriptions this connection may add (SUBSCRIBE churn is bounded).
    subscribes: TokenBucket,
    /// When a filter over that rate was last audited (at most one line a second).
    subscribe_rate_audited: Option<Instant>,
    next_pump: Option<Instant>,
    /// The mailbox has more for the peer than one write took.
    pump_more: bool,
}

/// Why a session ended.
enum End {
    Closed,
    WriteTimeout,
    ClientDisconnect {
        with_will: bool,
    },
    KeepAlive,
    Kicked(KickReason),
    Protocol(u8, String),
    Refused(String),
    BrokerGone,
    /// The session's own code failed (a panic, contained).
    Internal(String),
}

impl End {
    fn disconnect_reason(&self) -> Option<u8> {
        match self {
            End::Closed | End::ClientDisconnect { .. } | End::WriteTimeout => None,
            End::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::Kicked(KickReason::Shutdown) => Some(reason::SHUTTING_DOWN),
            End::Kicked(KickReason::TakenOver) => Some(reason::SESSION_TAKEN_OVER),
            End::Kicked(KickReason::Banned) => Some(reason::NOT_AUTHORIZED),
            End::Kicked(_) => Some(reason::ADMINISTRATIVE_ACTION),
            End::Protocol(code, _) => Some(*code),
            End::Refused(_) => Some(reason::NOT_AUTHORIZED),
            End::BrokerGone => Some(reason::SERVER_UNAVAILABLE),
            End::Internal(_) => Some(reason::UNSPECIFIED),
        }
    }

    fn describe(&self) -> String {
        match self {
            End::Closed => "connection closed".into(),
            End::WriteTimeout => "peer stopped reading".into(),
            End::ClientDisconnect { with_will: false } => "client disconnected".into(),
            End::ClientDisconnect { with_will: true } => {
                "client disconnected, asking for its Will".into()
            }
            End::KeepAlive => "keep-alive expired".into(),
            End::Kicked(r) => r.as_str().into(),
            End::Protocol(_, why) => format!("protocol error: {why}"),
            End::Refused(why) => format!("disconnected on refusal: {why}"),
            End::BrokerGone => "broker link closed".into(),
            End::Internal(why) => format!("internal error: {why}"),
        }
    }

    /// The Last Will goes out only on an unexpected end: never after a normal
    /// DISCONNECT, a kick, a take-over or a security refusal.
    fn fires_will(&self) -> bool {
        matches!(
            self,
            End::Closed
                | End::WriteTimeout
                | End::KeepAlive
                | End::ClientDisconnect { with_will: true }
        )
    }

    /// A removed or disabled principal keeps no session.
    fn discards_session(&self) -> bool {
        matches!(
            self,
            End::Kicked(KickReason::Removed | KickReason::Disabled | KickReason::Banned)
        )
    }
}

/// Messages a session takes from its mailbox at a time.
const PUMP_BATCH: usize = 64;

/// Bytes of output gathered before they are written even though more work is ready.
const FLUSH_AT: usize = 32 * 1024;

impl Session {
    fn principal(&self) -> &PrincipalRef {
        &self.admission.peer().principal
    }

    /// Route what is for this session into its mailbox (a device's commands, or what
    /// a service's subscriptions match), and take the uplink its messages go through.
    async fn open_link(&mut self, ctx: &Context, state: SessionState) -> Result<(), String> {
        self.state = state;
        let id = self.principal().id.clone();
        let mailbox = self.state.mailbox.clone();
        let link = match ctx.kind {
            PrincipalKind::Device => {
                ctx.forwarder
                    .register_device(id.clone(), mailbox)
                    .await
                    .map_err(|e| e.to_string())?;
                ctx.forwarder.uplink_for(&id)
            }
            PrincipalKind::Service => {
                ctx.forwarder
                    .attach_service(id.clone(), mailbox)
                    .await
                    .map_err(|e| e.to_string())?;
                ctx.forwarder.service_uplink(&id)
            }
        };
        self.link = Some(link);
        Ok(())
    }

    fn connack_props(&self, ctx: &Context, connect: &ConnectInfo) -> ConnAckProps {
        ConnAckProps {
            max_packet_size: ctx.limits.max_packet_size as u32,
            receive_maximum: ctx.limits.receive_maximum,
            topic_alias_maximum: ctx.limits.topic_alias_maximum,
            server_keep_alive: (self.keep_alive != connect.keep_alive).then_some(self.keep_alive),
            session_expiry: (self.expiry != connect.session_expiry).then_some(self.expiry),
            shared_subscriptions: ctx.kind == PrincipalKind::Service,
            subscription_identifiers: ctx.kind == PrincipalKind::Service,
        }
    }

    /// After the connection: park or drop the session, fire the Will if due.
    async fn finish(mut self, ctx: &Context, end: &End, mut slot: OwnedMutexGuard<Slot>) {
        let id = self.principal().id.clone();
        let mailbox = self.state.mailbox.clone();
        mailbox.put_back(std::mem::take(&mut self.staged), Instant::now());
        if self.expiry > 0 && !end.discards_session() {
            // Parked: its mailbox keeps collecting (within its bounds) until the peer
            // returns or the session expires.
            let expires_at = Instant::now() + Duration::from_secs(u64::from(self.expiry));
            slot.park(self.state, expires_at);
            if ctx.kind == PrincipalKind::Service {
                ctx.forwarder.service_online(id.clone(), false).await;
            }
        } else {
            mailbox.clear();
            match ctx.kind {
                PrincipalKind::Device => ctx.forwarder.unregister_device(id.clone(), mailbox).await,
                PrincipalKind::Service => ctx.forwarder.detach_service(id.clone(), mailbox).await,
            }
        }
        let epoch = slot.epoch;
        let slot = OwnedMutexGuard::mutex(&slot).clone();
        drop(self.link.take());
        let gate = self.admission.will_gate();
        // A quarantined device's Last Will is suppressed: the device is not trusted.
        if gate.quarantined() {
            self.will = None;
        }
        let (Some(will), true) = (self.will.take(), end.fires_will()) else {
            return;
        };
        // MQTT 5: the Will waits for its delay (never longer than the session lives),
        // and is dropped if the device comes back first.
        let delay = will_delay(will.delay_secs, self.expiry);
        let uplink = match ctx.kind {
            PrincipalKind::Device => ctx.forwarder.uplink_for(&id),
            PrincipalKind::Service => ctx.forwarder.service_uplink(&id),
        };
        let kind = ctx.kind;
        let principal = self.admission.peer().principal.clone();
        let auth = ctx.auth.clone();
        let audit = ctx.audit.clone();
        let metrics = ctx.metrics.clone();
        let generation = self.generation;
        let peer = self.peer;
        let publish = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                // Held by a connection, or taken by one since: the device came back.
                match slot.try_lock() {
                    Ok(s) if s.epoch == epoch => {}
                    _ => return,
                }
            }
            // Re-checked as it fires: rights may have changed since CONNECT, and the
            // device may have been quarantined since.
            if !auth.still_current(&principal, generation) || !gate.admit(&will.message) {
                return;
            }
            let topic = will.message.topic.to_string();
            let sent = if will.message.qos == QoS::AtMostOnce {
                uplink.send(will.message).await.is_ok()
            } else {
                uplink.send_acked(will.message).await.is_ok()
            };
            if sent {
                Metrics::inc(&metrics.wills_published);
                audit.record(
                    AuditEntry::new("will", "allow")
                        .principal(kind.as_str(), principal.id.to_string())
                        .source(peer)
                        .topic(topic),
                );
            }
        };
        tokio::spawn(publish);
    }

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
        let mut keep_alive = KeepAlive::new(self.keep_alive, Instant::now());
        let mailbox = self.state.mailbox.clone();
        let mut shutdown = ctx.shutdown.clone();
        let mut live = ctx.live.clone();
        live.mark_unchanged();
        let mut live_open = true;
        let mut out = BytesMut::new();
        loop {
            let kick = *kicked.borrow();
            if let Some(reason) = kick {
                // What was gathered (acknowledgements the broker already took) goes
                // out before the session ends.
                if !out.is_empty() {
                    let _ =
                        tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await;
                }
                return End::Kicked(reason);
            }

            // Queued messages go out once the frames the peer already sent are taken
            // (its acknowledgements free the window), so that many deliveries leave in
            // one write, not one per acknowledgement; and at least once per read.
            if !reader.has_frame() {
                self.pump_mailbox(ctx, &mut out);
            }
            // Output is written once the acknowledgements that are ready have been
            // gathered, and always before more is read (the flush branch below); the
            // deliveries that are ready are taken in one go; and here, when a lot has
            // gathered. One write for many packets, not one system call per
            // acknowledgement or delivery.
            if out.len() >= FLUSH_AT {
                match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
                    Ok(Ok(())) => out.clear(),
                    Ok(Err(_)) => return End::Closed,
                    Err(_) => return End::WriteTimeout,
                }
            }
            // Biased: owed acknowledgements first, then the write, then reading, so a
            // peer that is being held back still hears about what already passed
            // before anything more of its is read.
            let step = tokio::select! {
                biased;
                Some(result) = front_ack(&mut self.pending_acks) => {
                    let done = self.pending_acks.pop_front();
                    match (result, done) {
                        (Ok(()), Some(p)) => {
                            self.ack_publish(p.pkid, p.qos, p.code, &mut out);
                            Ok(())
                        }
                        _ => Err(End::BrokerGone),
                    }
                }
                // Nothing more ready to send at once: write what was gathered.
                _ = std::future::ready(()), if !out.is_empty() => {
                    match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
                        Ok(Ok(())) => {
                            out.clear();
                            // A burst's buffer is not kept by a session gone quiet.
                            if out.capacity() > READ_MAX {
                                out = BytesMut::new();
                            }
                            Ok(())
                        }
                        Ok(Err(_)) => return End::Closed,
                        Err(_) => return End::WriteTimeout,
                    }
                }
                // Kicks, reloads and the drain before more input: a frame that arrives
                // after a reload is judged by the new rules.
                _ = kicked.changed() => continue,
                changed = live.changed(), if live_open => match changed {
                    Ok(()) => {
                        let next = live.borrow_and_update().clone();
                        Box::pin(self.reload(ctx, next)).await
                    }
                    // The gateway is stopping: nothing more will be reloaded.
                    Err(_) => {
                        live_open = false;
                        Ok(())
                    }
                },
                // Registered after the drain began: end like everyone else.
                _ = stopped(&mut shutdown) => Err(End::Kicked(KickReason::Shutdown)),
                frame = reader.next(rd) => {
                    let now = Instant::now();
                    keep_alive.heard(now);
                    self.stats.heard(now);
                    match frame {
                        // Boxed: its state is large and needed only while a frame is
                        // handled, not while the session waits (a few KB per idle
                        // connection).
                        Ok(frame) => Box::pin(self.on_frame(ctx, frame, &mut out)).await,
                        Err(ReadError::Strict(e)) => {
                            ctx.metrics.refused(Refusal::MalformedPacket);
                            self.audit_refusal(ctx, "packet", None, &e.to_string());
                            Err(End::Protocol(e.reason_code(), e.to_string()))
                        }
                        Err(_) => Err(End::Closed),
                    }
                }
                _ = std::future::ready(()), if self.pump_more => {
                    self.pump_more = false;
                    Ok(())
                }
                _ = mailbox.notify.notified() => Ok(()),
                _ = sleep_until_opt(self.next_pump) => {
                    self.next_pump = None;
                    Ok(())
                }
                _ = tokio::time::sleep_until(keep_alive.deadline().into()) => Err(End::KeepAlive),
            };
            if let Err(end) = step {
                if !out.is_empty() {
                    let _ =
                        tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await;
                }
                return end;
            }
        }
    }

    /// A configuration reload: the session keeps running under the new rules. Rights
    /// it lost are gone from now on (subscriptions no longer allowed are dropped); a
    /// certificate that no longer verifies (CA removed, or revoked by a CRL) ends it.
    async fn reload(&mut self, ctx: &Context, live: Arc<Live>) -> Result<(), End> {
        let principal = self.principal().clone();
        let Some(acl) = ctx.auth.current_acl(&principal) else {
            return Err(End::Kicked(KickReason::PolicyChanged));
        };
        if let Some(chain) = &self.certs
            && !ctx.auth.certificate_still_valid(&principal, chain)
        {
            return Err(End::Kicked(KickReason::CertificateRevoked));
        }
        self.admission
            .reload(rules(ctx, &live, &principal, acl), Instant::now());
        let lost: Vec<SubscriptionKey> = self
            .state
            .subscriptions()
            .iter()
            .filter(|s| !self.admission.may_subscribe(&s.key.filter))
            .map(|s| s.key.clone())
            .collect();
        for key in &lost {
            self.state.unsubscribe(key);
            self.audit_refusal(
                ctx,
                "subscribe",
                Some(&key.to_string()),
                "subscription no longer allowed after reload",
            );
        }
        if ctx.kind == PrincipalKind::Service && !lost.is_empty() {
            ctx.forwarder
                .unsubscribe(principal.id.clone(), lost)
                .await
                .map_err(|_| End::BrokerGone)?;
        }
        Ok(())
    }

    /// Move queued messages to the peer while the inflight window allows (and, past
    /// a burst's worth of output, again once that is written). Commands to a device
    /// pass its rate too (denial-of-thing): over it, they wait in the mailbox, whose
    /// bounds then apply.
    fn pump_mailbox(&mut self, ctx: &Context, out: &mut BytesMut) {
        let now = Instant::now();
        // A quarantined device's commands wait (within the mailbox's bounds) until it
        // is released, if its group's policy holds them; looked at again each second.
        if self.admission.holds_commands(now) {
            if !self.state.mailbox.is_empty() || !self.staged.is_empty() {
                self.next_pump = Some(now + Duration::from_secs(1));
            }
            return;
        }
        while self.state.window_open(self.window)
            && !(self.staged.is_empty() && self.state.mailbox.is_empty())
        {
            if out.len() >= FLUSH_AT {
                // The session writes what gathered, then comes straight back here
                // (not through a timer: its resolution would stall every burst).
                self.pump_more = true;
                break;
            }
            if let Err(wait) = self.admission.downlink_budget(now) {
                self.next_pump = Some(now + wait);
                break;
            }
            if self.staged.is_empty() {
                self.state
                    .mailbox
                    .pop_many(now, PUMP_BATCH, &mut self.staged);
            }
            let Some(d) = self.staged.pop_front() else {
                self.admission.return_budget();
                break;
            };
            self.deliver(ctx, d, out);
        }
        let expired = self.state.mailbox.take_expired();
        if expired > 0 {
            ctx.metrics
                .queue_expired
                .fetch_add(expired, Ordering::Relaxed);
        }
    }

    fn audit_refusal(&self, ctx: &Context, event: &'static str, topic: Option<&str>, why: &str) {
        let mut entry = AuditEntry::new(event, "refuse")
            .principal(ctx.kind.as_str(), self.principal().id.to_string())
            .source(self.peer)
            .protocol(protocol(self.version).as_str())
            .reason(why.to_string());
        if let Some(t) = topic {
            entry = entry.topic(truncate(t, 256));
        }
        ctx.audit.record(entry);
    }

    /// Acknowledge a publish from the peer, in the order publishes arrived: behind any
    /// earlier one still waiting for the broker.
    fn answer_publish(&mut self, pkid: u16, qos: u8, code: u8, out: &mut BytesMut) {
        if self.pending_acks.is_empty() {
            self.ack_publish(pkid, qos, code, out);
        } else {
            self.pending_acks.push_back(PendingAck {
                pkid,
                qos,
                code,
                rx: None,
            });
        }
    }

    fn ack_publish(&mut self, pkid: u16, qos: u8, code: u8, out: &mut BytesMut) {
        let packet = if qos == 2 {
            Outgoing::PubRec { pkid, reason: code }
        } else {
            Outgoing::PubAck { pkid, reason: code }
        };
        codec::encode(&packet, self.version, out);
    }

    /// What the last connection left unacknowledged, again (DUP), within this
    /// connection's Maximum Packet Size: one that no longer fits is dropped as if
    /// delivered, like any delivery too large for the peer.
    fn resend(&mut self, ctx: &Context, out: &mut BytesMut) {
        for send in self.state.resume() {
            let before = out.len();
            let defined = self.encode_send(&send, out);
            if out.len() - before > self.peer_max_packet {
                out.truncate(before);
                if let Some(topic) = defined {
                    self.out_aliases.remove(&topic);
                }
                if let Outbound::Publish { pkid, .. } = send {
                    self.state.abandon(pkid);
                }
                ctx.metrics.refused(Refusal::OverClientMaximumPacketSize);
            }
        }
    }

    /// Encode a packet for the peer. A PUBLISH uses a topic alias where the peer
    /// allows them: the first one to a topic defines it, later ones send the alias
    /// alone. Returns the topic whose alias this packet defined, if it did.
    fn encode_send(&mut self, send: &Outbound, out: &mut BytesMut) -> Option<TopicName> {
        match send {
            Outbound::Publish {
                pkid,
                delivery,
                qos,
                dup,
            } => {
                let m = &delivery.message;
                let known = match self.out_alias_max {
                    0 => None,
                    _ => self.out_aliases.get(&m.topic).copied(),
                };
                let (topic, topic_alias, defined) = match known {
                    Some(a) => ("", Some(a), None),
                    None if self.out_aliases.len() < usize::from(self.out_alias_max) => {
                        let a = self.out_aliases.len() as u16 + 1;
                        self.out_aliases.insert(m.topic.clone(), a);
                        (m.topic.as_str(), Some(a), Some(m.topic.clone()))
                    }
                    None => (m.topic.as_str(), None, None),
                };
                codec::encode(
                    &Outgoing::Publish {
                        topic,
                        payload: m.payload.clone(),
                        qos: *qos as u8,
                        retain: m.retain,
                        pkid: *pkid,
                        dup: *dup,
                        props: m.properties.as_deref(),
                        subscription_ids: &delivery.subscription_ids,
                        topic_alias,
                    },
                    self.version,
                    out,
                );
                defined
            }
            Outbound::PubRel { pkid } => {
                codec::encode(&Outgoing::PubRel { pkid: *pkid }, self.version, out);
                None
            }
        }
    }

    async fn on_frame(
        &mut self,
        ctx: &Context,
        frame: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        let packet = match codec::decode(frame, self.version) {
            Ok(p) => p,
            Err(e) => {
                ctx.metrics.refused(Refusal::MalformedPacket);
                self.audit_refusal(ctx, "packet", None, &e.to_string());
                return Err(End::Protocol(e.reason_code(), e.to_string()));
            }
        };
        match packet {
            Incoming::Publish(p) => self.on_publish(ctx, p, out).await,
            Incoming::PubRel(pkid) => {
                self.state.on_pubrel(pkid);
                codec::encode(&Outgoing::PubComp { pkid }, self.version, out);
                Ok(())
            }
            Incoming::PubAck(pkid) => {
                self.state.on_puback(pkid);
                Ok(())
            }
            Incoming::PubRec(pkid) => {
                if let Some(send) = self.state.on_pubrec(pkid) {
                    self.encode_send(&send, out);
                }
                Ok(())
            }
            Incoming::PubComp(pkid) => {
                self.state.on_pubcomp(pkid);
                Ok(())
            }
            Incoming::Subscribe {
                pkid,
                filters,
                identifier,
            } => self.on_subscribe(ctx, pkid, filters, identifier, out).await,
            Incoming::Unsubscribe { pkid, filters } => {
                let shared = ctx.kind == PrincipalKind::Service;
                // A filter that does not parse was never subscribed to.
                let keys: Vec<Option<SubscriptionKey>> = filters
                    .iter()
                    .map(|f| SubscriptionKey::parse(f, ctx.limits.topic, shared).ok())
                    .collect();
                let existed: Vec<bool> = keys
                    .iter()
                    .map(|k| k.as_ref().is_some_and(|k| self.state.unsubscribe(k)))
                    .collect();
                let removed: Vec<SubscriptionKey> = keys
                    .into_iter()
                    .zip(&existed)
                    .filter_map(|(k, e)| k.filter(|_| *e))
                    .collect();
                // A service's subscriptions are gone from the fan-out before the
                // UNSUBACK (a message or two already queued may still follow it).
                if shared && !removed.is_empty() {
                    ctx.forwarder
                        .unsubscribe(self.principal().id.clone(), removed)
                        .await
                        .map_err(|_| End::BrokerGone)?;
                }
                codec::encode(&Outgoing::UnsubAck { pkid, existed }, self.version, out);
                Ok(())
            }
            Incoming::PingReq => {
                codec::encode(&Outgoing::PingResp, self.version, out);
                Ok(())
            }
            Incoming::Disconnect {
                reason: code,
                session_expiry,
            } => {
                if let Some(requested) = session_expiry {
                    // A session that was clean cannot be made persistent at the end.
                    if self.expiry == 0 && requested > 0 {
                        return Err(End::Protocol(
                            reason::PROTOCOL_ERROR,
                            "session expiry set on DISCONNECT of a clean session".into(),
                        ));
                    }
                    self.expiry = requested.min(ctx.limits.max_session_expiry);
                }
                Err(End::ClientDisconnect {
                    with_will: code == reason::DISCONNECT_WITH_WILL,
                })
            }
        }
    }

    /// Answer a refused publish the MQTT way (the core has counted, audited and
    /// observed it): 3.1.1 acknowledges and drops (or disconnects, by policy); MQTT 5
    /// says why in the acknowledgement.
    fn refuse_publish(
        &mut self,
        p: &PublishIn,
        refusal: Refusal,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        if self.version == ProtocolVersion::V311 && self.disconnect_on_refusal {
            return Err(End::Refused(refusal.to_string()));
        }
        if p.qos == 2 && self.version == ProtocolVersion::V5 {
            // An MQTT 5 failure PUBREC ends the flow: no PUBREL will free the id.
            // (3.1.1 completes it, PUBREL → PUBCOMP, though nothing was forwarded.)
            self.state.on_pubrel(p.pkid);
        }
        if p.qos > 0 {
            self.answer_publish(p.pkid, p.qos, publish_code(refusal), out);
        }
        Ok(())
    }

    /// Resolve a topic alias (MQTT 5) before anything else looks at the topic.
    fn resolve_topic(&mut self, ctx: &Context, p: &PublishIn) -> Result<TopicName, End> {
        let alias = p.props.topic_alias;
        if let Some(a) = alias
            && (a == 0 || a > ctx.limits.topic_alias_maximum)
        {
            return Err(End::Protocol(
                reason::TOPIC_ALIAS_INVALID,
                format!(
                    "topic alias {a} outside 1..={}",
                    ctx.limits.topic_alias_maximum
                ),
            ));
        }
        if p.topic.is_empty() {
            return match alias.and_then(|a| self.aliases.get(&a)) {
                Some(t) => Ok(t.clone()),
                None => Err(End::Protocol(
                    reason::PROTOCOL_ERROR,
                    "empty topic with an unknown topic alias".into(),
                )),
            };
        }
        let topic = TopicName::parse(&p.topic, ctx.limits.topic).map_err(|e| {
            ctx.metrics.refused(Refusal::TopicInvalid);
            self.audit_refusal(ctx, "publish", Some(&p.topic), &e.to_string());
            End::Protocol(reason::TOPIC_NAME_INVALID, e.to_string())
        })?;
        if let Some(a) = alias {
            self.aliases.insert(a, topic.clone());
        }
        Ok(topic)
    }

    async fn on_publish(
        &mut self,
        ctx: &Context,
        p: PublishIn,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        let arrived = Instant::now();
        // Content standard consumers refuse, from anyone: refused as a payload is (a
        // validation failure), before the topic is parsed or an alias is recorded.
        if let Err(refusal) =
            self.admission
                .screen(&p.topic, &carried(&p.props, &p.payload), arrived)
        {
            return self.refuse_publish(&p, refusal, out);
        }
        let topic = self.resolve_topic(ctx, &p)?;
        // More unacknowledged QoS 1/2 publishes than the Receive Maximum announced. A
        // QoS 2 retransmission (a resumed session's DUP) is not a new one.
        if p.qos > 0 && !(p.qos == 2 && self.state.has_incoming_qos2(p.pkid)) {
            // QoS 2 ones count from arrival until PUBREL (incoming_qos2); QoS 1 ones
            // until the broker has them.
            let unacked = self.pending_acks.iter().filter(|a| a.qos == 1).count()
                + self.state.incoming_qos2_len();
            if unacked >= usize::from(ctx.limits.receive_maximum) {
                ctx.metrics.refused(Refusal::ReceiveMaximumExceeded);
                return Err(End::Protocol(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive maximum exceeded".into(),
                ));
            }
        }
        // QoS 2 retransmission: already accepted, answer again without forwarding twice.
        if p.qos == 2 && !self.state.incoming_qos2(p.pkid) {
            if !self.pending_acks.iter().any(|a| a.pkid == p.pkid) {
                self.answer_publish(p.pkid, 2, reason::SUCCESS, out);
            }
            return Ok(());
        }
        let props = match properties(&p.props, &ctx.limits) {
            Ok(props) => props,
            Err(refusal) => {
                self.admission
                    .refused(refusal, "publish", Some(topic.as_str()), None, arrived);
                return self.refuse_publish(&p, refusal, out);
            }
        };
        let msg = Message {
            topic,
            payload: p.payload.clone(),
            qos: QoS::from_u8(p.qos).unwrap_or(QoS::AtMostOnce),
            retain: p.retain,
            properties: props,
        };
        // The pipeline decides; while it holds the peer back, nothing more is read.
        let mut offer = Offer::new(msg, arrived);
        let msg = loop {
            match self.admission.uplink(offer, Instant::now()) {
                Verdict::Forward(msg) => break msg,
                Verdict::Wait(again, at) => {
                    tokio::time::sleep_until(at.into()).await;
                    offer = again;
                }
                Verdict::Divert(forensic) => {
                    let Some(uplink) = &self.link else {
                        return Err(End::BrokerGone);
                    };
                    uplink.send(forensic).await.map_err(|_| End::BrokerGone)?;
                    if p.qos > 0 {
                        self.answer_publish(p.pkid, p.qos, reason::SUCCESS, out);
                    }
                    return Ok(());
                }
                // Dropped (quarantine, or the rate limit's "drop"): acknowledged as if
                // delivered, so the device does not retry.
                Verdict::Discard(_) => {
                    if p.qos > 0 {
                        self.answer_publish(p.pkid, p.qos, reason::SUCCESS, out);
                    }
                    return Ok(());
                }
                Verdict::Refuse(refusal) => return self.refuse_publish(&p, refusal, out),
                Verdict::Disconnect(_) => {
                    return Err(End::Protocol(
                        reason::MESSAGE_RATE_TOO_HIGH,
                        "message rate too high for too long".into(),
                    ));
                }
            }
        };
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        // The acknowledgement waits for the broker, in its own queue: never behind
        // deliveries held by the peer's Receive Maximum.
        let Some(uplink) = &self.link else {
            return Err(End::BrokerGone);
        };
        if p.qos == 0 {
            uplink.send(msg).await.map_err(|_| End::BrokerGone)?;
        } else {
            let acked = uplink.send_acked(msg).await.map_err(|_| End::BrokerGone)?;
            self.pending_acks.push_back(PendingAck {
                pkid: p.pkid,
                qos: p.qos,
                code: reason::SUCCESS,
                rx: Some(acked),
            });
        }
        ctx.metrics.forward_latency.record(arrived.elapsed());
        Ok(())
    }

    async fn on_subscribe(
        &mut self,
        ctx: &Context,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        identifier: Option<u32>,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        if filters.len() > ctx.limits.max_subscribe_filters {
            ctx.metrics.refused(Refusal::TooManyFilters);
            let codes = vec![Err(reason::QUOTA_EXCEEDED); filters.len()];
            codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
            return Ok(());
        }
        let service = ctx.kind == PrincipalKind::Service;
        let mut codes = Vec::with_capacity(filters.len());
        // Per accepted filter, its place in `codes`.
        let mut accepted: Vec<(usize, Subscription)> = Vec::new();
        let mut retained = Vec::new();
        for f in filters {
            let key = match SubscriptionKey::parse(&f.path, ctx.limits.topic, service) {
                Ok(k) => k,
                Err(e) => {
                    ctx.metrics.refused(Refusal::FilterInvalid);
                    self.audit_refusal(ctx, "subscribe", Some(&f.path), &e.to_string());
                    // Devices are told shares do not exist for them (CONNACK said so).
                    let code = if !service && f.path.starts_with("$share/") {
                        reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
                    } else {
                        reason::TOPIC_FILTER_INVALID
                    };
                    codes.push(Err(code));
                    continue;
                }
            };
            // MQTT 5: No Local on a shared subscription is a protocol error.
            if key.share.is_some() && f.no_local {
                return Err(End::Protocol(
                    reason::PROTOCOL_ERROR,
                    "No Local set on a shared subscription".into(),
                ));
            }
            // A shared subscription is authorized by its filter, like any other.
            if self
                .admission
                .admit_subscription(&key.filter, &f.path, Instant::now())
                .is_err()
            {
                codes.push(Err(reason::NOT_AUTHORIZED));
                continue;
            }
            // A filter the session holds (or that this SUBSCRIBE already added) only
            // changes options: it costs neither room nor rate.
            let is_new =
                !self.state.has_subscription(&key) && !accepted.iter().any(|(_, s)| s.key == key);
            let held = self.state.subscriptions().len()
                + accepted
                    .iter()
                    .filter(|(_, s)| !self.state.has_subscription(&s.key))
                    .count();
            let now = Instant::now();
            let over = if !is_new {
                None
            } else if held >= ctx.limits.max_subscriptions {
                Some((Refusal::TooManySubscriptions, true))
            } else if self.subscribes.take(1.0, now).is_err() {
                // Audited at most once a second: a churner is counted, not transcribed.
                let due = self
                    .subscribe_rate_audited
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
                if due {
                    self.subscribe_rate_audited = Some(now);
                }
                Some((Refusal::SubscribeRate, due))
            } else {
                None
            };
            if let Some((refusal, audit)) = over {
                ctx.metrics.refused(refusal);
                if audit {
                    self.audit_refusal(ctx, "subscribe", Some(&f.path), refusal.detail());
                }
                codes.push(Err(reason::QUOTA_EXCEEDED));
                continue;
            }
            let granted = QoS::from_u8(f.qos).unwrap_or(QoS::AtMostOnce);
            let options = SubscriptionOptions {
                qos: granted,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                retain_handling: RetainHandling::from_u8(f.retain_handling).unwrap_or_default(),
                identifier,
            };
            let sub = Subscription { key, options };
            if !service {
                let existed = self.state.has_subscription(&sub.key);
                let send = match options.retain_handling {
                    RetainHandling::OnSubscribe => true,
                    RetainHandling::OnNewSubscription => !existed,
                    RetainHandling::Never => false,
                };
                if send {
                    retained.extend(ctx.retained.matching(&self.principal().id, &sub.key.filter));
                }
            }
            codes.push(Ok(granted as u8));
            accepted.push((codes.len() - 1, sub));
        }
        if service && !accepted.is_empty() {
            // SUBACK once the fan-out has the subscriptions (and has queued the
            // retained messages they asked for, which follow the SUBACK): nothing
            // published after the SUBACK can miss them.
            let subs = accepted.iter().map(|(_, s)| s.clone()).collect();
            let added = ctx
                .forwarder
                .subscribe(self.principal().id.clone(), subs)
                .await
                .map_err(|_| End::BrokerGone)?;
            for ((at, sub), added) in accepted.into_iter().zip(added) {
                match added {
                    Ok(_) => {
                        self.state.subscribe(sub);
                    }
                    Err(e) => {
                        ctx.metrics.refused(Refusal::SubscriptionsFull);
                        let filter = sub.key.to_string();
                        self.audit_refusal(ctx, "subscribe", Some(&filter), &e.to_string());
                        codes[at] = Err(reason::QUOTA_EXCEEDED);
                    }
                }
            }
        } else {
            for (_, sub) in accepted {
                self.state.subscribe(sub);
            }
        }
        codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
        // A device's retained commands follow the SUBACK, through the mailbox like any
        // command.
        let now = Instant::now();
        for m in retained {
            if let Err(overflow) = self.state.mailbox.push(Delivery::from(m), now) {
                Metrics::inc(&ctx.metrics.queue_overflow);
                self.audit_refusal(ctx, "queue", None, overflow.as_str());
            }
        }
        Ok(())
    }

    /// A message for this peer: through the pipeline, then out (or into the inflight
    /// window's wait).
    fn deliver(&mut self, ctx: &Context, d: Delivery, out: &mut BytesMut) {
        if self.admission.may_receive(&d.message).is_err() {
            return;
        }
        // A service's fan-out already applied its subscriptions; a device's commands
        // are matched here.
        let qos = match ctx.kind {
            PrincipalKind::Service => d.message.qos,
            PrincipalKind::Device => match self.state.delivery_qos(&d) {
                Some(q) => q,
                None => return,
            },
        };
        let before = out.len();
        let send = self.state.start(d, qos);
        let defined = self.encode_send(&send, out);
        // MQTT 5: never send a packet larger than the client said it accepts; such a
        // message is dropped as if delivered (and an alias it would have defined is
        // not).
        if out.len() - before > self.peer_max_packet {
            out.truncate(before);
            if let Some(topic) = defined {
                self.out_aliases.remove(&topic);
            }
            if let Outbound::Publish { pkid, .. } = send
                && qos != QoS::AtMostOnce
            {
                self.state.abandon(pkid);
            }
            ctx.metrics.refused(Refusal::OverClientMaximumPacketSize);
            return;
        }
        Metrics::inc(&ctx.metrics.messages_delivered);
        self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
    }
}

/// The MQTT 5 reason code that tells a publisher why its message was refused.
fn publish_code(refusal: Refusal) -> u8 {
    match refusal {
        Refusal::TopicForbiddenCharacter
        | Refusal::ResponseTopicInvalid
        | Refusal::UnknownDevice
        | Refusal::TopicInvalid => reason::TOPIC_NAME_INVALID,
        r if r.stage() == Stage::Validate => reason::PAYLOAD_FORMAT_INVALID,
        r if r.stage() == Stage::Limit => reason::QUOTA_EXCEEDED,
        Refusal::Quarantined => reason::SUCCESS,
        _ => reason::NOT_AUTHORIZED,
    }
}

/// An acknowledgement owed to the peer.
struct PendingAck {
    pkid: u16,
    qos: u8,
    code: u8,
    /// Fires when the broker has the message; `None` when nothing is awaited.
    rx: Option<oneshot::Receiver<()>>,
}

/// Resolves when the oldest owed acknowledgement may go out.
async fn front_ack(
    pending: &mut VecDeque<PendingAck>,
) -> Option<Result<(), oneshot::error::RecvError>> {
    match pending.front_mut() {
        Some(PendingAck { rx: Some(rx), .. }) => Some(rx.await),
        Some(PendingAck { rx: None, .. }) => Some(Ok(())),
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown is signalled (without holding the watch's guard).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
