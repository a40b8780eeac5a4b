//! The behaviour model's evaluation (issue 6): how often it flags a well-behaved fleet
//! (false positives), and how soon it quarantines each hostile behaviour of the
//! simulator (true positives).
//!
//! Nothing here opens a socket or reads the wall clock. A device is a generator of
//! what the gateway would tell its model, each observation stamped with a fixed base
//! `Instant` plus simulated seconds, so a week of a thousand devices takes seconds and
//! a run is the same for a seed on any number of threads. The model is the gateway's
//! own: each device is the `Tracked` of a behaviour table of its own (hashing topics
//! the same way in every process), and its transitions are read, with their reasons,
//! from the table's change channel. The well-behaved timing is the simulator's own
//! (`fleet::jittered`, `fleet::daily_rate`, `fleet::ramp_rate`); its messages are told
//! to the model a window's worth at a time. A hostile behaviour is translated into
//! what the gateway's model observes of it: a flood's and a ramp's messages pass the
//! gateway's own admission (`portcullis_core::admission`: quarantine, ACL, rate
//! limits with their waits, validation) on the simulated clock; logins and
//! connections pass its per-source back-off and connection rate
//! (`portcullis_core::backoff`, `portcullis_core::limit`). All at the default
//! configuration, with the simulator's default parameters for the behaviour.

use crate::fleet::{daily_rate, jittered, ramp_rate};
use crate::scenario::{Behaviour, MQTT_FLOOD_INFLIGHT};
use bytes::Bytes;
use portcullis_config::Config;
use portcullis_config::validation::{PayloadFormat, PayloadRule, Validation};
use portcullis_core::acl::AclTemplate;
use portcullis_core::admission::{Admission, Directory, Offer, Peer, Rules, Shared, Verdict};
use portcullis_core::audit::Audit;
use portcullis_core::backoff::{BackoffPolicy, SourceGuard};
use portcullis_core::behaviour::{Observation, Settings, State, Transition};
use portcullis_core::limit::{GlobalBucket, PrincipalRates, Rate, TokenBucket};
use portcullis_core::message::{Message, QoS};
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind, PrincipalRef};
use portcullis_core::quarantine::{Behaviours, Change, Policies, Policy, Tracked};
use portcullis_core::retained::RetainedCommands;
use portcullis_core::topic::{TopicFilter, TopicName};
use portcullis_core::validate::Validator;
use rand::{RngExt, TryRng};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const HOUR: f64 = 3600.0;
const DAY: f64 = 86_400.0;

/// Well-behaved time before a hostile behaviour starts (the model has learned by then).
pub const PREFIX_SECS: f64 = HOUR;
/// How long after its onset a hostile behaviour runs if it is not quarantined.
pub const HORIZON_SECS: f64 = HOUR;
/// A flooder's pace when nothing holds it back: 32 QoS 1 messages in flight over a
/// 16 ms round trip.
pub const FLOOD_LINK_RATE: f64 = 2000.0;
/// The oversized payload that a validation size limit refuses: under the default
/// `limits.max_packet_size` (256 KiB), over a configured `validation.max_payload_bytes`
/// such as 64 KiB.
pub const OVERSIZE_REFUSED_BYTES: usize = 200_000;
/// The size rule it meets.
pub const OVERSIZE_RULE_BYTES: usize = 64 * 1024;
/// A slow ramp ends at the rate `hostile.toml` ramps to (50/s × 8) ...
pub const SLOW_RAMP_END_RATE: f64 = 400.0;
/// ... over six hours, starting at the device's own rate: slow next to the baseline's
/// capped rise (×2 per hour).
pub const SLOW_RAMP_SECS: f64 = 6.0 * HOUR;
/// The keep-alive the simulator's devices ask for; the gateway drops a silent
/// session after one and a half of it.
pub const DEVICE_KEEP_ALIVE_SECS: f64 = 60.0;

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Well-behaved devices.
    pub devices: usize,
    /// Simulated days each.
    pub days: f64,
    pub seed: u64,
    /// Devices per hostile behaviour.
    pub hostile: usize,
    /// Worker threads (default: the CPUs this process may run on).
    #[serde(skip)]
    pub threads: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            devices: 1000,
            days: 7.0,
            seed: 1,
            hostile: 50,
            threads: None,
        }
    }
}

/// The gateway configuration the translation uses (the embedded defaults).
#[derive(Debug, Clone, Serialize)]
pub struct Gateway {
    pub messages_per_second: f64,
    pub message_burst: f64,
    pub bytes_per_second: f64,
    pub byte_burst: f64,
    pub max_delay_ms: u64,
    pub sustained_secs: u64,
    /// What happens to a principal over its rate for too long.
    pub action: &'static str,
    pub probation_rate_factor: f64,
    pub connections_per_second_per_source: f64,
    pub connection_burst_per_source: f64,
    pub auth_max_failures: u32,
    pub auth_failure_window_secs: u64,
    pub auth_backoff_initial_secs: u64,
    pub auth_backoff_max_secs: u64,
    pub max_packet_size: usize,
    pub connect_timeout_secs: u64,
    pub max_connections_per_source: usize,
    /// A session that goes silent is dropped this long after it was last heard.
    pub silent_session_secs: f64,
    /// The configuration itself, for the gateway's own reading of it.
    #[serde(skip)]
    config: Arc<Config>,
    #[serde(skip)]
    policies: Policies,
    #[serde(skip)]
    backoff: BackoffPolicy,
}

impl Gateway {
    pub fn from_config(c: &Config) -> Gateway {
        use portcullis_config::RateAction;
        let r = &c.rate_limits;
        let action = match r.action {
            RateAction::Drop => "drop",
            RateAction::QuotaExceeded => "quota_exceeded",
            RateAction::Disconnect => "disconnect",
        };
        Gateway {
            messages_per_second: r.messages_per_second,
            message_burst: r.message_burst,
            bytes_per_second: r.bytes_per_second,
            byte_burst: r.byte_burst,
            max_delay_ms: r.max_delay.as_millis() as u64,
            sustained_secs: r.sustained.as_secs(),
            action,
            probation_rate_factor: c.behaviour.probation_rate_factor,
            connections_per_second_per_source: r.connections_per_second_per_source,
            connection_burst_per_source: r.connection_burst_per_source,
            auth_max_failures: c.auth.max_failures,
            auth_failure_window_secs: c.auth.failure_window.as_secs(),
            auth_backoff_initial_secs: c.auth.backoff_initial.as_secs(),
            auth_backoff_max_secs: c.auth.backoff_max.as_secs(),
            max_packet_size: c.limits.max_packet_size,
            connect_timeout_secs: c.limits.connect_timeout.as_secs(),
            max_connections_per_source: c.limits.max_connections_per_source,
            silent_session_secs: 1.5
                * DEVICE_KEEP_ALIVE_SECS.min(c.sessions.max_keep_alive.as_secs() as f64),
            policies: Policies::from_config(c),
            backoff: BackoffPolicy::from_config(&c.auth),
            config: Arc::new(c.clone()),
        }
    }

    fn connection_rate(&self) -> Rate {
        Rate {
            per_second: self.connections_per_second_per_source,
            burst: self.connection_burst_per_source,
        }
    }

    fn backoff(&self) -> BackoffPolicy {
        self.backoff
    }
}

/// The whole evaluation; the same for the same options.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub options: Options,
    /// The model's settings.
    pub settings: BTreeMap<&'static str, serde_json::Value>,
    pub gateway: Gateway,
    pub false_positives: FalsePositives,
    pub true_positives: Vec<Detection>,
    /// Hostile behaviours that never authenticate as the device.
    pub not_device_behaviours: Vec<NotDevice>,
}

/// A well-behaved device's parameters, drawn from the seed.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Mean messages per second.
    pub rate: f64,
    pub jitter: f64,
    pub daily_amplitude: f64,
    /// Where in its daily cycle the device starts, in seconds.
    pub daily_phase_secs: f64,
    pub payload_min: usize,
    pub payload_max: usize,
    /// Messages sent at once after each connection.
    pub boot_burst: u32,
    pub topics: usize,
    /// Mean time between losses of the connection.
    pub reconnect_every_secs: f64,
    /// Chance that a loss is an outage of minutes rather than seconds.
    pub outage_chance: f64,
    /// Mean time between changes of its address (DHCP).
    pub new_source_every_secs: f64,
    /// Chance that a reconnect first fails authentication once or twice.
    pub auth_failure_chance: f64,
}

