//! One configured port's bus: its task reads the port's bytes into frames (`link`),
//! checks each authenticated frame's counter against its device's replay floor
//! (`floors`), hands fresh frames to the device's session (started at its first one),
//! and writes what sessions ask for, each frame under the device's key with the
//! gateway's next counter towards it.
//!
//! What is refused here never reaches a session:
//!
//! - **Noise, malformed frames, frames naming a device the port does not allow, and
//!   bad tags** are dropped unanswered (an answer would tell a prober which ids exist,
//!   and a forged frame moves no counter). Each is counted
//!   (`portcullis_refusals_total`, reason `frame_*` or `malformed_packet`); the first
//!   of a run is audited. A bad tag naming a device allowed here feeds that device's
//!   behaviour model as a failed validation (on a shared bus anyone can name any
//!   device in a bad frame: the model's probation, not a ban, is the answer).
//! - **A replayed counter** (not above the last accepted one) is refused, counted,
//!   audited once per run and fed to the device's model; the device is answered
//!   RESYNC with the floor, at most once per `serial.resync_interval`. A DATA frame
//!   whose counter is the last one accepted is the device sending its frame again
//!   because our answer was lost: the bus, which writes every answer, answers it again
//!   as it did (at most once per interval), and nothing acts on it twice.
//! - **Frames over `serial.max_frames_per_second`** on the port are dropped (after
//!   their tag is checked: the rate is counted in frames).
//!
//! A port that vanishes ends its sessions (their commands wait in their mailboxes),
//! is audited, and is reopened with back-off; its return is
//! audited too.

use crate::counters::CounterStore;
use crate::floors::{FloorError, Floors};
use crate::keys::FrameKeys;
use crate::link::{Heard, HeardBody, Outcome, Reader, Refused};
use crate::port::{Port, PortEvent};
use crate::session::{self, Down, Input, Link, SerialState, Unsent};
use portcullis_core::admission::{self, Live};
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::auth::Authenticator;
use portcullis_core::behaviour::Observation;
use portcullis_core::forward::Forwarder;
use portcullis_core::limit::{Rate, TokenBucket};
use portcullis_core::mailbox::MailboxLimits;
use portcullis_core::metrics::Metrics;
use portcullis_core::parking::ParkedSessions;
use portcullis_core::peer::Protocol;
use portcullis_core::principal::{PrincipalId, PrincipalKind};
use portcullis_core::quarantine::Behaviours;
use portcullis_core::refusal::Refusal;
use portcullis_core::retained::RetainedCommands;
use portcullis_core::sessions::Sessions;
use portcullis_core::topic::TopicLimits;
use portcullis_serial_frame::{Body, Direction, MAX_WIRE_LEN, NakReason, Outgoing, encode};
use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Writes waiting for a bus from its sessions.
const DOWN_QUEUE: usize = 256;
/// Bytes gathered for the port at most: frames written while the port is behind wait
/// here and go out together; beyond it they are dropped (and the devices send again).
const MAX_UNWRITTEN: usize = 64 * 1024;
/// How soon gathered bytes the port had no room for are offered again.
const FLUSH_RETRY: Duration = Duration::from_millis(5);

/// The serial layer's limits (`[serial]`, and the gateway's own).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub topic: TopicLimits,
    pub mailbox: MailboxLimits,
    /// How long a device's commands outlive its session.
    pub session_expiry: Duration,
    pub ack_timeout: Duration,
    pub max_retransmits: u32,
    pub resync_interval: Duration,
    pub max_frames_per_second: u32,
    pub counter_reserve: u64,
}

/// What every bus and serial session shares.
pub struct Context {
    /// The settings a configuration reload replaces; each session watches it.
    pub live: watch::Receiver<Arc<Live>>,
    pub auth: Arc<Authenticator>,
    pub forwarder: Arc<dyn Forwarder>,
    pub sessions: Arc<Sessions>,
    /// What a device's session leaves for its next one.
    pub parked: Arc<ParkedSessions<SerialState>>,
    pub retained: Arc<RetainedCommands>,
    pub behaviours: Arc<Behaviours>,
    pub shared: Arc<admission::Shared>,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
    /// The devices' frame keys.
    pub keys: Arc<dyn FrameKeys>,
    /// Replay floors and the gateway's own counters, on disk.
    pub store: Arc<CounterStore>,
}

