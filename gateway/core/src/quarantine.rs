//! Per-device behaviour and quarantine, shared by every session: the model of each
//! device (`behaviour`), its state as the pipeline's first stage reads it, and the
//! record of its transitions, kept across restarts.
//!
//! The per-message path locks only its own device's model (uncontended: one session
//! per device) and reads one atomic for the quarantine stage. Transitions are rare;
//! they go through a channel to one task that persists them (batched redb commits),
//! audits them, publishes them under `portcullis/events/quarantine/{id}`, and purges
//! a newly quarantined device's retained messages.

use crate::audit::{Audit, AuditEntry};
use crate::behaviour::{DeviceModel, Observation, Settings, State, Transition};
use crate::control::Action;
use crate::forward::Forwarder;
use crate::message::{Message, QoS};
use crate::metrics::Metrics;
use crate::principal::{GroupName, PrincipalId};
use crate::registry::{Registry, now_unix};
use crate::retained::RetainedCommands;
use crate::topic::TopicName;
use portcullis_config::{Config, QuarantineCommands, QuarantineTraffic};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The record the quarantine keeps, still found here by its callers.
pub use crate::behaviour_record::{HISTORY, HistoryEntry, Record};

/// What a device group's behaviour settings decide.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Off: the group's devices are neither modelled nor quarantined.
    pub enabled: bool,
    pub settings: Settings,
    /// Probation multiplies the device's rate limits by this.
    pub probation_rate_factor: f64,
    pub traffic: QuarantineTraffic,
    /// Diverted messages per second (to `portcullis/forensic/{id}/…`).
    pub forensic_per_second: f64,
    pub commands: QuarantineCommands,
}

impl Policy {
    pub fn from_config(b: &portcullis_config::Behaviour) -> Policy {
        Policy {
            enabled: b.enabled,
            settings: Settings::from_config(b),
            probation_rate_factor: b.probation_rate_factor,
            traffic: b.quarantine_traffic,
            forensic_per_second: b.forensic_messages_per_second,
            commands: b.quarantine_commands,
        }
    }
}

/// The policies of every device group, swapped whole on a reload.
#[derive(Debug, Clone)]
pub struct Policies {
    default: Arc<Policy>,
    groups: HashMap<String, Arc<Policy>>,
}

impl Policies {
    pub fn from_config(config: &Config) -> Policies {
        Policies {
            default: Arc::new(Policy::from_config(&config.behaviour)),
            groups: config
                .device_groups
                .keys()
                .map(|g| {
                    (
                        g.clone(),
                        Arc::new(Policy::from_config(&config.behaviour_for(g))),
                    )
                })
                .collect(),
        }
    }

    pub fn for_group(&self, group: &GroupName) -> Arc<Policy> {
        self.groups
            .get(group.as_str())
            .unwrap_or(&self.default)
            .clone()
    }
}

/// A transition on its way to be persisted, audited and published.
#[derive(Debug)]
pub struct Change {
    pub id: PrincipalId,
    pub transition: Transition,
    pub at_unix: u64,
    /// Told by another replica (not sent on to the others again).
    pub remote: bool,
}

/// One device's model and the state the pipeline reads.
pub struct Tracked {
    pub id: PrincipalId,
    state: AtomicU8,
    model: Mutex<DeviceModel>,
    changes: mpsc::UnboundedSender<Change>,
}

impl Tracked {
    /// The state the quarantine stage acts on (one atomic load).
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Feed the model; a transition is applied to the state and sent on.
    pub fn observe(&self, obs: Observation, now: Instant, policy: &Policy) -> Option<State> {
        if !policy.enabled {
            return None;
        }
        self.decide(|m| m.observe(obs, now, &policy.settings))
    }

    /// Let time pass on the model (windows close, time-outs apply); a transition is
    /// applied to the state and sent on.
    pub fn tick(&self, now: Instant, policy: &Policy) -> Option<State> {
        if !policy.enabled {
            return None;
        }
        self.decide(|m| m.tick(now, &policy.settings))
    }

