//! Counters for what the gateway decided. Rendered as Prometheus text.
//!
//! The hot path only touches atomics: every refusal reason has its own counter slot
//! (`Refusal::slot`), so counting one takes no lock.

use crate::peer::Protocol;
use crate::principal::PrincipalKind;
use crate::refusal::Refusal;
use std::fmt::Write;
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
    /// Retained messages the broker's retained store had no room for.
    pub retained_refused: AtomicU64,
    /// Service subscriptions held now, over all sessions (the fan-out's table).
    pub service_subscriptions: AtomicU64,
    pub takeovers: AtomicU64,
    pub wills_published: AtomicU64,
    pub bytes_accepted: AtomicU64,
    pub audit_dropped: AtomicU64,
    /// Audit log rotations that failed (the log went on in its current file).
    pub audit_rotation_failures: AtomicU64,
    /// Behaviour transitions: into quarantine, into probation, out of either.
    pub quarantined: AtomicU64,
    pub probations: AtomicU64,
    pub releases: AtomicU64,
    /// Messages of quarantined devices kept from services: dropped, or diverted to
    /// the forensic topic.
    pub quarantine_dropped: AtomicU64,
    pub quarantine_diverted: AtomicU64,
    /// Alerts on failed logins naming a registered device (at most one per id per window).
    pub auth_failure_alerts: AtomicU64,
    refusals: RefusalCounters,
    /// Open sessions by protocol and principal kind (`session_gauge`).
    sessions: [[AtomicU64; 2]; Protocol::ALL.len()],
    /// Accept → handed to the broker link, seconds.
    pub forward_latency: Histogram,
}

/// Upper bounds of the forward-latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// A fixed-bucket histogram on atomics: recording is a few relaxed adds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// One counter per refusal reason.
#[derive(Debug)]
struct RefusalCounters([AtomicU64; Refusal::COUNT]);

impl Default for RefusalCounters {
    fn default() -> Self {
        RefusalCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Metrics {
    /// The gauge of open sessions of one protocol and kind.
    pub fn session_gauge(&self, protocol: Protocol, kind: PrincipalKind) -> &AtomicU64 {
        let k = match kind {
            PrincipalKind::Device => 0,
            PrincipalKind::Service => 1,
        };
        &self.sessions[protocol as usize][k]
    }

    pub fn refused(&self, refusal: Refusal) {
        self.refusals.0[refusal.slot()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusal_count(&self, refusal: Refusal) -> u64 {
        self.refusals.0[refusal.slot()].load(Ordering::Relaxed)
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
            "portcullis_service_subscriptions",
            "Service subscriptions held now, over all sessions (bounded by broker.max_subscriptions).",
            "gauge",
            load(&self.service_subscriptions),
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
            "Messages refused because a session's queue (device or service) was full.",
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
            "Queued messages dropped for age (or their own expiry interval), or with a parked session that expired.",
            "counter",
            load(&self.queue_expired),
        );
        gauge(
            &mut out,
            "portcullis_retained_refused_total",
            "Retained messages delivered but not retained: the retained store was full.",
            "counter",
            load(&self.retained_refused),
        );
        gauge(
            &mut out,
            "portcullis_auth_failure_alerts_total",
            "Alerts raised on failed logins naming a registered device (auth.alert_failures in a window).",
            "counter",
            load(&self.auth_failure_alerts),
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
        gauge(
            &mut out,
            "portcullis_audit_rotation_failures_total",
            "Audit log rotations that failed; the log went on in its current file.",
            "counter",
            load(&self.audit_rotation_failures),
        );
        for (name, help, c) in [
            (
                "portcullis_quarantines_total",
                "Devices put in quarantine by the behaviour model or an operator.",
                &self.quarantined,
            ),
            (
                "portcullis_probations_total",
                "Devices put on probation by the behaviour model.",
                &self.probations,
            ),
            (
                "portcullis_quarantine_releases_total",
                "Devices released from quarantine or probation (by time, a clean window or an operator).",
                &self.releases,
            ),
            (
                "portcullis_quarantine_dropped_total",
                "Messages of quarantined devices dropped.",
                &self.quarantine_dropped,
            ),
            (
                "portcullis_quarantine_diverted_total",
                "Messages of quarantined devices diverted to the forensic topic.",
                &self.quarantine_diverted,
            ),
        ] {
            gauge(&mut out, name, help, "counter", load(c));
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_sessions Open sessions by protocol and kind.\n# TYPE portcullis_sessions gauge"
        );
        for kind in [PrincipalKind::Device, PrincipalKind::Service] {
            for protocol in Protocol::ALL {
                let _ = writeln!(
                    out,
                    "portcullis_sessions{{protocol=\"{}\",kind=\"{}\"}} {}",
                    protocol.as_str(),
                    kind.as_str(),
                    load(self.session_gauge(protocol, kind))
                );
            }
        }
        self.forward_latency.render(
            &mut out,
            "portcullis_forward_latency_seconds",
            "From a message's arrival to its hand-over to the broker link.",
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_refusals_total Refusals by stage and reason.\n# TYPE portcullis_refusals_total counter"
        );
        for r in Refusal::ALL {
            let v = self.refusal_count(*r);
            if v == 0 {
                continue;
            }
            let (stage, reason) = (r.stage(), r.label());
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
    fn the_latency_histogram_is_cumulative() {
        let m = Metrics::default();
        m.forward_latency
            .record(std::time::Duration::from_micros(30));
        m.forward_latency
            .record(std::time::Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains("portcullis_forward_latency_seconds_bucket{le=\"0.000025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_forward_latency_seconds_bucket{le=\"0.00005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_forward_latency_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_forward_latency_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn refusals_are_rendered_with_labels() {
        let m = Metrics::default();
        m.refused(Refusal::BadSecret);
        m.refused(Refusal::BadSecret);
        let text = m.render();
        assert!(
            text.contains("portcullis_refusals_total{stage=\"connect\",reason=\"bad_secret\"} 2"),
            "{text}"
        );
        assert_eq!(m.refusal_count(Refusal::BadSecret), 2);
        assert!(!text.contains("reason=\"banned\""), "{text}");
    }
}
