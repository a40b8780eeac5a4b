//! Serial members: devices on the buses of `[target.serial]` (the device end of a pty
//! pair, or a tty), each a [`SerialDevice`] with firmware-like counters, well-behaved
//! or hostile, counted in the same report as MQTT and CoAP members.
//!
//! A bus has one writer and one reader, as a device end of a real bus would: members
//! hand whole frames to the writer (so their frames never interleave mid-frame), and
//! the reader splits what the gateway writes into frames and gives each to the member
//! it names (what every device on an RS-485 bus does by itself, ignoring frames for
//! other ids, done once per bus).
//!
//! What a serial member counts: `sent`, frames written; `acknowledged`, ACKs of its
//! telemetry; `refused`, NAKs by their reason (`rate_limited`, `not_authorized`, …),
//! `no_answer` for a genuine frame never answered, `dropped` / `replay_refused` for a
//! hostile frame the gateway dropped as it should; `resyncs`, RESYNCs heard;
//! `accepted`, a forged, replayed or cut frame the gateway answered (ACK, NAK or
//! RESYNC: any answer means it took the frame as authentic and fresh); `connected`,
//! 1 once the gateway answered the member (its session started).

use super::{Member, Plan, Shared, interval, telemetry};
use crate::provision::Secret;
use crate::report::GroupStats;
use crate::scenario::{Behaviour, SERIAL_FLOOD_EXPIRY, SERIAL_FLOOD_INFLIGHT, Scenario};
use crate::serial::{Heard, SerialDevice};
use anyhow::{Context, Result, bail};
use portcullis_serial_frame::{Deframed, Deframer, MAX_ENCODED_LEN, decode};
use rand::RngExt;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout_at};

/// Counters a member reserves per "flash write".
const RESERVE: u64 = 1000;
/// How long a genuine frame waits for its ACK or NAK before it is sent again.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Times a well-behaved frame is sent again before it counts as `no_answer`.
const RESENDS: u32 = 2;
/// Frames a well-behaved member leaves unanswered at most (boot bursts included).
const MAX_OUTSTANDING: usize = 8;
/// Frames a replayer keeps to send again.
const RECORDED: usize = 32;
/// Whole frames waiting for a bus's writer.
const WRITE_QUEUE: usize = 1024;
/// A serial payload's limit (docs/serial-protocol.md).
pub const MAX_PAYLOAD: usize = 1024;

/// One member's end of its bus.
pub(super) struct Link {
    write: mpsc::Sender<Vec<u8>>,
    /// The frames that name the member, each with its delimiters.
    heard: mpsc::UnboundedReceiver<Vec<u8>>,
}

/// The buses of a scenario, open.
pub(super) struct Buses {
    buses: HashMap<String, Bus>,
}

struct Bus {
    write: mpsc::Sender<Vec<u8>>,
    routes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Vec<u8>>>>>,
}

impl Buses {
    /// Open every bus a serial group is on, each with its writer and reader thread.
    /// Both run until the port closes (the pty pair stopped) or the process ends.
    pub(super) fn open(s: &Scenario) -> Result<Buses> {
        let mut buses = HashMap::new();
        for g in s.groups.iter().filter(|g| g.serial()) {
            let name = s.bus_of(g).expect("checked at load").to_string();
            if buses.contains_key(&name) {
                continue;
            }
            let path = &s.target.serial[&name];
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| {
                    format!(
                        "serial bus {name:?}: cannot open {} (is its socat pair running? e.g. \
                         socat -d -d pty,raw,echo=0,link=GATEWAY-END pty,raw,echo=0,link={})",
                        path.display(),
                        path.display()
                    )
                })?;
            let reader = file
                .try_clone()
                .with_context(|| format!("serial bus {name:?}: {}", path.display()))?;
            let routes = Arc::new(Mutex::new(HashMap::new()));
            let (write, rx) = mpsc::channel(WRITE_QUEUE);
            std::thread::Builder::new()
                .name(format!("bus-{name}-write"))
                .spawn(move || write_bus(file, rx))
                .context("starting a bus writer")?;
            let r = routes.clone();
            std::thread::Builder::new()
                .name(format!("bus-{name}-read"))
                .spawn(move || read_bus(reader, r))
                .context("starting a bus reader")?;
            buses.insert(name, Bus { write, routes });
        }
        Ok(Buses { buses })
    }

    /// Member `id`'s end of bus `name`.
    pub(super) fn link(&self, name: &str, id: &str) -> Result<Link> {
        let Some(bus) = self.buses.get(name) else {
            bail!("no open bus {name:?}");
        };
        let (tx, heard) = mpsc::unbounded_channel();
        bus.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), tx);
        Ok(Link {
            write: bus.write.clone(),
            heard,
        })
    }
}

