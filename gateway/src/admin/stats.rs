//! `GET /api/v1/stats`: the gateway's running totals, read from the metrics' atomics,
//! and the registered devices per behaviour state. Counters only: the dashboard
//! takes two readings and shows the rates from their difference and `time_ms`.

use super::AdminState;
use portcullis_core::behaviour::State;
use portcullis_core::device_census::DeviceStates;
use portcullis_core::metrics::{DeviceCensus, Metrics};
use portcullis_core::refusal::Refusal;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

#[derive(Debug, Serialize)]
pub struct Stats {
    /// When the counters were read, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections_active: u64,
    /// Every refusal since start.
    pub refusals: u64,
    /// Refusals by pipeline stage, every stage present.
    pub refusals_by_stage: BTreeMap<&'static str, u64>,
    /// Registered devices per behaviour state, every state present.
    pub devices: BTreeMap<&'static str, u64>,
}

impl Stats {
    pub fn read(admin: &AdminState, metrics: &Metrics) -> Stats {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut by_stage = BTreeMap::new();
        for r in Refusal::ALL {
            *by_stage.entry(r.stage().as_str()).or_insert(0) += metrics.refusal_count(*r);
        }
        let counts = match &admin.behaviours {
            Some(b) => DeviceStates::new(admin.registry.clone(), b.clone()).devices_by_state(),
            None => {
                let mut c = [0; State::ALL.len()];
                c[State::Normal.to_u8() as usize] = admin
                    .registry
                    .snapshot()
                    .count(portcullis_core::principal::PrincipalKind::Device)
                    as u64;
                c
            }
        };
        Stats {
            time_ms: portcullis_core::registry::now_unix_ms(),
            messages_in: load(&metrics.messages_accepted),
            messages_out: load(&metrics.messages_delivered),
            bytes_in: load(&metrics.bytes_accepted),
            bytes_out: load(&metrics.bytes_delivered),
            connections_active: load(&metrics.connections_active),
            refusals: by_stage.values().sum(),
            refusals_by_stage: by_stage,
            devices: State::ALL.iter().map(|s| s.as_str()).zip(counts).collect(),
        }
    }
}
