//! Counters for what the gateway decided. Rendered by prometheus-client, as
//! Prometheus text or OpenMetrics.
//!
//! The hot path only touches atomics: every refusal reason has its own counter slot
//! (`Refusal::slot`), so counting one takes no lock. What is cheaper to count than to
//! keep (devices per behaviour state, the process's own resources) is counted when a
//! page is rendered.

use crate::behaviour::State;
use crate::peer::Protocol;
use crate::principal::PrincipalKind;
use crate::refusal::Refusal;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, NoLabelSet, prometheus_text, text as openmetrics_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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
    /// Payload bytes of the messages counted in `messages_delivered`.
    pub bytes_delivered: AtomicU64,
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
    /// The session file: durable commits, failed ones, sessions restored at start, and
    /// records dropped at start (damaged, or for a device no longer registered).
    pub session_store_commits: AtomicU64,
    pub session_store_errors: AtomicU64,
    pub sessions_restored: AtomicU64,
    pub session_records_dropped: AtomicU64,
    refusals: RefusalCounters,
    /// Open sessions by protocol and principal kind (`session_gauge`).
    sessions: [[AtomicU64; 2]; Protocol::ALL.len()],
    /// Accept → handed to the broker link, seconds.
    pub forward_latency: Histogram,
    /// Upstream mode: the outbox and the link to the broker cluster.
    pub outbox: OutboxMetrics,
    /// CoAP devices: the DTLS endpoint and the CoAP exchanges.
    pub coap: CoapMetrics,
    /// Serial devices: the ports and the link's frames.
    pub serial: SerialMetrics,
    /// Devices per behaviour state, counted at each scrape once the gateway sets it.
    census: CensusSlot,
}

/// Counts over tables the hot path keeps no totals of, taken when a page is rendered.
pub trait DeviceCensus: Send + Sync {
    /// Registered devices in each behaviour state, in the order of `State::ALL`.
    fn devices_by_state(&self) -> [u64; State::ALL.len()];
}

#[derive(Default)]
struct CensusSlot(OnceLock<Arc<dyn DeviceCensus>>);

impl std::fmt::Debug for CensusSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "CensusSlot(set)"
        } else {
            "CensusSlot(unset)"
        })
    }
}

/// The version `portcullis_build_info` reports: the workspace's, from Cargo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The serial adapter: its ports and the frames on them (refused frames are counted in
/// `portcullis_refusals_total`, stage `decode`, `connect` or `limits`, reason `frame_*`).
#[derive(Debug, Default)]
pub struct SerialMetrics {
    /// Configured ports open now, and reopened after they vanished.
    pub ports_open: AtomicU64,
    pub port_reopens: AtomicU64,
    /// Authenticated, fresh frames read from devices.
    pub frames_in: AtomicU64,
    /// Frames written to devices (data, ACK, NAK, RESYNC; retransmissions included).
    pub frames_out: AtomicU64,
    /// A device's last frame sent again (its answer was lost), answered again.
    pub duplicates: AtomicU64,
    /// RESYNC frames sent to devices whose counter fell behind.
    pub resyncs: AtomicU64,
    /// Commands sent again for want of an ACK, and given up on (back to the mailbox).
    pub retransmissions: AtomicU64,
    pub commands_timed_out: AtomicU64,
    /// Frames refused busy (NAK 6) because their device's session was behind.
    pub dropped_busy: AtomicU64,
    /// Counter reservations that could not be written (the frame was refused).
    pub counter_store_errors: AtomicU64,
}