/// Whole frames written in the order the members handed them over.
fn write_bus(mut file: File, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.blocking_recv() {
        if file.write_all(&bytes).and_then(|()| file.flush()).is_err() {
            return;
        }
    }
}

/// What the gateway writes, split into frames, each handed to the member it names.
fn read_bus(mut file: File, routes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Vec<u8>>>>>) {
    let mut deframer = Box::new(Deframer::<MAX_ENCODED_LEN>::new());
    let mut buf = [0u8; 4096];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
        deframer.feed(&buf[..n], |event| {
            let Deframed::Frame(encoded) = event else {
                return;
            };
            if encoded.is_empty() {
                return;
            }
            let mut wire = Vec::with_capacity(encoded.len() + 2);
            wire.push(0);
            wire.extend_from_slice(encoded);
            wire.push(0);
            if let Ok(frame) = decode(encoded)
                && let Some(tx) = routes.get(frame.id())
            {
                let _ = tx.send(wire);
            }
        });
    }
}

impl Link {
    async fn write(&self, bytes: Vec<u8>) -> bool {
        self.write.send(bytes).await.is_ok()
    }

    /// What `device` hears before `until` (the next frame that names it); nothing at
    /// `until`.
    async fn hear(&mut self, device: &mut SerialDevice, until: Instant) -> Vec<Heard> {
        match timeout_at(until, self.heard.recv()).await {
            Ok(Some(frame)) => device.read(&frame),
            Ok(None) => {
                // The bus is gone: nothing more will be heard.
                sleep_until(until).await;
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }
}

impl Member {
    /// The member's frame key: its own, or (an id the gateway does not know) one made
    /// up now.
    fn frame_key(&self) -> Vec<u8> {
        match &self.secret {
            Secret::SerialKey(k) => k.clone(),
            _ => random_key(),
        }
    }
}

fn random_key() -> Vec<u8> {
    let mut key = vec![0u8; 32];
    rand::rng().fill(&mut key[..]);
    key
}

/// The member's session started at the gateway: counted once.
struct Answered<'a> {
    seen: bool,
    stats: &'a GroupStats,
}

impl Answered<'_> {
    fn now(&mut self) {
        if !self.seen {
            self.seen = true;
            self.stats.add(&self.stats.connected, 1);
        }
    }
}

/// A serial member's run.
pub(super) async fn device(m: &Member, mut link: Link, shared: &Shared, stats: &GroupStats) {
    match m.behaviour.clone() {
        Behaviour::WellBehaved {
            rate,
            jitter,
            boot_burst,
            daily_amplitude,
            day_secs,
            qos,
            topic,
            ack_topic,
            commands,
        } => {
            let plan = Plan {
                rate: Box::new(move |t| super::daily_rate(rate, daily_amplitude, day_secs, t)),
                jitter,
                boot_burst,
                qos,
                topic,
                ack_topic: commands.then_some(ack_topic),
            };
            well_behaved(m, &mut link, shared, stats, plan).await
        }
        Behaviour::Forged { rate } => forged(m, &mut link, shared, stats, rate).await,
        Behaviour::Replay { rate } => replay(m, &mut link, shared, stats, rate).await,
        Behaviour::Flood {
            inflight,
            payload_bytes,
        } => {
            let inflight = inflight.unwrap_or(SERIAL_FLOOD_INFLIGHT);
            flood(m, &mut link, shared, stats, inflight, payload_bytes).await
        }
        Behaviour::Noise { rate, bytes } => noise(m, &mut link, shared, stats, rate, bytes).await,
        // Refused at load for serial groups.
        _ => {}
    }
}

/// A telemetry frame waiting for its answer.
struct Pending {
    bytes: Vec<u8>,
    sent_us: u64,
    at: Instant,
    resent: u32,
    /// Telemetry (counted), not a command's acknowledgement.
    telemetry: bool,
}