/// The address the core knows a serial device by. A serial device has none, and the
/// core keys back-off and the behaviour model's sources by address, so each device
/// has its own in the unique-local range, `[fd00::5e71:P:D]:0`: P is the port's place
/// in the configuration and D the device's place in the port's list.
pub fn source(port: u16, device: u16) -> SocketAddr {
    SocketAddr::new(
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0x5e71, port, device).into(),
        0,
    )
}

/// Serve one configured port until the gateway stops: `index` is its place in the
/// configuration, `devices` the ids allowed on it.
pub async fn serve(ctx: Arc<Context>, index: u16, port: Port, devices: Vec<PrincipalId>) {
    let (down_tx, down_rx) = mpsc::channel(DOWN_QUEUE);
    let rate = f64::from(ctx.limits.max_frames_per_second);
    let now = Instant::now();
    let mut bus = Bus {
        path: port.path().display().to_string().into(),
        reader: Reader::new(devices.iter().cloned()),
        floors: Floors::new(ctx.store.clone(), ctx.limits.counter_reserve),
        devices,
        index,
        sessions: HashMap::new(),
        resynced_at: HashMap::new(),
        answered: HashMap::new(),
        frames: TokenBucket::new(
            Rate {
                per_second: rate,
                burst: rate,
            },
            now,
        ),
        refused_run: false,
        unwritten: Vec::new(),
        open: false,
        opened_before: false,
        failing: false,
        down_tx,
        ctx,
        port,
    };
    bus.run(down_rx).await;
}

/// A device's last DATA frame taken, and how it was answered.
#[derive(Debug, Clone, Copy)]
struct Answered {
    counter: u64,
    /// `None`: its session has not answered yet; then ACK (`None`) or NAK.
    answer: Option<Option<NakReason>>,
    again_at: Option<Instant>,
}

struct Bus {
    ctx: Arc<Context>,
    port: Port,
    path: Arc<str>,
    index: u16,
    reader: Reader,
    floors: Floors,
    devices: Vec<PrincipalId>,
    /// The session of each device heard since the port opened.
    sessions: HashMap<PrincipalId, mpsc::Sender<Input>>,
    /// When each device was last sent a RESYNC.
    resynced_at: HashMap<PrincipalId, Instant>,
    /// Each device's last DATA frame taken, its answer, and when it was last answered
    /// again: sent again, it gets the same answer, at most once per
    /// `serial.resync_interval`.
    answered: HashMap<PrincipalId, Answered>,
    /// Frames the port may bring (`serial.max_frames_per_second`).
    frames: TokenBucket,
    /// Frames refused since the last one taken (one audit line per run).
    refused_run: bool,
    /// Frames for the port not written yet: gathered while a batch is handled, so
    /// that a burst of answers is a few writes, not one each.
    unwritten: Vec<u8>,
    open: bool,
    opened_before: bool,
    /// Opening the port has failed since it was last open (one audit line per outage).
    failing: bool,
    down_tx: mpsc::Sender<Down>,
}

