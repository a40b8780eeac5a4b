//! What a client sent, decoded: the packets the session acts on, the same for MQTT
//! 3.1.1 and 5. `strict` produces them in one pass over the frame; payloads and
//! binary properties share the frame's memory.

use bytes::Bytes;

/// MQTT 5 publish (and will) properties as the peer sent them, not yet validated
/// against the gateway's limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawProps {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub topic_alias: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval, seconds.
    pub delay: u32,
    pub props: RawProps,
}

/// CONNECT, the first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// Seconds the session should outlive the connection: MQTT 5 Session Expiry
    /// Interval; MQTT 3.1.1 clean_session = 0 asks for "as long as allowed".
    pub session_expiry: u32,
    pub will: Option<Will>,
    /// MQTT 5: the client's Receive Maximum, Maximum Packet Size and Topic Alias
    /// Maximum (aliases the gateway may define towards it).
    pub receive_maximum: Option<u16>,
    pub max_packet_size: Option<u32>,
    pub topic_alias_maximum: u16,
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
    pub props: RawProps,
}

/// One filter of a SUBSCRIBE, with its options as sent (MQTT 3.1.1: only the QoS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub path: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0, 1 or 2 (the strict decoder refuses 3).
    pub retain_handling: u8,
}

/// A packet after CONNECT (a second CONNECT, or AUTH, is refused by the decoder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Publish(PublishIn),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        /// MQTT 5 Subscription Identifier (1..=268435455).
        identifier: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `reason` is 0 for MQTT 3.1.1; MQTT 5 may also update the session expiry.
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
}
