//! MQTT 3.1.1 and 5 packets, translated to and from one small model.
//!
//! Incoming frames are decoded once, by `strict`, which checks every rule as it
//! reads; outgoing packets are encoded with rumqttc's `mqttbytes` codecs. The session
//! logic above sees only `Incoming`/`Outgoing` and a reason code, whichever version
//! the peer speaks.

pub use crate::incoming::{ConnectInfo, Incoming, PublishIn, RawProps, SubscribeFilter, Will};
use crate::strict::{self, ProtocolVersion, StrictError};
use bytes::{Bytes, BytesMut};
use portcullis_core::message::Properties;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// MQTT 5 reason codes the gateway sends (mapped to 3.1.1 where it has an equivalent).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_VERSION: u8 = 0x84;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
}

/// What a successful MQTT 5 CONNACK tells the client about the gateway's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnAckProps {
    pub max_packet_size: u32,
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    /// Set when the gateway overrides the client's keep-alive.
    pub server_keep_alive: Option<u16>,
    /// Set when the gateway grants a different session expiry than asked.
    pub session_expiry: Option<u32>,
    /// Shared subscriptions and Subscription Identifiers (service sessions).
    pub shared_subscriptions: bool,
    pub subscription_identifiers: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing<'a> {
    /// `code` is an MQTT 5 reason code; `props` go with a successful MQTT 5 CONNACK.
    ConnAck {
        code: u8,
        session_present: bool,
        props: ConnAckProps,
    },
    Publish {
        topic: &'a str,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
        dup: bool,
        props: Option<&'a Properties>,
        /// MQTT 5 Subscription Identifiers of the subscriptions that matched.
        subscription_ids: &'a [u32],
        /// MQTT 5 Topic Alias: with a topic, it defines the alias; with an empty
        /// topic, it stands for the topic it was defined for.
        topic_alias: Option<u16>,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    /// Per filter: `Ok(granted qos)` or `Err(reason)`.
    SubAck {
        pkid: u16,
        codes: Vec<Result<u8, u8>>,
    },
    /// Per filter: whether there was such a subscription.
    UnsubAck {
        pkid: u16,
        existed: Vec<bool>,
    },
    PingResp,
    Disconnect {
        reason: u8,
    },
}

fn qos_v4(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Decode the first frame of a connection, which must be CONNECT; it also tells
/// which version the peer speaks.
pub fn decode_connect(frame: BytesMut) -> Result<(ProtocolVersion, ConnectInfo), StrictError> {
    strict::decode_connect(&frame.freeze())
}

/// Decode one complete frame after CONNECT.
pub fn decode(frame: BytesMut, version: ProtocolVersion) -> Result<Incoming, StrictError> {
    strict::decode_frame(&frame.freeze(), version)
}

fn connack_v4(code: u8) -> v4::ConnectReturnCode {
    match code {
        reason::SUCCESS => v4::ConnectReturnCode::Success,
        reason::UNSUPPORTED_VERSION => v4::ConnectReturnCode::RefusedProtocolVersion,
        reason::SERVER_UNAVAILABLE | reason::SERVER_BUSY | reason::SHUTTING_DOWN => {
            v4::ConnectReturnCode::ServiceUnavailable
        }
        _ => v4::ConnectReturnCode::NotAuthorized,
    }
}

fn connack_v5(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::MALFORMED => C::MalformedPacket,
        reason::PROTOCOL_ERROR => C::ProtocolError,
        reason::UNSUPPORTED_VERSION => C::UnsupportedProtocolVersion,
        reason::SERVER_UNAVAILABLE | reason::SHUTTING_DOWN => C::ServerUnavailable,
        reason::SERVER_BUSY => C::ServerBusy,
        reason::PACKET_TOO_LARGE => C::PacketTooLarge,
        reason::QUOTA_EXCEEDED => C::QuotaExceeded,
        reason::TOPIC_NAME_INVALID => C::TopicNameInvalid,
        reason::QOS_NOT_SUPPORTED => C::QoSNotSupported,
        reason::BAD_AUTH_METHOD => C::BadAuthenticationMethod,
        _ => C::NotAuthorized,
    }
}

fn puback_v5(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_v5(code: u8) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        _ => R::UnspecifiedError,
    }
}

fn suback_v5(code: Result<u8, u8>) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as S;
    match code {
        Ok(q) => S::Success(qos_v5(q)),
        Err(reason::NOT_AUTHORIZED) => S::NotAuthorized,
        Err(reason::TOPIC_FILTER_INVALID) => S::TopicFilterInvalid,
        Err(reason::QUOTA_EXCEEDED) => S::QuotaExceeded,
        Err(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED) => S::SharedSubscriptionsNotSupported,
        Err(_) => S::Unspecified,
    }
}