/// Telemetry at the plan's rate, each frame sent again (the same bytes) when
/// unanswered; commands acknowledged on the link and, with `ack_topic`, by a DATA frame
/// `{"ack":<command>}` there; a command sent again acknowledged again, not counted.
async fn well_behaved(
    m: &Member,
    link: &mut Link,
    shared: &Shared,
    stats: &GroupStats,
    plan: Plan,
) {
    let mut dev = SerialDevice::new(&m.id, &m.frame_key(), 0, RESERVE);
    let listening = shared.devices.get(&m.id).map(|d| &d.listening);
    let mut answered = Answered { seen: false, stats };
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut payload = Vec::with_capacity(128);
    let mut seq = 0u64;
    let stop = shared.end + shared.grace;
    let mut burst = plan.boot_burst as usize;
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= stop {
            break;
        }
        // Unanswered: sent again, or given up.
        let late: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| now >= p.at + ANSWER_WAIT)
            .map(|(c, _)| *c)
            .collect();
        for c in late {
            let Some(p) = pending.get_mut(&c) else {
                continue;
            };
            if p.resent < RESENDS {
                p.resent += 1;
                p.at = now;
                let bytes = p.bytes.clone();
                link.write(bytes).await;
            } else if pending.remove(&c).is_some_and(|p| p.telemetry) {
                stats.refused("no_answer");
            }
        }
        let outstanding = pending.values().filter(|p| p.telemetry).count();
        if shared.running() && now >= next && outstanding < MAX_OUTSTANDING {
            seq += 1;
            let sent_us = shared.now_us();
            telemetry(&mut payload, seq, sent_us, 0);
            let (counter, bytes) = dev.data(&plan.topic, &payload);
            stats.add(&stats.sent, 1);
            pending.insert(
                counter,
                Pending {
                    bytes: bytes.clone(),
                    sent_us,
                    at: now,
                    resent: 0,
                    telemetry: true,
                },
            );
            link.write(bytes).await;
            if burst > 1 {
                burst -= 1;
            } else {
                burst = 0;
                next = (next + interval(&plan, shared)).max(now);
            }
            continue;
        }
        let mut wake = pending
            .values()
            .map(|p| p.at + ANSWER_WAIT)
            .min()
            .unwrap_or(stop)
            .min(stop);
        if shared.running() && outstanding < MAX_OUTSTANDING {
            wake = wake.min(next);
        }
        for h in link.hear(&mut dev, wake).await {
            match h {
                Heard::Ack(c) => {
                    answered.now();
                    if let Some(l) = listening
                        && plan.ack_topic.is_some()
                    {
                        l.store(true, Relaxed);
                    }
                    if let Some(p) = pending.remove(&c)
                        && p.telemetry
                    {
                        stats.add(&stats.acknowledged, 1);
                        if !shared.service_listens {
                            stats.latency_us(shared.now_us().saturating_sub(p.sent_us));
                        }
                    }
                }
                Heard::Nak(c, reason) => {
                    answered.now();
                    if pending.remove(&c).is_some_and(|p| p.telemetry) {
                        stats.refused(reason.label());
                    }
                }
                Heard::Resync(floor) => {
                    stats.add(&stats.resyncs, 1);
                    // Refused as stale: never to be answered.
                    let stale: Vec<u64> = pending.range(..=floor).map(|(c, _)| *c).collect();
                    for c in stale {
                        if pending.remove(&c).is_some_and(|p| p.telemetry) {
                            stats.refused("stale");
                        }
                    }
                }
                Heard::Command {
                    counter,
                    payload: command,
                    again,
                    ..
                } => {
                    link.write(dev.ack(counter)).await;
                    if again {
                        continue;
                    }
                    stats.add(&stats.commands_received, 1);
                    if let Some(ack) = &plan.ack_topic {
                        let mut body = b"{\"ack\":".to_vec();
                        body.extend_from_slice(&command);
                        body.push(b'}');
                        body.truncate(MAX_PAYLOAD);
                        let (c, bytes) = dev.data(ack, &body);
                        pending.insert(
                            c,
                            Pending {
                                bytes: bytes.clone(),
                                sent_us: shared.now_us(),
                                at: Instant::now(),
                                resent: 0,
                                telemetry: false,
                            },
                        );
                        link.write(bytes).await;
                    }
                }
            }
        }
    }
    if let Some(l) = listening {
        l.store(false, Relaxed);
    }
    for _ in pending.values().filter(|p| p.telemetry) {
        stats.refused("no_answer");
    }
}

