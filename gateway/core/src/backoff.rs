//! Back-off after repeated authentication failures, per (id, source) and per source.
//!
//! Pure state with an injected clock. Failures against one id from one source back
//! that pair off: after `max_failures` in a window, for a back-off that doubles on
//! each further failure up to a cap. Waiting out the cap does not start the pair
//! over: until it has been quiet for `forget`, each further failure backs it off
//! again, so a guesser gets about one guess per cap, not `max_failures` fresh ones.
//! A source as a whole is backed off only when it fails against many distinct ids
//! or at a much higher rate, so devices sharing an address (a NAT) are not locked
//! out by one of them. A successful login clears only its own (id, source) record.
//! Sources are keyed by [`SourceKey`] (an IPv6 /64 is one source).

use crate::source_key::SourceKey;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    /// Failures of one (id, source) pair within `window` before the pair is backed off.
    pub max_failures: u32,
    pub window: Duration,
    pub initial: Duration,
    pub max: Duration,
    /// A record with no failure for this long starts over (its back-off level decays).
    pub forget: Duration,
    /// Distinct ids one source fails against within `window` before it is backed off.
    pub source_max_ids: u32,
    /// Failures from one source within `window`, whatever the ids, before it is.
    pub source_max_failures: u32,
    /// Records kept at most (pairs and sources each); the oldest are evicted beyond.
    pub max_entries: usize,
    /// Prefix length that makes one IPv6 source.
    pub ipv6_prefix: u8,
    /// Failed logins naming one registered id within `window` that raise an alert.
    pub alert_failures: u32,
}

impl BackoffPolicy {
    pub fn from_config(a: &portcullis_config::Auth) -> BackoffPolicy {
        BackoffPolicy {
            max_failures: a.max_failures,
            window: *a.failure_window,
            initial: *a.backoff_initial,
            max: *a.backoff_max,
            forget: *a.backoff_forget,
            source_max_ids: a.source_max_ids,
            source_max_failures: a.source_max_failures,
            max_entries: a.backoff_max_entries,
            ipv6_prefix: a.ipv6_source_prefix,
            alert_failures: a.alert_failures,
        }
    }
}

/// Failures of one pair or one source.
#[derive(Debug, Clone)]
struct Record {
    window_start: Instant,
    failures: u32,
    /// Back-offs earned since the record was last quiet for `forget`.
    level: u32,
    blocked_until: Option<Instant>,
    last_failure: Instant,
    /// Distinct ids (hashed) failed in the current window; sources only, at most
    /// `source_max_ids`.
    ids: Vec<u64>,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            window_start: now,
            failures: 0,
            level: 0,
            blocked_until: None,
            last_failure: now,
            ids: Vec::new(),
        }
    }

    /// Count a failure: start over after `forget` of quiet, a new count after a window.
    fn count(&mut self, policy: &BackoffPolicy, now: Instant) {
        if now.saturating_duration_since(self.last_failure) > policy.forget {
            *self = Record::new(now);
        }
        if now.saturating_duration_since(self.window_start) > policy.window {
            self.failures = 0;
            self.ids.clear();
            self.window_start = now;
        }
        self.failures = self.failures.saturating_add(1);
        self.last_failure = now;
    }

    fn block(&mut self, policy: &BackoffPolicy, now: Instant) {
        let factor = 1u32.checked_shl(self.level.min(31)).unwrap_or(u32::MAX);
        let backoff = policy.initial.saturating_mul(factor).min(policy.max);
        self.blocked_until = Some(now + backoff);
        self.level = self.level.saturating_add(1);
    }

    fn blocked(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// Which record refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackedOff {
    /// This id from this source.
    Pair(Duration),
    /// The source as a whole.
    Source(Duration),
}

impl BackedOff {
    pub fn remaining(&self) -> Duration {
        match self {
            BackedOff::Pair(d) | BackedOff::Source(d) => *d,
        }
    }
}

#[derive(Debug)]
pub struct SourceGuard {
    policy: BackoffPolicy,
    hasher: RandomState,
    pairs: HashMap<(SourceKey, u64), Record>,
    sources: HashMap<SourceKey, Record>,
}