impl Params {
    fn draw(rng: &mut Rng64) -> Params {
        let payload_min = log_uniform(rng, 16.0, 1024.0).round() as usize;
        Params {
            rate: log_uniform(rng, 0.01, 5.0),
            jitter: rng.random_range(0.0..0.5),
            daily_amplitude: rng.random_range(0.0..0.8),
            daily_phase_secs: rng.random_range(0.0..DAY),
            payload_min,
            payload_max: (payload_min as f64 * rng.random_range(1.0..4.0)).round() as usize,
            // The simulator sends at most 32 at once (its unacknowledged cap).
            boot_burst: rng.random_range(5..=32),
            topics: rng.random_range(1..=8),
            reconnect_every_secs: rng.random_range(2.0 * HOUR..8.0 * HOUR),
            outage_chance: rng.random_range(0.1..0.5),
            new_source_every_secs: rng.random_range(2.0 * DAY..6.0 * DAY),
            auth_failure_chance: rng.random_range(0.0..0.1),
        }
    }
}

/// The well-behaved fleet's transitions.
#[derive(Debug, Clone, Serialize)]
pub struct FalsePositives {
    pub devices: usize,
    pub days: f64,
    pub device_days: f64,
    /// What the fleet did, in all.
    pub messages: u64,
    pub connects: u64,
    pub takeovers: u64,
    pub source_changes: u64,
    pub auth_failures: u64,
    pub probations: u64,
    pub devices_in_probation: usize,
    pub probations_per_device_day: f64,
    pub quarantines: u64,
    pub devices_quarantined: usize,
    pub quarantines_per_device_day: f64,
    /// With none seen: the rate that none in this many device-days still allows
    /// (95 %, the rule of three).
    pub quarantines_per_device_day_95: f64,
    /// Entries into probation and quarantine, by detector.
    pub reasons: BTreeMap<String, ReasonCount>,
    /// Every quarantined device, and the first probation-only ones, with their
    /// parameters and transitions.
    pub flagged: Vec<Flagged>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReasonCount {
    pub probation: u64,
    pub quarantine: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flagged {
    pub device: String,
    pub params: Params,
    pub transitions: Vec<Step>,
}

/// One transition, at simulated seconds from the device's start.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at_secs: f64,
    pub from: &'static str,
    pub to: &'static str,
    pub reason: String,
}

/// One hostile behaviour's detection.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub behaviour: &'static str,
    /// What the gateway's model observes of it.
    pub observed_as: &'static str,
    /// Whether the model is the part of the gateway meant to stop it.
    pub model_detects: bool,
    /// What handles it otherwise.
    pub handled_by: Option<&'static str>,
    pub devices: usize,
    pub detected: usize,
    /// Quarantined while still well-behaved (a false positive).
    pub quarantined_before_onset: usize,
    /// Devices that went through probation after the onset.
    pub probation_first: usize,
    /// Onset to quarantine.
    pub median_secs: Option<f64>,
    pub max_secs: Option<f64>,
    /// The quarantine reason of the first device detected.
    pub first_reason: Option<String>,
    pub reasons: BTreeMap<String, usize>,
    /// Credential stuffing: most authentication failures the model saw in one rule
    /// window, over all devices.
    pub most_auth_failures_in_a_rule_window: Option<usize>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotDevice {
    pub behaviour: &'static str,
    pub handled_by: &'static str,
}

/// Run the evaluation with the model's default settings.
pub fn evaluate(o: &Options) -> Evaluation {
    evaluate_with(o, &Config::default().behaviour)
}

/// Run the evaluation with this behaviour model (a device group's, or a candidate
/// default) and the gateway's embedded defaults otherwise.
pub fn evaluate_with(o: &Options, b: &portcullis_config::Behaviour) -> Evaluation {
    evaluate_reporting(o, b, &|_| {})
}

/// How far an evaluation has come: devices simulated so far, of all it will simulate
/// (the well-behaved ones first, then the hostile ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub hostile: bool,
}

/// The number of devices an evaluation simulates.
pub fn devices_simulated(o: &Options) -> usize {
    o.devices + Hostile::ALL.len() * o.hostile
}

/// `evaluate_with`, telling `progress` after each simulated device (from the worker
/// threads, so it must be cheap).
pub fn evaluate_reporting(
    o: &Options,
    b: &portcullis_config::Behaviour,
    progress: &(dyn Fn(Progress) + Sync),
) -> Evaluation {
    let config = Config {
        behaviour: b.clone(),
        ..Config::default()
    };
    let gw = Gateway::from_config(&config);
    let threads = o
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let end = o.days * DAY;
    let total = devices_simulated(o);
    let done = AtomicUsize::new(0);
    let tick = |hostile| {
        let done = done.fetch_add(1, Ordering::Relaxed) + 1;
        progress(Progress {
            done,
            total,
            hostile,
        });
    };
    let runs = parallel(o.devices, threads, |i| {
        let run = well_behaved_device(o.seed, i, end, &gw);
        tick(false);
        run
    });
    let false_positives = tally_false_positives(o, &runs);
    let jobs: Vec<(Hostile, usize)> = Hostile::ALL
        .iter()
        .flat_map(|h| (0..o.hostile).map(move |i| (*h, i)))
        .collect();
    let hostile_runs = parallel(jobs.len(), threads, |j| {
        let (h, i) = jobs[j];
        let run = hostile_device(h, o.seed, i, &gw, false);
        tick(true);
        run
    });
    let true_positives = Hostile::ALL
        .iter()
        .map(|h| {
            let runs: Vec<&HostileRun> = jobs
                .iter()
                .zip(&hostile_runs)
                .filter(|((k, _), _)| k == h)
                .map(|(_, r)| r)
                .collect();
            tally_detection(*h, &runs, &gw)
        })
        .collect();
    Evaluation {
        options: o.clone(),
        settings: settings_map(&Settings::from_config(b)),
        gateway: gw,
        false_positives,
        true_positives,
        not_device_behaviours: NOT_DEVICE.to_vec(),
    }
}

const NOT_DEVICE: &[NotDevice] = &[
    NotDevice {
        behaviour: "slowloris",
        handled_by: "the CONNECT deadline (limits.connect_timeout), which closes \
                     each connection; the per-source connection rate and cap \
                     (rate_limits.connections_per_second_per_source, \
                     limits.max_connections_per_source); source bans",
    },
    NotDevice {
        behaviour: "malformed (before CONNECT)",
        handled_by: "strict decoding, which refuses a malformed CONNECT (or one over \
                     64 KiB) before any credential is looked at (malformed_connect); the \
                     per-source connection rate; source bans",
    },
    NotDevice {
        behaviour: "credential-stuffing (unknown ids)",
        handled_by: "uniform refusals (an unknown id costs the same work and gets the \
                     same answer as a wrong secret); per-source back-off \
                     (auth.max_failures, doubling up to auth.backoff_max); the \
                     per-source connection rate; source bans",
    },
];

// ---------------------------------------------------------------------------------
// Randomness: one small generator per device, from the seed and the device's index.

/// SplitMix64: fast, and its stream depends only on its seed.
#[derive(Debug, Clone)]
struct Rng64(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng64 {
    fn new(seed: u64, stream: u64, index: u64) -> Rng64 {
        Rng64(mix(seed ^ mix(stream.wrapping_add(mix(index)))))
    }
}

impl TryRng for Rng64 {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.try_next_u64()? >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        Ok(mix(self.0))
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dest.chunks_mut(8) {
            let b = self.try_next_u64()?.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        Ok(())
    }
}

fn log_uniform(rng: &mut Rng64, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp()
}

fn exponential(rng: &mut Rng64, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// A source address's hash (never 0: the model's "none yet").
fn source_hash(device: u64, n: u64) -> u64 {
    mix(device.wrapping_mul(0x1_0000).wrapping_add(n)) | 1
}

/// Run `f` on 0..n over `threads` threads, taking indices in turn; results in order.
fn parallel<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<(usize, T)>> = Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|scope| {
        for _ in 0..threads.min(n.max(1)) {
            scope.spawn(|| {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    mine.push((i, f(i)));
                }
                out.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            });
        }
    });
    let mut out = out.into_inner().unwrap_or_else(|e| e.into_inner());
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

// ---------------------------------------------------------------------------------
// Feeding one device's model.

/// Messages of one model window and one topic, told as one observation.
#[derive(Debug, Clone, Copy)]
struct Batch {
    window: u64,
    topic: u64,
    count: u32,
    bytes: u64,
    at: f64,
}