/// Frames naming the member, signed under a key that is not its own, `rate` a second.
/// It listens under its real key: any answer to a forged frame (the gateway signs
/// answers under the real key) means the gateway took it.
async fn forged(m: &Member, link: &mut Link, shared: &Shared, stats: &GroupStats, rate: f64) {
    let mut observer = SerialDevice::new(&m.id, &m.frame_key(), 0, RESERVE);
    let mut forger = SerialDevice::new(&m.id, &random_key(), 0, RESERVE);
    let period = Duration::from_secs_f64(1.0 / rate);
    let stop = shared.end + shared.grace;
    let mut forged: HashSet<u64> = HashSet::new();
    let mut payload = Vec::new();
    let (mut sent, mut accepted) = (0u64, 0u64);
    let mut next = Instant::now();
    while Instant::now() < stop {
        if shared.running() && Instant::now() >= next {
            sent += 1;
            telemetry(&mut payload, sent, shared.now_us(), 0);
            let (c, bytes) = forger.data("telemetry", &payload);
            forged.insert(c);
            stats.add(&stats.sent, 1);
            link.write(bytes).await;
            next += period;
        }
        let wake = if shared.running() {
            next.min(stop)
        } else {
            stop
        };
        for h in link.hear(&mut observer, wake).await {
            let taken = match h {
                Heard::Ack(c) | Heard::Nak(c, _) => forged.remove(&c),
                // Only a frame whose tag verified is answered RESYNC.
                Heard::Resync(_) => {
                    stats.add(&stats.resyncs, 1);
                    true
                }
                Heard::Command { .. } => false,
            };
            if taken {
                accepted += 1;
                stats.add(&stats.accepted, 1);
            }
        }
    }
    for _ in accepted.min(sent)..sent {
        stats.refused("dropped");
    }
}

/// Each cycle a genuine frame (answered as any), then one it recorded earlier, older
/// than the last one answered, sent again as it was. A replay must get no ACK or NAK
/// (a RESYNC, paced by the gateway, is the right answer).
async fn replay(m: &Member, link: &mut Link, shared: &Shared, stats: &GroupStats, rate: f64) {
    let mut dev = SerialDevice::new(&m.id, &m.frame_key(), 0, RESERVE);
    let mut answered = Answered { seen: false, stats };
    let period = Duration::from_secs_f64(1.0 / rate);
    let stop = shared.end + shared.grace;
    let mut recorded: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut replayed: HashSet<u64> = HashSet::new();
    let mut genuine: Option<(u64, u64)> = None;
    let mut last_answered = 0u64;
    let (mut replays, mut accepted) = (0u64, 0u64);
    let mut payload = Vec::new();
    let mut seq = 0;
    let mut next = Instant::now();
    let mut replay_due = false;
    while Instant::now() < stop {
        let now = Instant::now();
        if shared.running() && now >= next {
            // The last cycle's genuine frame, never answered.
            if genuine.take().is_some() {
                stats.refused("no_answer");
            }
            seq += 1;
            let sent_us = shared.now_us();
            telemetry(&mut payload, seq, sent_us, 0);
            let (c, bytes) = dev.data("telemetry", &payload);
            stats.add(&stats.sent, 1);
            genuine = Some((c, sent_us));
            recorded.push_back((c, bytes.clone()));
            if recorded.len() > RECORDED {
                recorded.pop_front();
            }
            link.write(bytes).await;
            replay_due = true;
            next += period;
        }
        // Once the genuine frame is answered (or the cycle is half over), the replay.
        if replay_due && (genuine.is_none() || now >= next - period / 2) {
            replay_due = false;
            let older: Vec<&(u64, Vec<u8>)> = recorded
                .iter()
                .filter(|(c, _)| *c < last_answered)
                .collect();
            if !older.is_empty() {
                let (c, bytes) = older[rand::rng().random_range(0..older.len())].clone();
                replays += 1;
                replayed.insert(c);
                stats.add(&stats.sent, 1);
                link.write(bytes).await;
            }
        }
        let mut wake = if shared.running() {
            next.min(stop)
        } else {
            stop
        };
        if replay_due {
            wake = wake.min(next - period / 2);
        }
        for h in link.hear(&mut dev, wake).await {
            let (c, reason) = match h {
                Heard::Ack(c) => (c, None),
                Heard::Nak(c, reason) => (c, Some(reason)),
                Heard::Resync(_) => {
                    stats.add(&stats.resyncs, 1);
                    continue;
                }
                Heard::Command { counter, .. } => {
                    link.write(dev.ack(counter)).await;
                    continue;
                }
            };
            answered.now();
            if let Some((g, sent_us)) = genuine
                && g == c
            {
                genuine = None;
                last_answered = last_answered.max(c);
                match reason {
                    None => {
                        stats.add(&stats.acknowledged, 1);
                        if !shared.service_listens {
                            stats.latency_us(shared.now_us().saturating_sub(sent_us));
                        }
                    }
                    Some(r) => stats.refused(r.label()),
                }
            } else if replayed.remove(&c) {
                accepted += 1;
                stats.add(&stats.accepted, 1);
            }
        }
    }
    if genuine.is_some() {
        stats.refused("no_answer");
    }
    for _ in accepted.min(replays)..replays {
        stats.refused("replay_refused");
    }
}