impl SerialMetrics {
    fn plain(&self) -> Vec<(&'static str, &'static str, MetricType, &AtomicU64)> {
        use MetricType::{Counter, Gauge};
        vec![
            (
                "portcullis_serial_ports_open",
                "Serial: configured ports open now.",
                Gauge,
                &self.ports_open,
            ),
            (
                "portcullis_serial_port_reopens",
                "Serial: ports opened again after they vanished.",
                Counter,
                &self.port_reopens,
            ),
            (
                "portcullis_serial_frames_in",
                "Serial: authenticated, fresh frames read from devices.",
                Counter,
                &self.frames_in,
            ),
            (
                "portcullis_serial_frames_out",
                "Serial: frames written to devices (retransmissions included).",
                Counter,
                &self.frames_out,
            ),
            (
                "portcullis_serial_duplicates",
                "Serial: a device's last frame sent again and answered again.",
                Counter,
                &self.duplicates,
            ),
            (
                "portcullis_serial_resyncs",
                "Serial: RESYNC frames sent to devices whose counter fell behind.",
                Counter,
                &self.resyncs,
            ),
            (
                "portcullis_serial_retransmissions",
                "Serial: commands sent again for want of an ACK.",
                Counter,
                &self.retransmissions,
            ),
            (
                "portcullis_serial_commands_timed_out",
                "Serial: commands never acknowledged (back to the mailbox).",
                Counter,
                &self.commands_timed_out,
            ),
            (
                "portcullis_serial_dropped_busy",
                "Serial: frames refused busy (NAK busy) because their device's session was behind.",
                Counter,
                &self.dropped_busy,
            ),
            (
                "portcullis_serial_counter_store_errors",
                "Serial: counter reservations that could not be written (the frame was refused).",
                Counter,
                &self.counter_store_errors,
            ),
        ]
    }
}

/// The CoAP listener: its DTLS endpoint (copied from the endpoint's own counters each
/// second) and the CoAP layer's duties.
#[derive(Debug, Default)]
pub struct CoapMetrics {
    /// DTLS sessions now, and handshakes in progress now.
    pub dtls_sessions: AtomicU64,
    pub dtls_handshakes_in_progress: AtomicU64,
    pub dtls_handshakes_completed: AtomicU64,
    /// First datagrams dropped by a cap (handshakes, sessions per source, sessions),
    /// and datagrams from unknown addresses that were not a ClientHello.
    pub dtls_refused_capped: AtomicU64,
    pub dtls_dropped_stray: AtomicU64,
    /// Datagrams dropped because their session was busy (CoAP retransmits them).
    pub dropped_busy: AtomicU64,
    /// Retransmitted requests answered from the deduplication cache.
    pub duplicates: AtomicU64,
    /// Our confirmable messages sent again, and given up on (no ACK after the last).
    pub retransmissions: AtomicU64,
    pub exchanges_timed_out: AtomicU64,
    /// Observe relations registered, and dropped (RST, timeout, deregistration).
    pub observe_registered: AtomicU64,
    pub observe_dropped: AtomicU64,
}

impl CoapMetrics {
    fn plain(&self) -> Vec<(&'static str, &'static str, MetricType, &AtomicU64)> {
        use MetricType::{Counter, Gauge};
        vec![
            (
                "portcullis_coap_dtls_sessions",
                "CoAP: DTLS sessions now (established or in handshake).",
                Gauge,
                &self.dtls_sessions,
            ),
            (
                "portcullis_coap_dtls_handshakes_in_progress",
                "CoAP: DTLS handshakes in progress now (bounded by coap.max_handshakes).",
                Gauge,
                &self.dtls_handshakes_in_progress,
            ),
            (
                "portcullis_coap_dtls_handshakes_completed",
                "CoAP: DTLS handshakes completed.",
                Counter,
                &self.dtls_handshakes_completed,
            ),
            (
                "portcullis_coap_dtls_refused_capped",
                "CoAP: first datagrams dropped by a cap (handshakes, sessions per source, sessions).",
                Counter,
                &self.dtls_refused_capped,
            ),
            (
                "portcullis_coap_dtls_dropped_stray",
                "CoAP: datagrams from unknown addresses that were not a ClientHello.",
                Counter,
                &self.dtls_dropped_stray,
            ),
            (
                "portcullis_coap_dropped_busy",
                "CoAP: datagrams dropped because their session was busy (the device retransmits).",
                Counter,
                &self.dropped_busy,
            ),
            (
                "portcullis_coap_duplicates",
                "CoAP: retransmitted requests answered from the deduplication cache.",
                Counter,
                &self.duplicates,
            ),
            (
                "portcullis_coap_retransmissions",
                "CoAP: confirmable notifications and responses sent again.",
                Counter,
                &self.retransmissions,
            ),
            (
                "portcullis_coap_exchanges_timed_out",
                "CoAP: confirmable messages never acknowledged (the command waits for the next session).",
                Counter,
                &self.exchanges_timed_out,
            ),
            (
                "portcullis_coap_observe_registered",
                "CoAP: Observe relations registered on /c.",
                Counter,
                &self.observe_registered,
            ),
            (
                "portcullis_coap_observe_dropped",
                "CoAP: Observe relations dropped (RST, timeout or deregistration).",
                Counter,
                &self.observe_dropped,
            ),
        ]
    }
}

