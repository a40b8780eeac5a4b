//! A subscription as a session holds it: the filter, an optional share name, and the
//! MQTT 5 subscription options, parsed once from what the peer sent.
//!
//! `$share/{name}/{filter}` names a shared subscription: every member of the share
//! gets its own subset of the matching messages (one member per message), which is
//! how the replicas of a cluster service split the telemetry between them.

use crate::message::QoS;
use crate::topic::{TopicError, TopicFilter, TopicLimits};
use std::fmt;
use std::sync::Arc;

/// MQTT 5 Retain Handling: when the retained messages a filter matches are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// At every SUBSCRIBE (0, and MQTT 3.1.1's only behaviour).
    #[default]
    OnSubscribe,
    /// Only when the subscription did not exist before (1).
    OnNewSubscription,
    /// Never (2).
    Never,
}

impl RetainHandling {
    pub fn from_u8(v: u8) -> Option<RetainHandling> {
        match v {
            0 => Some(RetainHandling::OnSubscribe),
            1 => Some(RetainHandling::OnNewSubscription),
            2 => Some(RetainHandling::Never),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Highest QoS the subscriber takes; a message is delivered at the lower of this
    /// and its own.
    pub qos: QoS,
    /// Never deliver the subscriber's own publishes back to it.
    pub no_local: bool,
    /// Keep the retain flag a message was published with (otherwise it is cleared on
    /// live delivery, and set only on retained messages sent at subscribe time).
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
    /// MQTT 5 Subscription Identifier, echoed on every message this subscription
    /// delivers.
    pub identifier: Option<u32>,
}

impl SubscriptionOptions {
    /// Plain options at a QoS (MQTT 3.1.1, and an MQTT 5 SUBSCRIBE with defaults).
    pub fn qos(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::OnSubscribe,
            identifier: None,
        }
    }
}

/// The name of a shared subscription's share (`$share/{name}/…`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShareName(Arc<str>);

impl ShareName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ShareName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error("{0}")]
    Filter(#[from] TopicError),
    #[error("a shared subscription needs a share name and a filter ($share/NAME/FILTER)")]
    ShareMalformed,
    #[error("a share name must not contain '+', '#' or '/'")]
    ShareNameInvalid,
}

/// What a SUBSCRIBE or UNSUBSCRIBE names: a filter, shared or not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriptionKey {
    pub share: Option<ShareName>,
    pub filter: TopicFilter,
}

impl SubscriptionKey {
    /// A plain filter, or `$share/NAME/FILTER` when `shared` allows it (services).
    /// Without `shared`, a `$share/…` filter is refused like any other `$` filter.
    pub fn parse(
        raw: &str,
        limits: TopicLimits,
        shared: bool,
    ) -> Result<SubscriptionKey, SubscriptionError> {
        let Some(rest) = raw.strip_prefix("$share/").filter(|_| shared) else {
            return Ok(SubscriptionKey {
                share: None,
                filter: TopicFilter::parse(raw, limits)?,
            });
        };
        let (name, filter) = rest
            .split_once('/')
            .ok_or(SubscriptionError::ShareMalformed)?;
        if name.is_empty() || filter.is_empty() {
            return Err(SubscriptionError::ShareMalformed);
        }
        if name.contains(['+', '#']) {
            return Err(SubscriptionError::ShareNameInvalid);
        }
        Ok(SubscriptionKey {
            share: Some(ShareName(Arc::from(name))),
            filter: TopicFilter::parse(filter, limits)?,
        })
    }
}

impl fmt::Display for SubscriptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.share {
            Some(name) => write!(f, "$share/{}/{}", name.as_str(), self.filter),
            None => write!(f, "{}", self.filter),
        }
    }
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub key: SubscriptionKey,
    pub options: SubscriptionOptions,
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: TopicLimits = TopicLimits {
        max_length: 128,
        max_depth: 8,
    };

    #[test]
    fn a_shared_filter_names_its_share_and_filter() {
        let k = SubscriptionKey::parse("$share/workers/devices/+/telemetry", L, true).unwrap();
        assert_eq!(k.share.as_ref().unwrap().as_str(), "workers");
        assert_eq!(k.filter.as_str(), "devices/+/telemetry");
        assert_eq!(k.to_string(), "$share/workers/devices/+/telemetry");
    }

    #[test]
    fn a_shared_filter_where_shares_are_not_allowed_is_refused_as_reserved() {
        assert_eq!(
            SubscriptionKey::parse("$share/workers/a", L, false),
            Err(SubscriptionError::Filter(TopicError::Reserved))
        );
    }

    #[test]
    fn malformed_shares_are_refused_with_the_reason() {
        for (raw, want) in [
            ("$share/workers", SubscriptionError::ShareMalformed),
            ("$share//a", SubscriptionError::ShareMalformed),
            ("$share/w/", SubscriptionError::ShareMalformed),
            ("$share/w+/a", SubscriptionError::ShareNameInvalid),
            ("$share/#/a", SubscriptionError::ShareNameInvalid),
            (
                "$share/w/a/#/b",
                SubscriptionError::Filter(TopicError::MisplacedHash),
            ),
        ] {
            assert_eq!(SubscriptionKey::parse(raw, L, true), Err(want), "{raw}");
        }
    }

    #[test]
    fn retain_handling_three_is_not_a_value() {
        assert_eq!(
            RetainHandling::from_u8(1),
            Some(RetainHandling::OnNewSubscription)
        );
        assert_eq!(RetainHandling::from_u8(3), None);
    }
}