impl SourceGuard {
    pub fn new(policy: BackoffPolicy) -> Self {
        SourceGuard {
            policy,
            hasher: RandomState::new(),
            pairs: HashMap::new(),
            sources: HashMap::new(),
        }
    }

    pub fn key(&self, source: IpAddr) -> SourceKey {
        SourceKey::new(source, self.policy.ipv6_prefix)
    }

    fn id_hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// `Err` while the source, or this id from it, is backed off.
    pub fn check(&self, source: IpAddr, id: &str, now: Instant) -> Result<(), BackedOff> {
        let key = self.key(source);
        if let Some(d) = self.sources.get(&key).and_then(|r| r.blocked(now)) {
            return Err(BackedOff::Source(d));
        }
        match self
            .pairs
            .get(&(key, self.id_hash(id)))
            .and_then(|r| r.blocked(now))
        {
            Some(d) => Err(BackedOff::Pair(d)),
            None => Ok(()),
        }
    }

    pub fn record_failure(&mut self, source: IpAddr, id: &str, now: Instant) {
        let policy = self.policy;
        let key = self.key(source);
        let id = self.id_hash(id);
        if self.pairs.len() >= policy.max_entries && !self.pairs.contains_key(&(key, id)) {
            evict(&mut self.pairs, &policy, now, false);
        }
        // With every record a guesser's that is backed off, a new pair gets none: the
        // failure still counts against its source below.
        if self.pairs.len() < policy.max_entries || self.pairs.contains_key(&(key, id)) {
            let pair = self
                .pairs
                .entry((key, id))
                .or_insert_with(|| Record::new(now));
            pair.count(&policy, now);
            // A pair backed off before (and not quiet since) is backed off again at once.
            if pair.level > 0 || pair.failures >= policy.max_failures {
                pair.block(&policy, now);
            }
        }
        if self.sources.len() >= policy.max_entries && !self.sources.contains_key(&key) {
            evict(&mut self.sources, &policy, now, true);
            if self.sources.len() >= policy.max_entries {
                // Every source tracked is backed off right now: the table stays bounded.
                return;
            }
        }
        let src = self.sources.entry(key).or_insert_with(|| Record::new(now));
        src.count(&policy, now);
        if !src.ids.contains(&id) && src.ids.len() < policy.source_max_ids as usize {
            src.ids.push(id);
        }
        if src.ids.len() >= policy.source_max_ids as usize
            || src.failures >= policy.source_max_failures
        {
            src.block(&policy, now);
        }
    }

    /// A valid login clears its own (id, source) record, and nothing else.
    pub fn record_success(&mut self, source: IpAddr, id: &str) {
        let key = (self.key(source), self.id_hash(id));
        self.pairs.remove(&key);
    }

    /// Records held (pairs, sources).
    pub fn tracked(&self) -> (usize, usize) {
        (self.pairs.len(), self.sources.len())
    }
}

/// Make room, down to nine tenths of `max_entries` so that the next inserts are cheap:
/// first what is quiet, then the oldest records that were never backed off. A record
/// that earned a back-off (`level > 0`) is a guesser's: a spray of fresh failures must
/// not make the table forget it. Only when `escalated_too` (sources, whose table must
/// always take a new one) are the oldest of those evicted, and never one blocked now.
fn evict<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Record>,
    policy: &BackoffPolicy,
    now: Instant,
    escalated_too: bool,
) {
    map.retain(|_, r| {
        r.blocked(now).is_some()
            || now.saturating_duration_since(r.last_failure)
                <= if r.level > 0 {
                    policy.forget
                } else {
                    policy.window
                }
    });
    let low_water = policy.max_entries - policy.max_entries / 10;
    shed_oldest(map, low_water, |r| r.level == 0 && r.blocked(now).is_none());
    if escalated_too {
        shed_oldest(map, low_water, |r| r.blocked(now).is_none());
    }
}

