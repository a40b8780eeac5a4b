//! Why the gateway refused something: one variant per reason, whatever the protocol.
//!
//! Each reason knows its stage, its metric label, the words for the audit line and
//! what the device's behaviour model makes of it. Adapters map a reason to their own
//! answer (an MQTT reason code, a CoAP 4.xx, a serial NAK); nothing matches stage
//! strings at run time. Every reason has its own counter slot, so counting a refusal
//! is one relaxed atomic add, never a lock.

use crate::auth::AuthRefusal;
use crate::behaviour::Observation;
use crate::content::Poison;
use crate::retained::{RetainedFull, RetainedRefused};
use crate::validate::InvalidKind;
use std::fmt;

/// Where in the gateway a refusal was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Before or during authentication (listener gates, credentials, the Will).
    Connect,
    Handshake,
    /// A packet or frame that breaks its protocol.
    Decode,
    Quarantine,
    Authorize,
    /// Rates, quotas and capacity bounds.
    Limit,
    Validate,
    Subscribe,
    Deliver,
}

impl Stage {
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Handshake => "handshake",
            Stage::Decode => "decode",
            Stage::Quarantine => "quarantine",
            Stage::Authorize => "authorize",
            Stage::Limit => "limits",
            Stage::Validate => "validate",
            Stage::Subscribe => "subscribe",
            Stage::Deliver => "deliver",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! refusals {
    ($($(#[$doc:meta])* $variant:ident => $stage:ident, $label:literal, $detail:literal;)*) => {
        /// One reason for a refusal.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Refusal {
            $($(#[$doc])* $variant,)*
        }

        impl Refusal {
            /// Every reason, in slot order.
            pub const ALL: &'static [Refusal] = &[$(Refusal::$variant,)*];
            pub const COUNT: usize = Refusal::ALL.len();

            pub const fn stage(self) -> Stage {
                match self {
                    $(Refusal::$variant => Stage::$stage,)*
                }
            }

            /// The metric label (`reason` of `portcullis_refusals_total`).
            pub const fn label(self) -> &'static str {
                match self {
                    $(Refusal::$variant => $label,)*
                }
            }

            /// The words for an audit line when there is nothing more specific.
            pub const fn detail(self) -> &'static str {
                match self {
                    $(Refusal::$variant => $detail,)*
                }
            }
        }
    };
}

refusals! {
    // Listener gates and authentication.
    Banned => Connect, "banned", "source or identity banned";
    ConnectionLimit => Connect, "connection_limit", "too many connections";
    ConnectionRate => Connect, "connection_rate", "too many new connections per second";
    UnauthenticatedShed => Connect, "unauthenticated_shed", "unauthenticated connection shed for a newer one";
    ConnectTimeout => Connect, "connect_timeout", "no CONNECT within the deadline";
    MalformedConnect => Connect, "malformed_connect", "malformed CONNECT";
    AuthMethodUnsupported => Connect, "auth_method_unsupported", "enhanced authentication is not supported";
    BackedOff => Connect, "backed_off", "too many failed attempts: backed off";
    BadClientId => Connect, "bad_client_id", "client id is not a valid identity";
    UsernameMismatch => Connect, "username_mismatch", "user name differs from the client id";
    CredentialNotRegistered => Connect, "credential_not_registered", "a credential of a kind not registered for this identity";
    UnknownPrincipal => Connect, "unknown_principal", "unknown identity";
    Disabled => Connect, "disabled", "identity disabled";
    NoCredential => Connect, "no_credential", "no credential offered";
    BadSecret => Connect, "bad_secret", "wrong secret";
    SecretNotAllowed => Connect, "secret_not_allowed", "secrets are not allowed for this identity";
    CertificateNotAllowed => Connect, "certificate_not_allowed", "certificates are not allowed for this identity";
    CertificateUntrusted => Connect, "certificate_untrusted", "certificate does not verify";
    CertificateIdentityMismatch => Connect, "certificate_identity_mismatch", "certificate names another identity";
    CertificateNotRegistered => Connect, "certificate_not_registered", "certificate is not the registered one";
    GroupNotConfigured => Connect, "group_not_configured", "the identity's group is not configured";
    RegistryChanged => Connect, "registry_changed", "registry changed during authentication";
    SessionBusy => Connect, "session_busy", "previous session did not end";
    WillTopicInvalid => Connect, "will_topic_invalid", "Will topic is not a valid topic name";
    WillContentInvalid => Connect, "will_content_invalid", "Will carries forbidden content";
    WillNotAuthorized => Connect, "will_not_authorized", "Will topic not allowed by ACL";
    WillPayloadInvalid => Connect, "will_payload_invalid", "Will payload fails validation";
    WillTooManyUserProperties => Connect, "too_many_user_properties", "Will carries too many user properties";
    WillResponseTopicInvalid => Connect, "response_topic_invalid", "Will response topic is not a valid topic name";
    TlsHandshakeFailed => Handshake, "tls_handshake_failed", "TLS handshake failed";
    // PROXY protocol v2 on a device listener (`[proxy_protocol]`).
    ProxyHeaderInvalid => Handshake, "proxy_header_invalid", "malformed PROXY protocol header from a load balancer";
    ProxyHeaderTimeout => Handshake, "proxy_header_timeout", "no whole PROXY protocol header within proxy_protocol.header_timeout";
    ProxyHeaderNotAllowed => Connect, "proxy_header_not_allowed", "PROXY protocol header from a source that is not a listed load balancer";
    /// The HTTP admin API: a request without the right bearer token.
    AdminUnauthorized => Connect, "admin_unauthorized", "admin API request without the right bearer token";
    // Protocol framing.
    MalformedPacket => Decode, "malformed_packet", "malformed packet";
    TopicInvalid => Decode, "topic_invalid", "topic name is not valid";
    // Serial links: a bus's bytes that are not a fresh, authenticated frame.
    FrameNoise => Decode, "frame_noise", "serial: bytes without a frame delimiter (line noise)";
    FrameTag => Decode, "frame_tag", "serial: frame tag does not verify";
    FrameReplay => Decode, "frame_replay", "serial: frame counter not above the last accepted";
    FrameNotOnBus => Connect, "frame_not_on_bus", "serial: a frame naming a device this port does not allow";
    FrameRate => Limit, "frame_rate", "serial: frames over the port's rate (serial.max_frames_per_second)";
    // The uplink stages, in their order.
    Quarantined => Quarantine, "quarantined", "device quarantined, message dropped";
    TopicNotAllowed => Authorize, "topic_not_allowed", "topic not allowed by ACL";
    ResponseTopicNotAllowed => Authorize, "response_topic_not_allowed", "response topic not allowed by ACL";
    UnknownDevice => Authorize, "unknown_device", "command for an id that is not a registered device";
    RateLimited => Limit, "rate_limited", "over the message or byte rate";
    ReceiveMaximumExceeded => Limit, "receive_maximum_exceeded", "receive maximum exceeded";
    TooManyUserProperties => Limit, "too_many_user_properties", "message properties over the limits";
    /// A device's retained telemetry (topics or bytes), or retained commands (topics).
    RetainedLimit => Limit, "retained_limit", "retained messages of this device at their limit";
    RetainedDeviceBytes => Limit, "retained_device_bytes", "retained commands of this device over their byte limit";
    RetainedTotalBytes => Limit, "retained_total_bytes", "retained commands over the gateway's byte limit";
    ResponseTopicInvalid => Validate, "response_topic_invalid", "response topic is not a valid topic name";
    TopicForbiddenCharacter => Validate, "topic_forbidden_character", "topic carries a forbidden character";
    PropertyForbiddenCharacter => Validate, "property_forbidden_character", "a property carries a forbidden character";
    PayloadNotUtf8Declared => Validate, "payload_not_utf8", "payload declared UTF-8 is not";
    TooLarge => Validate, "too_large", "payload too large";
    NotUtf8 => Validate, "not_utf8", "payload is not UTF-8";
    NotJson => Validate, "not_json", "payload is not JSON";
    Schema => Validate, "schema", "payload does not match the topic's schema";
    // Subscriptions.
    FilterNotAllowed => Authorize, "filter_not_allowed", "filter not allowed by ACL";
    TooManyFilters => Subscribe, "too_many_filters", "too many filters in one SUBSCRIBE";
    FilterInvalid => Subscribe, "filter_invalid", "topic filter is not valid";
    TooManySubscriptions => Subscribe, "too_many_subscriptions", "subscriptions at their limit";
    SubscribeRate => Subscribe, "subscribe_rate", "new topic filters over their rate (limits.subscribe_rate)";
    SubscriptionsFull => Subscribe, "subscriptions_full", "the gateway's subscription table is full";
    // The downlink.
    ReceiveNotAllowed => Authorize, "receive_not_allowed", "principal may not receive this topic";
    OverClientMaximumPacketSize => Deliver, "over_client_maximum_packet_size", "larger than the client accepts";
}

impl Refusal {
    /// The counter slot of this reason.
    pub const fn slot(self) -> usize {
        self as usize
    }

    /// What the device's behaviour model counts it as: an ACL denial, a failed
    /// validation, or nothing (a quota or a protocol bound is not misbehaviour in itself;
    /// rate-limit hits are observed by the limit stage, once per message).
    pub const fn observation(self) -> Option<Observation> {
        match self.stage() {
            Stage::Authorize => Some(Observation::Denied),
            Stage::Validate => Some(Observation::Invalid),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage(), self.detail())
    }
}

impl From<AuthRefusal> for Refusal {
    fn from(r: AuthRefusal) -> Refusal {
        match r {
            AuthRefusal::BackedOff => Refusal::BackedOff,
            AuthRefusal::BadClientId => Refusal::BadClientId,
            AuthRefusal::UsernameMismatch => Refusal::UsernameMismatch,
            AuthRefusal::CredentialNotRegistered => Refusal::CredentialNotRegistered,
            AuthRefusal::Unknown => Refusal::UnknownPrincipal,
            AuthRefusal::Disabled => Refusal::Disabled,
            AuthRefusal::NoCredential => Refusal::NoCredential,
            AuthRefusal::BadSecret => Refusal::BadSecret,
            AuthRefusal::SecretNotAllowed => Refusal::SecretNotAllowed,
            AuthRefusal::CertNotAllowed => Refusal::CertificateNotAllowed,
            AuthRefusal::CertUntrusted => Refusal::CertificateUntrusted,
            AuthRefusal::CertIdentityMismatch => Refusal::CertificateIdentityMismatch,
            AuthRefusal::CertNotPinned => Refusal::CertificateNotRegistered,
            AuthRefusal::NoGroup => Refusal::GroupNotConfigured,
            AuthRefusal::Banned => Refusal::Banned,
        }
    }
}

impl From<Poison> for Refusal {
    fn from(p: Poison) -> Refusal {
        if p.is_topic() {
            Refusal::TopicForbiddenCharacter
        } else if matches!(p, Poison::PayloadNotUtf8(_)) {
            Refusal::PayloadNotUtf8Declared
        } else {
            Refusal::PropertyForbiddenCharacter
        }
    }
}

impl From<InvalidKind> for Refusal {
    fn from(k: InvalidKind) -> Refusal {
        match k {
            InvalidKind::TooLarge => Refusal::TooLarge,
            InvalidKind::NotUtf8 => Refusal::NotUtf8,
            InvalidKind::NotJson => Refusal::NotJson,
            InvalidKind::Schema => Refusal::Schema,
        }
    }
}

impl From<RetainedRefused> for Refusal {
    fn from(r: RetainedRefused) -> Refusal {
        match r {
            RetainedRefused::Count(_) => Refusal::RetainedLimit,
            RetainedRefused::DeviceBytes(..) => Refusal::RetainedDeviceBytes,
            RetainedRefused::TotalBytes(..) => Refusal::RetainedTotalBytes,
        }
    }
}

impl From<RetainedFull> for Refusal {
    fn from(_: RetainedFull) -> Refusal {
        Refusal::RetainedLimit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_has_its_own_slot_and_its_own_stage_and_label() {
        let mut pairs = HashSet::new();
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.slot(), i, "{r:?}");
            assert!(
                pairs.insert((r.stage(), r.label())),
                "{r:?}: ({}, {}) is used twice",
                r.stage(),
                r.label()
            );
        }
    }

    #[test]
    fn quotas_are_not_counted_as_acl_denials() {
        for r in [
            Refusal::RetainedLimit,
            Refusal::RetainedDeviceBytes,
            Refusal::RetainedTotalBytes,
            Refusal::TooManyUserProperties,
            Refusal::RateLimited,
        ] {
            assert_eq!(r.stage(), Stage::Limit, "{r:?}");
            assert_eq!(r.observation(), None, "{r:?}");
        }
        assert_eq!(
            Refusal::TopicNotAllowed.observation(),
            Some(Observation::Denied)
        );
        assert_eq!(Refusal::Schema.observation(), Some(Observation::Invalid));
        assert_eq!(
            Refusal::ResponseTopicInvalid.observation(),
            Some(Observation::Invalid)
        );
    }

    #[test]
    fn the_audit_words_name_the_stage() {
        assert_eq!(
            Refusal::TopicNotAllowed.to_string(),
            "authorize: topic not allowed by ACL"
        );
        assert_eq!(
            Refusal::RateLimited.to_string(),
            "limits: over the message or byte rate"
        );
    }
}
