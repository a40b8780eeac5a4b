//! Rate limits: token buckets per principal, per source and for the whole gateway.
//!
//! Pure state with an injected clock. A principal over its rate is first slowed (the
//! session waits before reading its next packet, so TCP back-pressure reaches the
//! peer); only when it stays over the limit for a sustained period does the configured
//! action apply (drop, MQTT 5 "quota exceeded", or disconnect). Each session owns its
//! limiter, so the per-message path takes no lock; the gateway-wide cap is a lock-free
//! atomic bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        self.last = now;
    }

    /// Take `n` tokens, or say how long until they are there. A request larger than
    /// the burst is allowed once the bucket is full (it then goes negative), so an
    /// oversized message is slowed, never stuck forever.
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let need = n.min(self.rate.burst);
        if self.tokens >= need {
            self.tokens -= n;
            return Ok(());
        }
        if self.rate.per_second <= 0.0 {
            return Err(Duration::MAX);
        }
        // A tiny rate can make the wait longer than a Duration holds: then "forever".
        Err(
            Duration::try_from_secs_f64((need - self.tokens) / self.rate.per_second)
                .unwrap_or(Duration::MAX),
        )
    }

    /// How long until `n` tokens are there (zero if they are now); nothing is taken.
    pub fn wait_for(&self, n: f64, now: Instant) -> Duration {
        let mut probe = *self;
        match probe.take(n, now) {
            Ok(()) => Duration::ZERO,
            Err(wait) => wait,
        }
    }

    /// Give tokens back (a message taken but then not admitted elsewhere).
    pub fn give(&mut self, n: f64) {
        self.tokens = (self.tokens + n).min(self.rate.burst);
    }
}

/// What to do with a principal that stays over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimitAction {
    Drop,
    QuotaExceeded,
    Disconnect,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrincipalRates {
    pub messages: Rate,
    pub bytes: Rate,
    /// Longest a single packet is held back before the action applies instead.
    pub max_delay: Duration,
    /// How long a principal may be held back continuously before the action applies.
    pub sustained: Duration,
    pub action: OverLimitAction,
}

impl PrincipalRates {
    /// The rates a principal's configuration gives (group and principal overrides
    /// already applied by `Config::rates_for`).
    pub fn from_config(r: &portcullis_config::RateLimits) -> PrincipalRates {
        use portcullis_config::RateAction;
        PrincipalRates {
            messages: Rate {
                per_second: r.messages_per_second,
                burst: r.message_burst,
            },
            bytes: Rate {
                per_second: r.bytes_per_second,
                burst: r.byte_burst,
            },
            max_delay: *r.max_delay,
            sustained: *r.sustained,
            action: match r.action {
                RateAction::Drop => OverLimitAction::Drop,
                RateAction::QuotaExceeded => OverLimitAction::QuotaExceeded,
                RateAction::Disconnect => OverLimitAction::Disconnect,
            },
        }
    }

    /// Rates and bursts multiplied by `factor` (probation), at least one message of
    /// burst.
    pub fn tightened(mut self, factor: f64) -> PrincipalRates {
        self.messages.per_second *= factor;
        self.messages.burst = (self.messages.burst * factor).max(1.0);
        self.bytes.per_second *= factor;
        self.bytes.burst *= factor;
        self
    }
}

/// The verdict of the rate-limit stage for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitDecision {
    /// Within the rate.
    Pass,
    /// Over the rate: wait this long, then ask again (back-pressure).
    Wait(Duration),
    /// Over the rate for too long: refuse this message (drop or "quota exceeded").
    Refuse(OverLimitAction),
    /// Over the rate for too long: end the session.
    Disconnect,
}

#[derive(Debug, Clone)]
pub struct PrincipalLimiter {
    rates: PrincipalRates,
    messages: TokenBucket,
    bytes: TokenBucket,
    /// Since when the principal has been held back without a break.
    pressed_since: Option<Instant>,
    /// Messages refused since the last report.
    pub refused: u64,
}

impl PrincipalLimiter {
    pub fn new(rates: PrincipalRates, now: Instant) -> Self {
        PrincipalLimiter {
            rates,
            messages: TokenBucket::new(rates.messages, now),
            bytes: TokenBucket::new(rates.bytes, now),
            pressed_since: None,
            refused: 0,
        }
    }

    /// How long until the principal may send one more message (of `len` bytes).
    pub fn retry_after(&self, len: usize, now: Instant) -> Duration {
        self.messages
            .wait_for(1.0, now)
            .max(self.bytes.wait_for(len as f64, now))
    }

    /// Give back what a passed message took (it was then held up elsewhere, e.g. by
    /// the gateway-wide cap, and will ask again).
    pub fn refund(&mut self, len: usize) {
        self.messages.give(1.0);
        self.bytes.give(len as f64);
    }

