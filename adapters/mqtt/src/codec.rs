//! MQTT 3.1.1 and 5 packets, translated to and from one small model.
//!
//! Parsing and encoding are rumqttc's `mqttbytes` codecs; every frame has already
//! passed `strict` before it gets here. The session logic above sees only
//! `Incoming`/`Outgoing` and a reason code, whichever version the peer speaks.

use crate::strict::ProtocolVersion;
use bytes::{Bytes, BytesMut};
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
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub keep_alive: u16,
    pub clean_start: bool,
    pub will: Option<Will>,
    /// MQTT 5: the client asked for enhanced authentication.
    pub auth_method: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishIn {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub pkid: u16,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Connect(ConnectInfo),
    Publish(PublishIn),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing<'a> {
    /// `code` is an MQTT 5 reason code.
    ConnAck {
        code: u8,
        max_packet_size: u32,
    },
    Publish {
        topic: &'a str,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
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
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Disconnect {
        reason: u8,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

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

/// Decode one complete, strictness-checked frame.
pub fn decode(
    mut frame: BytesMut,
    version: ProtocolVersion,
    max_size: usize,
) -> Result<Incoming, DecodeError> {
    // rumqttc refuses a v5 DISCONNECT with no body, which the spec allows; strict has
    // already checked the frame, so its type is all that matters here.
    if frame.first().map(|b| b >> 4) == Some(14) {
        return Ok(Incoming::Disconnect);
    }
    let err = |e: &dyn std::fmt::Display| DecodeError(e.to_string());
    match version {
        ProtocolVersion::V311 => {
            let packet = v4::Packet::read(&mut frame, max_size).map_err(|e| err(&e))?;
            Ok(match packet {
                v4::Packet::Connect(c) => Incoming::Connect(ConnectInfo {
                    client_id: c.client_id,
                    username: c.login.as_ref().map(|l| l.username.clone()),
                    password: c
                        .login
                        .map(|l| l.password.into_bytes())
                        .filter(|p| !p.is_empty()),
                    keep_alive: c.keep_alive,
                    clean_start: c.clean_session,
                    auth_method: false,
                    will: c.last_will.map(|w| Will {
                        topic: w.topic,
                        payload: w.message,
                        qos: w.qos as u8,
                        retain: w.retain,
                    }),
                }),
                v4::Packet::Publish(p) => Incoming::Publish(PublishIn {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    pkid: p.pkid,
                    topic_alias: None,
                    response_topic: None,
                }),
                v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
                v4::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
                v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
                v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
                v4::Packet::Subscribe(s) => Incoming::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| (f.path, f.qos as u8))
                        .collect(),
                },
                v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.topics,
                },
                v4::Packet::PingReq => Incoming::PingReq,
                v4::Packet::Disconnect => Incoming::Disconnect,
                other => return Err(DecodeError(format!("unexpected packet {other:?}"))),
            })
        }
        ProtocolVersion::V5 => {
            let packet =
                v5::Packet::read(&mut frame, Some(max_size as u32)).map_err(|e| err(&e))?;
            Ok(match packet {
                v5::Packet::Connect(c, will, login) => Incoming::Connect(ConnectInfo {
                    client_id: c.client_id,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login
                        .map(|l| l.password.into_bytes())
                        .filter(|p| !p.is_empty()),
                    keep_alive: c.keep_alive,
                    clean_start: c.clean_start,
                    auth_method: c
                        .properties
                        .as_ref()
                        .is_some_and(|p| p.authentication_method.is_some()),
                    will: will.map(|w| Will {
                        topic: String::from_utf8_lossy(&w.topic).into_owned(),
                        payload: w.message,
                        qos: w.qos as u8,
                        retain: w.retain,
                    }),
                }),
                v5::Packet::Publish(p) => Incoming::Publish(PublishIn {
                    topic: std::str::from_utf8(&p.topic)
                        .map_err(|_| DecodeError("topic is not UTF-8".into()))?
                        .to_string(),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    pkid: p.pkid,
                    topic_alias: p.properties.as_ref().and_then(|pr| pr.topic_alias),
                    response_topic: p.properties.and_then(|pr| pr.response_topic),
                }),
                v5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
                v5::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
                v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
                v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
                v5::Packet::Subscribe(s) => Incoming::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| (f.path, f.qos as u8))
                        .collect(),
                },
                v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.filters,
                },
                v5::Packet::PingReq(_) => Incoming::PingReq,
                v5::Packet::Disconnect(_) => Incoming::Disconnect,
                other => return Err(DecodeError(format!("unexpected packet {other:?}"))),
            })
        }
    }
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
        reason::PACKET_TOO_LARGE => D::PacketTooLarge,
        reason::QUOTA_EXCEEDED => D::QuotaExceeded,
        reason::ADMINISTRATIVE_ACTION => D::AdministrativeAction,
        reason::QOS_NOT_SUPPORTED => D::QoSNotSupported,
        _ => D::UnspecifiedError,
    }
}

/// Encode a packet for a peer of the given version. Returns false when the packet has
/// no 3.1.1 form (a server DISCONNECT) and nothing was written.
pub fn encode(out: &Outgoing<'_>, version: ProtocolVersion, buf: &mut BytesMut) -> bool {
    let max = usize::MAX;

    match version {
        ProtocolVersion::V311 => {
            let packet = match out {
                Outgoing::ConnAck { code, .. } => {
                    v4::Packet::ConnAck(v4::ConnAck::new(connack_v4(*code), false))
                }
                Outgoing::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid,
                } => v4::Packet::Publish(v4::Publish {
                    dup: false,
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
                    max_packet_size,
                } => {
                    let properties = (*code == reason::SUCCESS).then(|| v5::ConnAckProperties {
                        session_expiry_interval: None,
                        receive_max: None,
                        max_qos: Some(1),
                        retain_available: Some(1),
                        max_packet_size: Some(*max_packet_size),
                        assigned_client_identifier: None,
                        topic_alias_max: Some(0),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: Some(1),
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: Some(0),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    });
                    v5::Packet::ConnAck(v5::ConnAck {
                        session_present: false,
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
                } => v5::Packet::Publish(v5::Publish {
                    dup: false,
                    qos: qos_v5(*qos),
                    retain: *retain,
                    topic: Bytes::copy_from_slice(topic.as_bytes()),
                    pkid: *pkid,
                    payload: payload.clone(),
                    properties: None,
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
                Outgoing::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: vec![v5::UnsubAckReason::Success; *count],
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
            max_packet_size: 1024,
        }) {
            v5::Packet::ConnAck(c) => assert_eq!(c.code, v5::ConnectReturnCode::NotAuthorized),
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::new();
        assert!(encode(
            &Outgoing::ConnAck {
                code: reason::NOT_AUTHORIZED,
                max_packet_size: 1024
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
            decode(frame, ProtocolVersion::V5, 1024).unwrap(),
            Incoming::Disconnect
        );
    }
}
