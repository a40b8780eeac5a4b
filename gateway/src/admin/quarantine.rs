//! Quarantine by operators: list and show devices' behaviour states, quarantine a
//! device, release it. With a gateway running this goes through its behaviour table
//! (effective on the next message); offline, the persisted record is rewritten.

use super::protocol::{
    Baseline, DeviceState, ListQuarantine, QuarantineDevice, QuarantineRow, QuarantineShown,
    ReleaseDevice, ShowQuarantine,
};
use super::{AdminError, AdminState, Handler, existing_id};
use portcullis_core::audit::AuditEntry;
use portcullis_core::behaviour::State;
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
use portcullis_core::quarantine::Record;
use portcullis_core::registry::now_unix;

/// A quarantine reason given by an operator: shown in one table row, so one line.
fn check_reason(reason: &str) -> Result<(), String> {
    if reason.chars().count() > 200 {
        return Err("the reason is limited to 200 characters".into());
    }
    if reason.chars().any(char::is_control) {
        return Err("the reason must be one line without control characters".into());
    }
    Ok(())
}

impl AdminState {
    /// An operator's quarantine or release: `from → to: reason`.
    fn audit_quarantine(
        &self,
        event: &'static str,
        id: &PrincipalId,
        from: State,
        to: State,
        reason: &str,
    ) {
        self.write_audit(
            AuditEntry::new(event, "allow")
                .principal(PrincipalKind::Device.as_str(), id.to_string())
                .protocol("admin")
                .reason(format!("{} → {}: {reason}", from.as_str(), to.as_str())),
        );
    }

    /// A registered device and its group: only devices have behaviour models.
    pub(crate) fn device(&self, id: &str) -> Result<(PrincipalId, GroupName), String> {
        self.registered_device(id).map_err(AdminError::message)
    }

    /// As `device`, an id not registered being `NotFound`.
    fn registered_device(&self, id: &str) -> Result<(PrincipalId, GroupName), AdminError> {
        let pid = existing_id(id)?;
        match self.registry.snapshot().get(PrincipalKind::Device, &pid) {
            Some(r) => Ok((pid, r.group.clone())),
            None => Err(AdminError::NotFound(format!(
                "device {id} is not registered"
            ))),
        }
    }

    /// The behaviour records: the running gateway's, or those persisted. Records of
    /// devices removed since are left out (the gateway drops them on start).
    fn behaviour_records(&self, all: bool) -> Result<Vec<(PrincipalId, Record)>, AdminError> {
        let snapshot = self.registry.snapshot();
        let mut out = match &self.behaviours {
            Some(b) => b.records(true),
            None => self
                .registry
                .behaviour_records()?
                .into_iter()
                .filter_map(|(id, r)| Some((PrincipalId::existing(&id).ok()?, r)))
                .collect(),
        };
        out.retain_mut(|(id, r)| {
            r.state = self.current_state(id, r.state);
            snapshot.get(PrincipalKind::Device, id).is_some() && (all || r.state != State::Normal)
        });
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(out)
    }

    fn behaviour_record(&self, id: &PrincipalId) -> Result<Option<Record>, AdminError> {
        let mut record = match &self.behaviours {
            Some(b) => b.record(id),
            None => self
                .registry
                .behaviour_records()?
                .into_iter()
                .find(|(k, _)| k == id.as_str())
                .map(|(_, r)| r),
        };
        if let Some(r) = &mut record {
            r.state = self.current_state(id, r.state);
        }
        Ok(record)
    }

    /// The state the pipeline acts on: the running model's, which a record catches
    /// up with once the transition task has noted it.
    fn current_state(&self, id: &PrincipalId, recorded: State) -> State {
        self.behaviours
            .as_ref()
            .and_then(|b| b.get(id))
            .map_or(recorded, |(_, t)| t.state())
    }

    /// With no gateway running: write a transition into the persisted record; the
    /// gateway starts in that state.
    fn store_transition(
        &self,
        id: &PrincipalId,
        record: Option<Record>,
        to: State,
        reason: &str,
    ) -> Result<State, AdminError> {
        let now = now_unix();
        let mut record = record.unwrap_or_else(|| Record::new(now));
        let from = record.push(now, to, reason.to_string());
        self.registry
            .put_behaviour_records(&[(id.to_string(), record)])?;
        Ok(from)
    }
}

impl Handler for ListQuarantine {
    fn run(self, state: &AdminState) -> Result<Vec<QuarantineRow>, AdminError> {
        Ok(state
            .behaviour_records(self.all)?
            .into_iter()
            .map(|(id, r)| QuarantineRow {
                id,
                state: r.state,
                since_unix: r.since_unix,
                reason: r.history.back().map(|h| h.reason.clone()),
            })
            .collect())
    }
}