/// The outbox of upstream mode, and its link to the broker cluster.
#[derive(Debug, Default)]
pub struct OutboxMetrics {
    /// Messages and bytes held now.
    pub depth: AtomicU64,
    pub bytes: AtomicU64,
    /// When the oldest message held was taken (Unix milliseconds; 0 when empty).
    pub oldest_unix_ms: AtomicU64,
    /// Dead letters held now.
    pub dead_letters: AtomicU64,
    /// 1 while messages wait for room in the outbox (devices are held back).
    pub full: AtomicU64,
    /// Messages moved to the dead letters (refused by the broker, or never acknowledged).
    pub dead_lettered: AtomicU64,
    /// Messages dropped for age (`upstream.outbox.message_ttl` or their own expiry).
    pub expired: AtomicU64,
    /// QoS 0 messages dropped to make room (`when_full = "drop-oldest-qos0"`).
    pub dropped_full: AtomicU64,
    /// QoS 1/2 publishes refused because the outbox stayed full.
    pub refused_full: AtomicU64,
    /// Durable commits (each an fsync) and the messages they wrote.
    pub commits: AtomicU64,
    pub committed: AtomicU64,
    /// Messages sent to the broker, sent again after a lost link, and acknowledged.
    pub sent: AtomicU64,
    pub resent: AtomicU64,
    pub acknowledged: AtomicU64,
    /// 1 while a broker of the cluster is connected.
    pub connected: AtomicU64,
    /// Connections to the broker cluster made, and lost.
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Commands received from the cluster.
    pub commands: AtomicU64,
    /// Control messages told to the other replicas, taken from them, and refused
    /// (forged, replayed, stale, malformed).
    pub control_sent: AtomicU64,
    pub control_applied: AtomicU64,
    pub control_refused: AtomicU64,
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

    /// A message of `payload` bytes delivered to a peer.
    pub fn delivered(&self, payload: usize) {
        Metrics::inc(&self.messages_delivered);
        self.bytes_delivered
            .fetch_add(payload as u64, Ordering::Relaxed);
    }

    /// Where `portcullis_devices{state}` is counted from; the first one set stays.
    /// Until one is set, every state reads 0.
    pub fn set_device_census(&self, census: Arc<dyn DeviceCensus>) {
        let _ = self.census.0.set(census);
    }

    /// The page for a scrape, in the Prometheus text format (0.0.4) or, when the
    /// scraper asks for it, in OpenMetrics (ending with `# EOF`). prometheus-client
    /// writes both; the values are read from the atomics at this moment.
    pub fn render(self: &Arc<Self>, format: Exposition) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut out = String::new();
        let written = match format {
            Exposition::Prometheus => prometheus_text::encode(&mut out, &registry),
            Exposition::OpenMetrics => openmetrics_text::encode(&mut out, &registry),
        };
        // Writing to a String fails only if an encoder refuses a name or label, which
        // are all fixed here (the unit tests render every one).
        debug_assert!(written.is_ok(), "{written:?}");
        out
    }
}

/// The text formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    Prometheus,
    OpenMetrics,
}