/// The session the gateway has registered for the device, for take-overs.
#[derive(Debug, Clone, Copy)]
struct Session {
    /// When the gateway lets go of it (infinite while it is live).
    gone_at: f64,
    /// When it took over an earlier session of the same identity.
    took_over_at: Option<f64>,
    /// When its peer last sent anything (its CONNECT at first).
    heard_at: f64,
    /// Whether the model has been told it ended.
    ended: bool,
    /// The source it came from (a hash of its address).
    source: u64,
}

/// One device's model, fed on the simulated clock: the `Tracked` of a behaviour table
/// of its own, whose change channel tells the transitions.
struct Feed {
    id: PrincipalId,
    group: GroupName,
    behaviours: Arc<Behaviours>,
    tracked: Arc<Tracked>,
    changes: UnboundedReceiver<Change>,
    policy: Arc<Policy>,
    base: Instant,
    window_secs: f64,
    batch: Option<Batch>,
    session: Option<Session>,
    steps: Vec<Step>,
    quarantined: Option<(f64, String)>,
    messages: u64,
    connects: u64,
    takeovers: u64,
    auth_failures: u64,
    /// Everything but single messages, in words (only when a device is traced).
    log: Option<Vec<String>>,
    /// The last observation's time: the model's clock never goes back.
    last: f64,
    /// How long the gateway holds a session that went silent.
    silent_session_secs: f64,
}

/// The group every simulated device is in.
const GROUP: &str = "default";

impl Feed {
    /// The model of device `id`, new at `base`.
    fn new(id: &str, base: Instant, gw: &Gateway) -> Feed {
        let id = PrincipalId::parse(id).expect("the simulator's device ids are valid");
        let group = GroupName::parse(GROUP).expect("a valid group name");
        let (behaviours, changes) = Behaviours::with_fixed_hasher(gw.policies.clone());
        // A device with no transition kept, at the simulated clock's start (tracking it
        // the gateway's way would start its model on the wall clock).
        let tracked = behaviours.restore(&id, &group, State::Normal, base, base);
        let policy = behaviours.policy(&group);
        Feed {
            window_secs: policy.settings.window.as_secs_f64(),
            id,
            group,
            behaviours,
            tracked,
            changes,
            policy,
            base,
            batch: None,
            session: None,
            steps: Vec::new(),
            quarantined: None,
            messages: 0,
            connects: 0,
            takeovers: 0,
            auth_failures: 0,
            log: None,
            last: 0.0,
            silent_session_secs: gw.silent_session_secs,
        }
    }

    fn log(&mut self, t: f64, what: impl FnOnce() -> String) {
        if let Some(log) = &mut self.log {
            log.push(format!("{}  {}", moment(t), what()));
        }
    }

    fn at(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t)
    }

    /// Simulated seconds of an instant.
    fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.base).as_secs_f64()
    }

    fn settings(&self) -> &Settings {
        &self.policy.settings
    }

    /// A topic's hash, as the gateway tells it to the model.
    fn hash(&self, topic: &str) -> u64 {
        self.behaviours.hash(topic)
    }

    fn done(&self) -> bool {
        self.quarantined.is_some()
    }

    fn note(&mut self, t: f64, obs: Observation) {
        self.end_session_by(t);
        debug_assert!(t >= self.last, "{obs:?} at {t} after {}", self.last);
        self.last = t;
        let now = self.at(t);
        if self.tracked.observe(obs, now, &self.policy).is_some() {
            self.drain(t);
        }
    }

    /// Record the transitions the model decided (at `t`), as the gateway hears of them.
    fn drain(&mut self, t: f64) {
        while let Ok(change) = self.changes.try_recv() {
            self.record(t, change.transition);
        }
    }

    fn record(&mut self, t: f64, tr: Transition) {
        if self.log.is_some() {
            let ((rate, sd), (bytes, bytes_sd), _) = self.tracked.baselines(self.settings());
            let line = format!(
                "{} -> {}: {} [baseline {rate:.2}/s sd {sd:.2}, {bytes:.0} B/s sd {bytes_sd:.0}]",
                tr.from.as_str(),
                tr.to.as_str(),
                tr.reason
            );
            self.log(t, || line);
        }
        if tr.to == State::Quarantined && self.quarantined.is_none() {
            self.quarantined = Some((t, tr.reason.clone()));
        }
        self.steps.push(Step {
            at_secs: t,
            from: tr.from.as_str(),
            to: tr.to.as_str(),
            reason: tr.reason,
        });
    }

    /// Anything but messages: the batch goes first, to keep the order.
    fn observe(&mut self, t: f64, obs: Observation) {
        self.flush();
        if obs == Observation::AuthFailure {
            self.auth_failures += 1;
        }
        self.log(t, || format!("{obs:?}"));
        self.note(t, obs);
    }

    /// `count` messages at `t`, `bytes` in all. Messages of one window and topic are
    /// told at once: the model counts them the same way.
    fn messages(&mut self, t: f64, topic: u64, count: u32, bytes: u64) {
        self.messages += count as u64;
        self.heard(t);
        let window = (t / self.window_secs) as u64;
        if let Some(b) = &mut self.batch
            && b.window == window
            && b.topic == topic
        {
            b.count += count;
            b.bytes += bytes;
            return;
        }
        self.flush();
        self.batch = Some(Batch {
            window,
            topic,
            count,
            bytes,
            at: t,
        });
    }

    /// A packet the session reads at `t` and hands to the admission, which tells the
    /// model itself.
    fn read(&mut self, t: f64) {
        self.flush();
        self.end_session_by(t);
        debug_assert!(t >= self.last, "a packet at {t} after {}", self.last);
        self.last = t;
        self.heard(t);
    }

    fn flush(&mut self) {
        if let Some(b) = self.batch.take() {
            self.note(
                b.at,
                Observation::Messages {
                    count: b.count,
                    bytes: b.bytes,
                    topic: b.topic,
                },
            );
        }
    }

    /// The gateway lets go of a session that ended by `t`: the model hears of it then.
    fn end_session_by(&mut self, t: f64) {
        if let Some(s) = &mut self.session
            && !s.ended
            && s.gone_at <= t
        {
            s.ended = true;
            let at = s.gone_at.max(self.last);
            self.last = at;
            let now = self.at(at);
            if self
                .tracked
                .observe(Observation::Disconnect, now, &self.policy)
                .is_some()
            {
                self.drain(at);
            }
        }
    }

    fn tick(&mut self, t: f64) {
        self.flush();
        self.end_session_by(t);
        debug_assert!(t >= self.last, "tick at {t} after {}", self.last);
        self.last = t;
        let now = self.at(t);
        if self.tracked.tick(now, &self.policy).is_some() {
            self.drain(t);
        }
    }

    /// The live session's peer sent something at `t`.
    fn heard(&mut self, t: f64) {
        if let Some(s) = &mut self.session
            && s.gone_at > t
        {
            s.heard_at = s.heard_at.max(t);
        }
    }

    /// A session accepted from `source`. As the gateway does: a session still
    /// registered is taken over, and the gateway's own rule
    /// (`portcullis_core::sessions::is_clone`) says whether that is a clone.
    fn connect(&mut self, t: f64, source: u64) {
        self.flush();
        self.end_session_by(t);
        self.connects += 1;
        let displaced = self.session.filter(|s| s.gone_at > t);
        let rival = displaced.map(|d| portcullis_core::sessions::Rival {
            took_over_at: d.took_over_at.map(|at| self.at(at)),
            heard_at: self.at(d.heard_at),
            same_source: d.source == source,
        });
        let clone =
            portcullis_core::sessions::is_clone(rival, self.at(t), self.settings().rule_window);
        if displaced.is_some() {
            self.takeovers += 1;
        }
        self.log(t, || {
            let how = match displaced {
                Some(d) => match d.took_over_at {
                    Some(at) => format!(
                        ", taking over a session that took over {:.1} s before",
                        t - at
                    ),
                    None => ", taking over a session still registered".into(),
                },
                None => String::new(),
            };
            format!("connect from source {source:016x}{how}")
        });
        self.note(t, Observation::Connect { source });
        if clone {
            self.note(t, Observation::Clone);
        }
        // The session taken over ends now.
        if displaced.is_some() {
            self.note(t, Observation::Disconnect);
        }
        self.session = Some(Session {
            gone_at: f64::INFINITY,
            took_over_at: displaced.map(|_| t),
            heard_at: t,
            ended: false,
            source,
        });
    }

    /// The session ends at `t`; the gateway lets go of it `linger` seconds later (0: it
    /// saw the end; a silent loss: when the keep-alive runs out).
    fn disconnect(&mut self, t: f64, linger: f64) {
        if let Some(s) = &mut self.session {
            s.gone_at = s.gone_at.min(t + linger);
        }
        self.log(t, || {
            if linger > 0.0 {
                format!("connection lost silently (the gateway lets go {linger:.0} s later)")
            } else {
                "disconnected (the gateway sees it)".into()
            }
        });
    }
}

