//! Access control lists: what a principal may publish and subscribe to.
//!
//! A group's ACL is a template (`devices/{id}/#`); a session expands it once at
//! CONNECT for its own id and group, so checking a message is a scan of a few
//! pre-parsed filters with no lookup and no lock. Everything not allowed is denied.
//! Two rules hold whatever the configuration says: nobody but the gateway publishes
//! under `portcullis/`, and a device never publishes to its own `commands` subtree.

use crate::principal::{GroupName, PrincipalId, PrincipalKind};
use crate::topic::{TopicError, TopicFilter, TopicName};

/// The unexpanded rules of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclTemplate {
    kind: PrincipalKind,
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// The rules of one principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    publish: Vec<TopicFilter>,
    subscribe: Vec<TopicFilter>,
    deny_publish: Vec<TopicFilter>,
}

impl AclTemplate {
    pub fn new(kind: PrincipalKind, publish: &[String], subscribe: &[String]) -> Self {
        AclTemplate {
            kind,
            publish: publish.to_vec(),
            subscribe: subscribe.to_vec(),
        }
    }

    /// Substitute `{id}` and `{group}`. Ids and group names are `[A-Za-z0-9._-]`, so
    /// the result cannot gain a level or a wildcard.
    pub fn expand(&self, id: &PrincipalId, group: &GroupName) -> Result<Acl, TopicError> {
        let expand = |pattern: &str| {
            let text = pattern
                .replace("{id}", id.as_str())
                .replace("{group}", group.as_str());
            TopicFilter::parse_unlimited(&text)
        };
        let publish = self
            .publish
            .iter()
            .map(|p| expand(p))
            .collect::<Result<_, _>>()?;
        let subscribe = self
            .subscribe
            .iter()
            .map(|p| expand(p))
            .collect::<Result<_, _>>()?;
        // The gateway's own namespace, one filter shared by every principal's rules.
        static GATEWAY: std::sync::LazyLock<TopicFilter> = std::sync::LazyLock::new(|| {
            TopicFilter::parse_unlimited("portcullis/#").expect("a valid filter")
        });
        let mut deny_publish = Vec::with_capacity(2);
        deny_publish.push(GATEWAY.clone());
        if self.kind == PrincipalKind::Device {
            deny_publish.push(expand("devices/{id}/commands/#")?);
        }
        Ok(Acl {
            publish,
            subscribe,
            deny_publish,
        })
    }
}

impl Acl {
    pub fn may_publish(&self, topic: &TopicName) -> bool {
        self.publish.iter().any(|f| f.matches(topic))
            && !self.deny_publish.iter().any(|f| f.matches(topic))
    }

    /// A filter is allowed only when an allowed filter covers all of it.
    pub fn may_subscribe(&self, filter: &TopicFilter) -> bool {
        self.subscribe.iter().any(|allowed| allowed.covers(filter))
    }

    /// May a message on this topic be delivered to the principal?
    pub fn may_receive(&self, topic: &TopicName) -> bool {
        self.subscribe.iter().any(|f| f.matches(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicLimits;

    const L: TopicLimits = TopicLimits {
        max_length: 256,
        max_depth: 16,
    };

    fn device_acl(id: &str) -> Acl {
        AclTemplate::new(
            PrincipalKind::Device,
            &["devices/{id}/#".to_string()],
            &["devices/{id}/commands/#".to_string()],
        )
        .expand(
            &PrincipalId::parse(id).unwrap(),
            &GroupName::parse("default").unwrap(),
        )
        .unwrap()
    }

    fn t(s: &str) -> TopicName {
        TopicName::parse(s, L).unwrap()
    }
    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s, L).unwrap()
    }

    #[test]
    fn device_publishes_only_under_its_own_namespace() {
        let acl = device_acl("sensor-1");
        assert!(acl.may_publish(&t("devices/sensor-1/telemetry")));
        assert!(acl.may_publish(&t("devices/sensor-1/telemetry/temp")));
        assert!(!acl.may_publish(&t("devices/sensor-2/telemetry")));
        assert!(!acl.may_publish(&t("devices/sensor-10/telemetry")));
        assert!(!acl.may_publish(&t("other/topic")));
    }

    #[test]
    fn device_cannot_publish_to_its_own_commands() {
        let acl = device_acl("sensor-1");
        assert!(!acl.may_publish(&t("devices/sensor-1/commands")));
        assert!(!acl.may_publish(&t("devices/sensor-1/commands/reboot")));
    }

    #[test]
    fn device_subscribes_only_to_its_commands() {
        let acl = device_acl("sensor-1");
        assert!(acl.may_subscribe(&f("devices/sensor-1/commands/#")));
        assert!(acl.may_subscribe(&f("devices/sensor-1/commands/reboot")));
        assert!(!acl.may_subscribe(&f("devices/sensor-2/commands/#")));
        assert!(!acl.may_subscribe(&f("devices/+/commands/#")));
        assert!(!acl.may_subscribe(&f("devices/sensor-1/#")));
        assert!(!acl.may_subscribe(&f("#")));
    }

    #[test]
    fn nobody_publishes_gateway_events() {
        let acl = AclTemplate::new(PrincipalKind::Service, &["#".to_string()], &[])
            .expand(
                &PrincipalId::parse("ops").unwrap(),
                &GroupName::parse("admins").unwrap(),
            )
            .unwrap();
        assert!(acl.may_publish(&t("devices/x/commands/y")));
        assert!(!acl.may_publish(&t("portcullis/events/quarantine/x")));
    }

    #[test]
    fn group_placeholder_expands() {
        let acl = AclTemplate::new(
            PrincipalKind::Service,
            &["groups/{group}/{id}/+".to_string()],
            &[],
        )
        .expand(
            &PrincipalId::parse("svc").unwrap(),
            &GroupName::parse("ops").unwrap(),
        )
        .unwrap();
        assert!(acl.may_publish(&t("groups/ops/svc/x")));
        assert!(!acl.may_publish(&t("groups/other/svc/x")));
    }
}