fn disconnect_v5(code: u8) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match code {
        reason::SUCCESS => D::NormalDisconnection,
        reason::MALFORMED => D::MalformedPacket,
        reason::PROTOCOL_ERROR => D::ProtocolError,
        reason::NOT_AUTHORIZED => D::NotAuthorized,
        reason::SERVER_BUSY => D::ServerBusy,
        reason::SHUTTING_DOWN => D::ServerShuttingDown,
        reason::KEEP_ALIVE_TIMEOUT => D::KeepAliveTimeout,
        reason::SESSION_TAKEN_OVER => D::SessionTakenOver,
        reason::TOPIC_FILTER_INVALID => D::TopicFilterInvalid,
        reason::TOPIC_NAME_INVALID => D::TopicNameInvalid,
        reason::TOPIC_ALIAS_INVALID => D::TopicAliasInvalid,
        reason::RECEIVE_MAXIMUM_EXCEEDED => D::ReceiveMaximumExceeded,
        reason::MESSAGE_RATE_TOO_HIGH => D::MessageRateTooHigh,
        reason::PACKET_TOO_LARGE => D::PacketTooLarge,
        reason::QUOTA_EXCEEDED => D::QuotaExceeded,
        reason::ADMINISTRATIVE_ACTION => D::AdministrativeAction,
        reason::QOS_NOT_SUPPORTED => D::QoSNotSupported,
        _ => D::UnspecifiedError,
    }
}

fn publish_properties(
    props: Option<&Properties>,
    subscription_ids: &[u32],
    topic_alias: Option<u16>,
) -> Option<v5::PublishProperties> {
    if props.is_none() && subscription_ids.is_empty() && topic_alias.is_none() {
        return None;
    }
    let ids = subscription_ids.iter().map(|&i| i as usize).collect();
    Some(match props {
        Some(p) => v5::PublishProperties {
            payload_format_indicator: p.payload_format_utf8.map(u8::from),
            message_expiry_interval: p.message_expiry_secs,
            topic_alias,
            response_topic: p.response_topic.as_ref().map(|t| t.as_str().to_string()),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: ids,
            content_type: p.content_type.clone(),
        },
        None => v5::PublishProperties {
            subscription_identifiers: ids,
            topic_alias,
            ..v5::PublishProperties::default()
        },
    })
}