// ---------------------------------------------------------------------------------
// The well-behaved device.

/// Topic suffixes a well-behaved device publishes to, the first ones most.
const TOPICS: &[&str] = &[
    "telemetry",
    "telemetry/ack",
    "status",
    "telemetry/battery",
    "telemetry/env",
    "events",
    "diagnostics",
    "config/reported",
];

struct WellBehaved {
    p: Params,
    rng: Rng64,
    index: u64,
    topics: Vec<u64>,
    source: u64,
    sources: u64,
    next_message: f64,
    next_loss: f64,
    next_new_source: f64,
    source_changes: u64,
    /// When it last sent anything.
    last_sent: f64,
    /// Away (connection lost) until then.
    back_at: Option<f64>,
}

impl WellBehaved {
    /// Drawn from the seed, connected at `t`.
    fn start(id: &str, index: u64, mut rng: Rng64, feed: &mut Feed, t: f64) -> WellBehaved {
        let p = Params::draw(&mut rng);
        let topics = TOPICS[..p.topics]
            .iter()
            .map(|suffix| feed.hash(&format!("devices/{id}/{suffix}")))
            .collect();
        let next_loss = t + exponential(&mut rng, p.reconnect_every_secs);
        let next_new_source = t + exponential(&mut rng, p.new_source_every_secs);
        let mut d = WellBehaved {
            p,
            rng,
            index,
            topics,
            source: source_hash(index, 0),
            sources: 0,
            next_message: t,
            next_loss,
            next_new_source,
            source_changes: 0,
            last_sent: t,
            back_at: None,
        };
        d.connected(feed, t);
        d
    }

    /// The interval to the next message, with the simulator's jitter and daily cycle.
    fn interval(&mut self, t: f64) -> f64 {
        let p = &self.p;
        let rate = daily_rate(p.rate, p.daily_amplitude, DAY, t + p.daily_phase_secs);
        jittered(rate, p.jitter, &mut self.rng).as_secs_f64()
    }

    fn payload(&mut self) -> usize {
        self.rng
            .random_range(self.p.payload_min..=self.p.payload_max)
    }

    fn topic(&mut self) -> u64 {
        let n = self.topics.len();
        if n == 1 || self.rng.random_bool(0.7) {
            self.topics[0]
        } else {
            self.topics[self.rng.random_range(0..n)]
        }
    }

    /// A session accepted: the connect, the boot burst, then telemetry.
    fn connected(&mut self, feed: &mut Feed, t: f64) {
        feed.connect(t, self.source);
        let n = self.p.boot_burst;
        let bytes: u64 = (0..n).map(|_| self.payload() as u64).sum();
        feed.messages(t, self.topics[0], n, bytes);
        feed.log(t, || format!("boot burst: {n} messages, {bytes} B"));
        self.last_sent = t;
        self.next_message = t + self.interval(t);
    }

    /// Lose the connection, to stay away for seconds or minutes.
    fn lose(&mut self, feed: &mut Feed) {
        let lost = self.next_loss;
        // Half the losses are silent (no FIN, no RST): the gateway lets go of the
        // session one and a half keep-alives after it last heard from the device,
        // which pings when it has sent nothing for a keep-alive.
        let linger = if self.rng.random_bool(0.5) {
            let pinged = lost - self.rng.random_range(0.0..DEVICE_KEEP_ALIVE_SECS);
            let heard = self.last_sent.max(pinged);
            // Its pings are heard too (the clone rule looks at when).
            feed.heard(heard);
            (heard + feed.silent_session_secs - lost).max(0.0)
        } else {
            0.0
        };
        feed.disconnect(lost, linger);
        let outage = if self.rng.random_bool(self.p.outage_chance) {
            self.rng.random_range(60.0..1800.0)
        } else {
            self.rng.random_range(1.0..20.0)
        };
        feed.log(lost, || format!("away for {outage:.1} s"));
        self.back_at = Some(lost + outage);
    }

    /// Come back at `t` (from a new address when its lease changed; sometimes after
    /// a failed login or two just before).
    fn come_back(&mut self, feed: &mut Feed, t: f64) {
        self.back_at = None;
        if t >= self.next_new_source {
            self.sources += 1;
            self.source = source_hash(self.index, self.sources);
            self.source_changes += 1;
            self.next_new_source = t + exponential(&mut self.rng, self.p.new_source_every_secs);
        }
        if self.rng.random_bool(self.p.auth_failure_chance) {
            // Within the outage, which is a second at least. Counted, but not fed to
            // the model: failed logins are never the device's observations.
            feed.auth_failures += self.rng.random_range(1..=2);
        }
        self.connected(feed, t);
        self.next_loss = t + exponential(&mut self.rng, self.p.reconnect_every_secs);
    }

    /// Everything before `until` (and no more: another behaviour may follow).
    fn run(&mut self, feed: &mut Feed, until: f64) {
        loop {
            if let Some(back) = self.back_at {
                if back >= until {
                    break;
                }
                self.come_back(feed, back);
            } else if self.next_loss <= self.next_message {
                if self.next_loss >= until {
                    break;
                }
                self.lose(feed);
            } else {
                let t = self.next_message;
                if t >= until {
                    break;
                }
                let (topic, bytes) = (self.topic(), self.payload());
                feed.messages(t, topic, 1, bytes as u64);
                self.last_sent = t;
                self.next_message = t + self.interval(t);
            }
        }
        feed.tick(until);
    }
}

/// The base of every simulated clock (any fixed instant will do).
fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

struct WellBehavedRun {
    id: String,
    params: Params,
    steps: Vec<Step>,
    messages: u64,
    connects: u64,
    takeovers: u64,
    source_changes: u64,
    auth_failures: u64,
}

const STREAM_FLEET: u64 = 0;

fn well_behaved_device(seed: u64, index: usize, end: f64, gw: &Gateway) -> WellBehavedRun {
    well_behaved_traced(seed, index, end, gw, false).0
}

/// What a well-behaved device of the fleet did, event by event (all but single
/// messages), with its transitions and the baseline at each: `wb-N` as in the report.
pub fn trace(o: &Options, device: &str) -> Option<String> {
    let gw = Gateway::from_config(&Config::default());
    let (params, log) = match device.strip_prefix("wb-") {
        Some(n) => {
            let n: usize = n.parse().ok().filter(|n| (1..=o.devices).contains(n))?;
            let (run, log) = well_behaved_traced(o.seed, n - 1, o.days * DAY, &gw, true);
            (run.params, log)
        }
        // A hostile device: `h-{behaviour}-N`.
        None => {
            let (kind, n) = device.strip_prefix("h-")?.rsplit_once('-')?;
            let h = *Hostile::ALL.iter().find(|h| h.slug() == kind)?;
            let n: usize = n.parse().ok().filter(|n| (1..=o.hostile).contains(n))?;
            let run = hostile_device(h, o.seed, n - 1, &gw, true);
            (run.params, run.log)
        }
    };
    let mut out = format!("{device}: {params:?}\n");
    for line in log {
        out.push_str(&line);
        out.push('\n');
    }
    Some(out)
}

fn well_behaved_traced(
    seed: u64,
    index: usize,
    end: f64,
    gw: &Gateway,
    traced: bool,
) -> (WellBehavedRun, Vec<String>) {
    let id = format!("wb-{}", index + 1);
    let mut feed = Feed::new(&id, base(), gw);
    if traced {
        feed.log = Some(Vec::new());
    }
    let rng = Rng64::new(seed, STREAM_FLEET, index as u64);
    let mut d = WellBehaved::start(&id, index as u64, rng, &mut feed, 0.0);
    d.run(&mut feed, end);
    let run = WellBehavedRun {
        id,
        params: d.p,
        steps: feed.steps,
        messages: feed.messages,
        connects: feed.connects,
        takeovers: feed.takeovers,
        source_changes: d.source_changes,
        auth_failures: feed.auth_failures,
    };
    (run, feed.log.unwrap_or_default())
}

/// The detector a reason names.
fn reason_kind(reason: &str) -> String {
    let kinds = [
        (
            "byte rate",
            "over the ceiling",
            "byte rate over its ceiling",
        ),
        ("byte rate", "", "byte rate above its baseline"),
        ("rate ", "over the ceiling", "message rate over its ceiling"),
        ("rate ", "", "message rate above its baseline"),
    ];
    for (start, has, kind) in kinds {
        if reason.starts_with(start) && reason.contains(has) {
            return kind.to_string();
        }
    }
    for rule in [
        "authentication failures",
        "ACL denials",
        "validation failures",
        "rate-limit hits",
        "source address changes",
        "connections",
        "distinct topics",
        "cloned identity",
    ] {
        if reason.contains(rule) {
            return rule.to_string();
        }
    }
    reason.to_string()
}

