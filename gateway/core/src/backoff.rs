//! Per-source back-off after repeated authentication failures.
//!
//! Pure state with an injected clock. A source that fails `max_failures` times in a
//! window is refused before any credential is checked, for a back-off that doubles on
//! each further failure up to a cap. Only the source is penalised: the same id
//! connecting correctly from elsewhere is unaffected, so an attacker cannot lock a
//! device out by failing in its name.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    pub max_failures: u32,
    pub window: Duration,
    pub initial: Duration,
    pub max: Duration,
}

impl BackoffPolicy {
    pub fn from_config(a: &portcullis_config::Auth) -> BackoffPolicy {
        BackoffPolicy {
            max_failures: a.max_failures,
            window: Duration::from_secs(a.failure_window_secs),
            initial: Duration::from_secs(a.backoff_initial_secs),
            max: Duration::from_secs(a.backoff_max_secs),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct SourceState {
    window_start: Instant,
    failures: u32,
    /// How many back-offs this source has earned since it was last quiet.
    level: u32,
    blocked_until: Option<Instant>,
    last_failure: Instant,
}

/// Most sources tracked at once; beyond it, entries that no longer block are evicted.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub struct SourceGuard {
    policy: BackoffPolicy,
    sources: HashMap<IpAddr, SourceState>,
}

impl SourceGuard {
    pub fn new(policy: BackoffPolicy) -> Self {
        SourceGuard {
            policy,
            sources: HashMap::new(),
        }
    }

    /// `Err(remaining)` while the source is backed off.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.sources.get(&source).and_then(|s| s.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    pub fn record_failure(&mut self, source: IpAddr, now: Instant) {
        if self.sources.len() >= MAX_TRACKED && !self.sources.contains_key(&source) {
            self.evict(now);
        }
        let policy = self.policy;
        let state = self.sources.entry(source).or_insert(SourceState {
            window_start: now,
            failures: 0,
            level: 0,
            blocked_until: None,
            last_failure: now,
        });
        // A source quiet for longer than the cap starts over.
        if now.saturating_duration_since(state.last_failure) > policy.max {
            state.level = 0;
            state.failures = 0;
            state.window_start = now;
        }
        if now.saturating_duration_since(state.window_start) > policy.window && state.level == 0 {
            state.failures = 0;
            state.window_start = now;
        }
        state.failures = state.failures.saturating_add(1);
        state.last_failure = now;
        if state.failures >= policy.max_failures {
            let factor = 1u32.checked_shl(state.level.min(31)).unwrap_or(u32::MAX);
            let backoff = policy.initial.saturating_mul(factor).min(policy.max);
            state.blocked_until = Some(now + backoff);
            state.level = state.level.saturating_add(1);
        }
    }

    fn evict(&mut self, now: Instant) {
        let window = self.policy.window;
        self.sources.retain(|_, s| {
            s.blocked_until.is_some_and(|u| u > now)
                || now.saturating_duration_since(s.last_failure) <= window
        });
        if self.sources.len() >= MAX_TRACKED {
            // Under a spray from very many sources, forget the oldest half.
            let mut ages: Vec<Instant> = self.sources.values().map(|s| s.last_failure).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            self.sources.retain(|_, s| s.last_failure > cutoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            max_failures: 3,
            window: Duration::from_secs(60),
            initial: Duration::from_secs(2),
            max: Duration::from_secs(16),
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn source_is_backed_off_after_repeated_failures() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for _ in 0..2 {
            g.record_failure(ip(1), t0);
            assert!(g.check(ip(1), t0).is_ok());
        }
        g.record_failure(ip(1), t0);
        assert_eq!(g.check(ip(1), t0), Err(Duration::from_secs(2)));
        assert!(g.check(ip(1), t0 + Duration::from_secs(2)).is_ok());
    }

    #[test]
    fn other_sources_are_not_affected() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            g.record_failure(ip(1), t0);
        }
        assert!(g.check(ip(1), t0).is_err());
        assert!(g.check(ip(2), t0).is_ok());
    }

    #[test]
    fn back_off_doubles_on_repeats_up_to_the_cap() {
        let mut g = SourceGuard::new(policy());
        let mut now = Instant::now();
        for _ in 0..3 {
            g.record_failure(ip(1), now);
        }
        let mut seen = vec![];
        for _ in 0..5 {
            let wait = g.check(ip(1), now).unwrap_err();
            seen.push(wait.as_secs());
            now += wait;
            g.record_failure(ip(1), now);
        }
        assert_eq!(seen, vec![2, 4, 8, 16, 16]);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        g.record_failure(ip(1), t0);
        g.record_failure(ip(1), t0);
        let later = t0 + Duration::from_secs(61);
        g.record_failure(ip(1), later);
        assert!(g.check(ip(1), later).is_ok());
    }
}
