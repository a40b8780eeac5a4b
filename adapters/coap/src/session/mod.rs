//! CoAP sessions: one per DTLS session (or plain CoAP session on loopback, see
//! `plain`), from the handshake to its end, through the core's pipeline.
//!
//! The dispatcher (`serve`) reads the DTLS endpoint's events: a completed handshake
//! starts a session task, a datagram goes to its session, a failed handshake is a
//! failed login (back-off, audit, alert). A session is keyed by its DTLS session, not
//! the address alone: a device whose NAT mapping changed handshakes again from its new
//! address, takes its identity's earlier session over, and resumes what it held (its
//! queued commands and its Observe relation).
//!
//! A session authenticates the identity the handshake proved (method `psk`), registers
//! with the core (`peer::Lifecycle`), and then reads CoAP into the core's model:
//! `POST /t/{path}` is a message to `devices/{id}/{path}` offered to `Admission`;
//! `GET /c` with Observe, and `?ttd=N` on a telemetry POST, take the device's commands
//! from its mailbox through the downlink gates. The CoAP duties coap-lite leaves to us
//! live in `exchange` (deduplication, Block1) and `downlink` (our confirmable
//! messages and their retransmission).

use crate::dtls::{self, Endpoint, Event, Proof};
use portcullis_core::admission::{self, Admission, Live, Peer};
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::auth::{AuthRefusal, Authenticator, Credential, Credentials};
use portcullis_core::auth_alert;
use portcullis_core::device_session::{DeviceState, Opened, Opener};
use portcullis_core::forward::Forwarder;
use portcullis_core::limit::GlobalBucket;
use portcullis_core::mailbox::{Mailbox, MailboxLimits};
use portcullis_core::metrics::Metrics;
use portcullis_core::parking::{Parked, ParkedSessions, Slot};
use portcullis_core::peer::{Closed, Lifecycle, Protocol, catch_unwind};
use portcullis_core::principal::PrincipalKind;
use portcullis_core::quarantine::Behaviours;
use portcullis_core::refusal::Refusal;
use portcullis_core::retained::RetainedCommands;
use portcullis_core::sessions::{KickReason, SessionGuard, Sessions};
use portcullis_core::topic::TopicLimits;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedMutexGuard, watch};

mod downlink;
mod exchange;
mod inbox;

use exchange::{End, Session};
use inbox::Input;

/// Datagrams waiting for one session; beyond it they are dropped (CoAP retransmits).
const INPUT_QUEUE: usize = 64;

/// The CoAP layer's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub topic: TopicLimits,
    /// A device's command mailbox.
    pub mailbox: MailboxLimits,
    /// Largest request body, whole or reassembled from Block1 blocks.
    pub max_body_size: usize,
    /// How long a device's commands and Observe relation outlive its session.
    pub session_expiry: Duration,
    /// Longest `?ttd=N` wait granted.
    pub max_ttd: Duration,
    /// Responses kept per session to answer retransmitted requests.
    pub dedup_entries: usize,
    /// ACK_TIMEOUT of our confirmable messages (RFC 7252 §4.8).
    pub ack_timeout: Duration,
}

/// What every CoAP session shares.
pub struct Context {
    /// The settings a configuration reload replaces; each session watches it.
    pub live: watch::Receiver<Arc<Live>>,
    pub global: Arc<GlobalBucket>,
    pub auth: Arc<Authenticator>,
    pub forwarder: Arc<dyn Forwarder>,
    pub sessions: Arc<Sessions>,
    /// What a device's session leaves for its next one.
    pub parked: Arc<ParkedSessions<CoapState>>,
    pub retained: Arc<RetainedCommands>,
    pub behaviours: Arc<Behaviours>,
    /// What every admission shares (one `Arc` a session rather than six).
    pub shared: Arc<admission::Shared>,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
}

impl Context {
    fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            sessions: self.sessions.clone(),
            auth: self.auth.clone(),
            behaviours: self.behaviours.clone(),
            metrics: self.metrics.clone(),
            audit: self.audit.clone(),
        }
    }
}

/// An Observe relation on `/c`: the token the device registered with, and the
/// sequence number of the next notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observer {
    pub token: Vec<u8>,
    pub seq: u32,
}