/// Probation-only devices listed at most.
const FLAGGED_PROBATION: usize = 20;

fn tally_false_positives(o: &Options, runs: &[WellBehavedRun]) -> FalsePositives {
    let device_days = o.devices as f64 * o.days;
    let mut reasons: BTreeMap<String, ReasonCount> = BTreeMap::new();
    let (mut probations, mut quarantines) = (0, 0);
    let (mut in_probation, mut quarantined) = (0, 0);
    let mut flagged = Vec::new();
    let mut listed_probation = 0;
    for r in runs {
        let p = r.steps.iter().filter(|s| s.to == "probation").count() as u64;
        let q = r.steps.iter().filter(|s| s.to == "quarantined").count() as u64;
        for s in &r.steps {
            let c = reasons.entry(reason_kind(&s.reason));
            match s.to {
                "probation" => c.or_default().probation += 1,
                "quarantined" => c.or_default().quarantine += 1,
                _ => {}
            }
        }
        probations += p;
        quarantines += q;
        in_probation += (p > 0) as usize;
        quarantined += (q > 0) as usize;
        let list = q > 0 || (p > 0 && listed_probation < FLAGGED_PROBATION);
        if list {
            listed_probation += (q == 0) as usize;
            flagged.push(Flagged {
                device: r.id.clone(),
                params: r.params.clone(),
                transitions: r.steps.clone(),
            });
        }
    }
    let per_day = |n: u64| {
        if device_days > 0.0 {
            n as f64 / device_days
        } else {
            0.0
        }
    };
    FalsePositives {
        devices: o.devices,
        days: o.days,
        device_days,
        messages: runs.iter().map(|r| r.messages).sum(),
        connects: runs.iter().map(|r| r.connects).sum(),
        takeovers: runs.iter().map(|r| r.takeovers).sum(),
        source_changes: runs.iter().map(|r| r.source_changes).sum(),
        auth_failures: runs.iter().map(|r| r.auth_failures).sum(),
        probations,
        devices_in_probation: in_probation,
        probations_per_device_day: per_day(probations),
        quarantines,
        devices_quarantined: quarantined,
        quarantines_per_device_day: per_day(quarantines),
        quarantines_per_device_day_95: if quarantines == 0 && device_days > 0.0 {
            3.0 / device_days
        } else {
            per_day(quarantines)
        },
        reasons,
        flagged,
    }
}

// ---------------------------------------------------------------------------------
// Hostile behaviours, as the gateway's model observes them.

/// Each hostile behaviour of the simulator a device identity can show, with a variant
/// where the gateway's answer (and so what the model sees) depends on the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    Flood,
    Oversized,
    OversizedPacket,
    SchemaBreaking,
    TopicScan,
    StuffingOneSource,
    StuffingManySources,
    ClonedIdentity,
    ReconnectStorm,
    Malformed,
    SlowRamp,
}

impl Hostile {
    pub const ALL: [Hostile; 11] = [
        Hostile::Flood,
        Hostile::Oversized,
        Hostile::OversizedPacket,
        Hostile::SchemaBreaking,
        Hostile::TopicScan,
        Hostile::StuffingOneSource,
        Hostile::StuffingManySources,
        Hostile::ClonedIdentity,
        Hostile::ReconnectStorm,
        Hostile::Malformed,
        Hostile::SlowRamp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hostile::Flood => "flood",
            Hostile::Oversized => "oversized (with a size rule)",
            Hostile::OversizedPacket => "oversized (over max_packet_size)",
            Hostile::SchemaBreaking => "schema-breaking (with a json rule)",
            Hostile::TopicScan => "topic-scan",
            Hostile::StuffingOneSource => "credential-stuffing (one source)",
            Hostile::StuffingManySources => "credential-stuffing (many sources)",
            Hostile::ClonedIdentity => "cloned-identity",
            Hostile::ReconnectStorm => "reconnect-storm",
            Hostile::Malformed => "malformed (after CONNECT)",
            Hostile::SlowRamp => "slow-ramp",
        }
    }

    /// Its part of a device id (`h-{slug}-N`).
    pub fn slug(self) -> &'static str {
        match self {
            Hostile::OversizedPacket => "oversized-packet",
            Hostile::StuffingOneSource => "stuffing-one-source",
            Hostile::StuffingManySources => "stuffing-many-sources",
            Hostile::Malformed => "malformed",
            other => other.kind(),
        }
    }

    /// The simulator's kind (for its default parameters).
    fn kind(self) -> &'static str {
        match self {
            Hostile::Flood => "flood",
            Hostile::Oversized | Hostile::OversizedPacket => "oversized",
            Hostile::SchemaBreaking => "schema-breaking",
            Hostile::TopicScan => "topic-scan",
            Hostile::StuffingOneSource | Hostile::StuffingManySources => "credential-stuffing",
            Hostile::ClonedIdentity => "cloned-identity",
            Hostile::ReconnectStorm => "reconnect-storm",
            Hostile::Malformed => "malformed",
            Hostile::SlowRamp => "slow-ramp",
        }
    }

    pub fn observed_as(self) -> &'static str {
        match self {
            Hostile::Flood => {
                "messages as fast as the rate limiter reads them (32 in flight, 64 B), \
                 a rate-limit hit per message held back or dropped"
            }
            Hostile::Oversized => {
                "200000 B payloads (under max_packet_size) refused by a validation size \
                 rule (max_payload_bytes under 200000, not the embedded default): the \
                 message (its bytes), then a validation failure"
            }
            Hostile::OversizedPacket => {
                "payloads over max_packet_size: DISCONNECT packet_too_large before the \
                 message is read: a connection and a validation failure (the protocol \
                 error) per attempt"
            }
            Hostile::SchemaBreaking => {
                "non-JSON payloads refused by a json rule on telemetry (not the embedded \
                 default, which has none and so sees only messages and quarantines \
                 nothing): the message, then a validation failure"
            }
            Hostile::TopicScan => {
                "an ACL denial per action; its two publishes per cycle are messages too \
                 (one to a new topic)"
            }
            Hostile::StuffingOneSource => {
                "a failed login per guess that the (id, source) back-off lets through to \
                 the credential check (not fed to the device's model)"
            }
            Hostile::StuffingManySources => {
                "a failed login per guess, each from a new source (no back-off), not fed to \
                 the device's model"
            }
            Hostile::ClonedIdentity => {
                "a connection per interval from two places in turn, each taking the other \
                 over: a clone from the second take-over on"
            }
            Hostile::ReconnectStorm => {
                "a connection per attempt the per-source connection rate accepts"
            }
            Hostile::Malformed => {
                "a connection and a validation failure per attempt (each ends with a \
                 protocol error)"
            }
            Hostile::SlowRamp => {
                "telemetry ramping from the device's rate to 400/s over 6 h, read as the \
                 rate limiter allows (32 unacknowledged), a rate-limit hit per message \
                 held back or dropped"
            }
        }
    }

    /// Whether stopping it is the model's job.
    pub fn model_detects(self) -> bool {
        !matches!(
            self,
            Hostile::StuffingOneSource | Hostile::StuffingManySources
        )
    }

    fn handled_by(self) -> Option<&'static str> {
        match self {
            Hostile::StuffingOneSource => Some(
                "per-(id, source) back-off (auth.max_failures, doubling to \
                 auth.backoff_max, not reset until auth.backoff_forget of quiet)",
            ),
            // Failed logins by others never change how the device is treated.
            Hostile::StuffingManySources => Some(
                "an alert (auth.alert_failures in a window: audit, metric and \
                 portcullis/events/auth_failures/{id}); never the device's model",
            ),
            _ => None,
        }
    }

    fn session_based(self) -> bool {
        !matches!(
            self,
            Hostile::StuffingOneSource | Hostile::StuffingManySources
        )
    }
}

/// The simulator's default parameters for a behaviour.
fn sim_default(kind: &str) -> Behaviour {
    let text = match kind {
        // The ramp has no defaults; these are replaced per device.
        "slow-ramp" => "kind = \"slow-ramp\"\nrate = 1.0\nfactor = 1.0".to_string(),
        _ => format!("kind = \"{kind}\""),
    };
    toml::from_str(&text).unwrap_or_else(|e| panic!("default {kind}: {e}"))
}