impl Bus {
    async fn run(&mut self, mut down_rx: mpsc::Receiver<Down>) {
        let mut shutdown = self.ctx.shutdown.clone();
        let mut outcomes = Vec::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let retry = !self.unwritten.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {}
                // Writes first: answers and commands are what the devices wait for.
                Some(down) = down_rx.recv() => {
                    self.write(down).await;
                    while let Ok(down) = down_rx.try_recv() {
                        self.write(down).await;
                    }
                }
                event = self.port.event() => match event {
                    PortEvent::Bytes(bytes) => {
                        self.reader.feed(&bytes, self.ctx.keys.as_ref(), &mut outcomes);
                        for outcome in outcomes.drain(..) {
                            self.outcome(outcome).await;
                        }
                    }
                    PortEvent::Opened => self.opened(),
                    PortEvent::Vanished { error } => self.vanished(&error),
                    PortEvent::OpenFailed { error, retry_in } => {
                        self.open_failed(&error, retry_in)
                    }
                },
                _ = tokio::time::sleep(FLUSH_RETRY), if retry => {}
            }
            self.flush();
        }
        // What was gathered before the stop goes out.
        self.flush();
        self.end_sessions();
        if self.open {
            self.ctx
                .metrics
                .serial
                .ports_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn audit(&self, event: &'static str, decision: &'static str) -> AuditEntry {
        AuditEntry::new(event, decision)
            .source(format!("serial:{}", self.path))
            .protocol(Protocol::Serial.as_str())
    }

    fn opened(&mut self) {
        self.open = true;
        self.failing = false;
        let serial = &self.ctx.metrics.serial;
        serial.ports_open.fetch_add(1, Ordering::Relaxed);
        let words = if self.opened_before {
            Metrics::inc(&serial.port_reopens);
            "serial port open again"
        } else {
            "serial port open"
        };
        self.opened_before = true;
        tracing::info!(path = %self.path, "{words}");
        self.ctx
            .audit
            .record(self.audit("port", "allow").reason(words));
    }

    fn vanished(&mut self, error: &str) {
        if self.open {
            self.open = false;
            self.ctx
                .metrics
                .serial
                .ports_open
                .fetch_sub(1, Ordering::Relaxed);
        }
        tracing::warn!(path = %self.path, %error, "serial port vanished; reopening with back-off");
        self.ctx
            .audit
            .record(self.audit("port", "refuse").reason(format!(
                "serial port vanished ({error}); reopening with back-off"
            )));
        self.end_sessions();
    }

    fn open_failed(&mut self, error: &str, retry_in: Duration) {
        if self.failing {
            tracing::debug!(path = %self.path, %error, ?retry_in, "serial port still cannot be opened");
            return;
        }
        self.failing = true;
        tracing::warn!(path = %self.path, %error, ?retry_in, "serial port cannot be opened; trying again with back-off");
        self.ctx
            .audit
            .record(self.audit("port", "refuse").reason(format!(
                "serial port cannot be opened ({error}); trying again with back-off"
            )));
    }

    /// The port closed: every session on it ends (and parks its commands).
    fn end_sessions(&mut self) {
        for (_, tx) in self.sessions.drain() {
            let _ = tx.try_send(Input::PortClosed);
        }
    }

    /// A frame refused before any session: counted; the first of a run audited.
    fn refuse(&mut self, refusal: Refusal, id: Option<&str>, words: String) {
        self.ctx.metrics.refused(refusal);
        if self.refused_run {
            return;
        }
        self.refused_run = true;
        let mut entry = self.audit("frame", "refuse").reason(format!(
            "{refusal}: {words} (further refusals are counted until a frame is taken)"
        ));
        if let Some(id) = id {
            entry = entry.principal("device", id.chars().take(64).collect::<String>());
        }
        self.ctx.audit.record(entry);
    }

    /// A device allowed here whose frames fail: its behaviour model hears of it.
    fn observe_invalid(&self, id: &PrincipalId) {
        let ctx = &self.ctx;
        let Some(group) = ctx.auth.group_of(PrincipalKind::Device, id) else {
            return;
        };
        let policy = ctx.behaviours.policy(&group);
        ctx.behaviours
            .track(id, &group)
            .observe(Observation::Invalid, Instant::now(), &policy);
    }

    async fn outcome(&mut self, outcome: Outcome) {
        if self.frames.take(1.0, Instant::now()).is_err() {
            self.refuse(
                Refusal::FrameRate,
                None,
                format!(
                    "more than {} frames a second on the port",
                    self.ctx.limits.max_frames_per_second
                ),
            );
            return;
        }
        let heard = match outcome {
            Outcome::Heard(heard) => heard,
            Outcome::Refused(Refused::Noise) => {
                return self.refuse(
                    Refusal::FrameNoise,
                    None,
                    "more bytes without a delimiter than a frame has".into(),
                );
            }
            Outcome::Refused(Refused::Malformed { rule }) => {
                return self.refuse(
                    Refusal::MalformedPacket,
                    None,
                    format!("not a frame ({rule})"),
                );
            }
            // The id is the frame's claim only: named in the words, not as the principal.
            Outcome::Refused(Refused::NotOnThisBus { id }) => {
                let words = format!("a frame naming {id:?}, a device this port does not allow");
                return self.refuse(Refusal::FrameNotOnBus, None, words);
            }
            Outcome::Refused(Refused::BadTag { id }) => {
                self.observe_invalid(&id);
                return self.refuse(
                    Refusal::FrameTag,
                    Some(id.as_str()),
                    "the tag does not verify under the device's key".into(),
                );
            }
        };
        self.heard(heard).await;
    }

    async fn heard(&mut self, heard: Heard) {
        let Heard { id, counter, body } = heard;
        match self.floors.check(&id, counter).await {
            Ok(()) => {}
            Err(FloorError::Replay { counter, floor }) => {
                return self.replay(id, counter, floor, &body).await;
            }
            Err(e) => {
                // Nothing is taken past what is on disk; the device sends again.
                Metrics::inc(&self.ctx.metrics.serial.counter_store_errors);
                tracing::error!(device = %id, error = %e, "serial counter not reserved; frame refused");
                return;
            }
        }
        self.floors.accept(&id, counter);
        self.refused_run = false;
        Metrics::inc(&self.ctx.metrics.serial.frames_in);
        let input = match body {
            HeardBody::Data { suffix, payload } => Input::Data {
                counter,
                suffix,
                payload,
            },
            HeardBody::Ack { counter } => Input::Ack { counter },
            HeardBody::Nak { counter, reason } => Input::Nak { counter, reason },
        };
        let data = match &input {
            Input::Data { counter, .. } => Some(*counter),
            _ => None,
        };
        let taken = self.hand_over(id.clone(), input);
        if taken && let Some(counter) = data {
            // Its answer is coming: sent again meanwhile, it is not a replay.
            self.answered.insert(
                id.clone(),
                Answered {
                    counter,
                    answer: None,
                    again_at: None,
                },
            );
        }
        if !taken && let Some(counter) = data {
            // A quarantined device is not told (its frames are taken as if delivered,
            // and dropped); any other is refused busy. Its counter is used: it sends the
            // message again in a new frame.
            let nak = session::unless_quarantined(&self.ctx, &id, NakReason::Busy);
            self.answer(&id, counter, nak).await;
        }
    }

    /// An authenticated frame whose counter is not fresh.
    async fn replay(&mut self, id: PrincipalId, counter: u64, floor: u64, body: &HeardBody) {
        let now = Instant::now();
        let interval = self.ctx.limits.resync_interval;
        // Its last frame again, taken here: our answer was lost (or is still coming).
        // Answered again as it was, at most once per interval; never acted on twice.
        // Any other frame at or below the floor is a replay (after a restart the floor
        // is the reserved bound, and nothing was taken at it).
        if counter == floor
            && matches!(body, HeardBody::Data { .. })
            && let Some(a) = self.answered.get_mut(&id)
            && a.counter == counter
        {
            if let Some(nak) = a.answer
                && a.again_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= interval)
            {
                a.again_at = Some(now);
                Metrics::inc(&self.ctx.metrics.serial.duplicates);
                let body = match nak {
                    None => Body::Ack { counter },
                    Some(reason) => Body::Nak { counter, reason },
                };
                let _ = self.send(&id, body).await;
            }
            return;
        }
        self.observe_invalid(&id);
        self.refuse(
            Refusal::FrameReplay,
            Some(id.as_str()),
            format!("counter {counter} is not above {floor}: a replayed or stale frame"),
        );
        let may_resync = self
            .resynced_at
            .get(&id)
            .is_none_or(|at| now.saturating_duration_since(*at) >= interval);
        if may_resync {
            self.resynced_at.insert(id.clone(), now);
            if self.send(&id, Body::Resync { floor }).await.is_ok() {
                Metrics::inc(&self.ctx.metrics.serial.resyncs);
            }
        }
    }

    /// Answer the device's DATA frame `counter` (ACK, or NAK with a reason), and
    /// remember it for the frame sent again.
    async fn answer(&mut self, id: &PrincipalId, counter: u64, nak: Option<NakReason>) {
        // The answer to an earlier frame, coming after a later one was taken, leaves
        // the later one's record alone.
        if self.answered.get(id).is_none_or(|a| a.counter <= counter) {
            self.answered.insert(
                id.clone(),
                Answered {
                    counter,
                    answer: Some(nak),
                    again_at: None,
                },
            );
        }
        let body = match nak {
            None => Body::Ack { counter },
            Some(reason) => Body::Nak { counter, reason },
        };
        let _ = self.send(id, body).await;
    }

    /// Hand a fresh frame to its device's session, starting one if it has none;
    /// whether the session took it.
    fn hand_over(&mut self, id: PrincipalId, input: Input) -> bool {
        let tx = match self.sessions.get(&id) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let place = self.devices.iter().position(|d| *d == id).unwrap_or(0);
                let link = Link {
                    id: id.clone(),
                    source: source(self.index, u16::try_from(place).unwrap_or(u16::MAX)),
                    path: self.path.clone(),
                    down: self.down_tx.clone(),
                };
                let tx = session::spawn(self.ctx.clone(), link);
                self.sessions.insert(id.clone(), tx.clone());
                tx
            }
        };
        match tx.try_send(input) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                Metrics::inc(&self.ctx.metrics.serial.dropped_busy);
                false
            }
            // Ended since (a kick): the next frame starts a new session.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.sessions.remove(&id);
                false
            }
        }
    }

    /// What a session asked for.
    async fn write(&mut self, down: Down) {
        match down {
            Down::Answer { id, counter, nak } => self.answer(&id, counter, nak).await,
            Down::Command {
                id,
                suffix,
                payload,
                sent,
            } => {
                let body = Body::Data {
                    suffix: &suffix,
                    payload: &payload,
                };
                let written = self.send(&id, body).await.map(|(counter, len)| {
                    let at = self.unwritten.len() - len;
                    (counter, self.unwritten[at..].to_vec())
                });
                let _ = sent.send(written);
            }
            Down::Again(bytes) => {
                if self.gather(&bytes) {
                    Metrics::inc(&self.ctx.metrics.serial.frames_out);
                }
            }
        }
    }

    /// Add a frame to what goes to the port next; `false` if it cannot go (the port
    /// closed, or too much waits already).
    fn gather(&mut self, frame: &[u8]) -> bool {
        if !self.open || self.unwritten.len() + frame.len() > MAX_UNWRITTEN {
            return false;
        }
        self.unwritten.extend_from_slice(frame);
        true
    }

    /// Write what was gathered to the port, if it has room.
    fn flush(&mut self) {
        if self.unwritten.is_empty() {
            return;
        }
        if !self.open {
            self.unwritten.clear();
            return;
        }
        if self.port.write(&self.unwritten) {
            self.unwritten.clear();
        }
    }

    /// Write one frame to device `id` with the gateway's next counter towards it, at
    /// the end of what is gathered for the port: the counter, and the frame's length.
    async fn send(&mut self, id: &PrincipalId, body: Body<'_>) -> Result<(u64, usize), Unsent> {
        if !self.open {
            return Err(Unsent::Unavailable);
        }
        let key = self.ctx.keys.key(id).ok_or(Unsent::Unavailable)?;
        let counter = match self.floors.next_down(id).await {
            Ok(counter) => counter,
            Err(e) => {
                if matches!(e, FloorError::Store(_) | FloorError::Worker) {
                    Metrics::inc(&self.ctx.metrics.serial.counter_store_errors);
                }
                tracing::error!(device = %id, error = %e, "no counter to write to the device with");
                return Err(Unsent::Unavailable);
            }
        };
        let frame = Outgoing {
            direction: Direction::Down,
            id: id.as_str(),
            counter,
            body,
        };
        // A leading delimiter ends whatever a device's receiver holds of a cut frame.
        // A frame that cannot be encoded leaves its counter unused: gaps are allowed.
        let mut wire = [0u8; MAX_WIRE_LEN + 1];
        let n = encode(&key, &frame, &mut wire[1..]).map_err(|e| Unsent::Unencodable(e.label()))?;
        if !self.gather(&wire[..=n]) {
            return Err(Unsent::Unavailable);
        }
        Metrics::inc(&self.ctx.metrics.serial.frames_out);
        Ok((counter, n + 1))
    }
}
