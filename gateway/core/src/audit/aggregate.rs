//! Which refusals are worth a line, pure: the first of a kind in its window is
//! written, the repeats become one count when the window closes, so a flood of
//! identical refusals costs a line per window, not the disk. Memory is bounded.

use super::LONGEST;
use super::entry::{AuditEntry, Extra};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Distinct refusals tracked at once; beyond it they share one overflow count.
pub const AGGREGATE_KEYS_MAX: usize = 10_000;

/// Two refusals are "the same" when all but their time and source port are: a
/// different topic or reason is a different fact, worth its own line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    event: &'static str,
    kind: Option<&'static str>,
    principal: Option<String>,
    /// The address without the port: every new connection gets a new port.
    source: Option<String>,
    protocol: Option<&'static str>,
    topic: Option<String>,
    reason: Option<String>,
}

impl RefusalKey {
    fn of(entry: &AuditEntry) -> Self {
        RefusalKey {
            event: entry.event,
            kind: entry.kind,
            principal: entry.principal.clone(),
            source: entry.source.as_deref().map(|s| {
                s.parse::<SocketAddr>()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_else(|_| s.to_string())
            }),
            protocol: entry.protocol,
            topic: entry.topic.clone(),
            reason: entry.reason.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Tally {
    closes: Instant,
    first_ms: u64,
    last_ms: u64,
    /// Refusals counted and not written.
    repeated: u64,
}

impl Tally {
    fn open(closes: Instant, time_ms: u64) -> Self {
        Tally {
            closes,
            first_ms: time_ms,
            last_ms: time_ms,
            repeated: 0,
        }
    }
}

/// Decides which refusals are written: the first of a kind in its window is, the
/// others are counted into one `aggregate` line when the window closes. Memory is
/// bounded by `cap` keys; refusals of new kinds beyond it share an overflow tally.
pub(super) struct Aggregator {
    window: Duration,
    cap: usize,
    open: HashMap<RefusalKey, Tally>,
    /// Keys in the order their windows opened, which is the order they close.
    closing: VecDeque<RefusalKey>,
    overflow: Option<Tally>,
}

impl Aggregator {
    pub(super) fn new(window: Duration, cap: usize) -> Self {
        Aggregator {
            window: window.min(LONGEST),
            cap,
            open: HashMap::new(),
            closing: VecDeque::new(),
            overflow: None,
        }
    }

    /// Whether `entry` is to be written now.
    pub(super) fn admit(&mut self, entry: &AuditEntry, now: Instant) -> bool {
        if entry.decision != "refuse" || self.window.is_zero() {
            return true;
        }
        let key = RefusalKey::of(entry);
        if let Some(tally) = self.open.get_mut(&key) {
            tally.repeated += 1;
            tally.last_ms = entry.time_ms;
            return false;
        }
        let closes = now + self.window;
        if self.open.len() >= self.cap {
            let tally = self
                .overflow
                .get_or_insert_with(|| Tally::open(closes, entry.time_ms));
            tally.repeated += 1;
            tally.last_ms = entry.time_ms;
            return false;
        }
        self.closing.push_back(key.clone());
        self.open.insert(key, Tally::open(closes, entry.time_ms));
        true
    }

    /// Close the windows that ended by `now`; an `aggregate` line for each that
    /// counted something.
    pub(super) fn close_expired(&mut self, now: Instant, wall_ms: u64) -> Vec<(AuditEntry, Extra)> {
        self.close(Some(now), wall_ms)
    }

    /// Close every window (the writer is stopping).
    pub(super) fn close_all(&mut self, wall_ms: u64) -> Vec<(AuditEntry, Extra)> {
        self.close(None, wall_ms)
    }

    fn close(&mut self, now: Option<Instant>, wall_ms: u64) -> Vec<(AuditEntry, Extra)> {
        let due = |tally: &Tally| now.is_none_or(|now| tally.closes <= now);
        let mut lines = Vec::new();
        while let Some(key) = self.closing.front() {
            match self.open.get(key) {
                Some(tally) if !due(tally) => break,
                _ => {}
            }
            let Some(key) = self.closing.pop_front() else {
                break;
            };
            if let Some(tally) = self.open.remove(&key)
                && tally.repeated > 0
            {
                lines.push(self.aggregate_line(Some(key), tally, wall_ms));
            }
        }
        if self.overflow.as_ref().is_some_and(due)
            && let Some(tally) = self.overflow.take()
        {
            lines.push(self.aggregate_line(None, tally, wall_ms));
        }
        lines
    }

    fn aggregate_line(
        &self,
        key: Option<RefusalKey>,
        tally: Tally,
        wall_ms: u64,
    ) -> (AuditEntry, Extra) {
        let mut entry = AuditEntry::own("aggregate", "refuse", wall_ms);
        let of = match key {
            Some(key) => {
                entry.kind = key.kind;
                entry.principal = key.principal;
                entry.source = key.source;
                entry.protocol = key.protocol;
                entry.topic = key.topic;
                entry.reason = key.reason;
                Some(key.event)
            }
            None => {
                entry.reason = Some(format!(
                    "more than {} kinds of refusal in one window: the rest were counted together",
                    self.cap
                ));
                None
            }
        };
        let extra = Extra {
            of,
            repeated: Some(tally.repeated),
            first_ms: Some(tally.first_ms),
            last_ms: Some(tally.last_ms),
            dropped: None,
        };
        (entry, extra)
    }

    /// When the next window closes.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let first = self
            .closing
            .front()
            .and_then(|key| self.open.get(key))
            .map(|t| t.closes);
        let overflow = self.overflow.as_ref().map(|t| t.closes);
        match (first, overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_memory_is_bounded() {
        let t0 = Instant::now();
        let mut aggregator = Aggregator::new(Duration::from_secs(60), 2);
        let refused = |id: &str| AuditEntry::new("connect", "refuse").principal("device", id);
        assert!(aggregator.admit(&refused("a"), t0));
        assert!(aggregator.admit(&refused("b"), t0));
        assert!(!aggregator.admit(&refused("c"), t0));
        assert!(!aggregator.admit(&refused("d"), t0));
        assert!(!aggregator.admit(&refused("a"), t0));
        assert_eq!(aggregator.open.len(), 2);
        assert!(
            aggregator
                .close_expired(t0 + Duration::from_secs(59), 0)
                .is_empty()
        );
        let closed = aggregator.close_expired(t0 + Duration::from_secs(60), 0);
        let counts: Vec<_> = closed
            .iter()
            .map(|(e, x)| (e.principal.clone(), x.repeated))
            .collect();
        assert_eq!(
            counts,
            vec![(Some("a".to_string()), Some(1)), (None, Some(2))]
        );
        assert_eq!(aggregator.next_deadline(), None);
    }
}