/// A QoS 1 telemetry message of `len` bytes.
fn publish(topic: &str, len: usize) -> Message {
    Message {
        topic: TopicName::parse_unlimited(topic).expect("the simulator's topics are valid"),
        payload: Bytes::from(vec![b'x'; len]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: None,
    }
}

/// The registry, as far as the admission asks: only the device itself is registered.
struct Registered(PrincipalId);

impl Directory for Registered {
    fn is_device(&self, id: &PrincipalId) -> bool {
        *id == self.0
    }
}

/// A hostile device's session, reading one message at a time and handing each to the
/// gateway's own admission (the device's ACL, rates, validation and behaviour model),
/// as the MQTT session does.
struct Admitted {
    admission: Admission,
    /// When the session reads its next packet.
    free_at: f64,
}

impl Admitted {
    /// A session of the feed's device, accepted at `t`, under the default device
    /// group's rules.
    fn new(gw: &Gateway, feed: &Feed, t: f64) -> Admitted {
        Admitted::with_validation(gw, feed, t, &gw.config.validation)
    }

    /// `new`, with this validation policy instead of the configured one.
    fn with_validation(gw: &Gateway, feed: &Feed, t: f64, validation: &Validation) -> Admitted {
        let (c, now) = (&gw.config, feed.at(t));
        let group = c.device_groups.get(GROUP);
        let (publish, subscribe) = group
            .map(|g| (g.publish.clone(), g.subscribe.clone()))
            .unwrap_or_default();
        let acl = AclTemplate::new(PrincipalKind::Device, &publish, &subscribe)
            .expand(&feed.id, &feed.group)
            .expect("the default device group's ACL expands for a valid id");
        let metrics = Arc::new(Metrics::default());
        // Its audit lines go nowhere: the receiver is dropped.
        let (audit, _) = Audit::detached(1, metrics.clone());
        let shared = Shared {
            // One device alone never reaches the gateway-wide cap.
            global: Arc::new(GlobalBucket::new(
                c.rate_limits.global_messages_per_second,
                now,
            )),
            retained: Arc::new(RetainedCommands::new(c.sessions.max_retained_per_device)),
            behaviours: feed.behaviours.clone(),
            directory: Arc::new(Registered(feed.id.clone())),
            metrics,
            audit,
        };
        let rules = Rules {
            acl: Arc::new(acl),
            validator: Arc::new(
                Validator::new(validation, |p| gw.config.resolve(p))
                    .expect("the simulator's validation policies have no schema file"),
            ),
            rates: PrincipalRates::from_config(&c.rates_for("device", GROUP, feed.id.as_str())),
            behaviour: feed.policy.clone(),
        };
        let peer = Peer {
            principal: PrincipalRef {
                kind: PrincipalKind::Device,
                id: feed.id.clone(),
                group: feed.group.clone(),
            },
            source: SocketAddr::from(([127, 0, 0, 1], 1883)),
            protocol: portcullis_core::peer::Protocol::Mqtt311,
        };
        Admitted {
            admission: Admission::new(peer, rules, Arc::new(shared), now),
            free_at: t,
        }
    }

    /// A message sent at `t`: read when the session gets to it, then offered to the
    /// admission, and again at each wait, until it is forwarded, dropped or refused
    /// (or the device is quarantined). When the session is done with it.
    fn offer(&mut self, feed: &mut Feed, t: f64, message: Message) -> f64 {
        let read = t.max(self.free_at);
        feed.read(read);
        feed.messages += 1;
        let mut offer = Offer::new(message, feed.at(read));
        let mut now = read;
        loop {
            let verdict = self.admission.uplink(offer, feed.at(now));
            feed.drain(now);
            match verdict {
                Verdict::Wait(again, at) if !feed.done() => {
                    // The session sleeps on tokio's timer: a millisecond at least.
                    now = feed.secs(at).max(now + 0.001);
                    offer = again;
                }
                _ => break,
            }
        }
        feed.last = now;
        self.free_at = now;
        now
    }

    /// A SUBSCRIBE to `filter` at `t`, asked of the admission (which tells the model
    /// of a refusal).
    fn subscribe(&mut self, feed: &mut Feed, t: f64, filter: &str) {
        let read = t.max(self.free_at);
        feed.read(read);
        let f = TopicFilter::parse_unlimited(filter).expect("the simulator's filters are valid");
        let _ = self.admission.admit_subscription(&f, filter, feed.at(read));
        feed.drain(read);
        self.free_at = read;
    }
}

/// A publisher with at most `cap` messages unacknowledged.
struct InFlight {
    cap: usize,
    acks: VecDeque<f64>,
}

impl InFlight {
    fn new(cap: usize) -> InFlight {
        InFlight {
            cap: cap.max(1),
            acks: VecDeque::new(),
        }
    }

    /// The earliest it can send at or after `t`.
    fn ready(&mut self, mut t: f64) -> f64 {
        while self.acks.front().is_some_and(|a| *a <= t) {
            self.acks.pop_front();
        }
        if self.acks.len() >= self.cap
            && let Some(a) = self.acks.pop_front()
        {
            t = t.max(a);
        }
        t
    }

    fn acked(&mut self, at: f64) {
        self.acks.push_back(at);
    }
}

/// One hostile device's run.
struct HostileRun {
    onset: f64,
    /// Quarantined at (simulated seconds) and why.
    quarantined: Option<(f64, String)>,
    before_onset: bool,
    /// Slow ramp: the rate it offered at quarantine.
    ramp_rate: Option<f64>,
    /// Most authentication failures the model saw in one rule window.
    auth_failures_per_window: Option<usize>,
    guesses: u64,
    /// It was in probation after the onset.
    probation: bool,
    params: Params,
    log: Vec<String>,
}

const STREAM_HOSTILE: u64 = 1_000;

fn hostile_device(h: Hostile, seed: u64, index: usize, gw: &Gateway, traced: bool) -> HostileRun {
    let id = format!("h-{}-{}", h.slug(), index + 1);
    let stream = STREAM_HOSTILE + Hostile::ALL.iter().position(|k| *k == h).unwrap_or(0) as u64;
    let mut feed = Feed::new(&id, base(), gw);
    if traced {
        feed.log = Some(Vec::new());
    }
    let rng = Rng64::new(seed, stream, index as u64);
    let dev_index = (stream << 32) | index as u64;
    let mut d = WellBehaved::start(&id, dev_index, rng, &mut feed, 0.0);
    d.run(&mut feed, PREFIX_SECS);
    let onset = PREFIX_SECS;
    let mut run = HostileRun {
        onset,
        quarantined: None,
        before_onset: feed.done(),
        params: d.p.clone(),
        log: Vec::new(),
        ramp_rate: None,
        auth_failures_per_window: None,
        guesses: 0,
        probation: false,
    };
    let prefix_steps = feed.steps.len();
    if run.before_onset {
        run.quarantined = feed.quarantined.clone();
        run.log = feed.log.unwrap_or_default();
        return run;
    }
    feed.log(onset, || format!("onset of {}", h.name()));
    let end = onset
        + if h == Hostile::SlowRamp {
            SLOW_RAMP_SECS + HORIZON_SECS
        } else {
            HORIZON_SECS
        };
    let telemetry_topic = format!("devices/{id}/telemetry");
    let source = d.source;
    // A compromised firmware starts over: a session of its own.
    if h.session_based() && h != Hostile::ClonedIdentity {
        feed.disconnect(onset, 0.0);
    }
    let mut connections = TokenBucket::new(gw.connection_rate(), feed.at(onset));
    let behaviour = sim_default(h.kind());
    match (h, behaviour) {
        (
            Hostile::Flood,
            Behaviour::Flood {
                inflight,
                payload_bytes,
            },
        ) => {
            feed.connect(onset, source);
            let mut session = Admitted::new(gw, &feed, onset);
            let message = publish(&telemetry_topic, payload_bytes);
            let mut inflight = InFlight::new(inflight.unwrap_or(MQTT_FLOOD_INFLIGHT) as usize);
            let mut t = onset;
            while !feed.done() && t < end {
                let sent = inflight.ready(t);
                inflight.acked(session.offer(&mut feed, sent, message.clone()));
                t = sent + 1.0 / FLOOD_LINK_RATE;
            }
        }
        (Hostile::Oversized, Behaviour::Oversized { rate, .. }) => {
            assert!(OVERSIZE_REFUSED_BYTES <= gw.max_packet_size);
            feed.connect(onset, source);
            let size_rule = Validation {
                max_payload_bytes: OVERSIZE_RULE_BYTES,
                ..Validation::default()
            };
            let mut session = Admitted::with_validation(gw, &feed, onset, &size_rule);
            let message = publish(&telemetry_topic, OVERSIZE_REFUSED_BYTES);
            every(&mut feed, onset, end, rate, |feed, t, _| {
                session.offer(feed, t, message.clone());
            });
        }
        (Hostile::OversizedPacket, Behaviour::Oversized { bytes, rate }) => {
            assert!(bytes > gw.max_packet_size);
            every(&mut feed, onset, end, rate, |feed, t, _| {
                if connections.take(1.0, feed.at(t)).is_ok() {
                    // A session ended by a protocol error counts as a failed validation.
                    feed.connect(t, source);
                    feed.observe(t, Observation::Invalid);
                    feed.disconnect(t, 0.0);
                }
            });
        }
        (Hostile::SchemaBreaking, Behaviour::SchemaBreaking { rate }) => {
            feed.connect(onset, source);
            let json_rule = Validation {
                rules: vec![PayloadRule {
                    topic: "devices/+/telemetry/#".into(),
                    groups: None,
                    format: PayloadFormat::Json,
                    schema: None,
                    max_bytes: None,
                }],
                ..Validation::default()
            };
            let mut session = Admitted::with_validation(gw, &feed, onset, &json_rule);
            every(&mut feed, onset, end, rate, |feed, t, n| {
                let mut message = publish(&telemetry_topic, 0);
                message.payload = Bytes::from(format!("not json {n}"));
                session.offer(feed, t, message);
            });
        }
        (Hostile::TopicScan, Behaviour::TopicScan { rate }) => {
            feed.connect(onset, source);
            let mut session = Admitted::new(gw, &feed, onset);
            // The simulator's cycle of five actions (`fleet::topic_scan`), from n = 1.
            every(&mut feed, onset, end, rate, |feed, t, n| {
                let (publish_to, subscribe_to) = match n % 5 {
                    0 => (None, "#".to_string()),
                    1 => (Some(format!("devices/scan-{n}/telemetry")), String::new()),
                    2 => (None, "devices/+/telemetry/#".to_string()),
                    3 => (Some(format!("devices/{id}/commands/reboot")), String::new()),
                    _ => (None, format!("devices/scan-{n}/commands/#")),
                };
                match publish_to {
                    Some(topic) => {
                        let mut message = publish(&topic, 0);
                        message.payload = Bytes::from_static(b"{}");
                        session.offer(feed, t, message);
                    }
                    None => session.subscribe(feed, t, &subscribe_to),
                }
            });
        }
        (Hostile::StuffingOneSource, Behaviour::CredentialStuffing { rate }) => {
            let mut guard = SourceGuard::new(gw.backoff());
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
            let mut failures = Vec::new();
            let mut guesses = 0;
            every(&mut feed, onset, end, rate, |feed, t, _| {
                guesses += 1;
                let now = feed.at(t);
                if guard.check(ip, "victim", now).is_ok() {
                    guard.record_failure(ip, "victim", now);
                    failures.push(t);
                }
            });
            run.guesses = guesses;
            let window = feed.settings().rule_window.as_secs_f64();
            let most = (0..failures.len())
                .map(|i| {
                    failures[i..]
                        .iter()
                        .take_while(|f| **f < failures[i] + window)
                        .count()
                })
                .max()
                .unwrap_or(0);
            run.auth_failures_per_window = Some(most);
        }
        (Hostile::StuffingManySources, Behaviour::CredentialStuffing { rate }) => {
            let mut guard = SourceGuard::new(gw.backoff());
            every(&mut feed, onset, end, rate, |feed, t, n| {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + n as u32));
                let now = feed.at(t);
                if guard.check(ip, "victim", now).is_ok() {
                    guard.record_failure(ip, "victim", now);
                    feed.auth_failures += 1;
                }
            });
        }
        (Hostile::ClonedIdentity, Behaviour::ClonedIdentity { interval_secs }) => {
            // The device's own session is live; the clone connects from elsewhere, and
            // the two take each other over in turn.
            let clone = source_hash(dev_index, u64::MAX);
            every(&mut feed, onset, end, 1.0 / interval_secs, |feed, t, n| {
                feed.connect(t, if n % 2 == 1 { clone } else { source });
            });
        }
        (Hostile::ReconnectStorm, Behaviour::ReconnectStorm { rate }) => {
            every(&mut feed, onset, end, rate, |feed, t, _| {
                if connections.take(1.0, feed.at(t)).is_ok() {
                    feed.connect(t, source);
                    feed.disconnect(t, 0.0);
                }
            });
        }
        (Hostile::Malformed, Behaviour::Malformed { rate }) => {
            every(&mut feed, onset, end, rate, |feed, t, _| {
                if connections.take(1.0, feed.at(t)).is_ok() {
                    feed.connect(t, source);
                    feed.observe(t, Observation::Invalid);
                    feed.disconnect(t, 0.0);
                }
            });
        }
        (Hostile::SlowRamp, Behaviour::SlowRamp { .. }) => {
            let (rate, payload) = (d.p.rate, d.p.payload_min);
            let factor = SLOW_RAMP_END_RATE / rate;
            feed.connect(onset, source);
            let mut session = Admitted::new(gw, &feed, onset);
            let message = publish(&telemetry_topic, payload);
            // The simulator's telemetry loop: at most 32 unacknowledged; a device held
            // back sends when it can and its schedule starts over from there.
            let mut inflight = InFlight::new(32);
            let mut next = onset;
            let mut rng = d.rng.clone();
            while !feed.done() && next < end {
                let sent = inflight.ready(next);
                inflight.acked(session.offer(&mut feed, sent, message.clone()));
                let r = ramp_rate(rate, factor, SLOW_RAMP_SECS, sent - onset);
                next = sent + jittered(r, 0.0, &mut rng).as_secs_f64();
            }
            if let Some((t, _)) = &feed.quarantined {
                run.ramp_rate = Some(ramp_rate(rate, factor, SLOW_RAMP_SECS, t - onset));
            }
        }
        (h, b) => unreachable!("{h:?} with {b:?}"),
    }
    if !feed.done() {
        feed.tick(end);
    }
    run.probation = feed.steps[prefix_steps..]
        .iter()
        .any(|s| s.to == "probation");
    run.quarantined = feed.quarantined;
    run.log = feed.log.unwrap_or_default();
    run
}

