//! A serial device's session, through the core's pipeline: from the first fresh,
//! authenticated frame its bus hears from it until its port closes or the gateway ends
//! it (a kick: removed, disabled, banned, taken over, shut down).
//!
//! A session authenticates the identity its frame's tag proved (method `frame_key`),
//! registers with the core (`peer::Lifecycle`) and reads frames into the core's model:
//!
//! - **DATA up** is a message to `devices/{id}/{suffix}` offered to `Admission`. It is
//!   acknowledged (ACK carrying its counter) once the forwarder has it, or refused with
//!   a NAK naming why: not authorized, rate limited, invalid, too large, busy. A
//!   quarantined device's frames are acknowledged as if delivered, as MQTT and CoAP
//!   answer its messages.
//! - **Commands** for the device come from its mailbox through the downlink gates (the
//!   quarantine hold, its command rate, its receive ACL) and go down as DATA frames,
//!   one at a time, each sent again after `serial.ack_timeout` up to
//!   `serial.max_retransmits` times until the device acknowledges it. A command never
//!   acknowledged goes back to the mailbox, and the device is not written to again
//!   until it is heard from.
//!
//! The bus owns the port, the counters and the keys: a session asks it to write.

use crate::bus::Context;
use bytes::Bytes;
use portcullis_core::admission::{self, Admission, Live, NextCommand, Offer, Peer, Verdict};
use portcullis_core::audit::AuditEntry;
use portcullis_core::auth::{Credential, Credentials};
use portcullis_core::device_session::{DeviceState, NotOpened, Opened, Opener};
use portcullis_core::forward::{Taken, Uplink};
use portcullis_core::mailbox::{Delivery, Mailbox};
use portcullis_core::message::{Message, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::parking::{Parked, Slot};
use portcullis_core::peer::{Closed, Ended, Lifecycle, Protocol, catch_unwind, until_kicked};
use portcullis_core::principal::{PrincipalId, PrincipalKind};
use portcullis_core::refusal::{Refusal, Stage};
use portcullis_core::sessions::{KickReason, Kicked, SessionGuard, SessionStats};
use portcullis_serial_frame::NakReason;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot, watch};

/// Frames waiting for one session; beyond it they are dropped (the device sends again).
pub(crate) const INPUT_QUEUE: usize = 64;
/// Frames whose message is with the forwarder at once, at most; beyond it a frame is
/// refused busy.
const MAX_PENDING: usize = 16;
/// How long a kicked session may take to finish the frame it is on.
const KICK_GRACE: Duration = Duration::from_secs(1);
/// A wait of the pipeline this short is waited out rather than refused: the
/// gateway-wide cap's turn, not the device's being over its own rate.
const SHORT_WAIT: Duration = Duration::from_millis(10);

/// What the bus hands a device's session: its fresh, authenticated frames.
#[derive(Debug)]
pub(crate) enum Input {
    Data {
        counter: u64,
        suffix: String,
        payload: Vec<u8>,
    },
    Ack {
        counter: u64,
    },
    Nak {
        counter: u64,
        reason: NakReason,
    },
    /// The port closed (vanished, or the gateway stops).
    PortClosed,
}

/// Why a command could not be written.
#[derive(Debug)]
pub(crate) enum Unsent {
    /// It cannot be a frame (the named rule): it is dropped.
    Unencodable(&'static str),
    /// Not now (no key, the counter store, the port): it waits in the mailbox.
    Unavailable,
}

/// What a session asks its bus to write.
#[derive(Debug)]
pub(crate) enum Down {
    /// Answer the device's frame `counter`: ACK, or NAK with a reason.
    Answer {
        id: PrincipalId,
        counter: u64,
        nak: Option<NakReason>,
    },
    /// A command; the bus answers with the counter it got and the bytes it wrote.
    Command {
        id: PrincipalId,
        suffix: String,
        payload: Bytes,
        sent: oneshot::Sender<Result<(u64, Vec<u8>), Unsent>>,
    },
    /// A command's bytes again (the same counter: a device that took it answers again).
    Again(Vec<u8>),
}

/// What a device's serial session leaves for its next one.
#[derive(Debug)]
pub struct SerialState {
    pub mailbox: Arc<Mailbox>,
    /// The registration it belongs to (a device removed and added again starts anew).
    pub registered: u64,
    /// Its rate limits as the last session left them.
    pub buckets: Option<Box<admission::Buckets>>,
}

impl Parked for SerialState {
    fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }
}