impl Handler for ShowQuarantine {
    fn run(self, state: &AdminState) -> Result<QuarantineShown, AdminError> {
        let (id, group) = state.registered_device(&self.id)?;
        let record = state.behaviour_record(&id)?;
        // The learned baseline lives only in the running gateway's model.
        let baseline = state
            .behaviours
            .as_ref()
            .and_then(|b| Some((b.get(&id)?.1, b.policy(&group))))
            .map(|(tracked, policy)| {
                let ((mps, msd), (bps, bsd), learned) = tracked.baselines(&policy.settings);
                Baseline {
                    messages_per_second: mps,
                    messages_sd: msd,
                    bytes_per_second: bps,
                    bytes_sd: bsd,
                    learned_secs: learned.as_secs(),
                }
            });
        let state_now =
            state.current_state(&id, record.as_ref().map_or(State::Normal, |r| r.state));
        Ok(QuarantineShown {
            id,
            group,
            state: state_now,
            since_unix: record.as_ref().map(|r| r.since_unix),
            history: record
                .map(|r| r.history.into_iter().collect())
                .unwrap_or_default(),
            baseline,
        })
    }
}

impl Handler for ReleaseDevice {
    fn run(self, state: &AdminState) -> Result<DeviceState, AdminError> {
        let id = &self.id;
        let (pid, group) = state.registered_device(id)?;
        let not_held = || format!("device {id} is not quarantined or on probation");
        let (from, to, reason) = match &state.behaviours {
            Some(b) => {
                let to = b.release(&pid, &group, "operator").ok_or_else(not_held)?;
                let from = match to {
                    State::Normal => State::Probation,
                    _ => State::Quarantined,
                };
                (from, to, "released by operator")
            }
            None => {
                let record = state.behaviour_record(&pid)?;
                let to = match record.as_ref().map(|r| r.state) {
                    Some(State::Quarantined) => State::Released,
                    Some(State::Probation) => State::Normal,
                    _ => return Err(not_held().into()),
                };
                let reason = "released by operator (gateway not running)";
                (
                    state.store_transition(&pid, record, to, reason)?,
                    to,
                    reason,
                )
            }
        };
        state.audit_quarantine("quarantine_release", &pid, from, to, reason);
        Ok(DeviceState { id: pid, state: to })
    }
}