impl Exposition {
    /// OpenMetrics when the scraper's `Accept` header lists it, else Prometheus text.
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Exposition::OpenMetrics,
            _ => Exposition::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Prometheus => prometheus_text::CONTENT_TYPE,
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A counter or gauge with no labels: family name (counters without `_total`, which
/// the encoders add), help, type, value.
type Plain<'m> = (&'static str, &'static str, MetricType, &'m AtomicU64);

impl Metrics {
    fn plain(&self) -> [Plain<'_>; 27] {
        use MetricType::{Counter, Gauge};
        [
            (
                "portcullis_connections_accepted",
                "Connections that authenticated.",
                Counter,
                &self.connections_accepted,
            ),
            (
                "portcullis_connections_active",
                "Sessions currently open.",
                Gauge,
                &self.connections_active,
            ),
            (
                "portcullis_service_subscriptions",
                "Service subscriptions held now, over all sessions (bounded by broker.max_subscriptions).",
                Gauge,
                &self.service_subscriptions,
            ),
            (
                "portcullis_tls_handshake_failures",
                "TLS handshakes that failed or timed out.",
                Counter,
                &self.handshake_failures,
            ),
            (
                "portcullis_messages_accepted",
                "Messages accepted by the pipeline.",
                Counter,
                &self.messages_accepted,
            ),
            (
                "portcullis_messages_delivered",
                "Messages delivered to peers.",
                Counter,
                &self.messages_delivered,
            ),
            (
                "portcullis_queue_overflow",
                "Messages refused because a session's queue (device or service) was full.",
                Counter,
                &self.queue_overflow,
            ),
            (
                "portcullis_rate_limit_waits",
                "Times a principal over its rate (or the gateway at its cap) was held back.",
                Counter,
                &self.rate_limit_waits,
            ),
            (
                "portcullis_commands_undeliverable",
                "Commands for a device with no session (never connected, clean, or expired).",
                Counter,
                &self.commands_undeliverable,
            ),
            (
                "portcullis_queue_expired",
                "Queued messages dropped for age (or their own expiry interval), or with a parked session that expired.",
                Counter,
                &self.queue_expired,
            ),
            (
                "portcullis_retained_refused",
                "Retained messages delivered but not retained: the retained store was full.",
                Counter,
                &self.retained_refused,
            ),
            (
                "portcullis_auth_failure_alerts",
                "Alerts raised on failed logins naming a registered device (auth.alert_failures in a window).",
                Counter,
                &self.auth_failure_alerts,
            ),
            (
                "portcullis_session_store_commits",
                "Durable commits of parked sessions and retained commands to the session file.",
                Counter,
                &self.session_store_commits,
            ),
            (
                "portcullis_session_store_errors",
                "Commits to the session file that failed (retried).",
                Counter,
                &self.session_store_errors,
            ),
            (
                "portcullis_sessions_restored",
                "Parked device sessions restored from the session file at start.",
                Counter,
                &self.sessions_restored,
            ),
            (
                "portcullis_session_records_dropped",
                "Records of the session file dropped at start: damaged, expired, or for a device no longer registered.",
                Counter,
                &self.session_records_dropped,
            ),
            (
                "portcullis_session_takeovers",
                "Sessions ended by a new connection with the same identity.",
                Counter,
                &self.takeovers,
            ),
            (
                "portcullis_wills_published",
                "Last Will messages published after an unexpected disconnect.",
                Counter,
                &self.wills_published,
            ),
            (
                "portcullis_accepted_bytes",
                "Payload bytes accepted by the pipeline.",
                Counter,
                &self.bytes_accepted,
            ),
            (
                "portcullis_delivered_bytes",
                "Payload bytes of the messages delivered to peers (portcullis_messages_delivered).",
                Counter,
                &self.bytes_delivered,
            ),
            (
                "portcullis_audit_entries_dropped",
                "Audit entries that could not be queued.",
                Counter,
                &self.audit_dropped,
            ),
            (
                "portcullis_audit_rotation_failures",
                "Audit log rotations that failed; the log went on in its current file.",
                Counter,
                &self.audit_rotation_failures,
            ),
            (
                "portcullis_quarantines",
                "Devices put in quarantine by the behaviour model or an operator.",
                Counter,
                &self.quarantined,
            ),
            (
                "portcullis_probations",
                "Devices put on probation by the behaviour model.",
                Counter,
                &self.probations,
            ),
            (
                "portcullis_quarantine_releases",
                "Devices released from quarantine or probation (by time, a clean window or an operator).",
                Counter,
                &self.releases,
            ),
            (
                "portcullis_quarantine_dropped",
                "Messages of quarantined devices dropped.",
                Counter,
                &self.quarantine_dropped,
            ),
            (
                "portcullis_quarantine_diverted",
                "Messages of quarantined devices diverted to the forensic topic.",
                Counter,
                &self.quarantine_diverted,
            ),
        ]
    }
}

impl OutboxMetrics {
    fn plain(&self) -> [Plain<'_>; 21] {
        use MetricType::{Counter, Gauge};
        [
            (
                "portcullis_control_sent",
                "Upstream mode: control messages (quarantine, release, ban) told to the other replicas.",
                Counter,
                &self.control_sent,
            ),
            (
                "portcullis_control_applied",
                "Upstream mode: control messages from other replicas taken and applied.",
                Counter,
                &self.control_applied,
            ),
            (
                "portcullis_control_refused",
                "Upstream mode: control messages refused (MAC mismatch, replayed, stale, malformed).",
                Counter,
                &self.control_refused,
            ),
            (
                "portcullis_outbox_full",
                "Upstream mode: 1 while messages wait for room in the outbox (devices held back; /readyz answers 503).",
                Gauge,
                &self.full,
            ),
            (
                "portcullis_outbox_messages",
                "Upstream mode: messages in the outbox, waiting for the broker's acknowledgement.",
                Gauge,
                &self.depth,
            ),
            (
                "portcullis_outbox_bytes",
                "Upstream mode: bytes of messages in the outbox (bounded by upstream.outbox.max_bytes).",
                Gauge,
                &self.bytes,
            ),
            (
                "portcullis_outbox_dead_letters",
                "Upstream mode: dead letters held (portcullis outbox list).",
                Gauge,
                &self.dead_letters,
            ),
            (
                "portcullis_outbox_dead_lettered",
                "Upstream mode: messages moved to the dead letters (refused by the broker, never acknowledged, unreadable).",
                Counter,
                &self.dead_lettered,
            ),
            (
                "portcullis_outbox_expired",
                "Upstream mode: messages dropped from the outbox for age (message_ttl or their own expiry).",
                Counter,
                &self.expired,
            ),
            (
                "portcullis_outbox_dropped_full",
                "Upstream mode: QoS 0 messages dropped because the outbox was full (when_full = drop-oldest-qos0).",
                Counter,
                &self.dropped_full,
            ),
            (
                "portcullis_outbox_refused_full",
                "Upstream mode: QoS 1/2 publishes refused because the outbox stayed full (quota exceeded).",
                Counter,
                &self.refused_full,
            ),
            (
                "portcullis_outbox_fsyncs",
                "Upstream mode: durable outbox commits (one fsync each).",
                Counter,
                &self.commits,
            ),
            (
                "portcullis_outbox_committed",
                "Upstream mode: messages committed to the outbox.",
                Counter,
                &self.committed,
            ),
            (
                "portcullis_upstream_sent",
                "Upstream mode: messages sent to the broker for the first time.",
                Counter,
                &self.sent,
            ),
            (
                "portcullis_upstream_resent",
                "Upstream mode: messages sent again after a link was lost before the broker acknowledged them.",
                Counter,
                &self.resent,
            ),
            (
                "portcullis_upstream_acknowledged",
                "Upstream mode: QoS 1 messages the broker acknowledged.",
                Counter,
                &self.acknowledged,
            ),
            (
                "portcullis_upstream_connected",
                "Upstream mode: 1 while a broker of the cluster is connected.",
                Gauge,
                &self.connected,
            ),
            (
                "portcullis_upstream_connects",
                "Upstream mode: connections made to the broker cluster.",
                Counter,
                &self.connects,
            ),
            (
                "portcullis_upstream_disconnects",
                "Upstream mode: connections to the broker cluster lost.",
                Counter,
                &self.disconnects,
            ),
            (
                "portcullis_upstream_commands",
                "Upstream mode: commands received from the broker cluster.",
                Counter,
                &self.commands,
            ),
            (
                "portcullis_outbox_oldest_unix_ms",
                "Upstream mode: when the oldest message in the outbox was taken (Unix ms; 0 when empty).",
                Gauge,
                &self.oldest_unix_ms,
            ),
        ]
    }