impl DeviceState for SerialState {
    fn fresh(mailbox: Arc<Mailbox>, registered: u64) -> Self {
        SerialState {
            mailbox,
            registered,
            buckets: None,
        }
    }

    fn registered(&self) -> u64 {
        self.registered
    }

    fn buckets(&mut self) -> &mut Option<Box<admission::Buckets>> {
        &mut self.buckets
    }
}

/// Where a session's device is and how to write to it.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) id: PrincipalId,
    /// The address the core knows the device by (see `bus::source`).
    pub(crate) source: SocketAddr,
    /// The port's path, for the audit.
    pub(crate) path: Arc<str>,
    pub(crate) down: mpsc::Sender<Down>,
}

impl Link {
    async fn answer(&self, counter: u64, nak: Option<NakReason>) -> Result<(), End> {
        self.down
            .send(Down::Answer {
                id: self.id.clone(),
                counter,
                nak,
            })
            .await
            .map_err(|_| End::PortClosed)
    }
}

/// Start a session for the device of `link`; frames for it go to the sender returned.
pub(crate) fn spawn(ctx: Arc<Context>, link: Link) -> mpsc::Sender<Input> {
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    tokio::spawn(run(ctx, link, rx));
    tx
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum End {
    PortClosed,
    Kicked(KickReason),
    /// Over its rate for too long (`rate_limits` action "disconnect").
    RateTooHigh,
    BrokerGone,
    /// The session's own code failed (a panic, contained).
    Internal(String),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::PortClosed => "serial port closed".into(),
            End::Kicked(reason) => reason.as_str().into(),
            End::RateTooHigh => "message rate too high for too long".into(),
            End::BrokerGone => "broker link closed".into(),
            End::Internal(why) => format!("internal error: {why}"),
        }
    }
}

async fn run(ctx: Arc<Context>, link: Link, mut rx: mpsc::Receiver<Input>) {
    let Some((mut session, guard, mut slot, live)) = set_up(&ctx, &link, &mut rx).await else {
        // Refused (and told for a while), or ended before it began: what came since
        // is sent again, to the device's next session.
        answer_the_rest(&ctx, &link, &mut rx, NakReason::Busy).await;
        return;
    };
    let end = {
        let serving = std::pin::pin!(session.serve(&ctx, live, &mut rx, guard.kicked.clone()));
        match catch_unwind(serving).await {
            Ok(end) => end,
            Err(why) => End::Internal(why),
        }
    };
    if let End::Internal(why) = &end {
        tracing::error!(device = %link.id, error = %why, "serial session failed; its state is kept");
    }
    lifecycle(&ctx).closed(
        &session.admission,
        &Closed {
            why: end.describe(),
            taken_over: matches!(end, End::Kicked(KickReason::TakenOver)),
            broke_protocol: false,
        },
    );
    let now = Instant::now();
    if let Some(o) = session.outstanding.take() {
        session
            .state
            .mailbox
            .put_back(VecDeque::from([o.delivery]), now);
    }
    let state = SerialState {
        mailbox: session.state.mailbox.clone(),
        registered: session.state.registered,
        buckets: Some(Box::new(session.admission.buckets())),
    };
    if matches!(
        end,
        End::Kicked(KickReason::Removed | KickReason::Disabled | KickReason::Banned)
    ) {
        state.mailbox.clear();
        ctx.forwarder
            .unregister_device(link.id.clone(), state.mailbox.clone())
            .await;
    } else {
        slot.park(state, now + ctx.limits.session_expiry);
    }
    drop(slot);
    drop(guard);
    // Ended for its rate: its next frames are refused for a while rather than each
    // starting a session.
    if matches!(end, End::RateTooHigh) {
        hold(&ctx, &link, &mut rx, NakReason::RateLimited).await;
    }
    let rest = match end {
        End::Kicked(KickReason::Removed | KickReason::Disabled | KickReason::Banned) => {
            NakReason::NotAuthorized
        }
        End::RateTooHigh => NakReason::RateLimited,
        // Sent again, they go to the device's next session.
        _ => NakReason::Busy,
    };
    answer_the_rest(&ctx, &link, &mut rx, rest).await;
}

