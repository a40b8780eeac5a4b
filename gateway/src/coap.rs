//! The CoAP listeners of `serve`: the DTLS endpoint bound from `[listeners] coap_dtls`,
//! `[coap]` and `[proxy_protocol] coap_dtls`, the pre-shared keys from the registry,
//! plain CoAP on loopback from `[listeners] coap` (off by default), and the CoAP layer
//! over each.

use crate::usage::UsageError;
use anyhow::Result;
use portcullis_coap::dtls::{self, HeaderRefused, Settings, Stats};
use portcullis_coap::keys::RegistryKeys;
use portcullis_coap::plain;
use portcullis_coap::session::{self, CoapState, Context};
use portcullis_config::Config;
use portcullis_core::audit::AuditEntry;
use portcullis_core::device_key::MasterKeys;
use portcullis_core::metrics::Metrics;
use portcullis_core::parking::ParkedSessions;
use portcullis_core::proxy_header::{HeaderError, LoadBalancers};
use portcullis_core::refusal::Refusal;
use portcullis_core::registry::Registry;
use portcullis_core::source_gate::{Admitted, SourceGate};
use portcullis_core::source_key::SourceKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The running CoAP listeners (DTLS, and plain CoAP on loopback when configured).
pub struct CoapListener {
    /// The DTLS listener's address.
    pub local: Option<SocketAddr>,
    /// The plain CoAP listener's address.
    pub plain: Option<SocketAddr>,
    pub parked: Arc<ParkedSessions<CoapState>>,
    /// The DTLS endpoint's counters.
    pub stats: Arc<Stats>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The DTLS endpoint's bounds and load balancers, from the configuration.
fn settings(config: &Config) -> Settings {
    let c = &config.coap;
    // A datagram carries its whole header: no header timeout, nothing waits for one.
    let balancers = LoadBalancers::new(
        config.proxy_protocol.coap_dtls_balancers(),
        *config.proxy_protocol.header_timeout,
        1,
    );
    Settings {
        max_sessions: c.max_sessions,
        max_half_open: c.max_handshakes,
        max_per_source: c.max_sessions_per_source,
        handshake_timeout: *c.handshake_timeout,
        idle_timeout: *c.idle_timeout,
        balancers: balancers.map(Arc::new),
        ..Settings::default()
    }
}

/// The gateway's source gate before any DTLS state is made for a new address: a
/// banned source, or one over the connection caps or rate (shared with MQTT), gets
/// nothing. The place it takes under the caps is held for as long as the DTLS state.
struct Gate {
    gate: SourceGate,
    /// Sources refused within the last second, not asked again (nor audited again)
    /// until then: a refused source can replay its cookie'd ClientHello for free.
    refused: Mutex<HashMap<SourceKey, Instant>>,
    /// Prefix length of one IPv6 source, as the gate counts them.
    ipv6_prefix: u8,
    /// When each kind of PROXY header refusal was last audited. A datagram's source
    /// may be forged (UDP), a balancer's included: each refusal is counted, but each
    /// kind (not allowed, or each framing error) is audited at most once a second,
    /// so forged sources and lengths cannot write a line each.
    header_audited: Mutex<HashMap<HeaderKind, Instant>>,
}

/// A kind of PROXY header refusal, for `Gate::header_audited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum HeaderKind {
    NotAllowed,
    Invalid(std::mem::Discriminant<HeaderError>),
}

/// How long a refused source is refused without asking the gate again.
const REFUSED_FOR: Duration = Duration::from_secs(1);
/// Refused sources remembered at once; beyond it the memory starts over.
const MAX_REFUSED: usize = 65_536;

impl dtls::Admit for Gate {
    fn admit(&self, peer: SocketAddr) -> Option<Box<dyn Send + Sync>> {
        let now = Instant::now();
        let source = SourceKey::new(peer.ip(), self.ipv6_prefix);
        {
            let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused
                .get(&source)
                .is_some_and(|at| now.saturating_duration_since(*at) < REFUSED_FOR)
            {
                return None;
            }
        }
        let Ok(Admitted { slot, pre_auth }) = self.gate.admit(peer) else {
            let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused.len() >= MAX_REFUSED {
                refused.retain(|_, at| now.saturating_duration_since(*at) < REFUSED_FOR);
            }
            // Still full of fresh refusals: this one is asked again next time.
            if refused.len() < MAX_REFUSED {
                refused.insert(source, now);
            }
            return None;
        };
        // Handshakes in progress are bounded by the endpoint itself
        // (coap.max_handshakes), not by limits.max_unauthenticated.
        pre_auth.authenticated();
        Some(Box::new(slot))
    }

