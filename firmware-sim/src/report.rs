//! Per-group counters while a fleet runs, and the report at the end (text and JSON).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one group, shared by its members.
pub struct GroupStats {
    pub name: String,
    pub behaviour: &'static str,
    pub members: usize,
    pub connected: AtomicU64,
    pub sent: AtomicU64,
    pub acknowledged: AtomicU64,
    /// Telemetry from this group that a simulated service received.
    pub delivered: AtomicU64,
    pub commands_received: AtomicU64,
    /// Command acknowledgements from this group that a service received.
    pub commands_acknowledged: AtomicU64,
    /// Commands a service of this group sent.
    pub commands_sent: AtomicU64,
    /// Hostile actions the server accepted (a success code where a refusal was due).
    pub accepted: AtomicU64,
    /// Serial: RESYNCs the group's devices heard (a frame of theirs was stale).
    pub resyncs: AtomicU64,
    connect_refused: Mutex<BTreeMap<String, u64>>,
    refused: Mutex<BTreeMap<String, u64>>,
    disconnected: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram<u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, reason: &str) {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    match m.get_mut(reason) {
        Some(n) => *n += 1,
        None => {
            m.insert(reason.to_string(), 1);
        }
    }
}

impl GroupStats {
    pub fn new(name: &str, behaviour: &'static str, members: usize) -> GroupStats {
        GroupStats {
            name: name.to_string(),
            behaviour,
            members,
            connected: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_acknowledged: AtomicU64::new(0),
            commands_sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            connect_refused: Mutex::default(),
            refused: Mutex::default(),
            disconnected: Mutex::default(),
            // 1 µs to 60 s, 3 significant digits.
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")),
        }
    }

    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A connection attempt the server refused (CONNACK code, or closed).
    pub fn connect_refused(&self, reason: &str) {
        bump(&self.connect_refused, reason);
    }

    /// A message or subscription the server refused.
    pub fn refused(&self, reason: &str) {
        bump(&self.refused, reason);
    }

    /// The server ended a session (DISCONNECT reason, or closed).
    pub fn disconnected(&self, reason: &str) {
        bump(&self.disconnected, reason);
    }

    pub fn latency_us(&self, us: u64) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(us.max(1));
    }

    pub fn report(&self) -> GroupReport {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let latency = (!h.is_empty()).then(|| Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        });
        let map =
            |m: &Mutex<BTreeMap<String, u64>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        GroupReport {
            name: self.name.clone(),
            behaviour: self.behaviour.to_string(),
            members: self.members,
            connected: self.connected.load(Relaxed),
            connect_refused: map(&self.connect_refused),
            disconnected: map(&self.disconnected),
            sent: self.sent.load(Relaxed),
            acknowledged: self.acknowledged.load(Relaxed),
            refused: map(&self.refused),
            accepted: self.accepted.load(Relaxed),
            resyncs: self.resyncs.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            commands_sent: self.commands_sent.load(Relaxed),
            commands_received: self.commands_received.load(Relaxed),
            commands_acknowledged: self.commands_acknowledged.load(Relaxed),
            latency_us: latency,
            quarantined: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Serialize, Clone)]
pub struct GroupReport {
    pub name: String,
    pub behaviour: String,
    pub members: usize,
    /// Sessions that reached CONNACK success (a member that reconnects counts again).
    pub connected: u64,
    pub connect_refused: BTreeMap<String, u64>,
    pub disconnected: BTreeMap<String, u64>,
    pub sent: u64,
    pub acknowledged: u64,
    pub refused: BTreeMap<String, u64>,
    /// Hostile actions that were accepted.
    pub accepted: u64,
    /// Serial: RESYNCs heard.
    pub resyncs: u64,
    pub delivered: u64,
    pub commands_sent: u64,
    pub commands_received: u64,
    pub commands_acknowledged: u64,
    /// Publish → delivery at a simulated service when one listens, otherwise publish →
    /// acknowledgement; microseconds.
    pub latency_us: Option<Latency>,
    /// Members the gateway holds in probation or quarantine (or released and watched)
    /// at the end of the run, as `portcullis quarantine list` tells.
    pub quarantined: Vec<Quarantined>,
}

/// A member's behaviour state at the gateway, when it is not normal.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub id: String,
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Report {
    pub scenario: String,
    pub duration_secs: f64,
    pub groups: Vec<GroupReport>,
    /// Why the members' behaviour states could not be read, if they could not.
    pub quarantine_unknown: Option<String>,
}

impl Report {
    pub fn group(&self, name: &str) -> Option<&GroupReport> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {:?}, {:.1} s",
            self.scenario, self.duration_secs
        );
        for g in &self.groups {
            let _ = writeln!(
                out,
                "\n{} ({}, {} members)\n  connected {}  sent {}  acknowledged {}  delivered {}  accepted-hostile {}",
                g.name,
                g.behaviour,
                g.members,
                g.connected,
                g.sent,
                g.acknowledged,
                g.delivered,
                g.accepted
            );
            if g.resyncs > 0 {
                let _ = writeln!(out, "  resyncs heard {}", g.resyncs);
            }
            if g.commands_sent + g.commands_received > 0 {
                let _ = writeln!(
                    out,
                    "  commands sent {}  received {}  acknowledged {}",
                    g.commands_sent, g.commands_received, g.commands_acknowledged
                );
            }
            for (label, map) in [
                ("connect refused", &g.connect_refused),
                ("refused", &g.refused),
                ("disconnected", &g.disconnected),
            ] {
                if !map.is_empty() {
                    let list: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    let _ = writeln!(out, "  {label}: {}", list.join(", "));
                }
            }
            if let Some(l) = &g.latency_us {
                let _ = writeln!(
                    out,
                    "  latency µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n = {})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.count
                );
            }
            if self.quarantine_unknown.is_none() {
                let _ = writeln!(out, "  not normal at the gateway: {}", g.quarantined.len());
            }
            for q in &g.quarantined {
                let _ = writeln!(
                    out,
                    "    {} {}: {}",
                    q.id,
                    q.state,
                    q.reason.as_deref().unwrap_or("(no reason recorded)")
                );
            }
        }
        if let Some(why) = &self.quarantine_unknown {
            let _ = writeln!(out, "\nbehaviour states not read: {why}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_reasons_and_percentiles() {
        let g = GroupStats::new("g", "flood", 2);
        g.add(&g.sent, 3);
        g.refused("quota_exceeded");
        g.refused("quota_exceeded");
        g.connect_refused("banned");
        for us in 1..=1000 {
            g.latency_us(us);
        }
        let r = g.report();
        assert_eq!(r.sent, 3);
        assert_eq!(r.refused.get("quota_exceeded"), Some(&2));
        assert_eq!(r.connect_refused.get("banned"), Some(&1));
        let l = r.latency_us.clone().unwrap();
        assert_eq!(l.count, 1000);
        assert!((499..=501).contains(&l.p50), "{l:?}");
        assert!((989..=991).contains(&l.p99), "{l:?}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["refused"]["quota_exceeded"], 2);
    }
}
