//! The pipeline: every message, from every protocol and in both directions, gets a
//! verdict here before it moves.
//!
//! Data in, verdict out; no I/O, no lock. Adapters translate their protocol into a
//! `Message`, ask for a verdict, and act on it (forward, or answer the peer with the
//! protocol's refusal). Stages run cheapest first; each refusal names its stage and
//! reason so that audit lines and metrics can tell them apart. Later stages (rate
//! limits, validation, quarantine) slot in here.

use crate::acl::Acl;
use crate::principal::PrincipalRef;
use crate::topic::{TopicFilter, TopicName};
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A message as the core sees it: no protocol framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Request/response and application metadata, carried end to end where the
    /// protocols on both sides can (MQTT 5); `None` for most messages.
    pub properties: Option<Arc<Properties>>,
}

impl Message {
    /// The bytes it holds: topic, payload and properties (what bounded queues and
    /// stores count).
    pub fn size(&self) -> usize {
        let props = self.properties.as_deref().map_or(0, |p| {
            p.content_type.as_ref().map_or(0, String::len)
                + p.response_topic.as_ref().map_or(0, |t| t.as_str().len())
                + p.correlation_data.as_ref().map_or(0, |c| c.len())
                + p.user_properties
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        });
        self.topic.as_str().len() + self.payload.len() + props
    }
}

/// Message metadata (MQTT 5 publish properties, protocol-neutral).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    pub payload_format_utf8: Option<bool>,
    pub message_expiry_secs: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// Which way a message travels relative to the session asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the session's principal (device → services, or a service's publish).
    FromPeer,
    /// To be delivered to the session's principal (commands → device, telemetry → service).
    ToPeer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Authorize,
    Limit,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Authorize => "authorize",
            Stage::Limit => "limits",
        }
    }
}

/// Why a stage refused: a stable label for metrics and the words for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub stage: Stage,
    pub reason: &'static str,
    pub detail: &'static str,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage.as_str(), self.detail)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(Refusal),
}

/// What the pipeline knows about a session: fixed at CONNECT.
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    pub principal: PrincipalRef,
    pub acl: Arc<Acl>,
}

pub const NOT_ALLOWED_TO_PUBLISH: Refusal = Refusal {
    stage: Stage::Authorize,
    reason: "topic_not_allowed",
    detail: "topic not allowed by ACL",
};
pub const NOT_ALLOWED_TO_RECEIVE: Refusal = Refusal {
    stage: Stage::Authorize,
    reason: "receive_not_allowed",
    detail: "principal may not receive this topic",
};
pub const NOT_ALLOWED_TO_SUBSCRIBE: Refusal = Refusal {
    stage: Stage::Authorize,
    reason: "filter_not_allowed",
    detail: "filter not allowed by ACL",
};
pub const RATE_LIMITED: Refusal = Refusal {
    stage: Stage::Limit,
    reason: "rate_limited",
    detail: "over the message or byte rate",
};
pub const RESPONSE_TOPIC_NOT_ALLOWED: Refusal = Refusal {
    stage: Stage::Authorize,
    reason: "response_topic_not_allowed",
    detail: "response topic not allowed by ACL",
};

/// Verdict for a message in either direction.
pub fn admit(session: &SessionPolicy, msg: &Message, direction: Direction) -> Verdict {
    let allowed = match direction {
        Direction::FromPeer => session.acl.may_publish(&msg.topic),
        Direction::ToPeer => session.acl.may_receive(&msg.topic),
    };
    if allowed {
        Verdict::Accept
    } else {
        Verdict::Refuse(match direction {
            Direction::FromPeer => NOT_ALLOWED_TO_PUBLISH,
            Direction::ToPeer => NOT_ALLOWED_TO_RECEIVE,
        })
    }
}

/// Verdict for a subscription filter.
pub fn admit_subscription(session: &SessionPolicy, filter: &TopicFilter) -> Verdict {
    if session.acl.may_subscribe(filter) {
        Verdict::Accept
    } else {
        Verdict::Refuse(NOT_ALLOWED_TO_SUBSCRIBE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::AclTemplate;
    use crate::principal::{GroupName, PrincipalId, PrincipalKind};
    use crate::topic::TopicLimits;

    const L: TopicLimits = TopicLimits {
        max_length: 256,
        max_depth: 16,
    };

    fn session(kind: PrincipalKind, publish: &str, subscribe: &str) -> SessionPolicy {
        let id = PrincipalId::parse("sensor-1").unwrap();
        let group = GroupName::parse("default").unwrap();
        let acl = AclTemplate::new(kind, &[publish.to_string()], &[subscribe.to_string()])
            .expand(&id, &group)
            .unwrap();
        SessionPolicy {
            principal: PrincipalRef { kind, id, group },
            acl: Arc::new(acl),
        }
    }

    fn msg(topic: &str) -> Message {
        Message {
            topic: TopicName::parse(topic, L).unwrap(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        }
    }

    #[test]
    fn device_telemetry_is_accepted_and_foreign_topic_refused_by_authorize() {
        let s = session(
            PrincipalKind::Device,
            "devices/{id}/#",
            "devices/{id}/commands/#",
        );
        assert_eq!(
            admit(&s, &msg("devices/sensor-1/telemetry"), Direction::FromPeer),
            Verdict::Accept
        );
        assert_eq!(
            admit(&s, &msg("devices/sensor-2/telemetry"), Direction::FromPeer),
            Verdict::Refuse(NOT_ALLOWED_TO_PUBLISH)
        );
    }

    #[test]
    fn downlink_passes_the_same_pipeline() {
        let s = session(
            PrincipalKind::Device,
            "devices/{id}/#",
            "devices/{id}/commands/#",
        );
        assert_eq!(
            admit(
                &s,
                &msg("devices/sensor-1/commands/reboot"),
                Direction::ToPeer
            ),
            Verdict::Accept
        );
        assert!(matches!(
            admit(
                &s,
                &msg("devices/sensor-2/commands/reboot"),
                Direction::ToPeer
            ),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn subscription_outside_acl_is_refused() {
        let s = session(
            PrincipalKind::Service,
            "devices/+/commands/#",
            "devices/+/telemetry/#",
        );
        let ok = TopicFilter::parse("devices/+/telemetry/#", L).unwrap();
        let bad = TopicFilter::parse("devices/#", L).unwrap();
        assert_eq!(admit_subscription(&s, &ok), Verdict::Accept);
        assert!(matches!(admit_subscription(&s, &bad), Verdict::Refuse(_)));
    }
}