    /// Seconds the oldest message has waited (0 when the outbox is empty).
    pub fn oldest_age_secs(&self) -> u64 {
        let oldest = self.oldest_unix_ms.load(Ordering::Relaxed);
        if oldest == 0 {
            return 0;
        }
        crate::registry::now_unix_ms().saturating_sub(oldest) / 1000
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let age = self.outbox.oldest_age_secs();
        let metric = encoder.encode_descriptor(
            "portcullis_outbox_oldest_age_seconds",
            "Upstream mode: how long the oldest message in the outbox has waited (0 when empty).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(age).encode(metric)?;
        for (name, help, kind, value) in self
            .plain()
            .into_iter()
            .chain(self.outbox.plain())
            .chain(self.coap.plain())
            .chain(self.serial.plain())
        {
            let metric = encoder.encode_descriptor(name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(load(value)).encode(metric)?,
                _ => ConstGauge::new(load(value)).encode(metric)?,
            }
        }
        let mut sessions = encoder.encode_descriptor(
            "portcullis_sessions",
            "Open sessions by protocol and kind.",
            None,
            MetricType::Gauge,
        )?;
        for kind in [PrincipalKind::Device, PrincipalKind::Service] {
            for protocol in Protocol::ALL {
                let labels = [("protocol", protocol.as_str()), ("kind", kind.as_str())];
                ConstGauge::new(load(self.session_gauge(protocol, kind)))
                    .encode(sessions.encode_family(&labels)?)?;
            }
        }
        let h = &self.forward_latency;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .zip(&h.buckets)
            .map(|(bound, n)| (*bound, load(n)))
            .collect();
        // Read while messages are recorded: the count may lag its bucket by one.
        let bounded: u64 = buckets.iter().map(|(_, n)| n).sum();
        let count = load(&h.count).max(bounded);
        // Given explicitly: the OpenMetrics encoder writes only the buckets it gets.
        buckets.push((f64::INFINITY, count - bounded));
        encoder
            .encode_descriptor(
                "portcullis_forward_latency_seconds",
                "From a message's arrival to its hand-over to the broker link.",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                load(&h.sum_nanos) as f64 / 1e9,
                count,
                &buckets,
                None,
            )?;
        // Every reason from the start, at 0 until it happens: a rate over a series
        // that appears only at its first refusal misses that refusal.
        let mut refusals = encoder.encode_descriptor(
            "portcullis_refusals",
            "Refusals by stage and reason.",
            None,
            MetricType::Counter,
        )?;
        for r in Refusal::ALL {
            let labels = [
                ("stage", r.stage().to_string()),
                ("reason", r.label().to_string()),
            ];
            ConstCounter::new(self.refusal_count(*r)).encode(refusals.encode_family(&labels)?)?;
        }
        let counts = self
            .census
            .0
            .get()
            .map(|c| c.devices_by_state())
            .unwrap_or_default();
        let mut devices = encoder.encode_descriptor(
            "portcullis_devices",
            "Registered devices by behaviour state (normal: every device in no other state).",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in State::ALL.iter().zip(counts) {
            let labels = [("state", state.as_str())];
            ConstGauge::new(n).encode(devices.encode_family(&labels)?)?;
        }
        // An info family: `portcullis_build_info{version} 1` in both formats.
        Info::new([("version", VERSION)]).encode(encoder.encode_descriptor(
            "portcullis_build",
            "The running build of Portcullis.",
            None,
            MetricType::Info,
        )?)?;
        crate::process_metrics::Reading::now().encode(&mut encoder)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    #[test]
    fn the_latency_histogram_is_cumulative() {
        let m = metrics();
        m.forward_latency
            .record(std::time::Duration::from_micros(30));
        m.forward_latency
            .record(std::time::Duration::from_millis(3));
        let text = m.render(Exposition::Prometheus);
        let bucket = |le: &str| {
            let line = format!("portcullis_forward_latency_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("no {line} in {text}"))
                .parse::<u64>()
                .unwrap()
        };
        // The bounds as Prometheus's own clients write them (Go's float format).
        assert_eq!(bucket("2.5e-05"), 0);
        assert_eq!(bucket("5e-05"), 1);
        assert_eq!(bucket("0.005"), 2);
        assert_eq!(bucket("+Inf"), 2);
        m.forward_latency.record(std::time::Duration::from_secs(2));
        let open = m.render(Exposition::OpenMetrics);
        assert!(open.contains("_bucket{le=\"1.0\"} 2\n"), "{open}");
        assert!(open.contains("_bucket{le=\"+Inf\"} 3\n"), "{open}");
        assert!(
            text.contains("portcullis_forward_latency_seconds_count 2\n"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_forward_latency_seconds_sum 0.00303\n"),
            "{text}"
        );
    }

    #[test]
    fn refusals_are_rendered_with_labels_every_reason_from_zero() {
        let m = metrics();
        m.refused(Refusal::BadSecret);
        m.refused(Refusal::BadSecret);
        let text = m.render(Exposition::Prometheus);
        assert!(
            text.contains("portcullis_refusals_total{stage=\"connect\",reason=\"bad_secret\"} 2\n"),
            "{text}"
        );
        assert_eq!(m.refusal_count(Refusal::BadSecret), 2);
        assert!(
            text.contains("portcullis_refusals_total{stage=\"connect\",reason=\"banned\"} 0\n"),
            "{text}"
        );
    }

    /// Every line of the page parses as the format says: HELP and TYPE once per
    /// family before its samples, sample names that belong to their family, values
    /// that are numbers; OpenMetrics ends with `# EOF`.
    fn check_page(text: &str, openmetrics: bool) -> usize {
        let mut family: Option<(String, String)> = None;
        let mut seen = std::collections::HashSet::new();
        let mut samples = 0;
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line == "# EOF" {
                assert!(openmetrics, "# EOF in Prometheus text");
                assert!(lines.peek().is_none(), "lines after # EOF");
                return samples;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                let ty = lines
                    .next()
                    .unwrap_or_else(|| panic!("no TYPE after {line}"));
                let (ty_name, kind) = ty
                    .strip_prefix("# TYPE ")
                    .and_then(|t| t.split_once(' '))
                    .unwrap_or_else(|| panic!("bad TYPE line {ty}"));
                assert_eq!(ty_name, name, "{ty}");
                assert!(seen.insert(name.clone()), "family {name} twice");
                family = Some((name, kind.to_string()));
                continue;
            }
            let (name, kind) = family
                .as_ref()
                .unwrap_or_else(|| panic!("sample before HELP: {line}"));
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line}"));
            let sample = series.split('{').next().unwrap();
            let base = match kind.as_str() {
                "counter" if openmetrics => format!("{name}_total"),
                "info" if openmetrics => format!("{name}_info"),
                _ => name.clone(),
            };
            let allowed = match kind.as_str() {
                "histogram" => [
                    format!("{base}_bucket"),
                    format!("{base}_sum"),
                    format!("{base}_count"),
                ]
                .contains(&sample.to_string()),
                _ => sample == base,
            };
            assert!(allowed, "{sample} in family {name} ({kind})");
            assert!(value.parse::<f64>().is_ok(), "value of {line}");
            samples += 1;
        }
        assert!(!openmetrics, "no # EOF at the end of the OpenMetrics page");
        samples
    }

    #[test]
    fn both_pages_are_well_formed_with_the_same_samples() {
        let m = metrics();
        m.refused(Refusal::Banned);
        Metrics::inc(&m.messages_accepted);
        let prometheus = m.render(Exposition::Prometheus);
        let openmetrics = m.render(Exposition::OpenMetrics);
        let n = check_page(&prometheus, false);
        assert_eq!(check_page(&openmetrics, true), n);
        // 27 plain families, upstream mode's 21 and the outbox's oldest age, the CoAP
        // listener's 11, the serial adapter's 10, sessions, the histogram (12 bounds,
        // +Inf, sum, count), refusals, devices per state, build info, and on Linux the
        // process's 6.
        let sessions = 2 * Protocol::ALL.len();
        let process = if cfg!(target_os = "linux") { 6 } else { 0 };
        assert_eq!(
            n,
            27 + 22 + 11 + 10 + sessions + 15 + Refusal::ALL.len() + State::ALL.len() + 1 + process
        );
        // Today's sample names, in both formats.
        for page in [&prometheus, &openmetrics] {
            assert!(
                page.contains("\nportcullis_messages_accepted_total 1\n"),
                "{page}"
            );
            assert!(
                page.contains("\nportcullis_connections_active 0\n"),
                "{page}"
            );
        }
        assert!(prometheus.contains("# TYPE portcullis_messages_accepted_total counter\n"));
        assert!(openmetrics.contains("# TYPE portcullis_messages_accepted counter\n"));
    }

    #[test]
    fn build_info_names_the_cargo_version_in_both_formats() {
        let m = metrics();
        let line = format!("\nportcullis_build_info{{version=\"{VERSION}\"}} 1\n");
        let prometheus = m.render(Exposition::Prometheus);
        assert!(prometheus.contains(&line), "{prometheus}");
        assert!(prometheus.contains("# TYPE portcullis_build_info gauge\n"));
        let openmetrics = m.render(Exposition::OpenMetrics);
        assert!(openmetrics.contains(&line), "{openmetrics}");
        assert!(openmetrics.contains("# TYPE portcullis_build info\n"));
        // The workspace's version, as Cargo.toml sets it.
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
        let workspace = std::fs::read_to_string(manifest).unwrap();
        let set = workspace
            .lines()
            .find_map(|l| l.strip_prefix("version = \""))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("no version in {manifest}"));
        assert_eq!(VERSION, set);
    }

    /// The process series under the standard names, with the values of this process.
    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_come_from_proc_self_in_both_formats() {
        let m = metrics();
        let value = |page: &str, name: &str| -> f64 {
            page.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in {page}"))
                .parse()
                .unwrap()
        };
        for (format, cpu_type) in [
            (
                Exposition::Prometheus,
                "# TYPE process_cpu_seconds_total counter\n",
            ),
            (
                Exposition::OpenMetrics,
                "# TYPE process_cpu_seconds counter\n",
            ),
        ] {
            let page = m.render(format);
            assert!(page.contains(cpu_type), "{page}");
            assert!(value(&page, "process_cpu_seconds_total") >= 0.0);
            assert!(value(&page, "process_resident_memory_bytes") > 0.0);
            assert!(
                value(&page, "process_virtual_memory_bytes")
                    >= value(&page, "process_resident_memory_bytes")
            );
            assert!(value(&page, "process_start_time_seconds") > 1.0e9);
            assert!(value(&page, "process_open_fds") >= 1.0);
            // Counts are written as integers, as the other gauges are.
            assert!(
                page.lines()
                    .any(|l| l.starts_with("process_open_fds ") && !l.contains('.')),
                "{page}"
            );
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
            assert_eq!(
                value(&page, "process_max_fds") as u64,
                limit.current.unwrap()
            );
        }
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        assert_eq!(Exposition::negotiate(None), Exposition::Prometheus);
        assert_eq!(
            Exposition::negotiate(Some("text/plain")),
            Exposition::Prometheus
        );
        let prometheus_server = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            Exposition::negotiate(Some(prometheus_server)),
            Exposition::OpenMetrics
        );
    }
}