    pub fn rates(&self) -> PrincipalRates {
        self.rates
    }

    /// Ask to pass one message of `len` payload bytes.
    pub fn admit(&mut self, len: usize, now: Instant) -> LimitDecision {
        let wait = match self.messages.take(1.0, now) {
            Err(w) => Some(w),
            Ok(()) => match self.bytes.take(len as f64, now) {
                Ok(()) => None,
                Err(w) => {
                    self.messages.give(1.0);
                    Some(w)
                }
            },
        };
        let Some(wait) = wait else {
            // Half a burst left in the bucket: the principal has been within its rate
            // for a while. A flooder that waits for each token never gets there, not
            // even when a busy gateway wakes it late (a token or two to spare).
            let refilled = |b: &TokenBucket, need: f64| b.tokens >= need.max(b.rate.burst / 2.0);
            if refilled(&self.messages, 1.0) && refilled(&self.bytes, len as f64) {
                self.pressed_since = None;
            }
            return LimitDecision::Pass;
        };
        let since = *self.pressed_since.get_or_insert(now);
        let sustained = now.saturating_duration_since(since) >= self.rates.sustained;
        if sustained || wait > self.rates.max_delay {
            self.refused += 1;
            return match self.rates.action {
                OverLimitAction::Disconnect if sustained => LimitDecision::Disconnect,
                OverLimitAction::Disconnect => LimitDecision::Refuse(OverLimitAction::Drop),
                other => LimitDecision::Refuse(other),
            };
        }
        LimitDecision::Wait(wait)
    }
}

/// A gateway-wide messages-per-second cap, shared without a lock: tokens are kept as
/// micro-tokens in an atomic and refilled lazily by whoever takes next.
#[derive(Debug)]
pub struct GlobalBucket {
    per_second: u64,
    burst_micros: u64,
    tokens_micros: AtomicU64,
    last_micros: AtomicU64,
    epoch: Instant,
}

impl GlobalBucket {
    pub fn new(per_second: u64, now: Instant) -> Self {
        let burst_micros = per_second.saturating_mul(1_000_000);
        GlobalBucket {
            per_second,
            burst_micros,
            tokens_micros: AtomicU64::new(burst_micros),
            last_micros: AtomicU64::new(0),
            epoch: now,
        }
    }

