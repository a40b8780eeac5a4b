//! The behaviour model (SPEC §5): per-device features, detectors and the device state
//! machine `normal → probation → quarantined → released (watched) → normal`.
//!
//! Pure and clock-injected: callers feed it what a device offered and every verdict,
//! each with its time, and get back the transitions it decides, with their reasons in
//! words and numbers. Per observation it does amortized O(1) work and allocates
//! nothing (a reason is formatted only when a transition happens); its state is a few
//! hundred bytes.
//!
//! Two kinds of detector:
//! - **Learned baselines** of the message rate and the byte rate, per feature window:
//!   a plain average while learning, then exponential decay; a floor below which an
//!   excess is never an anomaly; a cap on how fast the baseline may rise; and a burst
//!   allowance (a token bucket) so that a boot burst or a flush after an outage is
//!   not an anomaly.
//! - **Fixed rules** with absolute ceilings: message and byte rate, and counts over a
//!   rule window of authentication failures, ACL denials, validation failures,
//!   rate-limit hits, connections, source changes and distinct topics; and a cloned
//!   identity.

use std::time::{Duration, Instant};

/// Detector and state-machine settings (per device group).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Length of one feature window.
    pub window: Duration,
    /// Time before the learned baseline is trusted.
    pub learning: Duration,
    /// Weight of a new window in the baseline once learned (exponential decay).
    pub decay: f64,
    /// A window this many standard deviations above the baseline is an anomaly
    /// (probation) ...
    pub sigma: f64,
    /// ... and an anomaly over this many times the baseline (or the floor, for a
    /// quiet device) is a flood: quarantine at once.
    pub flood_factor: f64,
    /// Excess over the baseline below this many messages per second is never an
    /// anomaly: a quiet device is not flagged for one extra message.
    pub floor_messages: f64,
    /// The same for bytes per second.
    pub floor_bytes: f64,
    /// The baseline may rise at most by this factor per hour, so that a slow ramp
    /// cannot train it upward.
    pub max_rise_per_hour: f64,
    /// Messages above the baseline a device may send at once (a boot burst) ...
    pub burst_messages: f64,
    /// ... and bytes ...
    pub burst_bytes: f64,
    /// ... refilled completely over this time.
    pub burst_recovery: Duration,
    /// Absolute ceilings on the rates: above one, quarantine at once.
    pub max_messages_per_s: f64,
    pub max_bytes_per_s: f64,
    /// The window of the counted rules. More than a ceiling below within it
    /// quarantines.
    pub rule_window: Duration,
    pub max_auth_failures: u32,
    pub max_denials: u32,
    pub max_validation_failures: u32,
    pub max_limit_hits: u32,
    pub max_connects: u32,
    pub max_source_changes: u32,
    /// Distinct topics published within a rule window.
    pub max_topics: u32,
    /// A second concurrent session with the same identity quarantines at once.
    pub quarantine_on_clone: bool,
    /// Anomalous windows in probation before quarantine.
    pub probation_windows: u32,
    /// Clean time that ends probation.
    pub probation_clear: Duration,
    /// A quarantine is released after this long (none: only by an operator).
    pub quarantine_ttl: Option<Duration>,
    /// Clean time a released device is watched before it is normal again.
    pub watch: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window: Duration::from_secs(1),
            learning: Duration::from_secs(15 * 60),
            decay: 0.01,
            sigma: 6.0,
            flood_factor: 5.0,
            floor_messages: 5.0,
            floor_bytes: 16384.0,
            max_rise_per_hour: 2.0,
            burst_messages: 64.0,
            burst_bytes: 262144.0,
            burst_recovery: Duration::from_secs(60),
            max_messages_per_s: 500.0,
            max_bytes_per_s: 1_048_576.0,
            rule_window: Duration::from_secs(60),
            max_auth_failures: 20,
            max_denials: 20,
            max_validation_failures: 20,
            max_limit_hits: 1000,
            max_connects: 30,
            max_source_changes: 10,
            max_topics: 100,
            quarantine_on_clone: true,
            probation_windows: 3,
            probation_clear: Duration::from_secs(60),
            quarantine_ttl: None,
            watch: Duration::from_secs(600),
        }
    }
}