/// Genuine frames as fast as the bus takes them, `inflight` unanswered at a time; one
/// unanswered for `SERIAL_FLOOD_EXPIRY` frees its place (the gateway drops frames over
/// the port's rate unanswered) and counts as `no_answer` if no answer came by the end.
async fn flood(
    m: &Member,
    link: &mut Link,
    shared: &Shared,
    stats: &GroupStats,
    inflight: u16,
    bytes: usize,
) {
    let mut dev = SerialDevice::new(&m.id, &m.frame_key(), 0, RESERVE);
    let mut answered = Answered { seen: false, stats };
    let stop = shared.end + shared.grace;
    let mut outstanding: HashMap<u64, Instant> = HashMap::new();
    let mut expired: HashSet<u64> = HashSet::new();
    let mut payload = Vec::new();
    let mut seq = 0;
    while Instant::now() < stop {
        while shared.running() && outstanding.len() < inflight as usize {
            seq += 1;
            telemetry(&mut payload, seq, shared.now_us(), bytes.min(MAX_PAYLOAD));
            payload.truncate(MAX_PAYLOAD);
            let (c, frame) = dev.data("telemetry", &payload);
            stats.add(&stats.sent, 1);
            outstanding.insert(c, Instant::now());
            if !link.write(frame).await {
                break;
            }
        }
        let now = Instant::now();
        outstanding.retain(|c, at| {
            let keep = now < *at + SERIAL_FLOOD_EXPIRY;
            if !keep {
                expired.insert(*c);
            }
            keep
        });
        let wake = outstanding
            .values()
            .map(|at| *at + SERIAL_FLOOD_EXPIRY)
            .min()
            .unwrap_or(stop)
            .min(stop);
        for h in link.hear(&mut dev, wake).await {
            let (c, reason) = match h {
                Heard::Ack(c) => (c, None),
                Heard::Nak(c, reason) => (c, Some(reason)),
                Heard::Resync(_) => {
                    stats.add(&stats.resyncs, 1);
                    continue;
                }
                Heard::Command { counter, .. } => {
                    link.write(dev.ack(counter)).await;
                    continue;
                }
            };
            answered.now();
            if outstanding.remove(&c).is_some() || expired.remove(&c) {
                match reason {
                    None => stats.add(&stats.acknowledged, 1),
                    Some(r) => stats.refused(r.label()),
                }
            }
        }
        if !shared.running()
            && outstanding.is_empty()
            && Instant::now() >= shared.end + shared.grace / 2
        {
            break;
        }
    }
    for _ in 0..outstanding.len() + expired.len() {
        stats.refused("no_answer");
    }
}