    /// Run `f` on the model; a transition it decides is applied to the state and sent
    /// on while the model is still locked, so two deciders cannot reorder them.
    fn decide(&self, f: impl FnOnce(&mut DeviceModel) -> Option<Transition>) -> Option<State> {
        self.decide_as(f, false)
    }

    fn decide_as(
        &self,
        f: impl FnOnce(&mut DeviceModel) -> Option<Transition>,
        remote: bool,
    ) -> Option<State> {
        let mut m = self.model.lock().unwrap_or_else(|p| p.into_inner());
        let t = f(&mut m)?;
        Some(self.apply(t, remote))
    }

    fn apply(&self, t: Transition, remote: bool) -> State {
        let to = t.to;
        self.state.store(to.to_u8(), Ordering::Relaxed);
        let _ = self.changes.send(Change {
            id: self.id.clone(),
            transition: t,
            at_unix: now_unix(),
            remote,
        });
        to
    }

    /// The learned baselines: (messages/s mean, sd), (bytes/s mean, sd), learned over.
    pub fn baselines(&self, s: &Settings) -> ((f64, f64), (f64, f64), Duration) {
        let m = self.model.lock().unwrap_or_else(|p| p.into_inner());
        (m.baseline(), m.byte_baseline(), m.learned_over(s))
    }
}

const SHARDS: usize = 16;

/// One shard of the table: each tracked device with its group.
type Shard = Mutex<HashMap<PrincipalId, (GroupName, Arc<Tracked>)>>;

/// Every device's behaviour, and the records of their transitions.
pub struct Behaviours {
    shards: [Shard; SHARDS],
    policies: RwLock<Arc<Policies>>,
    records: Mutex<HashMap<PrincipalId, Record>>,
    changes: mpsc::UnboundedSender<Change>,
    hasher: Hashing,
}

/// How ids, topics and addresses are hashed.
enum Hashing {
    /// Seeded per process: a device cannot pick topics that collide.
    Random(std::hash::RandomState),
    /// The same in every process (the simulator's: a run is the same for a seed).
    Fixed,
}

impl Hashing {
    fn hash_one(&self, s: impl std::hash::Hash) -> u64 {
        match self {
            Hashing::Random(r) => r.hash_one(s),
            Hashing::Fixed => {
                std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(s)
            }
        }
    }
}

impl Behaviours {
    /// The table, with the records kept in the registry: devices quarantined,
    /// released or on probation come back in that state. The receiver goes to
    /// `run`.
    pub fn load(
        registry: &Registry,
        policies: Policies,
    ) -> Result<(Arc<Behaviours>, mpsc::UnboundedReceiver<Change>), crate::registry::RegistryError>
    {
        let (b, rx) = Behaviours::new(policies);
        let snapshot = registry.snapshot();
        let (now, now_u) = (Instant::now(), now_unix());
        let mut records = b.records.lock().unwrap_or_else(|p| p.into_inner());
        for (id, record) in registry.behaviour_records()? {
            let Ok(id) = PrincipalId::parse(&id) else {
                continue;
            };
            // A device removed since keeps no record.
            let Some(principal) = snapshot.get(crate::principal::PrincipalKind::Device, &id) else {
                continue;
            };
            if record.state != State::Normal {
                let policy = b.policy(&principal.group);
                let age = Duration::from_secs(now_u.saturating_sub(record.since_unix));
                let since = now.checked_sub(age).unwrap_or(now);
                let model = DeviceModel::restored(record.state, since, now, &policy.settings);
                b.insert(&id, &principal.group, model);
            }
            records.insert(id, record);
        }
        drop(records);
        Ok((b, rx))
    }