/// Frames that reached an ending session after it stopped reading are answered NAK
/// `reason`, not lost unanswered (a quarantined device's are acknowledged as if
/// delivered, as the bus does: it is not told): the queue is closed first, so the
/// bus gives the device's next frame to a new session.
async fn answer_the_rest(
    ctx: &Context,
    link: &Link,
    rx: &mut mpsc::Receiver<Input>,
    reason: NakReason,
) {
    rx.close();
    while let Ok(input) = rx.try_recv() {
        let Input::Data { counter, .. } = input else {
            continue;
        };
        if link
            .answer(counter, unless_quarantined(ctx, &link.id, reason))
            .await
            .is_err()
        {
            return;
        }
    }
}

fn lifecycle(ctx: &Context) -> Lifecycle {
    Lifecycle {
        sessions: ctx.sessions.clone(),
        auth: ctx.auth.clone(),
        behaviours: ctx.behaviours.clone(),
        metrics: ctx.metrics.clone(),
        audit: ctx.audit.clone(),
    }
}

/// Authenticate the device its frame's tag proved, register it and take its parked
/// state; `None` if it is refused (its frames meanwhile are refused too).
async fn set_up(
    ctx: &Arc<Context>,
    link: &Link,
    rx: &mut mpsc::Receiver<Input>,
) -> Option<(
    Session,
    SessionGuard,
    OwnedMutexGuard<Slot<SerialState>>,
    watch::Receiver<Arc<Live>>,
)> {
    // Watched from here: a reload from now on is applied by the session.
    let mut live_rx = ctx.live.clone();
    let live = live_rx.borrow_and_update().clone();
    let now = Instant::now();
    let creds = Credentials {
        id: link.id.as_str(),
        presented: vec![Credential::FrameKey],
    };
    let authed = match ctx
        .auth
        .authenticate(PrincipalKind::Device, &creds, link.source.ip(), now)
    {
        Ok(authed) => authed,
        Err(refusal) => {
            let refusal = Refusal::from(refusal);
            refused(ctx, link, rx, refusal, "authentication refused").await;
            return None;
        }
    };
    let principal = authed.principal.clone();
    let admission = Admission::new(
        Peer {
            principal: principal.clone(),
            source: link.source,
            protocol: Protocol::Serial,
        },
        live.rules(&principal, authed.acl.clone(), &ctx.behaviours),
        ctx.shared.clone(),
        now,
    );
    let lifecycle = lifecycle(ctx);
    let opener = Opener {
        lifecycle: &lifecycle,
        parked: &ctx.parked,
        forwarder: ctx.forwarder.as_ref(),
        shutdown: &ctx.shutdown,
        mailbox: ctx.limits.mailbox,
        expiry: ctx.limits.session_expiry,
    };
    let Opened {
        admission,
        guard,
        slot,
        state,
        uplink,
        resumed,
    } = match opener
        .open(admission, authed.generation, authed.method)
        .await
    {
        Ok(opened) => opened,
        // Counted (and audited) by the opener; the device is told for a while.
        Err(NotOpened::Refused(refusal)) => {
            hold(ctx, link, rx, open_refused_nak(refusal)).await;
            return None;
        }
        Err(NotOpened::Ended) => return None,
    };
    lifecycle.opened(
        &admission,
        &guard,
        authed.method,
        &format!(
            " on {}{}",
            link.path,
            if resumed { ", session resumed" } else { "" }
        ),
    );
    let session = Session {
        link: link.clone(),
        admission,
        uplink,
        state,
        stats: guard.stats.clone(),
        pending: VecDeque::new(),
        outstanding: None,
        unresponsive: false,
        next_pump: None,
        limited_run: false,
        refused_full: false,
    };
    // A device whose session starts anew gets its retained commands first (as an MQTT
    // device after its SUBACK, a CoAP device with its first Observe); a resumed one
    // has them in its mailbox, or had them.
    if !resumed {
        session
            .admission
            .queue_retained_commands(&session.state.mailbox, now);
    }
    Some((session, guard, slot, live_rx))
}