    /// Take one message's worth; false when the gateway is at its cap.
    pub fn take(&self, now: Instant) -> bool {
        let now_micros = now.saturating_duration_since(self.epoch).as_micros() as u64;
        let last = self.last_micros.load(Ordering::Relaxed);
        if now_micros > last
            && self
                .last_micros
                .compare_exchange(last, now_micros, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let add = (now_micros - last).saturating_mul(self.per_second);
            let _ = self
                .tokens_micros
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_add(add).min(self.burst_micros))
                });
        }
        self.tokens_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1_000_000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(action: OverLimitAction) -> PrincipalRates {
        PrincipalRates {
            messages: Rate {
                per_second: 10.0,
                burst: 5.0,
            },
            bytes: Rate {
                per_second: 1000.0,
                burst: 1000.0,
            },
            max_delay: Duration::from_secs(1),
            sustained: Duration::from_secs(10),
            action,
        }
    }

    #[test]
    fn a_burst_passes_then_the_next_message_waits_for_its_token() {
        let t0 = Instant::now();
        let mut l = PrincipalLimiter::new(rates(OverLimitAction::Drop), t0);
        for _ in 0..5 {
            assert_eq!(l.admit(10, t0), LimitDecision::Pass);
        }
        assert_eq!(
            l.admit(10, t0),
            LimitDecision::Wait(Duration::from_millis(100))
        );
        assert_eq!(
            l.admit(10, t0 + Duration::from_millis(100)),
            LimitDecision::Pass
        );
    }

    #[test]
    fn the_byte_rate_limits_large_messages() {
        let t0 = Instant::now();
        let mut l = PrincipalLimiter::new(rates(OverLimitAction::Drop), t0);
        assert_eq!(l.admit(1000, t0), LimitDecision::Pass);
        // The message token was given back: only bytes are short.
        assert_eq!(
            l.admit(500, t0),
            LimitDecision::Wait(Duration::from_millis(500))
        );
        assert_eq!(
            l.admit(500, t0 + Duration::from_millis(500)),
            LimitDecision::Pass
        );
    }

    #[test]
    fn sustained_abuse_gets_the_configured_action() {
        for (action, expected) in [
            (
                OverLimitAction::Drop,
                LimitDecision::Refuse(OverLimitAction::Drop),
            ),
            (
                OverLimitAction::QuotaExceeded,
                LimitDecision::Refuse(OverLimitAction::QuotaExceeded),
            ),
            (OverLimitAction::Disconnect, LimitDecision::Disconnect),
        ] {
            let t0 = Instant::now();
            let mut l = PrincipalLimiter::new(rates(action), t0);
            let mut now = t0;
            // A flooder that never lets the bucket refill: held back, again and again.
            let mut last = LimitDecision::Pass;
            for _ in 0..1000 {
                last = l.admit(10, now);
                if !matches!(last, LimitDecision::Pass | LimitDecision::Wait(_)) {
                    break;
                }
                now += Duration::from_millis(20);
            }
            assert_eq!(last, expected, "{action:?}");
            assert!(
                now >= t0 + Duration::from_secs(10),
                "only after the sustained period"
            );
        }
    }

    #[test]
    fn a_tiny_rate_waits_forever_instead_of_panicking() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            Rate {
                per_second: 1e-20,
                burst: 1.0,
            },
            t0,
        );
        assert_eq!(b.take(1.0, t0), Ok(()));
        assert_eq!(b.take(1.0, t0), Err(Duration::MAX));
    }

    #[test]
    fn a_flooder_woken_late_is_still_pressed() {
        // A busy gateway wakes a held-back flooder late (here 150 ms, 1.5 tokens):
        // it takes the token it waited for and finds another in the bucket. It is
        // still flooding, and the sustained clock must keep running.
        let t0 = Instant::now();
        let mut l = PrincipalLimiter::new(rates(OverLimitAction::Disconnect), t0);
        let mut now = t0;
        let mut last = LimitDecision::Pass;
        while now < t0 + Duration::from_secs(30) {
            last = l.admit(10, now);
            match last {
                LimitDecision::Pass => {}
                LimitDecision::Wait(w) => now += w + Duration::from_millis(150),
                _ => break,
            }
        }
        assert_eq!(last, LimitDecision::Disconnect);
        assert!(now < t0 + Duration::from_secs(12), "at {:?}", now - t0);
    }

    #[test]
    fn a_principal_back_within_its_rate_is_no_longer_pressed() {
        let t0 = Instant::now();
        let mut l = PrincipalLimiter::new(rates(OverLimitAction::Disconnect), t0);
        let mut now = t0;
        for _ in 0..5 {
            l.admit(10, now);
        }
        assert!(matches!(l.admit(10, now), LimitDecision::Wait(_)));
        // Nine seconds later it behaves: the pressure record is cleared.
        now += Duration::from_secs(9);
        assert_eq!(l.admit(10, now), LimitDecision::Pass);
        now += Duration::from_secs(2);
        for _ in 0..5 {
            l.admit(10, now);
        }
        assert!(matches!(l.admit(10, now), LimitDecision::Wait(_)));
    }

    #[test]
    fn a_wait_longer_than_the_max_delay_refuses_at_once() {
        let t0 = Instant::now();
        let mut r = rates(OverLimitAction::QuotaExceeded);
        r.messages = Rate {
            per_second: 0.1,
            burst: 1.0,
        };
        let mut l = PrincipalLimiter::new(r, t0);
        assert_eq!(l.admit(1, t0), LimitDecision::Pass);
        assert_eq!(
            l.admit(1, t0),
            LimitDecision::Refuse(OverLimitAction::QuotaExceeded)
        );
    }

    #[test]
    fn a_byte_flood_with_few_messages_still_counts_as_pressed() {
        let t0 = Instant::now();
        let mut r = rates(OverLimitAction::Disconnect);
        r.messages = Rate {
            per_second: 1000.0,
            burst: 1000.0,
        };
        let mut l = PrincipalLimiter::new(r, t0);
        let mut now = t0;
        let mut last = LimitDecision::Pass;
        for _ in 0..2000 {
            last = l.admit(1000, now);
            if last == LimitDecision::Disconnect {
                break;
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(last, LimitDecision::Disconnect);
    }

    #[test]
    fn a_refund_restores_what_a_message_took() {
        let t0 = Instant::now();
        let mut l = PrincipalLimiter::new(rates(OverLimitAction::Drop), t0);
        for _ in 0..5 {
            assert_eq!(l.admit(10, t0), LimitDecision::Pass);
            l.refund(10);
        }
        assert_eq!(l.admit(10, t0), LimitDecision::Pass);
    }

    #[test]
    fn the_global_bucket_caps_everyone_together() {
        let t0 = Instant::now();
        let g = GlobalBucket::new(100, t0);
        let taken = (0..250).filter(|_| g.take(t0)).count();
        assert_eq!(taken, 100);
        let later = t0 + Duration::from_millis(500);
        let more = (0..250).filter(|_| g.take(later)).count();
        assert_eq!(more, 50);
    }
}