/// Remove the oldest records that `may_go` allows until at most `target` remain (or
/// none of them is left).
fn shed_oldest<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Record>,
    target: usize,
    may_go: impl Fn(&Record) -> bool,
) {
    if map.len() <= target {
        return;
    }
    let mut ages: Vec<(Instant, &K)> = map
        .iter()
        .filter(|(_, r)| may_go(r))
        .map(|(k, r)| (r.last_failure, k))
        .collect();
    if ages.is_empty() {
        return;
    }
    // Exactly the `excess` oldest, ties or not.
    let excess = (map.len() - target).min(ages.len());
    ages.select_nth_unstable_by_key(excess - 1, |(at, _)| *at);
    let gone: Vec<K> = ages[..excess].iter().map(|(_, k)| (*k).clone()).collect();
    for k in gone {
        map.remove(&k);
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
            forget: Duration::from_secs(3600),
            source_max_ids: 10,
            source_max_failures: 100,
            max_entries: 1000,
            ipv6_prefix: 64,
            alert_failures: 10,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_pair_is_backed_off_after_repeated_failures() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for _ in 0..2 {
            g.record_failure(ip(1), "a", t0);
            assert!(g.check(ip(1), "a", t0).is_ok());
        }
        g.record_failure(ip(1), "a", t0);
        assert_eq!(g.check(ip(1), "a", t0), Err(BackedOff::Pair(secs(2))));
        assert!(g.check(ip(1), "a", t0 + secs(2)).is_ok());
    }

    #[test]
    fn other_ids_behind_the_same_address_are_not_affected() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for _ in 0..10 {
            g.record_failure(ip(5), "a", t0);
        }
        assert!(g.check(ip(5), "a", t0).is_err());
        assert!(g.check(ip(5), "b", t0).is_ok());
        assert!(g.check(ip(6), "a", t0).is_ok());
    }

    #[test]
    fn back_off_doubles_on_repeats_up_to_the_cap() {
        let mut g = SourceGuard::new(policy());
        let mut now = Instant::now();
        for _ in 0..3 {
            g.record_failure(ip(1), "a", now);
        }
        let mut seen = vec![];
        for _ in 0..6 {
            let wait = g.check(ip(1), "a", now).unwrap_err().remaining();
            seen.push(wait.as_secs());
            // Waiting out the back-off (even the cap) does not start the pair over:
            // the next failure backs it off again at once.
            now += wait + secs(1);
            g.record_failure(ip(1), "a", now);
        }
        assert_eq!(seen, vec![2, 4, 8, 16, 16, 16]);
    }

    #[test]
    fn a_guesser_gets_about_one_guess_per_cap_every_hour() {
        let mut p = policy();
        p.max = secs(300);
        p.forget = secs(86_400);
        let mut g = SourceGuard::new(p);
        let start = Instant::now();
        let mut guesses_per_hour = vec![0u32; 10];
        // The guesser tries every second for ten hours.
        for s in 0..36_000u64 {
            let now = start + secs(s);
            if g.check(ip(9), "victim", now).is_ok() {
                g.record_failure(ip(9), "victim", now);
                guesses_per_hour[(s / 3600) as usize] += 1;
            }
        }
        assert!(
            guesses_per_hour[0] <= 3 + 9 + 3600 / 300,
            "{guesses_per_hour:?}"
        );
        for n in &guesses_per_hour[1..] {
            assert!(*n <= 3600 / 300 + 1, "{guesses_per_hour:?}");
        }
    }

    #[test]
    fn a_pair_quiet_for_the_forget_period_starts_over() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            g.record_failure(ip(1), "a", t0);
        }
        let later = t0 + secs(3601);
        g.record_failure(ip(1), "a", later);
        assert!(g.check(ip(1), "a", later).is_ok());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        g.record_failure(ip(1), "a", t0);
        g.record_failure(ip(1), "a", t0);
        let later = t0 + secs(61);
        g.record_failure(ip(1), "a", later);
        assert!(g.check(ip(1), "a", later).is_ok());
    }

    #[test]
    fn spraying_many_ids_backs_the_whole_source_off() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for n in 0..9 {
            g.record_failure(ip(1), &format!("ghost-{n}"), t0);
        }
        assert!(g.check(ip(1), "never-tried", t0).is_ok());
        g.record_failure(ip(1), "ghost-9", t0);
        assert_eq!(
            g.check(ip(1), "never-tried", t0),
            Err(BackedOff::Source(secs(2)))
        );
        assert!(g.check(ip(2), "never-tried", t0).is_ok());
    }

    #[test]
    fn a_source_failing_at_a_much_higher_rate_is_backed_off() {
        let mut p = policy();
        p.max_failures = 1000;
        p.source_max_failures = 20;
        let mut g = SourceGuard::new(p);
        let t0 = Instant::now();
        for n in 0..20 {
            assert!(g.check(ip(1), "x", t0).is_ok(), "after {n}");
            g.record_failure(ip(1), ["a", "b"][n % 2], t0);
        }
        assert!(matches!(g.check(ip(1), "x", t0), Err(BackedOff::Source(_))));
    }

    #[test]
    fn a_success_clears_only_its_own_pair() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for id in ["a", "b"] {
            g.record_failure(ip(1), id, t0);
            g.record_failure(ip(1), id, t0);
        }
        g.record_success(ip(1), "a");
        g.record_failure(ip(1), "a", t0);
        g.record_failure(ip(1), "b", t0);
        assert!(g.check(ip(1), "a", t0).is_ok());
        assert!(g.check(ip(1), "b", t0).is_err());
    }

    #[test]
    fn addresses_in_one_ipv6_prefix_share_a_back_off() {
        let mut g = SourceGuard::new(policy());
        let t0 = Instant::now();
        for n in 1..=3u16 {
            let addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, n, 0, 0, n);
            g.record_failure(IpAddr::V6(addr), "a", t0);
        }
        let other_host = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0xff, 0, 0, 1);
        assert!(g.check(IpAddr::V6(other_host), "a", t0).is_err());
        let other_net = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1);
        assert!(g.check(IpAddr::V6(other_net), "a", t0).is_ok());
    }

    #[test]
    fn tracked_state_is_bounded() {
        let mut p = policy();
        p.max_entries = 100;
        let mut g = SourceGuard::new(p);
        let t0 = Instant::now();
        for n in 0..5000u32 {
            let addr = IpAddr::from(n.wrapping_add(0x0a00_0000).to_be_bytes());
            let at = t0 + Duration::from_millis(u64::from(n));
            g.record_failure(addr, &format!("id-{n}"), at);
        }
        let (pairs, sources) = g.tracked();
        assert!(pairs <= 100 && sources <= 100, "{pairs} {sources}");
    }

    #[test]
    fn a_spray_of_fresh_failures_does_not_make_the_table_forget_a_guesser() {
        let mut p = policy();
        p.max_entries = 100;
        let mut g = SourceGuard::new(p);
        let t0 = Instant::now();
        // The guesser earns a back-off for its pair.
        for _ in 0..3 {
            g.record_failure(ip(9), "victim", t0);
        }
        let guessed = |g: &SourceGuard, at| g.check(ip(9), "victim", at);
        assert!(matches!(guessed(&g, t0), Err(BackedOff::Pair(_))));
        // Then 5 000 fresh failures, one per new (id, source), all at once (same
        // instant: "the oldest half" used to be everything).
        let t1 = t0 + secs(1);
        for n in 0..5000u32 {
            let addr = IpAddr::from(n.wrapping_add(0x0a00_0000).to_be_bytes());
            g.record_failure(addr, &format!("id-{n}"), t1);
        }
        let (pairs, sources) = g.tracked();
        assert!(pairs <= 100 && sources <= 100, "{pairs} {sources}");
        // Its back-off expired meanwhile, but the pair is remembered: its next failure
        // backs it off again at once, with no fresh guesses.
        let t2 = t0 + secs(3);
        assert!(guessed(&g, t2).is_ok());
        g.record_failure(ip(9), "victim", t2);
        assert!(matches!(guessed(&g, t2), Err(BackedOff::Pair(_))));
    }
}
