//! Retained commands: the last retained message per command topic of each device,
//! delivered when the device subscribes ("desired state").
//!
//! The gateway owns device sessions, so it owns their retained commands too (the
//! broker cannot know when a device subscribes through the gateway). Bounded per
//! device; an empty retained payload clears the topic. Touched only by retained
//! publishes and by subscriptions, never by ordinary traffic.

use crate::message::Message;
use crate::principal::PrincipalId;
use crate::session_file::{Journal, Loaded, Snapshot, Source, Table};
use crate::topic::{TopicFilter, TopicName};
use crate::wire::{self, Reader, WireError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

/// Version of the stored form of a device's retained commands.
const RECORD_V1: u8 = 1;

/// Why a device's retained telemetry was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainedFull {
    #[error(
        "the device already holds retained messages on {0} topics (sessions.max_retained_per_device)"
    )]
    Topics(usize),
    #[error(
        "retained messages of the device would take {0} bytes, over {1} (sessions.max_retained_telemetry_bytes_per_device)"
    )]
    Bytes(usize, usize),
}

/// Why a retained command was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainedRefused {
    #[error("the device already has {0} retained commands (sessions.max_retained_per_device)")]
    Count(usize),
    #[error(
        "retained commands of the device would take {0} bytes, over {1} (sessions.max_retained_command_bytes_per_device)"
    )]
    DeviceBytes(usize, usize),
    #[error(
        "retained commands of all devices would take {0} bytes, over {1} (sessions.max_retained_command_bytes)"
    )]
    TotalBytes(usize, usize),
}

impl RetainedRefused {
    /// Stable metric label.
    pub fn label(self) -> &'static str {
        match self {
            RetainedRefused::Count(_) => "retained_limit",
            RetainedRefused::DeviceBytes(..) => "retained_device_bytes",
            RetainedRefused::TotalBytes(..) => "retained_total_bytes",
        }
    }
}

#[derive(Debug, Default)]
struct DeviceCommands {
    topics: BTreeMap<TopicName, Message>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Store {
    devices: HashMap<PrincipalId, DeviceCommands>,
    bytes: usize,
}

/// What one retained command costs: its topic and payload.
fn size(m: &Message) -> usize {
    m.topic.as_str().len() + m.payload.len()
}

#[derive(Debug)]
pub struct RetainedCommands {
    max_per_device: usize,
    max_bytes_per_device: usize,
    max_bytes: usize,
    inner: Mutex<Store>,
    /// Topics each device holds a retained message on in the broker (telemetry), with
    /// the size of each, and the bytes they take in all.
    device_topics: Mutex<HashMap<PrincipalId, DeviceTelemetry>>,
    max_telemetry_bytes_per_device: usize,
    /// Where retained commands are kept on disk, if they are.
    journal: OnceLock<Arc<Journal>>,
}

#[derive(Debug, Default)]
struct DeviceTelemetry {
    topics: HashMap<TopicName, usize>,
    bytes: usize,
}

impl RetainedCommands {
    /// At most `max_per_device` retained commands per device, with no byte limit until
    /// `with_byte_limits`.
    pub fn new(max_per_device: usize) -> Self {
        RetainedCommands {
            max_per_device,
            max_bytes_per_device: usize::MAX,
            max_bytes: usize::MAX,
            inner: Mutex::new(Store::default()),
            device_topics: Mutex::new(HashMap::new()),
            max_telemetry_bytes_per_device: usize::MAX,
            journal: OnceLock::new(),
        }
    }

    /// Keep retained commands on disk through `journal` from now on.
    pub fn keep_in(self: &Arc<Self>, journal: Arc<Journal>) {
        let source: Arc<dyn Source> = self.clone();
        journal.set_source(Table::Retained, Arc::downgrade(&source));
        let _ = self.journal.set(journal);
    }

    fn changed(&self, device: &PrincipalId) {
        if let Some(j) = self.journal.get() {
            j.mark(Table::Retained, device.as_str());
        }
    }