impl Handler for QuarantineDevice {
    fn run(self, state: &AdminState) -> Result<DeviceState, AdminError> {
        let id = &self.id;
        let (pid, group) = state.registered_device(id)?;
        if let Some(r) = &self.reason {
            check_reason(r)?;
        }
        let reason = format!(
            "quarantined by operator{}",
            self.reason.map(|r| format!(": {r}")).unwrap_or_default()
        );
        let already = || format!("device {id} is already quarantined");
        let from = match &state.behaviours {
            Some(b) => {
                // Sessions of such a group are not modelled: nothing would enforce it.
                if !b.policy(&group).enabled {
                    return Err(format!(
                        "device {id}: the behaviour model is off for its group {} \
                         (behaviour.enabled = false), so a quarantine would not be \
                         enforced; disable or ban the device instead",
                        group.as_str()
                    )
                    .into());
                }
                let from = state.current_state(&pid, State::Normal);
                b.quarantine(&pid, &group, reason.clone())
                    .ok_or_else(already)?;
                from
            }
            None => {
                let record = state.behaviour_record(&pid)?;
                if record.as_ref().map(|r| r.state) == Some(State::Quarantined) {
                    return Err(already().into());
                }
                state.store_transition(&pid, record, State::Quarantined, &reason)?
            }
        };
        state.audit_quarantine("quarantine_add", &pid, from, State::Quarantined, &reason);
        Ok(DeviceState {
            id: pid,
            state: State::Quarantined,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::RemovePrincipal;
    use crate::admin::testing::{add_device, audit_log, config, offline, running, usage, wire};
    use portcullis_core::quarantine::{HISTORY, HistoryEntry};
    use serde_json::{Value, json};
    use std::collections::VecDeque;

    /// Run a request as the socket would: its result as it goes on the wire.
    fn handle<O: Handler>(state: &AdminState, op: O) -> Result<Value, AdminError> {
        op.run(state).map(wire)
    }

    fn tracked_state(state: &AdminState, id: &str) -> Option<State> {
        let id = PrincipalId::parse(id).unwrap();
        Some(state.behaviours.as_ref()?.get(&id)?.1.state())
    }

    /// Persist a record as the gateway would have: one transition into `state`.
    fn put(state: &AdminState, id: &str, to: State, at_unix: u64, reason: &str) {
        let record = Record {
            state: to,
            since_unix: at_unix,
            history: VecDeque::from([HistoryEntry {
                at_unix,
                from: State::Normal,
                to,
                reason: reason.into(),
            }]),
        };
        state
            .registry
            .put_behaviour_records(&[(id.to_string(), record)])
            .unwrap();
    }

    fn stored(state: &AdminState, id: &str) -> Option<Record> {
        state
            .registry
            .behaviour_records()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == id)
            .map(|(_, r)| r)
    }

    #[test]
    fn list_shows_only_devices_not_normal_unless_all() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Quarantined,
            1_000,
            "message rate 40/s",
        );
        put(&state, "sensor-2", State::Normal, 2_000, "probation ended");
        let list = handle(&state, ListQuarantine { all: false }).unwrap();
        assert_eq!(
            list,
            json!([{
                "id": "sensor-1",
                "state": "quarantined",
                "since_unix": 1_000,
                "reason": "message rate 40/s",
            }])
        );
        let all = handle(&state, ListQuarantine { all: true }).unwrap();
        let ids: Vec<_> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["sensor-1", "sensor-2"]);
    }

    #[test]
    fn list_leaves_out_records_of_devices_removed_since() {
        let (_dir, state) = offline();
        put(&state, "gone-1", State::Quarantined, 1_000, "clone");
        let list = handle(&state, ListQuarantine { all: true }).unwrap();
        assert_eq!(list, json!([]));
    }

    #[test]
    fn show_gives_state_and_history_without_a_baseline_offline() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Probation,
            1_000,
            "topic spread 12",
        );
        let v = handle(
            &state,
            ShowQuarantine {
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(
            v,
            json!({
                "id": "sensor-1",
                "group": "default",
                "state": "probation",
                "since_unix": 1_000,
                "history": [{
                    "at_unix": 1_000,
                    "from": "normal",
                    "to": "probation",
                    "reason": "topic spread 12",
                }],
            })
        );
    }

    #[test]
    fn a_device_with_no_record_shows_normal_with_no_history() {
        let (_dir, state) = offline();
        let v = handle(
            &state,
            ShowQuarantine {
                id: "sensor-2".into(),
            },
        )
        .unwrap();
        assert_eq!(v["state"], "normal");
        assert_eq!(v["since_unix"], Value::Null);
        assert_eq!(v["history"], json!([]));
    }

    #[test]
    fn releasing_a_quarantined_device_offline_leaves_it_released_and_audited() {
        let (dir, state) = offline();
        put(&state, "sensor-1", State::Quarantined, 1_000, "clone");
        let v = handle(
            &state,
            ReleaseDevice {
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(v, json!({ "id": "sensor-1", "state": "released" }));
        let r = stored(&state, "sensor-1").unwrap();
        assert_eq!(r.state, State::Released);
        assert!(r.since_unix >= now_unix() - 5);
        let last = r.history.back().unwrap();
        assert_eq!((last.from, last.to), (State::Quarantined, State::Released));
        assert_eq!(last.reason, "released by operator (gateway not running)");
        let log = audit_log(&dir);
        assert!(log.contains(r#""event":"quarantine_release""#), "{log}");
        assert!(log.contains("quarantined → released"), "{log}");
    }

    #[test]
    fn releasing_a_device_on_probation_offline_returns_it_to_normal() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Probation,
            1_000,
            "rate 3 sd above",
        );
        let v = handle(
            &state,
            ReleaseDevice {
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(v["state"], "normal");
        assert_eq!(stored(&state, "sensor-1").unwrap().state, State::Normal);
    }

    #[test]
    fn releasing_a_device_not_held_is_a_usage_error() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Released,
            1_000,
            "released by operator",
        );
        for id in ["sensor-1", "sensor-2"] {
            let m = usage(handle(&state, ReleaseDevice { id: id.into() }));
            assert_eq!(m, format!("device {id} is not quarantined or on probation"));
        }
        // Nothing written for the device that had no record.
        assert!(stored(&state, "sensor-2").is_none());
    }

    #[test]
    fn an_unregistered_id_is_a_usage_error() {
        let (_dir, state) = offline();
        let ghost = || "ghost".to_string();
        let refusals = [
            usage(handle(&state, ShowQuarantine { id: ghost() })),
            usage(handle(&state, ReleaseDevice { id: ghost() })),
            usage(handle(
                &state,
                QuarantineDevice {
                    id: ghost(),
                    reason: None,
                },
            )),
        ];
        for m in refusals {
            assert_eq!(m, "device ghost is not registered");
        }
        let bad = usage(handle(&state, ShowQuarantine { id: "a/b".into() }));
        assert!(bad.starts_with("\"a/b\""), "{bad}");
    }

    #[test]
    fn adding_offline_quarantines_once_with_the_operators_reason() {
        let (dir, state) = offline();
        let v = handle(
            &state,
            QuarantineDevice {
                id: "sensor-2".into(),
                reason: Some("firmware under review".into()),
            },
        )
        .unwrap();
        assert_eq!(v, json!({ "id": "sensor-2", "state": "quarantined" }));
        let r = stored(&state, "sensor-2").unwrap();
        assert_eq!(r.state, State::Quarantined);
        let last = r.history.back().unwrap();
        assert_eq!((last.from, last.to), (State::Normal, State::Quarantined));
        assert_eq!(
            last.reason,
            "quarantined by operator: firmware under review"
        );
        assert!(audit_log(&dir).contains(r#""event":"quarantine_add""#));
        let again = usage(handle(
            &state,
            QuarantineDevice {
                id: "sensor-2".into(),
                reason: None,
            },
        ));
        assert_eq!(again, "device sensor-2 is already quarantined");
    }

    #[test]
    fn an_operators_reason_must_be_one_short_line() {
        let (_dir, state) = offline();
        for reason in ["two\nlines".to_string(), "x".repeat(201)] {
            let m = usage(handle(
                &state,
                QuarantineDevice {
                    id: "sensor-1".into(),
                    reason: Some(reason),
                },
            ));
            assert!(m.starts_with("the reason"), "{m}");
        }
        assert!(stored(&state, "sensor-1").is_none());
    }

    #[test]
    fn history_keeps_only_the_latest_transitions() {
        let (_dir, state) = offline();
        for _ in 0..HISTORY {
            handle(
                &state,
                QuarantineDevice {
                    id: "sensor-1".into(),
                    reason: None,
                },
            )
            .unwrap();
            handle(
                &state,
                ReleaseDevice {
                    id: "sensor-1".into(),
                },
            )
            .unwrap();
        }
        let r = stored(&state, "sensor-1").unwrap();
        assert_eq!(r.history.len(), HISTORY);
        assert_eq!(r.history.back().unwrap().to, State::Released);
    }

    #[test]
    fn removing_a_device_forgets_its_behaviour_record() {
        let (_dir, state) = offline();
        put(&state, "sensor-1", State::Quarantined, 1_000, "clone");
        handle(
            &state,
            RemovePrincipal {
                kind: PrincipalKind::Device,
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert!(stored(&state, "sensor-1").is_none());
        // Registered again, it starts afresh.
        handle(&state, add_device("sensor-1")).unwrap();
        let v = handle(
            &state,
            ShowQuarantine {
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(v["state"], "normal");
        // A device with no record is removed all the same.
        handle(
            &state,
            RemovePrincipal {
                kind: PrincipalKind::Device,
                id: "sensor-2".into(),
            },
        )
        .unwrap();
    }

    #[test]
    fn running_add_and_release_go_through_the_gateways_model() {
        let (dir, state) = running(config());
        let v = handle(
            &state,
            QuarantineDevice {
                id: "sensor-1".into(),
                reason: None,
            },
        )
        .unwrap();
        assert_eq!(v["state"], "quarantined");
        assert_eq!(tracked_state(&state, "sensor-1"), Some(State::Quarantined));
        let again = usage(handle(
            &state,
            QuarantineDevice {
                id: "sensor-1".into(),
                reason: None,
            },
        ));
        assert_eq!(again, "device sensor-1 is already quarantined");
        // The gateway's model carries the learned baseline.
        let show = handle(
            &state,
            ShowQuarantine {
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(show["state"], "quarantined");
        assert!(show["baseline"]["learned_secs"].is_u64(), "{show}");
        let v = handle(
            &state,
            ReleaseDevice {
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(v, json!({ "id": "sensor-1", "state": "released" }));
        assert_eq!(tracked_state(&state, "sensor-1"), Some(State::Released));
        let log = audit_log(&dir);
        assert!(log.contains("released by operator\""), "{log}");
        let m = usage(handle(
            &state,
            ReleaseDevice {
                id: "sensor-2".into(),
            },
        ));
        assert_eq!(m, "device sensor-2 is not quarantined or on probation");
    }

    #[test]
    fn running_add_is_refused_where_the_model_is_off() {
        let mut config = config();
        config.behaviour.enabled = false;
        let (_dir, state) = running(config);
        let m = usage(handle(
            &state,
            QuarantineDevice {
                id: "sensor-1".into(),
                reason: None,
            },
        ));
        assert!(m.contains("behaviour model is off"), "{m}");
        assert_eq!(tracked_state(&state, "sensor-1"), None);
    }

    #[test]
    fn removing_a_device_forgets_its_model_in_the_running_gateway() {
        let (_dir, state) = running(config());
        handle(
            &state,
            QuarantineDevice {
                id: "sensor-1".into(),
                reason: None,
            },
        )
        .unwrap();
        handle(
            &state,
            RemovePrincipal {
                kind: PrincipalKind::Device,
                id: "sensor-1".into(),
            },
        )
        .unwrap();
        assert_eq!(tracked_state(&state, "sensor-1"), None);
    }
}