    /// An empty table with no records (the simulator's, and tests'). The receiver
    /// gets every transition.
    pub fn new(policies: Policies) -> (Arc<Behaviours>, mpsc::UnboundedReceiver<Change>) {
        Behaviours::hashing(policies, Hashing::Random(std::hash::RandomState::new()))
    }

    /// `new`, with a hash of topics and addresses that is the same in every process
    /// (the simulator's evaluation: a run is the same for a seed). Not for a gateway:
    /// a device that knows the hash could pick topics that collide.
    pub fn with_fixed_hasher(
        policies: Policies,
    ) -> (Arc<Behaviours>, mpsc::UnboundedReceiver<Change>) {
        Behaviours::hashing(policies, Hashing::Fixed)
    }

    fn hashing(
        policies: Policies,
        hasher: Hashing,
    ) -> (Arc<Behaviours>, mpsc::UnboundedReceiver<Change>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let b = Arc::new(Behaviours {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            policies: RwLock::new(Arc::new(policies)),
            records: Mutex::new(HashMap::new()),
            changes: tx,
            hasher,
        });
        (b, rx)
    }

    fn shard(&self, id: &PrincipalId) -> &Shard {
        &self.shards[(self.hasher.hash_one(id.as_str()) as usize) % SHARDS]
    }

    fn insert(&self, id: &PrincipalId, group: &GroupName, model: DeviceModel) -> Arc<Tracked> {
        let tracked = Arc::new(Tracked {
            id: id.clone(),
            state: AtomicU8::new(model.state().to_u8()),
            model: Mutex::new(model),
            changes: self.changes.clone(),
        });
        self.shard(id)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), (group.clone(), tracked.clone()));
        tracked
    }

    /// Put a device in `state`, as if it had been there since `since` (as a record kept
    /// in the registry restores it).
    pub fn restore(
        &self,
        id: &PrincipalId,
        group: &GroupName,
        state: State,
        since: Instant,
        now: Instant,
    ) -> Arc<Tracked> {
        let policy = self.policy(group);
        self.insert(
            id,
            group,
            DeviceModel::restored(state, since, now, &policy.settings),
        )
    }

    /// The policy of a device group.
    pub fn policy(&self, group: &GroupName) -> Arc<Policy> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .for_group(group)
    }

    /// A reload: new settings for every group (models and states are kept).
    pub fn set_policies(&self, policies: Policies) {
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
    }

    /// A hash of a topic or an address, for the model's distinct counts (seeded per
    /// process, so a device cannot pick colliding topics).
    pub fn hash(&self, s: impl std::hash::Hash) -> u64 {
        self.hasher.hash_one(s) | 1
    }

    /// The model of a registered device, created on first use.
    pub fn track(&self, id: &PrincipalId, group: &GroupName) -> Arc<Tracked> {
        let shard = self.shard(id);
        {
            let mut devices = shard.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((g, t)) = devices.get_mut(id) {
                // Moved to another group: the new group's settings apply.
                if g != group {
                    *g = group.clone();
                }
                return t.clone();
            }
        }
        let policy = self.policy(group);
        self.insert(
            id,
            group,
            // Away until its session says it connected.
            DeviceModel::new(Instant::now(), &policy.settings).away(),
        )
    }

    /// The model of a device if it is tracked.
    pub fn get(&self, id: &PrincipalId) -> Option<(GroupName, Arc<Tracked>)> {
        self.shard(id)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A removed device: its model and record go.
    pub fn forget(&self, id: &PrincipalId) {
        self.shard(id)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Released by an operator: the new state, or `None` if it was not quarantined
    /// or on probation.
    pub fn release(&self, id: &PrincipalId, group: &GroupName, by: &str) -> Option<State> {
        self.release_as(id, group, by, false)
    }

    /// Quarantined by an operator.
    pub fn quarantine(&self, id: &PrincipalId, group: &GroupName, reason: String) -> Option<State> {
        self.quarantine_as(id, group, reason, false)
    }

    /// Released, on this replica's word or (`remote`) another's.
    pub fn release_as(
        &self,
        id: &PrincipalId,
        group: &GroupName,
        by: &str,
        remote: bool,
    ) -> Option<State> {
        self.track(id, group)
            .decide_as(|m| m.release(Instant::now(), by), remote)
    }

    /// Quarantined, on this replica's word or (`remote`) another's.
    pub fn quarantine_as(
        &self,
        id: &PrincipalId,
        group: &GroupName,
        reason: String,
        remote: bool,
    ) -> Option<State> {
        self.track(id, group)
            .decide_as(|m| m.quarantine(Instant::now(), reason), remote)
    }

    /// Apply time-outs (quarantine TTL, end of probation, end of watch) to every
    /// device not in the normal state. Called about once a second.
    pub fn sweep(&self, now: Instant) {
        for shard in &self.shards {
            let devices: Vec<(GroupName, Arc<Tracked>)> = shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|(_, t)| t.state() != State::Normal)
                .cloned()
                .collect();
            for (group, tracked) in devices {
                let policy = self.policy(&group);
                if !policy.enabled {
                    continue;
                }
                tracked.decide(|m| m.tick(now, &policy.settings));
            }
        }
    }

    /// Every tracked device not in the normal state, with its state (the devices
    /// per state on `/metrics`).
    pub fn held(&self) -> Vec<(PrincipalId, State)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let devices = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(devices.iter().filter_map(|(id, (_, t))| {
                let state = t.state();
                (state != State::Normal).then(|| (id.clone(), state))
            }));
        }
        out
    }

    /// Records of devices not in the normal state (or every record with `all`).
    pub fn records(&self, all: bool) -> Vec<(PrincipalId, Record)> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(PrincipalId, Record)> = records
            .iter()
            .filter(|(_, r)| all || r.state != State::Normal)
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out
    }

    pub fn record(&self, id: &PrincipalId) -> Option<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Note a change in the records; the record to persist (none for a device
    /// forgotten since: removed devices keep no record).
    fn note(&self, change: &Change) -> Option<Record> {
        self.get(&change.id)?;
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let record = records
            .entry(change.id.clone())
            .or_insert_with(|| Record::new(change.at_unix));
        let t = &change.transition;
        record.push(change.at_unix, t.to, t.reason.clone());
        Some(record.clone())
    }
}