impl Settings {
    /// The settings of a device group, from the configuration.
    pub fn from_config(b: &portcullis_config::Behaviour) -> Settings {
        Settings {
            window: *b.window,
            learning: *b.learning,
            decay: b.decay,
            sigma: b.sigma,
            flood_factor: b.flood_factor,
            floor_messages: b.floor_messages_per_second,
            floor_bytes: b.floor_bytes_per_second,
            max_rise_per_hour: b.max_rise_per_hour,
            burst_messages: b.burst_messages,
            burst_bytes: b.burst_bytes,
            burst_recovery: *b.burst_recovery,
            max_messages_per_s: b.max_messages_per_second,
            max_bytes_per_s: b.max_bytes_per_second,
            rule_window: *b.rule_window,
            max_auth_failures: b.max_auth_failures,
            max_denials: b.max_denials,
            max_validation_failures: b.max_validation_failures,
            max_limit_hits: b.max_limit_hits,
            max_connects: b.max_connects,
            max_source_changes: b.max_source_changes,
            max_topics: b.max_topics,
            quarantine_on_clone: b.quarantine_on_clone,
            probation_windows: b.probation_windows,
            probation_clear: *b.probation_clear,
            quarantine_ttl: (!b.quarantine_ttl.is_zero()).then_some(*b.quarantine_ttl),
            watch: *b.watch,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Normal,
    Probation,
    Quarantined,
    /// Released and watched: an anomaly now quarantines at once.
    Released,
}

impl State {
    /// Every state, in the order of their numbers (`to_u8`).
    pub const ALL: [State; 4] = [
        State::Normal,
        State::Probation,
        State::Quarantined,
        State::Released,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Probation => "probation",
            State::Quarantined => "quarantined",
            State::Released => "released",
        }
    }

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> State {
        match v {
            1 => State::Probation,
            2 => State::Quarantined,
            3 => State::Released,
            _ => State::Normal,
        }
    }
}

/// What the model is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Messages the device offered (before any limit): how many, their payload bytes
    /// in all, and a hash of their topic (for the distinct-topic count). One message
    /// at a time from a session; many at once from a simulation.
    Messages { count: u32, bytes: u64, topic: u64 },
    /// A publish or subscription the ACL refused.
    Denied,
    /// A payload the validation stage refused.
    Invalid,
    /// A message the rate-limit stage held back or refused.
    LimitHit,
    /// A failed authentication caused by the authenticated device's own session. No
    /// adapter has one today: failed logins by others naming the id are never the
    /// device's observations (they raise an alert, `auth_alert`), so a stranger who
    /// knows an id cannot quarantine it (issue 12).
    AuthFailure,
    /// A connection accepted, from a source (a hash of its address). Its boot burst
    /// is expected: the burst allowance is full again.
    Connect { source: u64 },
    /// A connection ended. While the device has none, quiet windows do not train
    /// its baseline: it was away, not quiet.
    Disconnect,
    /// A second concurrent session with its identity.
    Clone,
}

impl Observation {
    pub fn message(bytes: usize, topic: u64) -> Observation {
        Observation::Messages {
            count: 1,
            bytes: bytes as u64,
            topic,
        }
    }
}

/// A state change and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// Counted rules are kept in this many buckets over their window.
const BUCKETS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    AuthFailures,
    Denials,
    ValidationFailures,
    LimitHits,
    Connects,
    SourceChanges,
}

const RULES: usize = 6;

impl Rule {
    fn ceiling(self, s: &Settings) -> u32 {
        match self {
            Rule::AuthFailures => s.max_auth_failures,
            Rule::Denials => s.max_denials,
            Rule::ValidationFailures => s.max_validation_failures,
            Rule::LimitHits => s.max_limit_hits,
            Rule::Connects => s.max_connects,
            Rule::SourceChanges => s.max_source_changes,
        }
    }

    fn words(self) -> &'static str {
        match self {
            Rule::AuthFailures => "authentication failures",
            Rule::Denials => "ACL denials",
            Rule::ValidationFailures => "validation failures",
            Rule::LimitHits => "rate-limit hits",
            Rule::Connects => "connections",
            Rule::SourceChanges => "source address changes",
        }
    }
}

/// Bits of the distinct-topic sketch (linear counting).
const TOPIC_BITS: usize = 256;

/// A learned rate: mean and variance per second.
#[derive(Debug, Clone, Copy, Default)]
struct Baseline {
    mean: f64,
    var: f64,
}

impl Baseline {
    /// Train with one window's rate, weight `w`; the mean rises at most to `cap`.
    fn train(&mut self, rate: f64, w: f64, cap: f64) {
        let excess = rate - self.mean;
        self.var = (1.0 - w) * (self.var + w * excess * excess);
        // The cap is never below the current mean: falling is never held back.
        self.mean = (self.mean + w * excess).min(cap);
    }

    /// Train with `k` windows of rate 0 at a fixed weight `w`, in closed form:
    /// mean·aᵏ and aᵏ·(var + mean²·(1 − aᵏ)), with a = 1 − w.
    fn train_idle(&mut self, k: u32, w: f64) {
        let ak = (1.0 - w).powf(k as f64);
        self.var = ak * (self.var + self.mean * self.mean * (1.0 - ak));
        self.mean *= ak;
    }

    /// While learning (the plain average of `n` windows so far), `k` windows of rate
    /// 0 in closed form: the mean of n + k values and their population variance.
    fn learn_idle(&mut self, n: u32, k: u32) {
        let (n, k) = (n as f64, k as f64);
        let mean = self.mean * n / (n + k);
        self.var = (n * (self.var + self.mean * self.mean) / (n + k) - mean * mean).max(0.0);
        self.mean = mean;
    }
}

/// How bad a window looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Severity {
    Anomaly,
    Flood,
    Ceiling,
}

/// One device's model.
#[derive(Debug, Clone)]
pub struct DeviceModel {
    state: State,
    state_since: Instant,
    /// Since when nothing anomalous was seen (probation, watch).
    clean_since: Instant,
    window_start: Instant,
    /// The open window's counts.
    messages: u32,
    bytes: u64,
    /// Baselines of the message and byte rates per second.
    rate: Baseline,
    byte_rate: Baseline,
    /// Windows trained so far.
    windows: u32,
    anomalies: u32,
    /// What is left of the burst allowance.
    credit_messages: f64,
    credit_bytes: f64,
    /// The counted rules, in buckets over the rule window.
    counts: [[u16; BUCKETS]; RULES],
    bucket: usize,
    bucket_start: Instant,
    /// Distinct topics in the current rule window (a linear-counting sketch).
    topics: [u64; TOPIC_BITS / 64],
    topics_start: Instant,
    /// Hash of the last source it connected from (0: none yet).
    source: u64,
    /// Its connections open now (two during a take-over), and whether it has none
    /// since it was last connected.
    sessions: u8,
    offline: bool,
}