/// What a device's CoAP session keeps between DTLS sessions.
#[derive(Debug)]
pub struct CoapState {
    pub mailbox: Arc<Mailbox>,
    pub observer: Option<Observer>,
    /// The registration it belongs to (a device removed and added again starts anew).
    pub registered: u64,
    /// Its rate limits as the last session left them (a new session for each message
    /// gets no fresh burst).
    pub buckets: Option<Box<admission::Buckets>>,
    /// Commands awaiting the result the device may post.
    pub responses: downlink::Responses,
}

impl Parked for CoapState {
    fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }
}

impl DeviceState for CoapState {
    fn fresh(mailbox: Arc<Mailbox>, registered: u64) -> Self {
        CoapState {
            mailbox,
            observer: None,
            registered,
            buckets: None,
            responses: downlink::Responses::default(),
        }
    }

    fn registered(&self) -> u64 {
        self.registered
    }

    fn buckets(&mut self) -> &mut Option<Box<admission::Buckets>> {
        &mut self.buckets
    }
}

/// One DTLS session: where a CoAP session sends and what it closes (never a later
/// session at the same address).
#[derive(Clone)]
pub(crate) struct Link {
    sender: dtls::Sender,
    pub(crate) peer: SocketAddr,
    session: u64,
    /// Plain CoAP: no standing Observe relation (a port the device's client left could
    /// be bound by another local process, which would receive its notifications).
    pub(crate) plain: bool,
}

impl Link {
    pub(crate) fn send(&self, bytes: Vec<u8>) {
        self.sender.send(self.peer, self.session, bytes);
    }

    pub(crate) fn close(&self) {
        self.sender.close(self.peer, self.session);
    }
}

/// Run the CoAP layer over a bound DTLS endpoint until the gateway stops.
pub async fn serve(ctx: Arc<Context>, endpoint: Endpoint) {
    let Endpoint {
        sender, mut events, ..
    } = endpoint;
    let mut peers: HashMap<SocketAddr, (u64, inbox::Sender)> = HashMap::new();
    // Entries of sessions that ended on their own are dropped when the map has doubled
    // since it was last pruned (the endpoint's Closed removes the others).
    let mut prune_at = 64;
    // A reload rings every session (an idle one holds no watch of its own).
    let mut live = ctx.live.clone();
    live.mark_unchanged();
    let mut live_open = true;
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => break,
            },
            changed = live.changed(), if live_open => {
                match changed {
                    Ok(()) => {
                        live.mark_unchanged();
                        for (_, tx) in peers.values() {
                            tx.ring();
                        }
                    }
                    Err(_) => live_open = false,
                }
                continue;
            }
        };
        match event {
            Event::Connected {
                peer,
                identity,
                session,
                proof,
            } => {
                let link = Link {
                    sender: sender.clone(),
                    peer,
                    session,
                    plain: matches!(proof, Proof::Secret(_)),
                };
                // After shutdown no session starts: the device hears close_notify.
                if *ctx.shutdown.borrow() {
                    link.close();
                    continue;
                }
                if peers.len() >= prune_at {
                    peers.retain(|_, (_, tx)| !tx.is_closed());
                    prune_at = (peers.len() * 2).max(64);
                }
                let (tx, rx) = inbox::inbox(INPUT_QUEUE);
                peers.insert(peer, (session, tx));
                tokio::spawn(run(Box::new(Start {
                    ctx: ctx.clone(),
                    link,
                    identity,
                    proof,
                    rx,
                })));
            }
            Event::Data { peer, data } => {
                if let Some((_, tx)) = peers.get(&peer) {
                    match tx.try_send(Input::Datagram(data)) {
                        Ok(()) => {}
                        Err(inbox::Refused::Full) => {
                            Metrics::inc(&ctx.metrics.coap.dropped_busy);
                        }
                        // Its session is over but the DTLS session lives on (its close
                        // was lost): close it again.
                        Err(inbox::Refused::Closed) => {
                            if let Some((session, _)) = peers.remove(&peer) {
                                sender.close(peer, session);
                            }
                        }
                    }
                }
            }
            Event::Closed { peer, why } => match peers.remove(&peer) {
                Some((_, tx)) => {
                    // The session ends when its input does; the reason is a courtesy.
                    let _ = tx.try_send(Input::Closed(Box::new(why)));
                }
                None => handshake_failed(&ctx, peer, &why),
            },
        }
    }
}

