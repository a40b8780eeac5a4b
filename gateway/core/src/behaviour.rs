//! The behaviour model (SPEC §5): per-device features, detectors and the device state
//! machine `normal → probation → quarantined → released (watched) → normal`.
//!
//! Pure and clock-injected: callers feed it what a device offered and every verdict,
//! each with its time, and get back the transitions it decides, with their reasons in
//! words and numbers. Per message it does O(1) work and allocates nothing (a reason
//! is formatted only when a transition happens); its state is a few hundred bytes.
//!
//! Not wired into the pipeline yet: that, persistence, the CLI and the events are the
//! rest of issue 6.

use std::time::{Duration, Instant};

/// Detector and state-machine settings (per device group).
#[derive(Debug, Clone)]
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
    pub floor_per_s: f64,
    /// The baseline may rise at most by this factor per hour, so that a slow ramp
    /// cannot train it upward.
    pub max_rise_per_hour: f64,
    /// Absolute ceiling on the message rate: above it, quarantine at once.
    pub max_messages_per_s: f64,
    /// More authentication failures for the device's id than this within
    /// `auth_failure_window`: quarantine.
    pub max_auth_failures: u32,
    pub auth_failure_window: Duration,
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
            floor_per_s: 5.0,
            max_rise_per_hour: 2.0,
            max_messages_per_s: 500.0,
            max_auth_failures: 20,
            auth_failure_window: Duration::from_secs(60),
            quarantine_on_clone: true,
            probation_windows: 3,
            probation_clear: Duration::from_secs(60),
            quarantine_ttl: None,
            watch: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Normal,
    Probation,
    Quarantined,
    /// Released and watched: an anomaly now quarantines at once.
    Released,
}

/// What the model is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A message the device offered (before any limit). Byte rates and verdicts join
    /// with their detectors.
    Message,
    /// A failed authentication for its id.
    AuthFailure,
    /// A second concurrent session with its identity.
    Clone,
}

/// A state change and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// Authentication failures are counted in this many buckets over their window.
const AUTH_BUCKETS: usize = 6;

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
    /// Baseline of the message rate per second.
    mean: f64,
    var: f64,
    windows: u32,
    anomalies: u32,
    auth: [u16; AUTH_BUCKETS],
    auth_bucket: usize,
    auth_bucket_start: Instant,
}

