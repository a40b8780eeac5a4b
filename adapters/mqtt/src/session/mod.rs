//! One MQTT connection, from CONNECT to close: decode, ask the core, encode.
//!
//! Frames are read with a deadline and decoded once (`strict`, through the codec); the
//! core's admission decides on every message and the session answers the MQTT way. The
//! session ends when the peer goes silent, the gateway kicks it, or it misbehaves.
//! State that outlives a connection (subscriptions, unacknowledged messages, the
//! mailbox) lives in `state` and is parked (`portcullis_core::parking`) in between.
//!
//! This file is the connection's life (CONNECT to close); `connect` authenticates,
//! `driver` runs the loop, `publish`, `subscribe` and `deliver` handle the traffic, and
//! `end` says how it ended and what is left behind.

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
use portcullis_core::fanout::SubscribeError;
use portcullis_core::forward::{Forwarder, Taken, Uplink};
use portcullis_core::limit::{GlobalBucket, Rate, TokenBucket};
use portcullis_core::mailbox::{Delivery, Mailbox, MailboxLimits};
use portcullis_core::message::{Message, Properties, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::peer::{Closed, Ended, Lifecycle, Protocol, until_kicked};
use portcullis_core::principal::{PrincipalKind, PrincipalRef};
use portcullis_core::quarantine::Behaviours;
use portcullis_core::refusal::{Refusal, Stage};
use portcullis_core::retained::RetainedCommands;
use portcullis_core::sessions::{KickReason, Kicked, SessionStats, Sessions};
use portcullis_core::subscription::{
    RetainHandling, Subscription, SubscriptionKey, SubscriptionOptions,
};
use portcullis_core::topic::{TopicLimits, TopicName};
use rustls::pki_types::CertificateDer;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedMutexGuard, oneshot, watch};

mod connect;
mod deliver;
mod driver;
mod end;
mod publish;
mod step;
mod subscribe;
#[cfg(test)]
mod tests;

use connect::{Will, authenticate, carried, properties, refuse_connect, rules};
use deliver::FLUSH_AT;
use driver::{FrameReader, READ_MIN, ReadError};
use end::End;
use publish::{PendingAck, front_ack};
use step::{Forward, Held, Step, Subscribing, Why};

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

pub use portcullis_core::admission::Live;

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
    /// What every admission shares (one `Arc` a session rather than six).
    pub shared: Arc<admission::Shared>,
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

/// Refuse a login: the peer is told (a CONNACK with `code`), then the refusal is counted
/// and audited with the id it claimed.
async fn refuse_login<W: AsyncWrite + Unpin>(
    wr: &mut W,
    ctx: &Context,
    (version, code): (ProtocolVersion, u8),
    peer: SocketAddr,
    client_id: &str,
    refusal: Refusal,
    detail: &str,
) {
    refusal_connack(wr, code, version, ctx.limits.write_timeout).await;
    refuse_connect(ctx, peer, Some(client_id), refusal, detail);
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
        refuse_login(
            &mut wr,
            &ctx,
            (version, reason::BAD_AUTH_METHOD),
            peer,
            &connect.client_id,
            Refusal::AuthMethodUnsupported,
            "enhanced authentication is not supported",
        )
        .await;
        return;
    }
    let mut session = match authenticate(&ctx, &connect, version, peer, certs.as_deref()) {
        Ok(s) => s,
        Err(refusal) => {
            refuse_login(
                &mut wr,
                &ctx,
                (version, reason::NOT_AUTHORIZED),
                peer,
                &connect.client_id,
                refusal,
                "authentication refused",
            )
            .await;
            let _ = tokio::time::timeout(ctx.limits.write_timeout, wr.shutdown()).await;
            return;
        }
    };
    pre_auth.authenticated();
    // Registering ends an earlier session of the same identity (take-over).
    let lifecycle = ctx.lifecycle();
    let guard = match lifecycle.register(&session.admission, session.generation, session.method) {
        Ok(guard) => guard,
        Err(refusal) => {
            refuse_login(
                &mut wr,
                &ctx,
                (version, reason::NOT_AUTHORIZED),
                peer,
                &connect.client_id,
                refusal,
                "registry changed during authentication",
            )
            .await;
            return;
        }
    };
    session.stats = guard.stats.clone();
    // The session's slot: wait for a taken-over connection to put the state back.
    let slot = ctx.store.slot(&session.principal().id);
    let Ok(mut slot) = tokio::time::timeout(Duration::from_secs(5), slot.lock_owned()).await else {
        refuse_login(
            &mut wr,
            &ctx,
            (version, reason::SERVER_BUSY),
            peer,
            &connect.client_id,
            Refusal::SessionBusy,
            "previous session did not end",
        )
        .await;
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
        // Gone on disk too, whether or not this connection gets further.
        ctx.store.forget(&session.principal().id);
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
            let expires_at = now + Duration::from_secs(u64::from(session.expiry));
            ctx.store
                .park(&session.principal().id, &mut slot, state, expires_at);
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
    // Kept on disk while it lasts (what it subscribed to), or forgotten.
    if session.expiry > 0 {
        session.keep(&ctx);
    } else {
        ctx.store.forget(&session.principal().id);
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
    let kicked = guard.kicked.clone();
    // Every write has a deadline, this one too: a resumed session's resend can be
    // megabytes, and a peer holding the credential may never read it.
    let work = async {
        match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => {
                session
                    .serve(&ctx, &mut reader, &mut rd, &mut wr, &kicked)
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
                let code = match pending.rx {
                    Some(rx) => match rx.await {
                        Ok(Taken::Yes) => Some(pending.code),
                        Ok(Taken::Full) if version == ProtocolVersion::V5 => {
                            Some(reason::QUOTA_EXCEEDED)
                        }
                        _ => None,
                    },
                    None => Some(pending.code),
                };
                if let Some(code) = code {
                    session.ack_publish(pending.pkid, pending.qos, code, &mut out);
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
    /// A publish was refused for a full outbox since the last one acknowledged (one
    /// audit line per run of such refusals).
    refused_full: bool,
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

impl Session {
    fn principal(&self) -> &PrincipalRef {
        &self.admission.peer().principal
    }

    /// Keep what a persistent session holds now on disk (a live record: its
    /// subscriptions), if sessions are kept.
    fn keep(&self, ctx: &Context) {
        if self.expiry > 0 && ctx.store.persistent() {
            let expiry = Duration::from_secs(u64::from(self.expiry));
            ctx.store.live(&self.principal().id, &self.state, expiry);
        }
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
}

/// Resolves once shutdown is signalled (without holding the watch's guard).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