    /// Counted as on the MQTT listeners, and audited at most once a second per kind
    /// (`header_audited`).
    fn header_refused(&self, from: SocketAddr, why: HeaderRefused<'_>) {
        let (kind, refusal) = match why {
            HeaderRefused::NotAllowed => (HeaderKind::NotAllowed, Refusal::ProxyHeaderNotAllowed),
            HeaderRefused::Invalid(e) => (
                HeaderKind::Invalid(std::mem::discriminant(e)),
                Refusal::ProxyHeaderInvalid,
            ),
        };
        self.gate.metrics.refused(refusal);
        {
            let now = Instant::now();
            let mut audited = self
                .header_audited
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if audited
                .get(&kind)
                .is_some_and(|at| now.duration_since(*at) < REFUSED_FOR)
            {
                return;
            }
            audited.insert(kind, now);
        }
        let (refusal, detail) = match why {
            HeaderRefused::NotAllowed => (
                Refusal::ProxyHeaderNotAllowed,
                "a PROXY header from a source not in proxy_protocol.coap_dtls".to_string(),
            ),
            HeaderRefused::Invalid(HeaderError::Truncated(n)) => (
                Refusal::ProxyHeaderInvalid,
                format!("datagram of {n} bytes ends within its PROXY header"),
            ),
            HeaderRefused::Invalid(e) => (Refusal::ProxyHeaderInvalid, e.to_string()),
        };
        self.gate.audit.record(
            AuditEntry::new("connect", "refuse")
                .source(from)
                .protocol("proxy")
                .reason(format!("{}: {detail} (CoAP over DTLS)", refusal.label())),
        );
    }
}

/// Bind the CoAP listeners that are configured, and start their layer.
pub async fn start(
    config: &Config,
    registry: Arc<Registry>,
    master: Arc<MasterKeys>,
    gate: SourceGate,
    ctx: Arc<Context>,
) -> Result<Option<CoapListener>> {
    if config.listeners.coap.is_none() && config.listeners.coap_dtls.is_none() {
        return Ok(None);
    }
    // One gate for both: a source's places under the caps are counted together.
    let gate = Arc::new(Gate {
        gate,
        refused: Mutex::new(HashMap::new()),
        ipv6_prefix: config.auth.ipv6_source_prefix,
        header_audited: Mutex::new(HashMap::new()),
    });
    let parked = ctx.parked.clone();
    let mut tasks = Vec::new();
    let mut local = None;
    let mut stats = Arc::new(Stats::default());
    if let Some(addr) = config.listeners.coap_dtls {
        let keys = Arc::new(RegistryKeys::new(registry, master));
        if !config.proxy_protocol.coap_dtls.is_empty() {
            tracing::info!(
                listener = "device listener (CoAP over DTLS, UDP)",
                "PROXY protocol v2 from the listed load balancers"
            );
        }
        let endpoint = dtls::bind(addr, settings(config), keys, gate.clone())
            .await
            .map_err(|e| UsageError(e.to_string()))?;
        local = Some(endpoint.local);
        stats = endpoint.stats.clone();
        tasks.push(tokio::spawn(session::serve(ctx.clone(), endpoint)));
    }
    let mut plain_local = None;
    // The configuration has checked it is a loopback address.
    if let Some(addr) = config.listeners.coap {
        let endpoint = plain::bind(
            addr,
            plain::Settings {
                max_sessions: config.coap.max_sessions,
                idle_timeout: *config.coap.idle_timeout,
                queue: 4096,
            },
            gate,
        )
        .await
        .map_err(|e| UsageError(format!("plain CoAP: {e}")))?;
        plain_local = Some(endpoint.local);
        tasks.push(tokio::spawn(session::serve(ctx, endpoint)));
    }
    Ok(Some(CoapListener {
        local,
        plain: plain_local,
        parked,
        stats,
        tasks,
    }))
}

/// Copy the endpoint's counters into the gateway's metrics.
pub fn publish_stats(stats: &Stats, metrics: &Metrics) {
    let m = &metrics.coap;
    let copy = |from: &std::sync::atomic::AtomicU64, to: &std::sync::atomic::AtomicU64| {
        to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
    };
    copy(&stats.sessions, &m.dtls_sessions);
    copy(&stats.half_open, &m.dtls_handshakes_in_progress);
    copy(&stats.handshakes_completed, &m.dtls_handshakes_completed);
    copy(&stats.refused_capped, &m.dtls_refused_capped);
    copy(&stats.dropped_stray, &m.dtls_dropped_stray);
}