impl DeviceModel {
    pub fn new(now: Instant) -> DeviceModel {
        DeviceModel {
            state: State::Normal,
            state_since: now,
            clean_since: now,
            window_start: now,
            messages: 0,
            mean: 0.0,
            var: 0.0,
            windows: 0,
            anomalies: 0,
            auth: [0; AUTH_BUCKETS],
            auth_bucket: 0,
            auth_bucket_start: now,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn since(&self) -> Instant {
        self.state_since
    }

    /// The learned message rate per second and its standard deviation.
    pub fn baseline(&self) -> (f64, f64) {
        (self.mean, self.var.sqrt())
    }

    /// Feed one observation at `now`; a transition when one is decided.
    pub fn observe(&mut self, obs: Observation, now: Instant, s: &Settings) -> Option<Transition> {
        let mut decided = self.tick(now, s);
        match obs {
            Observation::Message => {
                self.messages = self.messages.saturating_add(1);
            }
            Observation::AuthFailure => {
                self.roll_auth(now, s);
                self.auth[self.auth_bucket] = self.auth[self.auth_bucket].saturating_add(1);
                let failures: u32 = self.auth.iter().map(|n| *n as u32).sum();
                if failures > s.max_auth_failures {
                    // A quarantine wins over a time-out decided at the same moment.
                    let reason = format!(
                        "{failures} authentication failures in {} s (ceiling {})",
                        s.auth_failure_window.as_secs(),
                        s.max_auth_failures
                    );
                    decided = self.quarantine(now, reason).or(decided);
                }
            }
            Observation::Clone => {
                if s.quarantine_on_clone {
                    let reason = "a second session with the same identity (cloned identity)";
                    decided = self.quarantine(now, reason.into()).or(decided);
                }
            }
        }
        decided
    }

    /// Close the windows that ended by `now`, and apply time-outs (quarantine TTL,
    /// end of probation, end of watch).
    pub fn tick(&mut self, now: Instant, s: &Settings) -> Option<Transition> {
        let mut decided = None;
        if now.saturating_duration_since(self.window_start) >= s.window {
            let rate = self.messages as f64 / s.window.as_secs_f64();
            decided = self.close_window(rate, now, s);
            // Windows with nothing in them since train the baseline as rate 0 (its
            // variance grows as it should), up to an hour of them: past that the
            // baseline has decayed anyway. Amortized O(1): one step per idle window.
            let idle = (now
                .saturating_duration_since(self.window_start)
                .as_secs_f64()
                / s.window.as_secs_f64())
            .min(u32::MAX as f64) as u32;
            let hour = (3600.0 / s.window.as_secs_f64()).max(1.0) as u32;
            for _ in 1..idle.min(hour) {
                self.train(0.0, s);
            }
            self.window_start += s.window * idle.max(1);
            self.messages = 0;
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

    fn weight(&self, s: &Settings) -> f64 {
        if self.learned(s) {
            s.decay
        } else {
            // Learning: the plain average of what was seen so far.
            1.0 / (self.windows as f64 + 1.0)
        }
    }

    fn learned(&self, s: &Settings) -> bool {
        self.windows as f64 * s.window.as_secs_f64() >= s.learning.as_secs_f64()
    }

    fn close_window(&mut self, rate: f64, now: Instant, s: &Settings) -> Option<Transition> {
        if rate > s.max_messages_per_s {
            self.clean_since = now;
            return self.quarantine(
                now,
                format!(
                    "rate {rate:.0}/s is over the ceiling {:.0}/s",
                    s.max_messages_per_s
                ),
            );
        }
        let sd = self.var.sqrt();
        let excess = rate - self.mean;
        if self.learned(s) && excess > s.floor_per_s && excess > s.sigma * sd {
            self.clean_since = now;
            let sigmas = if sd > 0.0 { excess / sd } else { f64::INFINITY };
            let reason = format!(
                "rate {rate:.0}/s is {sigmas:.1}σ above baseline {:.0}/s (learned over {} min)",
                self.mean,
                (self.windows as f64 * s.window.as_secs_f64() / 60.0).round()
            );
            let flood = rate > s.flood_factor * self.mean.max(s.floor_per_s);
            return match self.state {
                State::Normal if !flood => {
                    self.anomalies = 1;
                    self.enter(State::Probation, now, reason)
                }
                State::Probation if !flood => {
                    self.anomalies += 1;
                    if self.anomalies >= s.probation_windows {
                        let reason = format!("{reason}; {} windows in probation", self.anomalies);
                        self.quarantine(now, reason)
                    } else {
                        None
                    }
                }
                State::Quarantined => None,
                _ => self.quarantine(now, reason),
            };
        }
        self.train(rate, s);
        None
    }

    /// A normal window trains the baseline, at most as fast as allowed.
    fn train(&mut self, rate: f64, s: &Settings) {
        let excess = rate - self.mean;
        let w = self.weight(s);
        let mut mean = self.mean + w * excess;
        if self.learned(s) {
            let hours = s.window.as_secs_f64() / 3600.0;
            let cap = self.mean.max(s.floor_per_s) * s.max_rise_per_hour.powf(hours);
            mean = mean.min(cap);
        }
        self.var = (1.0 - w) * (self.var + w * excess * excess);
        self.mean = mean;
        self.windows = self.windows.saturating_add(1);
    }

    fn roll_auth(&mut self, now: Instant, s: &Settings) {
        let bucket = s.auth_failure_window / AUTH_BUCKETS as u32;
        let mut steps = 0;
        while now.saturating_duration_since(self.auth_bucket_start) >= bucket
            && steps < AUTH_BUCKETS
        {
            self.auth_bucket = (self.auth_bucket + 1) % AUTH_BUCKETS;
            self.auth[self.auth_bucket] = 0;
            self.auth_bucket_start += bucket;
            steps += 1;
        }
        if steps == AUTH_BUCKETS {
            self.auth = [0; AUTH_BUCKETS];
            self.auth_bucket_start = now;
        }
    }

    fn quarantine(&mut self, now: Instant, reason: String) -> Option<Transition> {
        if self.state == State::Quarantined {
            return None;
        }
        self.enter(State::Quarantined, now, reason)
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
            out.extend(m.observe(Observation::Message, *now, s));
            *now += step;
        }
        out
    }

    fn learned_at_20(s: &Settings) -> (DeviceModel, Instant) {
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0);
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
            if let Some(t) = m.observe(Observation::Message, now, &s) {
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
        let mut m = DeviceModel::new(t0);
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
        let mut t = send(&mut m, &s, &mut now, 60.0, 1);
        t.extend(send(&mut m, &s, &mut now, 20.0, 65));
        let states: Vec<State> = t.iter().map(|t| t.to).collect();
        assert_eq!(states, [State::Probation, State::Normal], "{t:?}");
        assert!(t[1].reason.starts_with("clean for 60 s"), "{t:?}");
    }

    #[test]
    fn a_slow_ramp_to_fifty_times_is_caught_by_the_ceiling() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0);
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
        let mut m = DeviceModel::new(t0);
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
        let mut m = DeviceModel::new(now);
        for _ in 0..30 {
            assert_eq!(m.observe(Observation::AuthFailure, now, &s), None);
            now += Duration::from_secs(20);
        }
        let mut m = DeviceModel::new(now);
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
        let mut m = DeviceModel::new(t0);
        m.observe(Observation::Clone, t0, &s);
        let at = t0 + Duration::from_secs(300);
        let t = m.observe(Observation::Clone, at, &s).expect("a transition");
        assert_eq!(t.to, State::Quarantined, "{t:?}");
        assert_eq!(m.state(), State::Quarantined);
    }

    #[test]
    fn an_idle_device_keeps_a_baseline_with_spread() {
        let s = Settings::default();
        let t0 = Instant::now();
        let mut m = DeviceModel::new(t0);
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
        let mut m = DeviceModel::new(t0);
        m.observe(Observation::Clone, t0, &s);
        assert_eq!(m.tick(t0 + Duration::from_secs(299), &s), None);
        let t = m.tick(t0 + Duration::from_secs(300), &s).expect("released");
        assert_eq!(t.to, State::Released);
        let t = m.tick(t0 + Duration::from_secs(900), &s).expect("normal");
        assert_eq!(t.to, State::Normal);
        // An operator's release; an anomaly while watched quarantines at once.
        let mut m = DeviceModel::new(t0);
        m.observe(Observation::Clone, t0, &s);
        let t = m.release(t0 + SEC, "operator").expect("released");
        assert_eq!(t.reason, "released by operator");
        let t = m
            .observe(Observation::Clone, t0 + 2 * SEC, &s)
            .expect("again");
        assert_eq!((t.from, t.to), (State::Released, State::Quarantined));
    }
}