/// Call `f(feed, t, n)` at `rate` per second from `start` (n from 1) until `end` or a
/// quarantine.
fn every(feed: &mut Feed, start: f64, end: f64, rate: f64, mut f: impl FnMut(&mut Feed, f64, u64)) {
    let mut n = 1u64;
    loop {
        let t = start + (n - 1) as f64 / rate;
        if t >= end || feed.done() {
            break;
        }
        f(feed, t, n);
        n += 1;
    }
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn tally_detection(h: Hostile, runs: &[&HostileRun], gw: &Gateway) -> Detection {
    let mut times = Vec::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_reason = None;
    let mut before = 0;
    let probation_first = runs.iter().filter(|r| r.probation).count();
    let most_failures = runs.iter().filter_map(|r| r.auth_failures_per_window).max();
    for r in runs {
        if r.before_onset {
            before += 1;
            continue;
        }
        if let Some((t, reason)) = &r.quarantined {
            times.push(t - r.onset);
            *reasons.entry(reason_kind(reason)).or_default() += 1;
            first_reason.get_or_insert_with(|| reason.clone());
        }
    }
    times.sort_by(f64::total_cmp);
    let detail = match h {
        Hostile::SlowRamp => {
            let mut rates: Vec<f64> = runs.iter().filter_map(|r| r.ramp_rate).collect();
            rates.sort_by(f64::total_cmp);
            median(&rates).map(|m| {
                format!(
                    "offered {m:.0}/s at quarantine (median; max {:.0}/s), the rate limit \
                     being {:.0}/s",
                    rates.last().copied().unwrap_or(m),
                    gw.messages_per_second
                )
            })
        }
        Hostile::StuffingOneSource => {
            let most = most_failures.unwrap_or(0);
            let guesses = runs.iter().map(|r| r.guesses).max().unwrap_or(0);
            Some(format!(
                "of {guesses} guesses in {:.0} min, at most {most} reached the credential \
                 check in any 60 s",
                HORIZON_SECS / 60.0
            ))
        }
        _ => None,
    };
    Detection {
        behaviour: h.name(),
        observed_as: h.observed_as(),
        model_detects: h.model_detects(),
        handled_by: h.handled_by(),
        devices: runs.len(),
        detected: times.len(),
        quarantined_before_onset: before,
        probation_first,
        median_secs: median(&times),
        max_secs: times.last().copied(),
        first_reason,
        reasons,
        most_auth_failures_in_a_rule_window: most_failures,
        detail,
    }
}

fn settings_map(s: &Settings) -> BTreeMap<&'static str, serde_json::Value> {
    use serde_json::json;
    let secs = |d: Duration| json!(d.as_secs_f64());
    BTreeMap::from([
        ("window_secs", secs(s.window)),
        ("learning_secs", secs(s.learning)),
        ("decay", json!(s.decay)),
        ("sigma", json!(s.sigma)),
        ("flood_factor", json!(s.flood_factor)),
        ("floor_messages_per_second", json!(s.floor_messages)),
        ("floor_bytes_per_second", json!(s.floor_bytes)),
        ("max_rise_per_hour", json!(s.max_rise_per_hour)),
        ("burst_messages", json!(s.burst_messages)),
        ("burst_bytes", json!(s.burst_bytes)),
        ("burst_recovery_secs", secs(s.burst_recovery)),
        ("max_messages_per_second", json!(s.max_messages_per_s)),
        ("max_bytes_per_second", json!(s.max_bytes_per_s)),
        ("rule_window_secs", secs(s.rule_window)),
        ("max_auth_failures", json!(s.max_auth_failures)),
        ("max_denials", json!(s.max_denials)),
        ("max_validation_failures", json!(s.max_validation_failures)),
        ("max_limit_hits", json!(s.max_limit_hits)),
        ("max_connects", json!(s.max_connects)),
        ("max_source_changes", json!(s.max_source_changes)),
        ("max_topics", json!(s.max_topics)),
        ("quarantine_on_clone", json!(s.quarantine_on_clone)),
        ("probation_windows", json!(s.probation_windows)),
        ("probation_clear_secs", secs(s.probation_clear)),
        (
            "quarantine_ttl_secs",
            json!(s.quarantine_ttl.map(|d| d.as_secs_f64())),
        ),
        ("watch_secs", secs(s.watch)),
    ])
}