/// A handshake that failed or stalled is a failed login for the identity it claimed:
/// back-off, the alert on failures naming a device, counted and audited. A wrong key
/// and an unknown identity are told apart only here (the peer saw the same failure).
fn handshake_failed(ctx: &Context, peer: SocketAddr, why: &dtls::Closed) {
    let identity = match why {
        dtls::Closed::HandshakeFailed { identity }
        | dtls::Closed::HandshakeTimeout { identity } => identity,
        _ => return,
    };
    Metrics::inc(&ctx.metrics.handshake_failures);
    let Some(identity) = identity else {
        ctx.metrics.refused(Refusal::TlsHandshakeFailed);
        return;
    };
    let claimed = match portcullis_core::principal::PrincipalId::parse(identity) {
        Ok(id) if ctx.auth.group_of(PrincipalKind::Device, &id).is_some() => AuthRefusal::BadSecret,
        _ => AuthRefusal::Unknown,
    };
    let refusal = ctx
        .auth
        .refuse_early(identity, claimed, peer.ip(), Instant::now());
    let detail = match why {
        dtls::Closed::HandshakeTimeout { .. } => "DTLS handshake not finished in time",
        _ => "DTLS handshake failed (wrong key or unknown identity)",
    };
    refuse(ctx, peer, identity, refusal, detail);
}

/// How long a kicked session may take to answer what it owes before it is cut off.
const KICK_GRACE: Duration = Duration::from_secs(1);

/// What a session's task starts from (boxed: the task keeps its arguments' room for
/// its whole life).
struct Start {
    ctx: Arc<Context>,
    link: Link,
    identity: String,
    proof: Proof,
    rx: inbox::Receiver,
}

/// One DTLS session's CoAP life.
async fn run(start: Box<Start>) {
    let Start {
        ctx,
        link,
        identity,
        proof,
        mut rx,
    } = *start;
    // The set-up's state is boxed and freed once done: an idle session's task holds
    // only what serving needs.
    let Some(running) = Box::pin(set_up(&ctx, link, identity, proof, &mut rx)).await else {
        return;
    };
    let Running {
        mut session,
        guard,
        mut slot,
        live,
    } = *running;
    // A kick rings the session (its loop holds no kick future of its own while idle).
    let bell = rx.bell();
    guard.kicked.on_kick(Box::new(move || bell.ring()));
    let end = {
        let serving = std::pin::pin!(session.serve(&ctx, live, rx, guard.kicked.clone()));
        match catch_unwind(serving).await {
            Ok(end) => end,
            Err(why) => End::Internal(why),
        }
    };
    let link = session.link().clone();
    if let End::Internal(why) = &end {
        tracing::error!(peer = %link.peer, error = %why, "CoAP session failed; its state is kept");
    }
    // The DTLS session ends with the CoAP one (a device that comes back handshakes).
    if !matches!(end, End::Dtls(_)) {
        link.close();
    }
    ctx.lifecycle().closed(
        session.admission(),
        &Closed {
            why: end.describe(),
            taken_over: matches!(end, End::Kicked(KickReason::TakenOver)),
            broke_protocol: false,
        },
    );
    let mut state = session.finish();
    state.buckets = Some(Box::new(session.admission().buckets()));
    if matches!(
        end,
        End::Kicked(KickReason::Removed | KickReason::Disabled | KickReason::Banned)
    ) {
        state.mailbox.clear();
        let id = session.admission().peer().principal.id.clone();
        ctx.forwarder
            .unregister_device(id, state.mailbox.clone())
            .await;
    } else {
        slot.park(state, Instant::now() + ctx.limits.session_expiry);
    }
    drop(slot);
    drop(guard);
}

/// A session set up: what serving it and ending it need.
struct Running {
    session: Box<Session>,
    guard: SessionGuard,
    slot: OwnedMutexGuard<Slot<CoapState>>,
    live: watch::Receiver<Arc<Live>>,
}

