//! Alerts on failed logins naming a registered id.
//!
//! Failed logins by others must never change how the device itself is treated (they
//! are the sources' doing, and the back-off answers them); the operator is told
//! instead. Pure state with an injected clock: failures are tallied per claimed id
//! in the back-off window, with the first few sources; when they reach the
//! threshold, one alert is raised for that id in that window. Unknown ids are
//! tallied the same way (the same work for both), but never alerted on.

use crate::principal::PrincipalId;
use crate::source_key::SourceKey;
use crate::topic::TopicName;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// Sources named in one alert at most.
pub const MAX_SOURCES: usize = 16;

/// What an alert says: failures of one id in the window, from these sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub failures: u32,
    pub window: Duration,
    pub sources: Vec<SourceKey>,
}

impl Alert {
    /// The sources, as the audit line and the event name them.
    pub fn sources_text(&self) -> String {
        let names: Vec<String> = self.sources.iter().map(|s| s.to_string()).collect();
        names.join(", ")
    }

    /// The audit reason: failures, window and sources.
    pub fn reason(&self) -> String {
        format!(
            "{} failed logins naming this device in {} s, from {}",
            self.failures,
            self.window.as_secs(),
            self.sources_text()
        )
    }

    /// The event (JSON) published on [`event_topic`].
    pub fn event(&self, id: &PrincipalId, at_unix: u64) -> Vec<u8> {
        let event = serde_json::json!({
            "device": id.as_str(),
            "failures": self.failures,
            "window_secs": self.window.as_secs(),
            "sources": self.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "at_unix": at_unix,
        });
        serde_json::to_vec(&event).unwrap_or_default()
    }
}

/// A refused device login, whatever the protocol: enough of them naming one device in
/// a window raise one alert, audited, counted and published on
/// `portcullis/events/auth_failures/{id}` with the sources named. The device itself
/// is never treated differently for it (the back-off answers the sources).
pub fn note_device_failure(
    auth: &crate::auth::Authenticator,
    metrics: &crate::metrics::Metrics,
    audit: &crate::audit::Audit,
    forwarder: &dyn crate::forward::Forwarder,
    client_id: &str,
    refusal: crate::auth::AuthRefusal,
    peer: std::net::SocketAddr,
) {
    let Some(alert) = auth.note_failure(client_id, refusal, peer.ip(), Instant::now()) else {
        return;
    };
    let Ok(id) = PrincipalId::parse(client_id) else {
        return;
    };
    crate::metrics::Metrics::inc(&metrics.auth_failure_alerts);
    audit.record(
        crate::audit::AuditEntry::new("auth_failures", "alert")
            .principal("device", id.to_string())
            .reason(alert.reason()),
    );
    tracing::warn!(device = %id, sources = %alert.sources_text(), failures = alert.failures, "failed logins naming a device");
    let Some(topic) = event_topic(&id) else {
        return;
    };
    let payload = alert.event(&id, crate::registry::now_unix());
    let uplink = forwarder.events();
    tokio::spawn(async move {
        let _ = uplink
            .send(crate::message::Message {
                topic,
                payload: payload.into(),
                qos: crate::message::QoS::AtMostOnce,
                retain: false,
                properties: None,
            })
            .await;
    });
}

/// The topic of a device's failed-login alerts.
pub fn event_topic(id: &PrincipalId) -> Option<TopicName> {
    TopicName::parse_unlimited(&format!("portcullis/events/auth_failures/{id}")).ok()
}

#[derive(Debug)]
struct Tally {
    window_start: Instant,
    failures: u32,
    sources: Vec<SourceKey>,
    alerted: bool,
}

#[derive(Debug)]
pub struct FailureAlerts {
    threshold: u32,
    window: Duration,
    max_entries: usize,
    hasher: RandomState,
    ids: HashMap<u64, Tally>,
}

impl FailureAlerts {
    pub fn new(threshold: u32, window: Duration, max_entries: usize) -> FailureAlerts {
        FailureAlerts {
            threshold: threshold.max(1),
            window,
            max_entries: max_entries.max(1),
            hasher: RandomState::new(),
            ids: HashMap::new(),
        }
    }