impl DeviceModel {
    pub fn new(now: Instant, s: &Settings) -> DeviceModel {
        DeviceModel {
            state: State::Normal,
            state_since: now,
            clean_since: now,
            window_start: now,
            messages: 0,
            bytes: 0,
            rate: Baseline::default(),
            byte_rate: Baseline::default(),
            windows: 0,
            anomalies: 0,
            credit_messages: s.burst_messages,
            credit_bytes: s.burst_bytes,
            counts: [[0; BUCKETS]; RULES],
            bucket: 0,
            bucket_start: now,
            topics: [0; TOPIC_BITS / 64],
            topics_start: now,
            source: 0,
            sessions: 0,
            offline: false,
        }
    }

    /// A model for a device not connected now (until it connects, time does not
    /// train its baseline).
    pub fn away(mut self) -> DeviceModel {
        self.offline = true;
        self
    }

    /// A model that resumes a state kept across a restart (its baseline is learned
    /// again); the device is not connected yet.
    pub fn restored(state: State, since: Instant, now: Instant, s: &Settings) -> DeviceModel {
        let mut m = DeviceModel::new(now, s).away();
        m.state = state;
        m.state_since = since;
        m
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn since(&self) -> Instant {
        self.state_since
    }

    /// The learned message rate per second and its standard deviation.
    pub fn baseline(&self) -> (f64, f64) {
        (self.rate.mean, self.rate.var.sqrt())
    }

    /// The learned byte rate per second and its standard deviation.
    pub fn byte_baseline(&self) -> (f64, f64) {
        (self.byte_rate.mean, self.byte_rate.var.sqrt())
    }

    /// How long the baseline has been learned over.
    pub fn learned_over(&self, s: &Settings) -> Duration {
        s.window.saturating_mul(self.windows)
    }

    /// Feed one observation at `now`; a transition when one is decided.
    pub fn observe(&mut self, obs: Observation, now: Instant, s: &Settings) -> Option<Transition> {
        let decided = self.tick(now, s);
        // A quarantine wins over a time-out decided at the same moment.
        let found = match obs {
            Observation::Messages {
                count,
                bytes,
                topic,
            } => {
                self.messages = self.messages.saturating_add(count);
                self.bytes = self.bytes.saturating_add(bytes);
                self.note_topic(topic, now, s)
            }
            Observation::Denied => self.count(Rule::Denials, now, s),
            Observation::Invalid => self.count(Rule::ValidationFailures, now, s),
            Observation::LimitHit => self.count(Rule::LimitHits, now, s),
            Observation::AuthFailure => self.count(Rule::AuthFailures, now, s),
            Observation::Connect { source } => {
                let changed = self.source != 0 && self.source != source;
                self.source = source;
                self.sessions = self.sessions.saturating_add(1);
                self.offline = false;
                self.credit_messages = s.burst_messages;
                self.credit_bytes = s.burst_bytes;
                self.count(Rule::Connects, now, s).or_else(|| {
                    changed
                        .then(|| self.count(Rule::SourceChanges, now, s))
                        .flatten()
                })
            }
            Observation::Disconnect => {
                self.sessions = self.sessions.saturating_sub(1);
                self.offline = self.sessions == 0;
                None
            }
            Observation::Clone => s
                .quarantine_on_clone
                .then(|| "a second session with the same identity (cloned identity)".to_string()),
        };
        match found {
            Some(reason) => self.quarantine(now, reason).or(decided),
            None => decided,
        }
    }

    /// Close the windows that ended by `now`, and apply time-outs (quarantine TTL,
    /// end of probation, end of watch).
    pub fn tick(&mut self, now: Instant, s: &Settings) -> Option<Transition> {
        let mut decided = None;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= s.window {
            let secs = s.window.as_secs_f64();
            decided = self.close_window(now, s);
            // Windows with nothing in them since train the baselines as rate 0 (their
            // variance grows as it should), unless the device was away.
            let idle = (elapsed.as_secs_f64() / secs).min(u32::MAX as f64) as u32;
            if !self.offline {
                self.train_idle(idle.saturating_sub(1), s);
            }
            self.refill(idle.saturating_sub(1), s);
            self.window_start += s.window.saturating_mul(idle.max(1));
            self.messages = 0;
            self.bytes = 0;
        }
        let clean_for = now.saturating_duration_since(self.clean_since);
        let in_state = now.saturating_duration_since(self.state_since);
        decided.or_else(|| match self.state {
            State::Quarantined => match s.quarantine_ttl {
                Some(ttl) if in_state >= ttl => self.enter(
                    State::Released,
                    now,
                    format!("quarantine time-to-live of {} s over", ttl.as_secs()),
                ),
                _ => None,
            },
            State::Probation if clean_for >= s.probation_clear => self.enter(
                State::Normal,
                now,
                format!("clean for {} s", clean_for.as_secs()),
            ),
            State::Released if clean_for >= s.watch => self.enter(
                State::Normal,
                now,
                format!("clean for {} s after release", clean_for.as_secs()),
            ),
            _ => None,
        })
    }

    /// Released by an operator (or the admin API).
    pub fn release(&mut self, now: Instant, by: &str) -> Option<Transition> {
        match self.state {
            State::Quarantined => self.enter(State::Released, now, format!("released by {by}")),
            // Probation is lighter than being watched after a quarantine.
            State::Probation => self.enter(State::Normal, now, format!("released by {by}")),
            _ => None,
        }
    }

    /// Quarantined by an operator, or by a rule decided outside the model.
    pub fn quarantine(&mut self, now: Instant, reason: String) -> Option<Transition> {
        if self.state == State::Quarantined {
            return None;
        }
        self.clean_since = now;
        self.enter(State::Quarantined, now, reason)
    }

    fn learned(&self, s: &Settings) -> bool {
        s.window.saturating_mul(self.windows) >= s.learning
    }

    fn learning_windows(s: &Settings) -> u32 {
        (s.learning.as_secs_f64() / s.window.as_secs_f64())
            .ceil()
            .min(u32::MAX as f64) as u32
    }

    /// The weight of the next window: a plain average while learning, then decay.
    fn weight(&self, s: &Settings) -> f64 {
        if self.learned(s) {
            s.decay
        } else {
            1.0 / (self.windows as f64 + 1.0)
        }
    }

    /// Judge the window that just closed, then train on it if it was normal.
    fn close_window(&mut self, now: Instant, s: &Settings) -> Option<Transition> {
        // Away, nothing was sent: there is nothing to judge, and its absence is not
        // its normal.
        if self.offline && self.messages == 0 && self.bytes == 0 {
            return None;
        }
        let secs = s.window.as_secs_f64();
        // The burst allowance takes what is above the baseline first.
        let judged = |count: f64, mean: f64, credit: &mut f64| {
            let over = (count - mean * secs).max(0.0);
            let used = over.min(*credit);
            *credit -= used;
            (count - used) / secs
        };
        // Judged with the allowance. Trained with what was sent while learning (its
        // bursts are part of its normal), and with what was judged after: what the
        // allowance took does not widen the baseline (a flood's first seconds would).
        let (raw_rate, raw_bytes) = (self.messages as f64 / secs, self.bytes as f64 / secs);
        let rate = judged(
            self.messages as f64,
            self.rate.mean,
            &mut self.credit_messages,
        );
        let byte_rate = judged(
            self.bytes as f64,
            self.byte_rate.mean,
            &mut self.credit_bytes,
        );
        self.refill(1, s);
        let learned = self.learned(s);
        let findings = [
            judge(
                "rate",
                "",
                rate,
                &self.rate,
                s.floor_messages,
                s.max_messages_per_s,
                learned,
                s,
            ),
            judge(
                "byte rate",
                " B",
                byte_rate,
                &self.byte_rate,
                s.floor_bytes,
                s.max_bytes_per_s,
                learned,
                s,
            ),
        ];
        let worst = findings.into_iter().flatten().max_by_key(|(sev, _)| *sev);
        let Some((severity, what)) = worst else {
            let w = self.weight(s);
            let rise = s.max_rise_per_hour.powf(secs / 3600.0);
            let cap = |b: &Baseline, floor: f64| {
                if learned {
                    b.mean.max(floor) * rise
                } else {
                    f64::INFINITY
                }
            };
            let (cap_rate, cap_bytes) = (
                cap(&self.rate, s.floor_messages),
                cap(&self.byte_rate, s.floor_bytes),
            );
            let (rate, byte_rate) = if learned {
                (rate, byte_rate)
            } else {
                (raw_rate, raw_bytes)
            };
            self.rate.train(rate, w, cap_rate);
            self.byte_rate.train(byte_rate, w, cap_bytes);
            self.windows = self.windows.saturating_add(1);
            return None;
        };
        self.clean_since = now;
        let reason = match severity {
            Severity::Ceiling => what,
            _ => format!(
                "{what} (learned over {} min)",
                (self.windows as f64 * secs / 60.0).round()
            ),
        };
        match (self.state, severity) {
            (State::Normal, Severity::Anomaly) => {
                self.anomalies = 1;
                self.enter(State::Probation, now, reason)
            }
            (State::Probation, Severity::Anomaly) => {
                self.anomalies += 1;
                if self.anomalies >= s.probation_windows {
                    let reason = format!("{reason}; {} windows in probation", self.anomalies);
                    self.quarantine(now, reason)
                } else {
                    None
                }
            }
            (State::Quarantined, _) => None,
            _ => self.quarantine(now, reason),
        }
    }

    /// `k` windows with nothing in them train the baselines as rate 0, in closed form
    /// (the plain average while learning, then the decay): O(1) however long.
    fn train_idle(&mut self, k: u32, s: &Settings) {
        let learning = Self::learning_windows(s)
            .saturating_sub(self.windows)
            .min(k);
        if learning > 0 {
            self.rate.learn_idle(self.windows, learning);
            self.byte_rate.learn_idle(self.windows, learning);
            self.windows += learning;
        }
        let k = k - learning;
        if k > 0 {
            self.rate.train_idle(k, s.decay);
            self.byte_rate.train_idle(k, s.decay);
            // Only how long it has learned is shown: saturating at the learning
            // period's worth of windows keeps the arithmetic in range.
            self.windows = self
                .windows
                .saturating_add(k)
                .max(Self::learning_windows(s));
        }
    }

    /// The burst allowance refills over `burst_recovery`, `k` windows' worth.
    fn refill(&mut self, k: u32, s: &Settings) {
        let part = (s.window.as_secs_f64() * k as f64 / s.burst_recovery.as_secs_f64()).min(1.0);
        self.credit_messages =
            (self.credit_messages + part * s.burst_messages).min(s.burst_messages);
        self.credit_bytes = (self.credit_bytes + part * s.burst_bytes).min(s.burst_bytes);
    }

    /// Rotate the rule buckets to `now`.
    fn roll(&mut self, now: Instant, s: &Settings) {
        let bucket = s.rule_window / BUCKETS as u32;
        let mut steps = 0;
        while now.saturating_duration_since(self.bucket_start) >= bucket && steps < BUCKETS {
            self.bucket = (self.bucket + 1) % BUCKETS;
            for rule in &mut self.counts {
                rule[self.bucket] = 0;
            }
            self.bucket_start += bucket;
            steps += 1;
        }
        if steps == BUCKETS {
            self.counts = [[0; BUCKETS]; RULES];
            self.bucket_start = now;
        }
    }

    /// Count one event of a rule; the reason when it goes over its ceiling.
    fn count(&mut self, rule: Rule, now: Instant, s: &Settings) -> Option<String> {
        self.roll(now, s);
        let counts = &mut self.counts[rule as usize];
        counts[self.bucket] = counts[self.bucket].saturating_add(1);
        let n: u32 = counts.iter().map(|n| *n as u32).sum();
        let ceiling = rule.ceiling(s);
        (n > ceiling).then(|| {
            format!(
                "{n} {} in {} s (ceiling {ceiling})",
                rule.words(),
                s.rule_window.as_secs()
            )
        })
    }

    /// Note a topic published; the reason when the distinct topics of the rule
    /// window go over their ceiling.
    fn note_topic(&mut self, topic: u64, now: Instant, s: &Settings) -> Option<String> {
        if now.saturating_duration_since(self.topics_start) >= s.rule_window {
            self.topics = [0; TOPIC_BITS / 64];
            self.topics_start = now;
        }
        // The top bits: the caller's hash may fix the lowest one.
        let bit = (topic >> (64 - TOPIC_BITS.trailing_zeros())) as usize;
        let (word, mask) = (bit / 64, 1u64 << (bit % 64));
        if self.topics[word] & mask != 0 {
            return None;
        }
        self.topics[word] |= mask;
        let distinct = distinct_topics(&self.topics);
        (distinct > s.max_topics as f64).then(|| {
            format!(
                "about {distinct:.0} distinct topics in {} s (ceiling {})",
                s.rule_window.as_secs(),
                s.max_topics
            )
        })
    }

    fn enter(&mut self, to: State, now: Instant, reason: String) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        self.state_since = now;
        if to != State::Probation {
            self.anomalies = 0;
        }
        if matches!(to, State::Released | State::Normal) {
            self.clean_since = now;
        }
        Some(Transition { from, to, reason })
    }
}