    /// Put kept retained commands back (within the limits), for devices `registered`
    /// says are still registered. Returns how many devices' records were dropped
    /// (damaged, or of a device removed while the gateway was down).
    pub fn restore(&self, records: Vec<Loaded>, registered: impl Fn(&PrincipalId) -> bool) -> u64 {
        let mut dropped = 0;
        for (key, value) in records {
            let messages = match (PrincipalId::parse(&key), value) {
                (Ok(id), _) if !registered(&id) => Err("the device is no longer registered".into()),
                (Ok(id), Ok(bytes)) => decode(&bytes).map(|m| (id, m)).map_err(|e| e.to_string()),
                (Err(e), _) => Err(e.to_string()),
                (_, Err(e)) => Err(e),
            };
            match messages {
                Ok((id, messages)) => {
                    for m in messages {
                        if let Err(e) = self.set(&id, m) {
                            tracing::warn!(device = %id, error = %e, "kept retained command dropped");
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(device = %key, reason = %why, "kept retained commands dropped");
                    if let Some(j) = self.journal.get() {
                        j.forget(Table::Retained, &key);
                    }
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// Cap the bytes kept for one device and for all of them.
    pub fn with_byte_limits(mut self, per_device: usize, total: usize) -> Self {
        self.max_bytes_per_device = per_device;
        self.max_bytes = total;
        self
    }

    /// Cap the bytes (topic and payload) of the retained telemetry one device holds in
    /// the broker, so one device cannot fill the gateway-wide retained store.
    pub fn with_telemetry_bytes_per_device(mut self, per_device: usize) -> Self {
        self.max_telemetry_bytes_per_device = per_device;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record (or, with an empty payload, clear) the retained command on a topic.
    pub fn set(&self, device: &PrincipalId, message: Message) -> Result<(), RetainedRefused> {
        let mut guard = self.lock();
        let store = &mut *guard;
        if message.payload.is_empty() {
            if let Some(d) = store.devices.get_mut(device) {
                if let Some(old) = d.topics.remove(&message.topic) {
                    d.bytes -= size(&old);
                    store.bytes -= size(&old);
                }
                if d.topics.is_empty() {
                    store.devices.remove(device);
                }
            }
            drop(guard);
            self.changed(device);
            return Ok(());
        }
        let (count, held, replaced) = match store.devices.get(device) {
            Some(d) => (
                d.topics.len(),
                d.bytes,
                d.topics.get(&message.topic).map(size),
            ),
            None => (0, 0, None),
        };
        if replaced.is_none() && count >= self.max_per_device {
            return Err(RetainedRefused::Count(self.max_per_device));
        }
        let replaced = replaced.unwrap_or(0);
        let device_bytes = held - replaced + size(&message);
        if device_bytes > self.max_bytes_per_device {
            return Err(RetainedRefused::DeviceBytes(
                device_bytes,
                self.max_bytes_per_device,
            ));
        }
        let total = store.bytes - replaced + size(&message);
        if total > self.max_bytes {
            return Err(RetainedRefused::TotalBytes(total, self.max_bytes));
        }
        let d = store.devices.entry(device.clone()).or_default();
        d.bytes = device_bytes;
        store.bytes = total;
        d.topics.insert(message.topic.clone(), message);
        drop(guard);
        self.changed(device);
        Ok(())
    }

    /// Bytes of retained commands held for all devices.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Retained commands of a device that a new subscription matches, in topic order.
    pub fn matching(&self, device: &PrincipalId, filter: &TopicFilter) -> Vec<Message> {
        self.lock()
            .devices
            .get(device)
            .map(|d| {
                d.topics
                    .values()
                    .filter(|d| filter.matches(&d.topic))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Account for a retained message a device publishes (an empty one clears its
    /// topic). Refused beyond the per-device caps of distinct retained topics and of
    /// their bytes (topic and payload).
    pub fn note_device_retained(
        &self,
        device: &PrincipalId,
        message: &Message,
    ) -> Result<(), RetainedFull> {
        let topic = &message.topic;
        let mut all = self.device_topics.lock().unwrap_or_else(|p| p.into_inner());
        if message.payload.is_empty() {
            if let Some(held) = all.get_mut(device) {
                if let Some(old) = held.topics.remove(topic) {
                    held.bytes -= old;
                }
                if held.topics.is_empty() {
                    all.remove(device);
                }
            }
            return Ok(());
        }
        let held = all.entry(device.clone()).or_default();
        let replaced = held.topics.get(topic).copied();
        if replaced.is_none() && held.topics.len() >= self.max_per_device {
            return Err(RetainedFull::Topics(self.max_per_device));
        }
        let bytes = held.bytes - replaced.unwrap_or(0) + size(message);
        if bytes > self.max_telemetry_bytes_per_device {
            if held.topics.is_empty() {
                all.remove(device);
            }
            return Err(RetainedFull::Bytes(
                bytes,
                self.max_telemetry_bytes_per_device,
            ));
        }
        held.topics.insert(topic.clone(), size(message));
        held.bytes = bytes;
        Ok(())
    }

    /// The topics a device holds retained messages on in the broker, forgotten here:
    /// the caller clears them (a quarantined device's retained messages are purged).
    pub fn take_device_retained(&self, device: &PrincipalId) -> Vec<TopicName> {
        let mut all = self.device_topics.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(device)
            .map(|t| t.topics.into_keys().collect())
            .unwrap_or_default()
    }

    /// Forget every retained command of a device.
    pub fn purge(&self, device: &PrincipalId) -> usize {
        let mut store = self.lock();
        let Some(d) = store.devices.remove(device) else {
            return 0;
        };
        store.bytes -= d.bytes;
        drop(store);
        self.changed(device);
        d.topics.len()
    }
}

impl Source for RetainedCommands {
    fn snapshot(&self, key: &str) -> Snapshot {
        let Ok(id) = PrincipalId::parse(key) else {
            return Snapshot::Delete;
        };
        let store = self.lock();
        let Some(d) = store.devices.get(&id) else {
            return Snapshot::Delete;
        };
        let mut out = vec![RECORD_V1];
        out.extend_from_slice(&(d.topics.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        for m in d.topics.values().take(usize::from(u16::MAX)) {
            wire::put_message(m, &mut out);
        }
        Snapshot::Write(out)
    }
}

fn decode(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    let mut r = Reader(bytes);
    let version = r.u8("version")?;
    if version != RECORD_V1 {
        return Err(WireError::Version(version));
    }
    let n = r.u16("count")?;
    let mut out = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        out.push(wire::message(&mut r)?);
    }
    if !r.is_empty() {
        return Err(WireError::Invalid("retained commands: bytes after the end"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;
    use crate::topic::TopicLimits;
    use bytes::Bytes;

    const L: TopicLimits = TopicLimits {
        max_length: 128,
        max_depth: 8,
    };

    fn cmd(topic: &str, payload: &'static str) -> Message {
        Message {
            topic: TopicName::parse(topic, L).unwrap(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: None,
        }
    }

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    #[test]
    fn latest_retained_command_per_topic_is_delivered_on_subscribe() {
        let r = RetainedCommands::new(4);
        r.set(&id("a"), cmd("devices/a/commands/mode", "eco"))
            .unwrap();
        r.set(&id("a"), cmd("devices/a/commands/mode", "boost"))
            .unwrap();
        r.set(&id("a"), cmd("devices/a/commands/fw", "1.2"))
            .unwrap();
        let all = r.matching(
            &id("a"),
            &TopicFilter::parse("devices/a/commands/#", L).unwrap(),
        );
        let got: Vec<_> = all
            .iter()
            .map(|d| (d.topic.as_str(), &d.payload[..]))
            .collect();
        assert_eq!(
            got,
            vec![
                ("devices/a/commands/fw", &b"1.2"[..]),
                ("devices/a/commands/mode", &b"boost"[..])
            ]
        );
        assert!(
            r.matching(
                &id("b"),
                &TopicFilter::parse("devices/a/commands/#", L).unwrap()
            )
            .is_empty()
        );
    }

    #[test]
    fn empty_payload_clears_the_topic() {
        let r = RetainedCommands::new(4);
        r.set(&id("a"), cmd("devices/a/commands/mode", "eco"))
            .unwrap();
        r.set(&id("a"), cmd("devices/a/commands/mode", "")).unwrap();
        assert!(
            r.matching(&id("a"), &TopicFilter::parse("#", L).unwrap())
                .is_empty()
        );
    }

    #[test]
    fn distinct_retained_topics_of_a_device_are_capped_and_clearing_frees_one() {
        let r = RetainedCommands::new(1);
        let m1 = cmd("devices/a/state", "on");
        let m2 = cmd("devices/a/config", "x");
        r.note_device_retained(&id("a"), &m1).unwrap();
        r.note_device_retained(&id("a"), &m1).unwrap();
        assert_eq!(
            r.note_device_retained(&id("a"), &m2),
            Err(RetainedFull::Topics(1))
        );
        assert!(
            r.note_device_retained(&id("b"), &cmd("devices/b/config", "x"))
                .is_ok()
        );
        r.note_device_retained(&id("a"), &cmd("devices/a/state", ""))
            .unwrap();
        r.note_device_retained(&id("a"), &m2).unwrap();
    }

    #[test]
    fn retained_telemetry_bytes_of_a_device_are_capped_and_replacing_counts_once() {
        // "devices/a/t1" + 8 bytes = 20 bytes each; 50 allowed.
        let r = RetainedCommands::new(10).with_telemetry_bytes_per_device(50);
        r.note_device_retained(&id("a"), &cmd("devices/a/t1", "12345678"))
            .unwrap();
        r.note_device_retained(&id("a"), &cmd("devices/a/t2", "12345678"))
            .unwrap();
        assert_eq!(
            r.note_device_retained(&id("a"), &cmd("devices/a/t3", "12345678")),
            Err(RetainedFull::Bytes(60, 50))
        );
        // Replacing a topic's message counts its new size only.
        r.note_device_retained(&id("a"), &cmd("devices/a/t2", "1234567890"))
            .unwrap();
        // Another device has its own allowance; clearing gives bytes back.
        r.note_device_retained(&id("b"), &cmd("devices/b/t1", "12345678"))
            .unwrap();
        r.note_device_retained(&id("a"), &cmd("devices/a/t1", ""))
            .unwrap();
        r.note_device_retained(&id("a"), &cmd("devices/a/t3", "12345678"))
            .unwrap();
    }

    #[test]
    fn retained_commands_per_device_are_capped() {
        let r = RetainedCommands::new(2);
        r.set(&id("a"), cmd("devices/a/commands/1", "x")).unwrap();
        r.set(&id("a"), cmd("devices/a/commands/2", "x")).unwrap();
        assert_eq!(
            r.set(&id("a"), cmd("devices/a/commands/3", "x")),
            Err(RetainedRefused::Count(2))
        );
        // Replacing an existing topic is always fine.
        r.set(&id("a"), cmd("devices/a/commands/2", "y")).unwrap();
        assert_eq!(r.purge(&id("a")), 2);
    }

    #[test]
    fn retained_command_bytes_are_capped_per_device_and_in_total() {
        // "devices/a/commands/1" is 20 bytes: each command below costs 20 + payload.
        let r = RetainedCommands::new(8).with_byte_limits(60, 100);
        r.set(&id("a"), cmd("devices/a/commands/1", "0123456789"))
            .unwrap();
        assert_eq!(
            r.set(&id("a"), cmd("devices/a/commands/2", "0123456789abcdef")),
            Err(RetainedRefused::DeviceBytes(66, 60))
        );
        // Replacing a command counts only the difference.
        r.set(
            &id("a"),
            cmd("devices/a/commands/1", "0123456789abcdef0123"),
        )
        .unwrap();
        r.set(
            &id("b"),
            cmd("devices/b/commands/1", "0123456789abcdef0123"),
        )
        .unwrap();
        assert_eq!(r.bytes(), 80);
        assert_eq!(
            r.set(&id("c"), cmd("devices/c/commands/1", "x")),
            Err(RetainedRefused::TotalBytes(101, 100))
        );
        // Clearing and purging give the bytes back.
        r.set(&id("a"), cmd("devices/a/commands/1", "")).unwrap();
        assert_eq!(r.bytes(), 40);
        assert_eq!(r.purge(&id("b")), 1);
        assert_eq!(r.bytes(), 0);
        r.set(&id("c"), cmd("devices/c/commands/1", "x")).unwrap();
    }
}
