//! What a line of the audit log says: an [`AuditEntry`] from a session, the fields
//! only the log's own lines carry, and the JSON body the chain seals, in the order
//! it is written.

use serde::Serialize;

/// Unix time in milliseconds: the `time_ms` of every line.
pub(super) use crate::registry::now_unix_ms as now_ms;

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// What happened: `connect`, `publish`, `subscribe`, `registry`, `handshake`, ...
    pub event: &'static str,
    /// `allow` or `refuse`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditEntry {
    pub fn new(event: &'static str, decision: &'static str) -> Self {
        AuditEntry {
            time_ms: now_ms(),
            event,
            decision,
            principal: None,
            kind: None,
            source: None,
            protocol: None,
            topic: None,
            reason: None,
        }
    }
    pub fn principal(mut self, kind: &'static str, id: impl Into<String>) -> Self {
        self.kind = Some(kind);
        self.principal = Some(id.into());
        self
    }
    pub fn source(mut self, source: impl ToString) -> Self {
        self.source = Some(source.to_string());
        self
    }
    pub fn protocol(mut self, protocol: &'static str) -> Self {
        self.protocol = Some(protocol);
        self
    }
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// One of the log's own lines (checkpoint, recovery, drops, aggregates).
    pub(super) fn own(event: &'static str, decision: &'static str, time_ms: u64) -> Self {
        AuditEntry {
            time_ms,
            ..AuditEntry::new(event, decision)
        }
    }
}

/// Fields only the log's own lines carry.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub(super) struct Extra {
    /// The event an `aggregate` line counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) of: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) repeated: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) first_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) last_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) dropped: Option<u64>,
}

/// A line without its MAC, in the order it is written.
#[derive(Serialize)]
pub(super) struct Body<'a> {
    pub(super) seq: u64,
    #[serde(flatten)]
    pub(super) entry: &'a AuditEntry,
    #[serde(flatten)]
    pub(super) extra: &'a Extra,
    pub(super) prev: String,
}