/// Authenticate the identity the handshake proved, register it, take its parked
/// state, and open the session; `None` if it is refused or taken over meanwhile (the
/// DTLS session closed).
async fn set_up(
    ctx: &Arc<Context>,
    link: Link,
    identity: String,
    proof: Proof,
    rx: &mut inbox::Receiver,
) -> Option<Box<Running>> {
    let peer = link.peer;
    // Watched from here: a reload from now on is applied by the session.
    let mut live_rx = ctx.live.clone();
    let live = live_rx.borrow_and_update().clone();
    let now = Instant::now();
    let creds = Credentials {
        id: &identity,
        presented: vec![match &proof {
            Proof::PreSharedKey => Credential::PreSharedKey,
            Proof::Secret(secret) => Credential::Secret(secret),
        }],
    };
    let authenticated = ctx
        .auth
        .authenticate(PrincipalKind::Device, &creds, peer.ip(), now);
    // The secret is not kept past its check.
    drop(creds);
    drop(proof);
    let authed = match authenticated {
        Ok(authed) => authed,
        Err(refusal) => {
            refuse(ctx, peer, &identity, refusal, "authentication refused");
            // A DTLS peer hears the close; a plain one's request is answered 4.01.
            if link.plain {
                unauthorized(&link, rx).await;
            }
            link.close();
            return None;
        }
    };
    let principal = authed.principal.clone();
    let admission = Admission::new(
        Peer {
            principal: principal.clone(),
            source: peer,
            protocol: Protocol::Coap,
        },
        live.rules(&principal, authed.acl.clone(), &ctx.behaviours),
        ctx.shared.clone(),
        now,
    );
    // Registering ends an earlier session of the same identity (take-over), whatever
    // protocol it speaks.
    let lifecycle = ctx.lifecycle();
    let opener = Opener {
        lifecycle: &lifecycle,
        parked: &ctx.parked,
        forwarder: ctx.forwarder.as_ref(),
        shutdown: &ctx.shutdown,
        mailbox: ctx.limits.mailbox,
        expiry: ctx.limits.session_expiry,
    };
    let Ok(Opened {
        admission,
        guard,
        slot,
        mut state,
        uplink,
        resumed,
    }) = opener
        .open(admission, authed.generation, authed.method)
        .await
    else {
        link.close();
        return None;
    };
    if link.plain {
        state.observer = None;
    }
    lifecycle.opened(
        &admission,
        &guard,
        authed.method,
        if resumed { ", session resumed" } else { "" },
    );
    let session = Box::new(Session::new(
        ctx,
        link,
        admission,
        uplink,
        state,
        guard.stats.clone(),
    ));
    Some(Box::new(Running {
        session,
        guard,
        slot,
        live: live_rx,
    }))
}

/// Answer a plain CoAP device's first request (queued behind its session's start)
/// 4.01: its id and secret were refused.
async fn unauthorized(link: &Link, rx: &mut inbox::Receiver) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    // A bell (a reload, a kick) may come first.
    let d = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Input::Datagram(d))) => break d,
            Ok(Some(Input::Bell)) => continue,
            _ => return,
        }
    };
    if let Ok(crate::message::Incoming::Request(r)) = crate::message::parse(&d) {
        let reply = crate::reply::Reply::refusal(
            coap_lite::ResponseType::Unauthorized,
            "authentication refused",
        );
        // A non-confirmable answer has an id of its own.
        let own_id = r.message_id.wrapping_add(0x8000);
        link.send(reply.answer(&crate::reply::Exchange::of(&r), own_id));
    }
}

/// A login refused, in its handshake or after it (backed off, banned, disabled, ...):
/// counted, audited with `detail`, and told to the alert on failures naming a device.
fn refuse(ctx: &Context, peer: SocketAddr, identity: &str, refusal: AuthRefusal, detail: &str) {
    ctx.metrics.refused(Refusal::from(refusal));
    ctx.audit.record(
        AuditEntry::new("connect", "refuse")
            .source(peer)
            .protocol(Protocol::Coap.as_str())
            .principal("device", identity.chars().take(128).collect::<String>())
            .reason(format!("{}: {detail}", refusal.label())),
    );
    auth_alert::note_device_failure(
        &ctx.auth,
        &ctx.metrics,
        &ctx.audit,
        ctx.forwarder.as_ref(),
        identity,
        refusal,
        peer,
    );
}