/// Encode a packet for a peer of the given version. Returns false when the packet has
/// no 3.1.1 form (a server DISCONNECT) and nothing was written.
pub fn encode(out: &Outgoing<'_>, version: ProtocolVersion, buf: &mut BytesMut) -> bool {
    let max = usize::MAX;

    match version {
        ProtocolVersion::V311 => {
            let packet = match out {
                Outgoing::ConnAck {
                    code,
                    session_present,
                    ..
                } => v4::Packet::ConnAck(v4::ConnAck::new(connack_v4(*code), *session_present)),
                Outgoing::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid,
                    dup,
                    ..
                } => v4::Packet::Publish(v4::Publish {
                    dup: *dup,
                    qos: qos_v4(*qos),
                    retain: *retain,
                    topic: topic.to_string(),
                    pkid: *pkid,
                    payload: payload.clone(),
                }),
                Outgoing::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Outgoing::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
                Outgoing::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
                Outgoing::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
                Outgoing::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    codes
                        .iter()
                        .map(|c| match c {
                            Ok(q) => v4::SubscribeReasonCode::Success(qos_v4(*q)),
                            Err(_) => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Outgoing::PingResp => v4::Packet::PingResp,
                // MQTT 3.1.1 has no server DISCONNECT: the connection is just closed.
                Outgoing::Disconnect { .. } => return false,
            };
            packet.write(buf, max).is_ok()
        }
        ProtocolVersion::V5 => {
            let packet = match out {
                Outgoing::ConnAck {
                    code,
                    session_present,
                    props,
                } => {
                    let success = *code == reason::SUCCESS;
                    let properties = success.then(|| v5::ConnAckProperties {
                        session_expiry_interval: props.session_expiry,
                        receive_max: Some(props.receive_maximum),
                        max_qos: None,
                        retain_available: Some(1),
                        max_packet_size: Some(props.max_packet_size),
                        assigned_client_identifier: None,
                        topic_alias_max: Some(props.topic_alias_maximum),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: Some(1),
                        subscription_identifiers_available: Some(u8::from(
                            props.subscription_identifiers,
                        )),
                        shared_subscription_available: Some(u8::from(props.shared_subscriptions)),
                        server_keep_alive: props.server_keep_alive,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    });
                    v5::Packet::ConnAck(v5::ConnAck {
                        session_present: *session_present && success,
                        code: connack_v5(*code),
                        properties,
                    })
                }
                Outgoing::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid,
                    dup,
                    props,
                    subscription_ids,
                    topic_alias,
                } => v5::Packet::Publish(v5::Publish {
                    dup: *dup,
                    qos: qos_v5(*qos),
                    retain: *retain,
                    topic: Bytes::copy_from_slice(topic.as_bytes()),
                    pkid: *pkid,
                    payload: payload.clone(),
                    properties: publish_properties(*props, subscription_ids, *topic_alias),
                }),
                Outgoing::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
                    pkid: *pkid,
                    reason: puback_v5(*reason),
                    properties: None,
                }),
                Outgoing::PubRec { pkid, reason } => v5::Packet::PubRec(v5::PubRec {
                    pkid: *pkid,
                    reason: pubrec_v5(*reason),
                    properties: None,
                }),
                Outgoing::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel {
                    pkid: *pkid,
                    reason: v5::PubRelReason::Success,
                    properties: None,
                }),
                Outgoing::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp {
                    pkid: *pkid,
                    reason: v5::PubCompReason::Success,
                    properties: None,
                }),
                Outgoing::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
                    pkid: *pkid,
                    return_codes: codes.iter().map(|c| suback_v5(*c)).collect(),
                    properties: None,
                }),
                Outgoing::UnsubAck { pkid, existed } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: existed
                        .iter()
                        .map(|e| {
                            if *e {
                                v5::UnsubAckReason::Success
                            } else {
                                v5::UnsubAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                    properties: None,
                }),
                Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outgoing::Disconnect { reason } => {
                    // rumqttc's writer appends an empty property length that its own
                    // remaining length does not count; write the two bytes ourselves.
                    buf.extend_from_slice(&[0xE0, 0x01, disconnect_v5(*reason) as u8]);
                    return true;
                }
            };
            packet.write(buf, None).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_v5(out: Outgoing<'_>) -> v5::Packet {
        let mut buf = BytesMut::new();
        assert!(encode(&out, ProtocolVersion::V5, &mut buf));
        v5::Packet::read(&mut buf, None).unwrap()
    }

    #[test]
    fn shutdown_disconnect_carries_its_reason_in_mqtt5() {
        let mut buf = BytesMut::new();
        assert!(encode(
            &Outgoing::Disconnect {
                reason: reason::SHUTTING_DOWN
            },
            ProtocolVersion::V5,
            &mut buf
        ));
        assert_eq!(&buf[..], &[0xE0, 0x01, 0x8B]);
    }

    #[test]
    fn refused_connect_is_not_authorized_in_both_versions() {
        match roundtrip_v5(Outgoing::ConnAck {
            code: reason::NOT_AUTHORIZED,
            session_present: false,
            props: ConnAckProps::default(),
        }) {
            v5::Packet::ConnAck(c) => assert_eq!(c.code, v5::ConnectReturnCode::NotAuthorized),
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::new();
        assert!(encode(
            &Outgoing::ConnAck {
                code: reason::NOT_AUTHORIZED,
                session_present: false,
                props: ConnAckProps::default(),
            },
            ProtocolVersion::V311,
            &mut buf
        ));
        assert_eq!(&buf[..], &[0x20, 0x02, 0x00, 0x05]);
    }

    #[test]
    fn v311_has_no_server_disconnect() {
        let mut buf = BytesMut::new();
        assert!(!encode(
            &Outgoing::Disconnect { reason: 0x8B },
            ProtocolVersion::V311,
            &mut buf
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn empty_v5_disconnect_decodes() {
        let frame = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert_eq!(
            decode(frame, ProtocolVersion::V5).unwrap(),
            Incoming::Disconnect {
                reason: 0,
                session_expiry: None
            }
        );
    }

    #[test]
    fn v5_disconnect_with_will_and_session_expiry_decodes() {
        // Reason 0x04 (disconnect with Will), properties: session expiry 120.
        let frame = BytesMut::from(&[0xE0u8, 0x07, 0x04, 0x05, 0x11, 0, 0, 0, 120][..]);
        assert_eq!(
            decode(frame, ProtocolVersion::V5).unwrap(),
            Incoming::Disconnect {
                reason: 0x04,
                session_expiry: Some(120)
            }
        );
    }

    #[test]
    fn v5_disconnect_keeps_its_session_expiry_behind_a_long_reason_string() {
        // Properties of 208 bytes: the property length takes two bytes.
        let mut props = vec![0x1F, 0, 200];
        props.extend_from_slice(&[b'r'; 200]);
        props.extend_from_slice(&[0x11, 0, 0, 0, 0]);
        let mut frame = BytesMut::from(&[0xE0u8, 0xD3, 0x01, 0x00, 0xD0, 0x01][..]);
        frame.extend_from_slice(&props);
        assert_eq!(
            decode(frame, ProtocolVersion::V5).unwrap(),
            Incoming::Disconnect {
                reason: 0,
                session_expiry: Some(0)
            }
        );
    }

    #[test]
    fn a_frame_that_breaks_a_rule_is_refused_with_its_reason() {
        // PINGREQ with a body.
        let err = decode(
            BytesMut::from(&[0xC0u8, 0x01, 0x00][..]),
            ProtocolVersion::V311,
        )
        .unwrap_err();
        assert_eq!(err.reason_code(), reason::MALFORMED);
        let err = decode_connect(BytesMut::from(&[0xC0u8, 0x00][..])).unwrap_err();
        assert_eq!(err, StrictError::ExpectedConnect(12));
    }
}