    /// Count a failed login claiming `id`; `Some` once per window per id, when the
    /// failures reach the threshold and `alert` is true (the id is registered).
    pub fn record(
        &mut self,
        id: &str,
        source: SourceKey,
        alert: bool,
        now: Instant,
    ) -> Option<Alert> {
        let key = self.hasher.hash_one(id);
        if self.ids.len() >= self.max_entries && !self.ids.contains_key(&key) {
            let window = self.window;
            self.ids
                .retain(|_, t| now.saturating_duration_since(t.window_start) <= window);
            if self.ids.len() >= self.max_entries {
                // A spray of unknown ids must not wipe the tallies of registered ones:
                // with no room, an id that cannot alert is not tracked, and room for
                // one that can is made from the oldest tenth.
                if !alert {
                    return None;
                }
                let mut starts: Vec<(Instant, u64)> =
                    self.ids.iter().map(|(k, t)| (t.window_start, *k)).collect();
                let tenth = (starts.len() / 10).max(1);
                starts.select_nth_unstable(tenth - 1);
                for (_, k) in &starts[..tenth] {
                    self.ids.remove(k);
                }
            }
        }
        let tally = self.ids.entry(key).or_insert(Tally {
            window_start: now,
            failures: 0,
            sources: Vec::new(),
            alerted: false,
        });
        if now.saturating_duration_since(tally.window_start) > self.window {
            *tally = Tally {
                window_start: now,
                failures: 0,
                sources: Vec::new(),
                alerted: false,
            };
        }
        tally.failures = tally.failures.saturating_add(1);
        if tally.sources.len() < MAX_SOURCES && !tally.sources.contains(&source) {
            tally.sources.push(source);
        }
        if alert && !tally.alerted && tally.failures >= self.threshold {
            tally.alerted = true;
            return Some(Alert {
                failures: tally.failures,
                window: self.window,
                sources: tally.sources.clone(),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn src(n: u8) -> SourceKey {
        SourceKey::new(IpAddr::from([127, 0, 0, n]), 64)
    }

    #[test]
    fn one_alert_per_id_per_window_naming_the_sources() {
        let mut a = FailureAlerts::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert_eq!(a.record("lock", src(1), true, t0), None);
        assert_eq!(a.record("lock", src(2), true, t0), None);
        let alert = a.record("lock", src(3), true, t0).expect("alert");
        assert_eq!(alert.failures, 3);
        assert_eq!(alert.sources, vec![src(1), src(2), src(3)]);
        for n in 4..50 {
            assert_eq!(a.record("lock", src(n), true, t0), None);
        }
        let later = t0 + Duration::from_secs(61);
        for n in 0..2 {
            assert_eq!(a.record("lock", src(n), true, later), None);
        }
        assert!(a.record("lock", src(9), true, later).is_some());
    }

    #[test]
    fn unknown_ids_are_tallied_but_never_alerted_on() {
        let mut a = FailureAlerts::new(1, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for n in 0..5 {
            assert_eq!(a.record("ghost", src(n), false, t0), None);
        }
    }

    #[test]
    fn tallies_are_bounded() {
        let mut a = FailureAlerts::new(5, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for n in 0..10_000 {
            a.record(&format!("id-{n}"), src(1), true, t0);
        }
        assert!(a.ids.len() <= 100);
    }

    #[test]
    fn a_spray_of_unknown_ids_does_not_wipe_a_registered_ids_tally() {
        let mut a = FailureAlerts::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        a.record("lock", src(1), true, t0);
        a.record("lock", src(2), true, t0);
        for n in 0..10_000 {
            a.record(&format!("ghost-{n}"), src(3), false, t0);
        }
        assert!(a.ids.len() <= 100);
        let alert = a
            .record("lock", src(4), true, t0)
            .expect("the third failure alerts");
        assert_eq!(alert.failures, 3);
    }
}