/// A login refused: counted and audited; then the device is told for a while.
async fn refused(
    ctx: &Context,
    link: &Link,
    rx: &mut mpsc::Receiver<Input>,
    refusal: Refusal,
    detail: &str,
) {
    ctx.metrics.refused(refusal);
    ctx.audit.record(
        AuditEntry::new("connect", "refuse")
            .source(format!("serial:{}", link.path))
            .protocol(Protocol::Serial.as_str())
            .principal("device", link.id.as_str())
            .reason(format!("{}: {detail}", refusal.label())),
    );
    hold(ctx, link, rx, NakReason::NotAuthorized).await;
}

/// A refused device's DATA frames are answered NAK `reason` for a while without
/// asking again, so that it costs one login per `serial.resync_interval` (at least a
/// second), not one per frame.
async fn hold(ctx: &Context, link: &Link, rx: &mut mpsc::Receiver<Input>, reason: NakReason) {
    let until =
        tokio::time::Instant::now() + ctx.limits.resync_interval.max(Duration::from_secs(1));
    loop {
        let input = tokio::select! {
            input = rx.recv() => input,
            _ = tokio::time::sleep_until(until) => return,
        };
        match input {
            Some(Input::Data { counter, .. }) => {
                if link.answer(counter, Some(reason)).await.is_err() {
                    return;
                }
            }
            Some(Input::PortClosed) | None => return,
            Some(_) => {}
        }
    }
}

/// A command written to the device, waiting for its ACK.
struct Outstanding {
    counter: u64,
    bytes: Vec<u8>,
    delivery: Delivery,
    sends: u32,
    due: Instant,
}

struct Session {
    link: Link,
    admission: Admission,
    uplink: Uplink,
    state: SerialState,
    stats: Arc<SessionStats>,
    /// Frames whose message is with the forwarder, oldest first.
    pending: VecDeque<(u64, oneshot::Receiver<Taken>)>,
    outstanding: Option<Outstanding>,
    /// A command went unacknowledged: nothing more is written until the device is heard.
    unresponsive: bool,
    /// Commands are not looked at before then (the hold, the device's command rate).
    next_pump: Option<Instant>,
    /// Frames refused for the rate since the last one taken (one audit line per run).
    limited_run: bool,
    /// A frame was refused for a full outbox since the last one taken (one audit line).
    refused_full: bool,
}

/// The answer to a frame not taken: NAK `reason`, but for a quarantined device, which
/// is not told (acknowledged as if delivered, counted as refused).
pub(crate) fn unless_quarantined(
    ctx: &Context,
    id: &PrincipalId,
    reason: NakReason,
) -> Option<NakReason> {
    let quarantined = ctx
        .behaviours
        .get(id)
        .is_some_and(|(_, t)| t.state() == portcullis_core::behaviour::State::Quarantined);
    if quarantined {
        ctx.metrics.refused(Refusal::Quarantined);
        return None;
    }
    Some(reason)
}

/// The answer to a device whose authenticated login could not open its session: busy
/// when the cause passes (its previous session still ending, the registry changing
/// under the login), so that it sends again; not authorized otherwise.
fn open_refused_nak(refusal: Refusal) -> NakReason {
    match refusal {
        Refusal::SessionBusy | Refusal::RegistryChanged => NakReason::Busy,
        _ => NakReason::NotAuthorized,
    }
}

/// The answer a refusal gets on the wire; `None`: acknowledged as if delivered (a
/// quarantined device is not told).
fn nak_reason(refusal: Refusal) -> Option<NakReason> {
    Some(match refusal {
        Refusal::Quarantined => return None,
        Refusal::TooLarge => NakReason::TooLarge,
        Refusal::ReceiveMaximumExceeded => NakReason::Busy,
        r => match r.stage() {
            Stage::Authorize => NakReason::NotAuthorized,
            Stage::Limit => NakReason::RateLimited,
            Stage::Validate | Stage::Decode => NakReason::Invalid,
            _ => NakReason::NotAuthorized,
        },
    })
}