/// What the transition task needs besides the table.
pub struct Effects {
    pub registry: Arc<Registry>,
    pub forwarder: Arc<dyn Forwarder>,
    pub retained: Arc<RetainedCommands>,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    /// Replicas (upstream mode): quarantines and releases decided here are told to
    /// the others.
    pub control: Option<mpsc::UnboundedSender<crate::control::Action>>,
}

/// The topic of a device's quarantine events.
pub fn event_topic(id: &PrincipalId) -> Option<TopicName> {
    TopicName::parse_unlimited(&format!("portcullis/events/quarantine/{id}")).ok()
}

/// Where a quarantined device's message goes when it is diverted.
pub fn forensic_topic(id: &PrincipalId, topic: &TopicName) -> Option<TopicName> {
    TopicName::parse_unlimited(&format!("portcullis/forensic/{id}/{topic}")).ok()
}

/// Persist, audit and publish transitions until `stop` fires (then what is queued is
/// handled, and the task ends). Each batch of changes is one registry commit.
pub async fn run(
    behaviours: Arc<Behaviours>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    fx: Effects,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut batch = Vec::new();
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            n = changes.recv_many(&mut batch, 256) => if n == 0 {
                break;
            },
            _ = &mut stop => {
                stopping = true;
                while let Ok(change) = changes.try_recv() {
                    batch.push(change);
                }
            }
        }
        let mut writes = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for change in batch.drain(..) {
            let Some(record) = behaviours.note(&change) else {
                continue;
            };
            let t = &change.transition;
            if let Some(control) = fx.control.as_ref().filter(|_| !change.remote) {
                let device = change.id.to_string();
                let reason = t.reason.clone();
                let told = match (t.from, t.to) {
                    (_, State::Quarantined) => Some(Action::Quarantine { device, reason }),
                    (State::Quarantined, State::Released | State::Normal) => {
                        Some(Action::Release { device, reason })
                    }
                    _ => None,
                };
                if let Some(action) = told {
                    let _ = control.send(action);
                }
            }
            Metrics::inc(match t.to {
                State::Quarantined => &fx.metrics.quarantined,
                State::Probation => &fx.metrics.probations,
                State::Released | State::Normal => &fx.metrics.releases,
            });
            fx.audit.record(
                AuditEntry::new("quarantine", t.to.as_str())
                    .principal("device", change.id.to_string())
                    .reason(format!(
                        "{} → {}: {}",
                        t.from.as_str(),
                        t.to.as_str(),
                        t.reason
                    )),
            );
            tracing::warn!(
                device = %change.id,
                from = t.from.as_str(),
                to = t.to.as_str(),
                reason = %t.reason,
                "device behaviour"
            );
            // Through the device's own uplink: its event and purge go behind whatever
            // it sent before, so a subscriber sees nothing of it after the event.
            let uplink = fx.forwarder.uplink_for(&change.id);
            if t.to == State::Quarantined {
                // Its retained messages are no longer what services should see.
                for topic in fx.retained.take_device_retained(&change.id) {
                    let _ = uplink
                        .send(Message {
                            topic,
                            payload: bytes::Bytes::new(),
                            qos: QoS::AtMostOnce,
                            retain: true,
                            properties: None,
                        })
                        .await;
                }
            }
            let event = serde_json::json!({
                "device": change.id.as_str(),
                "from": t.from.as_str(),
                "to": t.to.as_str(),
                "reason": t.reason,
                "at_unix": change.at_unix,
            });
            if let (Some(topic), Ok(payload)) =
                (event_topic(&change.id), serde_json::to_vec(&event))
            {
                events.push((
                    uplink,
                    Message {
                        topic,
                        payload: payload.into(),
                        qos: QoS::AtMostOnce,
                        retain: false,
                        properties: None,
                    },
                ));
            }
            writes.push((change.id.to_string(), record));
        }
        let registry = fx.registry.clone();
        let stored = tokio::task::spawn_blocking(move || registry.put_behaviour_records(&writes))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = stored {
            tracing::error!(error = %e, "quarantine state not persisted");
        }
        for (uplink, event) in events {
            let _ = uplink.send(event).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::record as device;
    use std::collections::VecDeque;

    fn policies() -> Policies {
        Policies::from_config(&Config::default())
    }

    #[test]
    fn kept_states_come_back_and_removed_devices_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(
            &dir.path().join("registry.redb"),
            crate::record::RecordSealer::derive(&[5; 32]),
        )
        .unwrap();
        registry.add(device("held")).unwrap();
        registry.add(device("fine")).unwrap();
        let record = |state, reason: &str| Record {
            state,
            since_unix: now_unix() - 30,
            history: VecDeque::from([HistoryEntry {
                at_unix: now_unix() - 30,
                from: State::Normal,
                to: state,
                reason: reason.into(),
            }]),
        };
        registry
            .put_behaviour_records(&[
                ("held".into(), record(State::Quarantined, "flood")),
                ("fine".into(), record(State::Normal, "clean for 60 s")),
                ("gone".into(), record(State::Quarantined, "clone")),
            ])
            .unwrap();
        let (b, _rx) = Behaviours::load(&registry, policies()).unwrap();
        let held = PrincipalId::parse("held").unwrap();
        let (_, tracked) = b.get(&held).expect("tracked");
        assert_eq!(tracked.state(), State::Quarantined);
        assert_eq!(b.records(false).len(), 1, "only the one not normal");
        assert_eq!(
            b.records(true).len(),
            2,
            "the removed device's record is left out"
        );
        assert_eq!(b.record(&held).unwrap().history[0].reason, "flood");
    }

    #[test]
    fn a_transition_reaches_the_state_and_the_change_channel() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(
            &dir.path().join("registry.redb"),
            crate::record::RecordSealer::derive(&[5; 32]),
        )
        .unwrap();
        let (b, mut rx) = Behaviours::load(&registry, policies()).unwrap();
        let (id, group) = (
            PrincipalId::parse("d1").unwrap(),
            GroupName::parse("default").unwrap(),
        );
        let tracked = b.track(&id, &group);
        let policy = b.policy(&group);
        assert_eq!(
            tracked.observe(Observation::Clone, Instant::now(), &policy),
            Some(State::Quarantined)
        );
        assert_eq!(tracked.state(), State::Quarantined);
        let change = rx.try_recv().expect("a change");
        assert_eq!(change.transition.to, State::Quarantined);
        let record = b.note(&change).expect("noted");
        assert_eq!(record.history.len(), 1);
        assert_eq!(b.release(&id, &group, "operator"), Some(State::Released));
        assert_eq!(
            b.release(&id, &group, "operator"),
            None,
            "not held any more"
        );
        // A removed device's late change is not written back.
        b.forget(&id);
        let late = rx.try_recv().expect("the release");
        assert_eq!(b.note(&late), None);
    }

    #[test]
    fn time_passing_ends_probation_through_the_change_channel() {
        let (b, mut rx) = Behaviours::new(policies());
        let (id, group) = (
            PrincipalId::parse("d1").unwrap(),
            GroupName::parse("default").unwrap(),
        );
        let t0 = Instant::now();
        let tracked = b.restore(&id, &group, State::Probation, t0, t0);
        let policy = b.policy(&group);
        let clear = policy.settings.probation_clear;
        assert_eq!(tracked.tick(t0 + clear / 2, &policy), None);
        assert_eq!(tracked.tick(t0 + clear, &policy), Some(State::Normal));
        assert_eq!(tracked.state(), State::Normal);
        let change = rx.try_recv().expect("a change");
        assert_eq!(
            (change.transition.from, change.transition.to),
            (State::Probation, State::Normal)
        );
        assert!(change.transition.reason.starts_with("clean for"));
        // A group with the model off: time changes nothing.
        let tracked = b.restore(&id, &group, State::Probation, t0, t0);
        let off = Policy {
            enabled: false,
            ..(*policy).clone()
        };
        assert_eq!(tracked.tick(t0 + clear, &off), None);
        assert_eq!(tracked.state(), State::Probation);
    }

    #[test]
    fn a_fixed_hasher_hashes_alike_in_every_table_and_a_gateways_does_not() {
        let topic = "devices/d1/telemetry";
        let fixed = || Behaviours::with_fixed_hasher(policies()).0.hash(topic);
        assert_eq!(fixed(), fixed());
        let random = || Behaviours::new(policies()).0.hash(topic);
        assert_ne!(random(), random());
    }

    #[test]
    fn a_group_with_the_model_off_is_not_observed() {
        let mut config = Config::default();
        config.behaviour.enabled = false;
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(
            &dir.path().join("registry.redb"),
            crate::record::RecordSealer::derive(&[5; 32]),
        )
        .unwrap();
        let (b, _rx) = Behaviours::load(&registry, Policies::from_config(&config)).unwrap();
        let (id, group) = (
            PrincipalId::parse("d1").unwrap(),
            GroupName::parse("default").unwrap(),
        );
        let policy = b.policy(&group);
        let tracked = b.track(&id, &group);
        assert_eq!(
            tracked.observe(Observation::Clone, Instant::now(), &policy),
            None
        );
        assert_eq!(tracked.state(), State::Normal);
    }
}
