//! A message as the core sees it: a topic, a payload, its QoS, retain flag and
//! metadata, with no protocol framing. Adapters build one from what their protocol
//! carries; every stage, store and forwarder works on this type.

use crate::topic::TopicName;
use bytes::Bytes;
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