/// Each cycle: line noise (every fourth a run longer than any frame, else `bytes`
/// random bytes), a frame cut short, then a good frame, written as one. Good frames
/// must all be answered; a cut frame answered is accepted.
async fn noise(
    m: &Member,
    link: &mut Link,
    shared: &Shared,
    stats: &GroupStats,
    rate: f64,
    bytes: usize,
) {
    let mut dev = SerialDevice::new(&m.id, &m.frame_key(), 0, RESERVE);
    let mut answered = Answered { seen: false, stats };
    let period = Duration::from_secs_f64(1.0 / rate);
    let stop = shared.end + shared.grace;
    let mut good: HashMap<u64, u64> = HashMap::new();
    let mut cut: HashSet<u64> = HashSet::new();
    let (mut cuts, mut accepted) = (0u64, 0u64);
    let mut payload = Vec::new();
    let mut seq = 0;
    let mut next = Instant::now();
    while Instant::now() < stop {
        if shared.running() && Instant::now() >= next {
            seq += 1;
            let mut wire = line_noise(seq, bytes, &mut rand::rng());
            telemetry(&mut payload, seq, shared.now_us(), 0);
            let (c, frame) = dev.data("telemetry", &payload);
            // Its leading delimiter and at least a byte kept; its end lost.
            let keep = rand::rng().random_range(2..frame.len() - 1);
            wire.extend_from_slice(&frame[..keep]);
            cut.insert(c);
            cuts += 1;
            let sent_us = shared.now_us();
            telemetry(&mut payload, seq, sent_us, 0);
            let (c, frame) = dev.data("telemetry", &payload);
            wire.extend_from_slice(&frame);
            good.insert(c, sent_us);
            stats.add(&stats.sent, 2);
            link.write(wire).await;
            next += period;
        }
        let wake = if shared.running() {
            next.min(stop)
        } else {
            stop
        };
        for h in link.hear(&mut dev, wake).await {
            let (c, reason) = match h {
                Heard::Ack(c) => (c, None),
                Heard::Nak(c, reason) => (c, Some(reason)),
                Heard::Resync(_) => {
                    stats.add(&stats.resyncs, 1);
                    continue;
                }
                Heard::Command { counter, .. } => {
                    link.write(dev.ack(counter)).await;
                    continue;
                }
            };
            answered.now();
            if let Some(sent_us) = good.remove(&c) {
                match reason {
                    None => {
                        stats.add(&stats.acknowledged, 1);
                        if !shared.service_listens {
                            stats.latency_us(shared.now_us().saturating_sub(sent_us));
                        }
                    }
                    Some(r) => stats.refused(r.label()),
                }
            } else if cut.remove(&c) {
                accepted += 1;
                stats.add(&stats.accepted, 1);
            }
        }
        if !shared.running() && good.is_empty() {
            break;
        }
    }
    for _ in 0..good.len() {
        stats.refused("no_answer");
    }
    for _ in accepted.min(cuts)..cuts {
        stats.refused("dropped");
    }
}

/// Cycle `n`'s noise: every fourth, a run of non-zero bytes longer than the longest
/// encoding (the gateway counts it as noise); otherwise `bytes` random bytes, zeros
/// among them (each piece between them a malformed frame).
fn line_noise(n: u64, bytes: usize, rng: &mut impl RngExt) -> Vec<u8> {
    if n.is_multiple_of(4) {
        (0..MAX_ENCODED_LEN + 50)
            .map(|_| rng.random_range(1..=255u8))
            .collect()
    } else {
        (0..bytes).map(|_| rng.random::<u8>()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::frame_with;
    use portcullis_serial_frame::{Body, Direction, Key};

    #[test]
    fn a_long_run_of_noise_has_no_delimiter_and_is_longer_than_any_frame() {
        let mut rng = rand::rng();
        let run = line_noise(4, 64, &mut rng);
        assert!(run.len() > MAX_ENCODED_LEN);
        assert!(!run.contains(&0));
        assert_eq!(line_noise(5, 64, &mut rng).len(), 64);
    }

    #[test]
    fn noise_and_a_cut_frame_cost_only_themselves_and_verify_for_no_one() {
        // What a device's receiver makes of a noise cycle: the good frame alone.
        let key = [3u8; 32];
        let mut sender = SerialDevice::new("n-1", &key, 0, RESERVE);
        let mut rng = rand::rng();
        for n in 1..=40 {
            let mut wire = line_noise(n, 64, &mut rng);
            let (_, cut) = sender.data("telemetry", b"cut");
            wire.extend_from_slice(&cut[..rng.random_range(2..cut.len() - 1)]);
            // As the gateway would answer the good frame: a down ACK.
            wire.extend(frame_with(
                &Key::new(&key).unwrap(),
                "n-1",
                Direction::Down,
                n,
                Body::Ack { counter: n },
            ));
            let mut receiver = SerialDevice::new("n-1", &key, 0, RESERVE);
            assert_eq!(receiver.read(&wire), vec![Heard::Ack(n)], "cycle {n}");
        }
    }
}