// ---------------------------------------------------------------------------------
// The text report.

/// A duration for people: seconds, minutes or hours.
fn span(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.1} s")
    } else if secs < 2.0 * HOUR {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{:.2} h", secs / HOUR)
    }
}

/// A moment of a device's run: day and time of day.
fn moment(secs: f64) -> String {
    let day = (secs / DAY).floor();
    let rest = secs - day * DAY;
    let (h, m, s) = (
        (rest / HOUR).floor(),
        ((rest % HOUR) / 60.0).floor(),
        rest % 60.0,
    );
    format!("day {} {h:02.0}:{m:02.0}:{s:04.1}", day as u64 + 1)
}

impl Evaluation {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let o = &self.options;
        let fp = &self.false_positives;
        let g = &self.gateway;
        let _ = writeln!(
            out,
            "Behaviour model evaluation on a simulated clock (seed {})\n",
            o.seed
        );
        let _ = writeln!(out, "Model settings:");
        let mut line = String::from(" ");
        for (k, v) in &self.settings {
            let item = format!(" {k}={v}");
            if line.len() + item.len() > 88 {
                let _ = writeln!(out, "{line}");
                line = String::from(" ");
            }
            line.push_str(&item);
        }
        let _ = writeln!(out, "{line}");
        let _ = writeln!(
            out,
            "Gateway (embedded defaults): {:.0} msg/s burst {:.0}, {} after {} s over it \
             (max delay {} ms), x{} in probation;\n  connections {:.0}/s burst {:.0} per \
             source; back-off after {} failures in {} s, {} s doubling to {} s;\n  \
             max_packet_size {} B; a silent session is dropped after {:.0} s\n",
            g.messages_per_second,
            g.message_burst,
            g.action,
            g.sustained_secs,
            g.max_delay_ms,
            g.probation_rate_factor,
            g.connections_per_second_per_source,
            g.connection_burst_per_source,
            g.auth_max_failures,
            g.auth_failure_window_secs,
            g.auth_backoff_initial_secs,
            g.auth_backoff_max_secs,
            g.max_packet_size,
            g.silent_session_secs,
        );
        let _ = writeln!(
            out,
            "False positives: {} well-behaved devices x {} days = {} device-days",
            fp.devices, fp.days, fp.device_days
        );
        let _ = writeln!(
            out,
            "  rate 0.01-5 msg/s (log-uniform), jitter 0-0.5, daily amplitude 0-0.8, \
             1-8 topics,\n  reconnect every 2-8 h (outage of 1-20 s or 1-30 min), boot \
             burst 5-32, new address every 2-6 days,\n  0-10 % of reconnects with 1-2 \
             authentication failures"
        );
        let _ = writeln!(
            out,
            "  traffic: {} messages, {} connects ({} take-overs of a silent session), {} \
             source changes, {} authentication failures",
            fp.messages, fp.connects, fp.takeovers, fp.source_changes, fp.auth_failures
        );
        let _ = writeln!(
            out,
            "  probations:  {:>6} on {:>4} devices = {:.6} per device-day",
            fp.probations, fp.devices_in_probation, fp.probations_per_device_day
        );
        let _ = writeln!(
            out,
            "  quarantines: {:>6} on {:>4} devices = {:.6} per device-day{}",
            fp.quarantines,
            fp.devices_quarantined,
            fp.quarantines_per_device_day,
            if fp.quarantines == 0 {
                format!(
                    " (95 % upper bound {:.6})",
                    fp.quarantines_per_device_day_95
                )
            } else {
                String::new()
            }
        );
        if !fp.reasons.is_empty() {
            let _ = writeln!(out, "  by detector (probation / quarantine):");
            for (k, c) in &fp.reasons {
                if c.probation + c.quarantine > 0 {
                    let _ = writeln!(out, "    {k}: {} / {}", c.probation, c.quarantine);
                }
            }
        }
        for f in &fp.flagged {
            let p = &f.params;
            let _ = writeln!(
                out,
                "  {}: rate {:.3}/s jitter {:.2} amplitude {:.2} phase {:.0} s payload \
                 {}-{} B burst {} topics {} reconnect ~{:.1} h",
                f.device,
                p.rate,
                p.jitter,
                p.daily_amplitude,
                p.daily_phase_secs,
                p.payload_min,
                p.payload_max,
                p.boot_burst,
                p.topics,
                p.reconnect_every_secs / HOUR
            );
            for s in &f.transitions {
                let _ = writeln!(
                    out,
                    "    {} {} -> {}: {}",
                    moment(s.at_secs),
                    s.from,
                    s.to,
                    s.reason
                );
            }
        }
        let _ = writeln!(
            out,
            "\nTrue positives: {} devices per behaviour, {:.0} min well-behaved, then the \
             behaviour (simulator defaults) for up to {:.0} min",
            o.hostile,
            PREFIX_SECS / 60.0,
            HORIZON_SECS / 60.0
        );
        let _ = writeln!(
            out,
            "  {:<35} {:>9} {:>9} {:>9}  first reason",
            "behaviour", "detected", "median", "max"
        );
        for d in &self.true_positives {
            let _ = writeln!(
                out,
                "  {:<35} {:>9} {:>9} {:>9}  {}",
                d.behaviour,
                format!("{}/{}", d.detected, d.devices),
                d.median_secs.map(span).unwrap_or_else(|| "-".into()),
                d.max_secs.map(span).unwrap_or_else(|| "-".into()),
                d.first_reason.as_deref().unwrap_or("-"),
            );
        }
        let _ = writeln!(out, "  What the model observes of each:");
        for d in &self.true_positives {
            let _ = writeln!(out, "    {}: {}.", d.behaviour, d.observed_as);
            if d.probation_first > 0 {
                let _ = writeln!(
                    out,
                    "      {} of {} went through probation first",
                    d.probation_first, d.devices
                );
            }
            if d.quarantined_before_onset > 0 {
                let _ = writeln!(
                    out,
                    "      {} quarantined while still well-behaved",
                    d.quarantined_before_onset
                );
            }
            if let Some(detail) = &d.detail {
                let _ = writeln!(out, "      {detail}.");
            }
            if let Some(by) = d.handled_by {
                let _ = writeln!(out, "      Not the model's: handled by {by}.");
            }
        }
        let _ = writeln!(
            out,
            "\nNot device behaviours (never authenticated as the device):"
        );
        for n in &self.not_device_behaviours {
            let _ = writeln!(
                out,
                "  {}: not a device behaviour: handled by {}.",
                n.behaviour, n.handled_by
            );
        }
        out
    }
}
