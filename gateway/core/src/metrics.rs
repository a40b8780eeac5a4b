//! Counters for what the gateway decided. Rendered as Prometheus text.
//!
//! The hot path only touches atomics; refusal counters, keyed by stage and reason,
//! sit behind a mutex that is taken only when something is refused.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub queue_overflow: AtomicU64,
    pub rate_limit_waits: AtomicU64,
    pub commands_undeliverable: AtomicU64,
    pub queue_expired: AtomicU64,
    pub takeovers: AtomicU64,
    pub wills_published: AtomicU64,
    pub bytes_accepted: AtomicU64,
    pub audit_dropped: AtomicU64,
    refusals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    pub fn refused(&self, stage: &'static str, reason: &'static str) {
        let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((stage, reason)).or_insert(0) += 1;
    }

    pub fn refusal_count(&self, stage: &str, reason: &str) -> u64 {
        let map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|((s, r), _)| *s == stage && *r == reason)
            .map(|(_, v)| *v)
            .sum()
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "portcullis_connections_accepted_total",
            "Connections that authenticated.",
            "counter",
            load(&self.connections_accepted),
        );
        gauge(
            &mut out,
            "portcullis_connections_active",
            "Sessions currently open.",
            "gauge",
            load(&self.connections_active),
        );
        gauge(
            &mut out,
            "portcullis_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
            "counter",
            load(&self.handshake_failures),
        );
        gauge(
            &mut out,
            "portcullis_messages_accepted_total",
            "Messages accepted by the pipeline.",
            "counter",
            load(&self.messages_accepted),
        );
        gauge(
            &mut out,
            "portcullis_messages_delivered_total",
            "Messages delivered to peers.",
            "counter",
            load(&self.messages_delivered),
        );
        gauge(
            &mut out,
            "portcullis_queue_overflow_total",
            "Messages refused because a device's queue was full.",
            "counter",
            load(&self.queue_overflow),
        );
        gauge(
            &mut out,
            "portcullis_rate_limit_waits_total",
            "Times a principal over its rate (or the gateway at its cap) was held back.",
            "counter",
            load(&self.rate_limit_waits),
        );
        gauge(
            &mut out,
            "portcullis_commands_undeliverable_total",
            "Commands for a device with no session (never connected, clean, or expired).",
            "counter",
            load(&self.commands_undeliverable),
        );
        gauge(
            &mut out,
            "portcullis_queue_expired_total",
            "Queued messages dropped for age before delivery.",
            "counter",
            load(&self.queue_expired),
        );
        gauge(
            &mut out,
            "portcullis_session_takeovers_total",
            "Sessions ended by a new connection with the same identity.",
            "counter",
            load(&self.takeovers),
        );
        gauge(
            &mut out,
            "portcullis_wills_published_total",
            "Last Will messages published after an unexpected disconnect.",
            "counter",
            load(&self.wills_published),
        );
        gauge(
            &mut out,
            "portcullis_accepted_bytes_total",
            "Payload bytes accepted by the pipeline.",
            "counter",
            load(&self.bytes_accepted),
        );
        gauge(
            &mut out,
            "portcullis_audit_entries_dropped_total",
            "Audit entries that could not be queued.",
            "counter",
            load(&self.audit_dropped),
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_refusals_total Refusals by stage and reason.\n# TYPE portcullis_refusals_total counter"
        );
        let map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        for ((stage, reason), v) in map.iter() {
            let _ = writeln!(
                out,
                "portcullis_refusals_total{{stage=\"{stage}\",reason=\"{reason}\"}} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_rendered_with_labels() {
        let m = Metrics::default();
        m.refused("connect", "bad_secret");
        m.refused("connect", "bad_secret");
        let text = m.render();
        assert!(
            text.contains("portcullis_refusals_total{stage=\"connect\",reason=\"bad_secret\"} 2"),
            "{text}"
        );
        assert_eq!(m.refusal_count("connect", "bad_secret"), 2);
    }
}