impl Session {
    async fn serve(
        &mut self,
        ctx: &Context,
        mut live: watch::Receiver<Arc<Live>>,
        rx: &mut mpsc::Receiver<Input>,
        kicked: Kicked,
    ) -> End {
        let mailbox = self.state.mailbox.clone();
        let mut live_open = true;
        loop {
            if let Some(reason) = kicked.reason() {
                return End::Kicked(reason);
            }
            if let Err(end) = self.pump(ctx, Instant::now()).await {
                return end;
            }
            let wake = self.next_wake();
            let wants = self.wants_commands();
            let step = tokio::select! {
                biased;
                reason = kicked.wait() => Err(End::Kicked(reason)),
                taken = front_taken(&mut self.pending) => self.taken(ctx, taken).await,
                _ = sleep_until(wake), if wake.is_some() => self.timers(ctx, Instant::now()).await,
                changed = live.changed(), if live_open => {
                    match changed {
                        Ok(()) => self.reload(ctx, &live.borrow_and_update().clone()),
                        Err(_) => {
                            live_open = false;
                            Ok(())
                        }
                    }
                }
                input = rx.recv() => match input {
                    None | Some(Input::PortClosed) => Err(End::PortClosed),
                    Some(input) => self.input_until_kicked(ctx, input, &kicked).await,
                },
                _ = mailbox.notify.notified(), if wants => Ok(()),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// A configuration reload: the new rules apply from the next frame on; a device
    /// whose group is gone is ended.
    fn reload(&mut self, ctx: &Context, live: &Live) -> Result<(), End> {
        let principal = self.admission.peer().principal.clone();
        let Some(acl) = ctx.auth.current_acl(&principal) else {
            return Err(End::Kicked(KickReason::PolicyChanged));
        };
        self.admission
            .reload(live.rules(&principal, acl, &ctx.behaviours), Instant::now());
        Ok(())
    }

    /// A frame's work, which may wait (for the forwarder, for pacing). A kick ends the
    /// session whatever it waits for: the work gets `KICK_GRACE` to finish, and is
    /// dropped after it (its state lives in the session, which is parked).
    async fn input_until_kicked(
        &mut self,
        ctx: &Context,
        input: Input,
        kicked: &Kicked,
    ) -> Result<(), End> {
        if let Some(reason) = kicked.reason() {
            return Err(End::Kicked(reason));
        }
        match until_kicked(self.input(ctx, input), kicked.clone(), KICK_GRACE).await {
            Ended::Finished(done) => done,
            Ended::CutOff(reason) => Err(End::Kicked(reason)),
            Ended::Panicked(why) => Err(End::Internal(why)),
        }
    }

    async fn input(&mut self, ctx: &Context, input: Input) -> Result<(), End> {
        let now = Instant::now();
        self.stats.heard(now);
        // Heard from: it may be written to again.
        self.unresponsive = false;
        match input {
            Input::Data {
                counter,
                suffix,
                payload,
            } => self.data(ctx, counter, suffix, payload, now).await,
            Input::Ack { counter } => {
                if self
                    .outstanding
                    .as_ref()
                    .is_some_and(|o| o.counter == counter)
                    && let Some(o) = self.outstanding.take()
                {
                    ctx.metrics.delivered(o.delivery.message.payload.len());
                    self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Input::Nak { counter, reason } => {
                if self
                    .outstanding
                    .as_ref()
                    .is_some_and(|o| o.counter == counter)
                    && let Some(o) = self.outstanding.take()
                {
                    self.refused_by_device(ctx, o.delivery, reason, now);
                }
                Ok(())
            }
            // Handled by `serve`.
            Input::PortClosed => Err(End::PortClosed),
        }
    }

    /// The device refused a command: a busy device gets it again later; any other
    /// refusal drops it, audited.
    fn refused_by_device(&mut self, ctx: &Context, d: Delivery, reason: NakReason, now: Instant) {
        if reason == NakReason::Busy {
            self.state.mailbox.put_back(VecDeque::from([d]), now);
            self.next_pump = Some(now + ctx.limits.ack_timeout);
            return;
        }
        self.admission.audit(
            "deliver",
            Some(d.message.topic.as_str()),
            format!("the device refused the command: {reason}"),
        );
    }

    /// Answer the device's frame `counter` (the bus remembers the answer for a frame
    /// sent again).
    async fn answer(&mut self, counter: u64, nak: Option<NakReason>) -> Result<(), End> {
        self.link.answer(counter, nak).await
    }

    /// A DATA frame: a message to `devices/{id}/{suffix}`, through the pipeline.
    async fn data(
        &mut self,
        ctx: &Context,
        counter: u64,
        suffix: String,
        payload: Vec<u8>,
        now: Instant,
    ) -> Result<(), End> {
        if self.pending.len() >= MAX_PENDING {
            self.limited(
                Refusal::ReceiveMaximumExceeded,
                None,
                "more than 16 frames waiting for the forwarder",
                now,
            );
            return self.answer(counter, Some(NakReason::Busy)).await;
        }
        let topic = match self
            .admission
            .device_topic(&suffix, &payload, ctx.limits.topic, now)
        {
            Ok(topic) => topic,
            Err((refusal, _)) => return self.answer(counter, nak_reason(refusal)).await,
        };
        let message = Message {
            topic,
            payload: payload.into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        };
        let (verdict, arrived) = self
            .admission
            .uplink_paced(Offer::new(message, now), SHORT_WAIT)
            .await;
        match verdict {
            Verdict::Forward(message) => {
                self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                self.limited_run = false;
                let rx = self
                    .uplink
                    .send_acked(message)
                    .await
                    .map_err(|_| End::BrokerGone)?;
                ctx.metrics.forward_latency.record(arrived.elapsed());
                self.pending.push_back((counter, rx));
                Ok(())
            }
            Verdict::Divert(forensic) => {
                self.uplink
                    .send(forensic)
                    .await
                    .map_err(|_| End::BrokerGone)?;
                self.answer(counter, None).await
            }
            Verdict::Discard(Refusal::RateLimited) | Verdict::Refuse(Refusal::RateLimited) => {
                self.answer(counter, Some(NakReason::RateLimited)).await
            }
            // Dropped by quarantine: acknowledged as if delivered.
            Verdict::Discard(_) => self.answer(counter, None).await,
            Verdict::Refuse(refusal) => self.answer(counter, nak_reason(refusal)).await,
            Verdict::Disconnect(_) => {
                self.answer(counter, Some(NakReason::RateLimited)).await?;
                Err(End::RateTooHigh)
            }
            // Over its rate: the device is told, and sends again later.
            Verdict::Wait(held, _) => {
                let topic = held.message().topic.clone();
                self.limited(
                    Refusal::RateLimited,
                    Some(topic.as_str()),
                    "over the rate: NAK rate_limited",
                    Instant::now(),
                );
                self.answer(counter, Some(NakReason::RateLimited)).await
            }
        }
    }

    /// A frame refused for the rate or for room: counted each time, audited (and told
    /// to the model) once per run of them.
    fn limited(&mut self, refusal: Refusal, topic: Option<&str>, words: &str, now: Instant) {
        if self.limited_run {
            self.admission.count(refusal);
        } else {
            self.limited_run = true;
            self.admission
                .refused(refusal, "publish", topic, Some(words), now);
        }
    }

    /// The forwarder answered for the oldest frame waiting on it.
    async fn taken(
        &mut self,
        ctx: &Context,
        taken: Result<Taken, oneshot::error::RecvError>,
    ) -> Result<(), End> {
        let Some((counter, _)) = self.pending.pop_front() else {
            return Ok(());
        };
        match taken {
            Ok(Taken::Yes) => {
                self.refused_full = false;
                self.answer(counter, None).await
            }
            Ok(Taken::Full) => {
                Metrics::inc(&ctx.metrics.outbox.refused_full);
                if !self.refused_full {
                    self.refused_full = true;
                    self.admission.audit(
                        "outbox",
                        None,
                        "the outbox is full: a serial frame was refused busy".into(),
                    );
                }
                self.answer(counter, Some(NakReason::Busy)).await
            }
            Err(_) => Err(End::BrokerGone),
        }
    }

    fn wants_commands(&self) -> bool {
        self.outstanding.is_none() && !self.unresponsive
    }

    fn next_wake(&self) -> Option<Instant> {
        let pump = self.next_pump.filter(|_| self.wants_commands());
        [self.outstanding.as_ref().map(|o| o.due), pump]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next command the device may receive now, through the downlink gates (a
    /// command too large for a frame is found out when the bus encodes it).
    fn next_command(&mut self, now: Instant) -> Option<Delivery> {
        match self
            .admission
            .next_command(&self.state.mailbox, now, |_| None)
        {
            NextCommand::Send(d) => {
                self.next_pump = None;
                Some(d)
            }
            NextCommand::Empty => {
                self.next_pump = None;
                None
            }
            NextCommand::NotBefore(at) => {
                self.next_pump = Some(at);
                None
            }
        }
    }

    /// Write the next command, if the device may have one now.
    async fn pump(&mut self, ctx: &Context, now: Instant) -> Result<(), End> {
        if !self.wants_commands() || self.next_pump.is_some_and(|at| at > now) {
            return Ok(());
        }
        while let Some(d) = self.next_command(now) {
            // The topic below `devices/{id}/`: `commands/...`.
            let suffix = d
                .message
                .topic
                .levels()
                .skip(2)
                .collect::<Vec<_>>()
                .join("/");
            let (sent, written) = oneshot::channel();
            self.link
                .down
                .send(Down::Command {
                    id: self.link.id.clone(),
                    suffix,
                    payload: d.message.payload.clone(),
                    sent,
                })
                .await
                .map_err(|_| End::PortClosed)?;
            match written.await {
                Ok(Ok((counter, bytes))) => {
                    self.outstanding = Some(Outstanding {
                        counter,
                        bytes,
                        delivery: d,
                        sends: 1,
                        due: now + ctx.limits.ack_timeout,
                    });
                    return Ok(());
                }
                // One that cannot be a frame is dropped, counted and audited, as an MQTT
                // client's Maximum Packet Size drops one; the next is tried.
                Ok(Err(Unsent::Unencodable(rule))) => {
                    ctx.metrics.refused(Refusal::OverClientMaximumPacketSize);
                    self.admission.audit(
                        "deliver",
                        Some(d.message.topic.as_str()),
                        format!(
                            "deliver: a command of {} bytes cannot be a serial frame ({rule}); dropped",
                            d.message.payload.len()
                        ),
                    );
                    // Not sent: it does not count against the device's command rate.
                    self.admission.return_budget();
                }
                Ok(Err(Unsent::Unavailable)) | Err(_) => {
                    self.admission.return_budget();
                    self.state.mailbox.put_back(VecDeque::from([d]), now);
                    self.next_pump = Some(now + ctx.limits.ack_timeout);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A command's ACK did not come in time: it is sent again, or given up on.
    async fn timers(&mut self, ctx: &Context, now: Instant) -> Result<(), End> {
        if self.next_pump.is_some_and(|at| at <= now) {
            self.next_pump = None;
        }
        let Some(o) = self.outstanding.as_mut() else {
            return Ok(());
        };
        if o.due > now {
            return Ok(());
        }
        if o.sends > ctx.limits.max_retransmits {
            Metrics::inc(&ctx.metrics.serial.commands_timed_out);
            if let Some(o) = self.outstanding.take() {
                self.state
                    .mailbox
                    .put_back(VecDeque::from([o.delivery]), now);
            }
            self.unresponsive = true;
            return Ok(());
        }
        Metrics::inc(&ctx.metrics.serial.retransmissions);
        o.sends += 1;
        o.due = now + ctx.limits.ack_timeout;
        let bytes = o.bytes.clone();
        self.link
            .down
            .send(Down::Again(bytes))
            .await
            .map_err(|_| End::PortClosed)
    }
}

/// Resolves with the forwarder's answer for the oldest pending frame.
async fn front_taken(
    pending: &mut VecDeque<(u64, oneshot::Receiver<Taken>)>,
) -> Result<Taken, oneshot::error::RecvError> {
    match pending.front_mut() {
        Some((_, rx)) => rx.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_refused_for_a_passing_cause_is_answered_busy_so_the_device_sends_again() {
        assert_eq!(open_refused_nak(Refusal::SessionBusy), NakReason::Busy);
        assert_eq!(open_refused_nak(Refusal::RegistryChanged), NakReason::Busy);
        assert_eq!(
            open_refused_nak(Refusal::Disabled),
            NakReason::NotAuthorized
        );
    }

    #[test]
    fn a_refused_frame_is_answered_by_its_stage_and_a_quarantined_device_is_not_told() {
        assert_eq!(nak_reason(Refusal::Quarantined), None);
        assert_eq!(nak_reason(Refusal::TooLarge), Some(NakReason::TooLarge));
        assert_eq!(
            nak_reason(Refusal::ReceiveMaximumExceeded),
            Some(NakReason::Busy)
        );
        assert_eq!(
            nak_reason(Refusal::FrameTag),
            Some(NakReason::Invalid),
            "a decode-stage refusal"
        );
    }
}