/// The linear-counting estimate of distinct topics from the sketch's bits.
fn distinct_topics(bits: &[u64; TOPIC_BITS / 64]) -> f64 {
    let m = TOPIC_BITS as f64;
    let zeros = bits.iter().map(|w| w.count_zeros()).sum::<u32>() as f64;
    if zeros == 0.0 {
        // Saturated: at least this many.
        return m * m.ln();
    }
    -m * (zeros / m).ln()
}

/// Judge one rate against its ceiling and its baseline: how bad, and why in words.
#[allow(clippy::too_many_arguments)]
fn judge(
    name: &str,
    unit: &str,
    rate: f64,
    b: &Baseline,
    floor: f64,
    ceiling: f64,
    learned: bool,
    s: &Settings,
) -> Option<(Severity, String)> {
    if rate > ceiling {
        return Some((
            Severity::Ceiling,
            format!("{name} {rate:.0}{unit}/s is over the ceiling {ceiling:.0}{unit}/s"),
        ));
    }
    let sd = b.var.sqrt();
    let excess = rate - b.mean;
    if !learned || excess <= floor || excess <= s.sigma * sd {
        return None;
    }
    // Beyond a thousand the number says no more than "far above".
    let sigmas = match excess / sd {
        x if x.is_finite() && x < 1000.0 => format!("{x:.1}σ"),
        _ => ">1000σ".to_string(),
    };
    let severity = if rate > s.flood_factor * b.mean.max(floor) {
        Severity::Flood
    } else {
        Severity::Anomaly
    };
    Some((
        severity,
        format!(
            "{name} {rate:.0}{unit}/s is {sigmas} above baseline {:.0}{unit}/s",
            b.mean
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// A device sending `rate` messages per second, evenly, for `secs` seconds from
    /// `*now`; the transitions it caused.
    fn send(
        m: &mut DeviceModel,
        s: &Settings,
        now: &mut Instant,
        rate: f64,
        secs: u64,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        let step = Duration::from_secs_f64(1.0 / rate);
        let end = *now + SEC * secs as u32;
        while *now < end {
            out.extend(m.observe(Observation::message(16, 1), *now, s));
            *now += step;
        }
        out
    }

    fn learned_at_20(s: &Settings) -> (DeviceModel, Instant) {
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, s);
        let mut now = t0;
        // 15 minutes of 18–22 messages per second.
        for i in 0..900u64 {
            let rate = 18.0 + (i % 5) as f64;
            assert!(
                send(&mut m, s, &mut now, rate, 1).is_empty(),
                "while learning"
            );
        }
        (m, now)
    }

    #[test]
    fn the_model_is_small() {
        assert!(
            std::mem::size_of::<DeviceModel>() <= 512,
            "{}",
            std::mem::size_of::<DeviceModel>()
        );
    }

    #[test]
    fn a_flood_is_quarantined_by_the_end_of_the_first_full_window() {
        let s = Settings::default();
        let (mut m, mut now) = learned_at_20(&s);
        let (mean, _) = m.baseline();
        assert!((mean - 20.0).abs() < 1.0, "baseline {mean}");
        let onset = now;
        let mut quarantined = None;
        let step = Duration::from_secs_f64(1.0 / 412.0);
        while now < onset + 2 * SEC {
            if let Some(t) = m.observe(Observation::message(16, 1), now, &s) {
                quarantined = Some((t, now));
                break;
            }
            now += step;
        }
        let (t, at) = quarantined.expect("quarantined");
        assert_eq!(t.to, State::Quarantined, "{t:?}");
        assert!(at - onset <= 2 * SEC, "after {:?}", at - onset);
        // The window that holds the onset already tells.
        assert!(t.reason.starts_with("rate "), "{}", t.reason);
        assert!(
            t.reason
                .contains("above baseline 20/s (learned over 15 min)"),
            "{}",
            t.reason
        );
    }

    #[test]
    fn a_quiet_device_is_not_flagged_for_a_few_extra_messages() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        for _ in 0..1000 {
            assert!(send(&mut m, &s, &mut now, 1.0, 1).is_empty());
        }
        // Three times its rate, still within the floor.
        assert!(send(&mut m, &s, &mut now, 3.0, 5).is_empty());
        assert_eq!(m.state(), State::Normal);
    }

    #[test]
    fn a_moderate_anomaly_goes_through_probation_then_quarantine() {
        let s = Settings::default();
        let (mut m, mut now) = learned_at_20(&s);
        let t = send(&mut m, &s, &mut now, 60.0, 6);
        assert_eq!(t.first().map(|t| t.to), Some(State::Probation), "{t:?}");
        assert_eq!(t.last().map(|t| t.to), Some(State::Quarantined), "{t:?}");
        assert!(
            t.last().unwrap().reason.contains("windows in probation"),
            "{t:?}"
        );
    }

    #[test]
    fn probation_ends_after_a_clean_period() {
        let s = Settings::default();
        let (mut m, mut now) = learned_at_20(&s);
        // Three seconds at three times the rate: the burst allowance takes the
        // first, two anomalous windows follow (one short of quarantine).
        let mut t = send(&mut m, &s, &mut now, 60.0, 3);
        t.extend(send(&mut m, &s, &mut now, 20.0, 65));
        let states: Vec<State> = t.iter().map(|t| t.to).collect();
        assert_eq!(states, [State::Probation, State::Normal], "{t:?}");
        assert!(t[1].reason.starts_with("clean for 60 s"), "{t:?}");
    }

    #[test]
    fn a_slow_ramp_to_fifty_times_is_caught_by_the_ceiling() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        // 10/s, then +1% per minute for hours: 50× after ~6.6 hours.
        let mut rate = 10.0;
        let mut caught = None;
        for minute in 0..600 {
            let t = send(&mut m, &s, &mut now, rate, 60);
            if let Some(t) = t.into_iter().find(|t| t.to == State::Quarantined) {
                caught = Some((minute, rate, t));
                break;
            }
            rate *= 1.01;
        }
        let (_, rate, t) = caught.expect("caught");
        assert!(rate <= 520.0, "caught only at {rate}/s");
        // The baseline could not follow: the rise is capped.
        assert!(m.baseline().0 < rate, "{:?}", m.baseline());
        assert!(t.reason.contains("over the ceiling 500/s"), "{}", t.reason);
    }

    #[test]
    fn credential_stuffing_and_clones_quarantine_at_once() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        let mut last = None;
        for _ in 0..21 {
            last = m.observe(Observation::AuthFailure, now, &s).or(last);
            now += Duration::from_secs(2);
        }
        let t = last.expect("quarantined");
        assert_eq!(t.to, State::Quarantined);
        assert_eq!(t.reason, "21 authentication failures in 60 s (ceiling 20)");
        // Twenty failures spread over ten minutes are not stuffing.
        let mut m = DeviceModel::new(now, &s);
        for _ in 0..30 {
            assert_eq!(m.observe(Observation::AuthFailure, now, &s), None);
            now += Duration::from_secs(20);
        }
        let mut m = DeviceModel::new(now, &s);
        let t = m.observe(Observation::Clone, now, &s).expect("quarantined");
        assert_eq!((t.from, t.to), (State::Normal, State::Quarantined));
        assert!(t.reason.contains("cloned identity"));
    }

    #[test]
    fn a_clone_at_the_moment_of_a_release_still_quarantines() {
        let s = Settings {
            quarantine_ttl: Some(Duration::from_secs(300)),
            ..Settings::default()
        };
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        m.observe(Observation::Clone, t0, &s);
        let at = t0 + Duration::from_secs(300);
        let t = m.observe(Observation::Clone, at, &s).expect("a transition");
        assert_eq!(t.to, State::Quarantined, "{t:?}");
        assert_eq!(m.state(), State::Quarantined);
    }

    #[test]
    fn an_idle_device_keeps_a_baseline_with_spread() {
        // Without a burst allowance, to see the variance alone.
        let s = Settings {
            burst_messages: 0.0,
            ..Settings::default()
        };
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        // Bursts of 30 messages, one second in every ten, for half an hour.
        for _ in 0..180 {
            assert!(send(&mut m, &s, &mut now, 30.0, 1).is_empty());
            now += 9 * SEC;
        }
        let (mean, sd) = m.baseline();
        assert!((2.0..4.5).contains(&mean), "{mean}");
        assert!(sd > 5.0, "idle windows count as rate 0: sd {sd}");
        // The same burst again is its normal, not a flood.
        assert!(send(&mut m, &s, &mut now, 30.0, 2).is_empty());
    }

    #[test]
    fn release_by_ttl_or_operator_then_watch_then_normal() {
        let s = Settings {
            quarantine_ttl: Some(Duration::from_secs(300)),
            ..Settings::default()
        };
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        m.observe(Observation::Clone, t0, &s);
        assert_eq!(m.tick(t0 + Duration::from_secs(299), &s), None);
        let t = m.tick(t0 + Duration::from_secs(300), &s).expect("released");
        assert_eq!(t.to, State::Released);
        let t = m.tick(t0 + Duration::from_secs(900), &s).expect("normal");
        assert_eq!(t.to, State::Normal);
        // An operator's release; an anomaly while watched quarantines at once.
        let mut m = DeviceModel::new(t0, &s);
        m.observe(Observation::Clone, t0, &s);
        let t = m.release(t0 + SEC, "operator").expect("released");
        assert_eq!(t.reason, "released by operator");
        let t = m
            .observe(Observation::Clone, t0 + 2 * SEC, &s)
            .expect("again");
        assert_eq!((t.from, t.to), (State::Released, State::Quarantined));
    }

    #[test]
    fn a_boot_burst_is_within_the_burst_allowance() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        for _ in 0..1000 {
            assert!(send(&mut m, &s, &mut now, 2.0, 1).is_empty());
        }
        // A reconnect every five minutes, each with 32 messages at once, then 2/s.
        for _ in 0..12 {
            let burst = now;
            for i in 0..32u32 {
                let at = burst + Duration::from_millis(i as u64);
                assert_eq!(m.observe(Observation::message(16, 1), at, &s), None);
            }
            now = burst + Duration::from_millis(100);
            assert!(send(&mut m, &s, &mut now, 2.0, 300).is_empty());
        }
        assert_eq!(m.state(), State::Normal);
        // Without the allowance the same burst is a flood.
        let strict = Settings {
            burst_messages: 0.0,
            ..Settings::default()
        };
        let mut m = DeviceModel::new(t0, &strict);
        let mut now = t0;
        send(&mut m, &strict, &mut now, 2.0, 1000);
        let burst = now;
        let mut t = Vec::new();
        for i in 0..32u32 {
            let at = burst + Duration::from_millis(i as u64);
            t.extend(m.observe(Observation::message(16, 1), at, &strict));
        }
        now = burst + Duration::from_millis(100);
        t.extend(send(&mut m, &strict, &mut now, 2.0, 2));
        assert_eq!(t.first().map(|t| t.to), Some(State::Quarantined), "{t:?}");
    }

    #[test]
    fn a_byte_flood_is_quarantined_with_its_reason() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        let step = Duration::from_millis(50);
        let mut until = now + Duration::from_secs(1000);
        while now < until {
            assert_eq!(m.observe(Observation::message(100, 1), now, &s), None);
            now += step;
        }
        // The same message rate, a hundred times the bytes.
        let mut t = None;
        until = now + Duration::from_secs(3);
        while now < until && t.is_none() {
            t = m.observe(Observation::message(10_000, 1), now, &s);
            now += step;
        }
        let t = t.expect("quarantined");
        assert_eq!(t.to, State::Quarantined, "{t:?}");
        assert!(
            t.reason.starts_with("byte rate ") && t.reason.contains("above baseline 2000 B/s"),
            "{}",
            t.reason
        );
    }

    #[test]
    fn each_counted_rule_quarantines_over_its_ceiling_only() {
        let s = Settings::default();
        let t0 = Instant::now();
        let cases = [
            (Observation::Denied, "21 ACL denials in 60 s (ceiling 20)"),
            (
                Observation::Invalid,
                "21 validation failures in 60 s (ceiling 20)",
            ),
            (
                Observation::LimitHit,
                "1001 rate-limit hits in 60 s (ceiling 1000)",
            ),
            (
                Observation::AuthFailure,
                "21 authentication failures in 60 s (ceiling 20)",
            ),
            (
                Observation::Connect { source: 7 },
                "31 connections in 60 s (ceiling 30)",
            ),
        ];
        for (obs, reason) in cases {
            let ceiling: u32 = reason.split(' ').next().unwrap().parse::<u32>().unwrap() - 1;
            // At the ceiling, spread over the window: nothing.
            let mut m = DeviceModel::new(t0, &s);
            let gap = Duration::from_secs(50) / ceiling;
            for i in 0..ceiling {
                assert_eq!(m.observe(obs, t0 + gap * i, &s), None, "{obs:?}");
            }
            // The same again a window later: still nothing (the old ones aged out).
            let later = t0 + Duration::from_secs(120);
            for i in 0..ceiling {
                assert_eq!(m.observe(obs, later + gap * i, &s), None, "{obs:?}");
            }
            let t = m
                .observe(obs, later + Duration::from_secs(55), &s)
                .expect("over the ceiling");
            assert_eq!((t.to, t.reason.as_str()), (State::Quarantined, reason));
        }
    }

    #[test]
    fn source_changes_are_counted_apart_from_reconnects() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        // Reconnecting from the same source: only connections count.
        for i in 0..20u32 {
            assert_eq!(
                m.observe(Observation::Connect { source: 1 }, t0 + SEC * i, &s),
                None
            );
        }
        let mut m = DeviceModel::new(t0, &s);
        let mut last = None;
        for i in 0..12u32 {
            last = m
                .observe(
                    Observation::Connect {
                        source: 1 + (i % 2) as u64,
                    },
                    t0 + SEC * i,
                    &s,
                )
                .or(last);
        }
        let t = last.expect("quarantined");
        assert_eq!(t.reason, "11 source address changes in 60 s (ceiling 10)");
    }

    #[test]
    fn a_topic_scan_is_caught_by_the_distinct_topic_ceiling() {
        let s = Settings::default();
        let t0 = Instant::now();
        // Like the gateway's hash: all 64 bits used, the lowest one set.
        let hash = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        // Forty topics, over and over: well under the ceiling.
        let mut m = DeviceModel::new(t0, &s);
        for i in 0..4000u64 {
            let at = t0 + Duration::from_millis(i * 30);
            assert_eq!(
                m.observe(Observation::message(8, hash(i % 40)), at, &s),
                None
            );
        }
        // A new topic each time.
        let mut m = DeviceModel::new(t0, &s);
        let mut caught = None;
        for i in 0..400u64 {
            let at = t0 + Duration::from_millis(i * 100);
            if let Some(t) = m.observe(Observation::message(8, hash(i)), at, &s) {
                caught = Some((i, t));
                break;
            }
        }
        let (i, t) = caught.expect("caught");
        assert!((80..=160).contains(&i), "after {i} topics");
        assert!(
            t.reason.contains("distinct topics in 60 s (ceiling 100)"),
            "{}",
            t.reason
        );
    }

    #[test]
    fn idle_windows_in_closed_form_match_one_step_each() {
        let s = Settings::default();
        let (m, now) = learned_at_20(&s);
        // Stepwise, as the learning phase does it.
        let mut stepped = m.rate;
        for _ in 0..5000 {
            stepped.train(0.0, s.decay, f64::INFINITY);
        }
        let mut closed = m.clone();
        closed.tick(now + Duration::from_secs(5001), &s);
        let (mean, sd) = closed.baseline();
        assert!(
            (mean - stepped.mean).abs() < 1e-9 * (1.0 + stepped.mean),
            "{mean} {}",
            stepped.mean
        );
        assert!((sd - stepped.var.sqrt()).abs() < 1e-9 * (1.0 + sd), "{sd}");
        // While learning: the plain average, one window at a time, equals the closed
        // form over the whole gap.
        let t0 = Instant::now();
        let mut learning = DeviceModel::new(t0, &s);
        let mut at = t0;
        send(&mut learning, &s, &mut at, 7.0, 100);
        // Close the window still open, then 300 empty ones.
        let end = learning.window_start + s.window;
        learning.tick(end, &s);
        let mut stepped = learning.rate;
        for n in learning.windows..learning.windows + 300 {
            stepped.train(0.0, 1.0 / (n as f64 + 1.0), f64::INFINITY);
        }
        learning.tick(end + Duration::from_secs(300), &s);
        let (mean, sd) = learning.baseline();
        assert!(
            (mean - stepped.mean).abs() < 1e-9,
            "{mean} {}",
            stepped.mean
        );
        assert!(
            (sd - stepped.var.sqrt()).abs() < 1e-6,
            "{sd} {}",
            stepped.var.sqrt()
        );
        // A year idle is one step too.
        let mut m2 = m.clone();
        let year = now + Duration::from_secs(365 * 86400);
        assert_eq!(m2.tick(year, &s), None);
        assert!(m2.baseline().0 < 1e-6);
    }

    #[test]
    fn a_restored_quarantine_keeps_its_time_to_live() {
        let s = Settings {
            quarantine_ttl: Some(Duration::from_secs(300)),
            ..Settings::default()
        };
        let now = Instant::now();
        let since = now;
        let mut m = DeviceModel::restored(
            State::Quarantined,
            since,
            now + Duration::from_secs(100),
            &s,
        );
        assert_eq!(m.state(), State::Quarantined);
        assert_eq!(m.tick(now + Duration::from_secs(299), &s), None);
        let t = m
            .tick(now + Duration::from_secs(300), &s)
            .expect("released");
        assert_eq!(t.to, State::Released);
    }

    #[test]
    fn time_away_does_not_decay_the_baseline_and_a_reconnect_may_burst() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0, &s);
        let mut now = t0;
        m.observe(Observation::Connect { source: 3 }, now, &s);
        assert!(send(&mut m, &s, &mut now, 5.0, 1200).is_empty());
        let before = m.baseline().0;
        // Gone for half an hour (an outage), then back with a boot burst of 60.
        m.observe(Observation::Disconnect, now, &s);
        now += Duration::from_secs(1800);
        m.observe(Observation::Connect { source: 3 }, now, &s);
        let (after, _) = m.baseline();
        assert!((after - before).abs() < 0.2, "{before} → {after}");
        for i in 0..60u64 {
            let at = now + Duration::from_millis(i);
            assert_eq!(m.observe(Observation::message(16, 1), at, &s), None);
        }
        now += Duration::from_millis(200);
        assert!(send(&mut m, &s, &mut now, 5.0, 60).is_empty());
        // A model made while the device is away (an auth failure, an operator) learns
        // nothing from the time before it connects.
        let mut away = DeviceModel::new(now, &s).away();
        away.tick(now + Duration::from_secs(7200), &s);
        assert_eq!(away.learned_over(&s), Duration::ZERO);
        // Quiet while connected is its normal, and does train the baseline down.
        now += Duration::from_secs(1800);
        m.tick(now, &s);
        assert!(m.baseline().0 < before / 10.0, "{:?}", m.baseline());
    }
}
