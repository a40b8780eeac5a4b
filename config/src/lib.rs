//! The typed Portcullis configuration.
//!
//! One TOML file, every key optional with a safe default, unknown keys rejected.
//! `Config::default()` is the embedded default that `portcullis serve` runs with no
//! file; the shipped `config/portcullis.toml` spells out exactly the same values (a
//! test keeps the two in step). Loading never echoes a value back in an error: a
//! misplaced secret must not end up in a terminal or a log.

use crate::duration::{Millis, Secs};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The shipped, fully commented configuration file.
pub const SHIPPED: &str = include_str!("../portcullis.toml");

pub mod behaviour;
pub mod duration;
pub mod proxy;
pub mod serial;
pub mod upstream;
pub mod validation;

pub use behaviour::{Behaviour, BehaviourOverride, QuarantineCommands, QuarantineTraffic};
pub use proxy::ProxyProtocol;
pub use serial::{Parity, Serial, SerialPort};
pub use upstream::{BrokerUrl, Outbox, Upstream, WhenFull};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the registry, the development PKI, the admin socket and the audit log live.
    pub data_dir: PathBuf,
    pub listeners: Listeners,
    pub tls: Tls,
    pub admin: Admin,
    pub observability: Observability,
    pub broker: Broker,
    /// The external broker cluster of upstream mode, and the outbox before it.
    pub upstream: Upstream,
    pub limits: Limits,
    pub sessions: Sessions,
    pub rate_limits: RateLimits,
    /// Per-principal rate overrides, keyed `"device/ID"` or `"service/ID"`.
    pub rate_overrides: BTreeMap<String, RateOverride>,
    /// Payload rules and size limits.
    pub validation: validation::Validation,
    pub auth: Auth,
    pub audit: Audit,
    /// The per-device behaviour model; device groups may override any key.
    pub behaviour: Behaviour,
    pub device_groups: BTreeMap<String, DeviceGroup>,
    pub service_groups: BTreeMap<String, ServiceGroup>,
    /// CoAP devices: DTLS sessions and the CoAP exchanges on them.
    pub coap: Coap,
    /// Serial devices: the ports the gateway may open, who may speak on each, and the
    /// link's bounds. No port unless listed.
    pub serial: Serial,
    /// PROXY protocol v2 headers from load balancers in front of the device listeners.
    pub proxy_protocol: ProxyProtocol,
    /// Keys of the file that were renamed and are still read, each with the new key
    /// to write (see [`duration::renamed_keys`]). Not a key itself.
    #[serde(skip)]
    pub renamed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    /// Device listener, MQTT over TLS. `"off"` disables it.
    #[serde(deserialize_with = "listen_addr")]
    pub device_tls: Option<SocketAddr>,
    /// Device listener, plain MQTT. Must be a loopback address.
    #[serde(deserialize_with = "listen_addr")]
    pub device_plain: Option<SocketAddr>,
    /// Service listener, MQTT over TLS.
    #[serde(deserialize_with = "listen_addr")]
    pub service_tls: Option<SocketAddr>,
    /// Service listener, plain MQTT. Must be a loopback address.
    #[serde(deserialize_with = "listen_addr")]
    pub service_plain: Option<SocketAddr>,
    /// Device listener, CoAP over DTLS 1.2 with a pre-shared key (UDP).
    #[serde(deserialize_with = "listen_addr")]
    pub coap_dtls: Option<SocketAddr>,
    /// Device listener, plain CoAP (UDP). Must be a loopback address; off by default.
    #[serde(deserialize_with = "listen_addr")]
    pub coap: Option<SocketAddr>,
}

/// A listen address, or `"off"`.
fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "expected an address like \"127.0.0.1:8883\" or \"off\" (got {text:?})"
        ))
    })
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Server certificate chain (PEM). Default: `{data_dir}/pki/server.pem`.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM). Default: `{data_dir}/pki/server.key`.
    pub key: Option<PathBuf>,
    /// Time a peer has to finish the TLS handshake.
    #[serde(alias = "handshake_timeout_secs")]
    pub handshake_timeout: Secs,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Unix socket of the admin API. Default: `{data_dir}/admin.sock`.
    pub socket: Option<PathBuf>,
    /// The admin API over HTTP (`/api/v1/...`, bearer token). Off by default.
    #[serde(deserialize_with = "listen_addr")]
    pub http_listen: Option<SocketAddr>,
    /// The file holding the bearer token of the HTTP admin API (required with
    /// `http_listen`). The token itself never goes in this file's text.
    pub http_token_file: Option<PathBuf>,
    /// Serve the HTTP admin API over TLS, with the server certificate of `[tls]`.
    /// Required off loopback.
    pub http_tls: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Observability {
    /// `/healthz`, `/readyz` and `/metrics`; `"off"` disables it.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: Option<SocketAddr>,
}

/// The most uplinks the embedded broker takes (see the check in `validate`).
pub const MAX_UPLINKS: usize = 256;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    /// `embedded` (the default) or `upstream` (an external cluster, `[upstream]`).
    pub mode: BrokerMode,
    /// Broker links carrying device traffic to the broker (devices are spread over them).
    pub uplinks: usize,
    /// Size of one commit-log segment of the embedded broker, in bytes.
    pub max_segment_size: usize,
    /// Segments kept per topic before the oldest is dropped.
    pub max_segment_count: usize,
    /// Maximum links (gateway uplinks + the downlink + the fan-out).
    pub max_links: usize,
    /// Messages queued towards one broker link before the sender waits.
    pub link_queue: usize,
    /// Retained messages kept for services, at most, and their bytes (topic, payload,
    /// properties).
    pub max_retained_messages: usize,
    pub max_retained_bytes: usize,
    /// Service subscriptions held at once over all sessions (each session is also
    /// capped by `sessions.max_subscriptions`).
    pub max_subscriptions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    /// rumqttd in-process, with no listener of its own.
    Embedded,
    /// An external broker cluster, through a durable outbox (`[upstream]`).
    Upstream,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest MQTT packet accepted from a peer, in bytes.
    pub max_packet_size: usize,
    /// Longest topic name, in bytes.
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_depth: usize,
    /// Time between TCP accept (or TLS handshake) and CONNECT.
    #[serde(alias = "connect_timeout_secs")]
    pub connect_timeout: Secs,
    /// Concurrent connections over all listeners.
    pub max_connections: usize,
    /// Concurrent connections from one source address.
    pub max_connections_per_source: usize,
    /// Filters in one SUBSCRIBE.
    pub max_subscribe_filters: usize,
    /// Time SIGTERM waits for sessions to close before exiting anyway.
    #[serde(alias = "drain_timeout_secs")]
    pub drain_timeout: Secs,
    /// Time a peer may take to accept what the gateway writes before it is dropped.
    #[serde(alias = "write_timeout_secs")]
    pub write_timeout: Secs,
    /// Topic filters one session may subscribe to per second, sustained, and at once
    /// (a token bucket); filters over it are refused with Quota exceeded.
    pub subscribe_rate: f64,
    pub subscribe_burst: f64,
    /// Concurrent connections not yet authenticated (TLS handshake or waiting for
    /// CONNECT); a new one past it sheds the oldest.
    pub max_unauthenticated: usize,
    /// File descriptors kept back from connections (registry, audit log, files): the
    /// connection cap is at most the descriptor limit minus this.
    pub fd_reserve: u64,
}

/// CoAP devices (docs/coap.md): the DTLS endpoint's bounds and the CoAP layer's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Coap {
    /// DTLS sessions at most, established or in handshake.
    pub max_sessions: usize,
    /// DTLS sessions (established or in handshake) from one source at most.
    pub max_sessions_per_source: usize,
    /// DTLS handshakes in progress at most, all sources together.
    pub max_handshakes: usize,
    /// Time a peer has to complete the DTLS handshake.
    pub handshake_timeout: Secs,
    /// A DTLS session silent this long is closed (the device handshakes again).
    pub idle_timeout: Secs,
    /// Largest request body, whole or reassembled from Block1 blocks, in bytes.
    pub max_body_size: usize,
    /// How long a device's commands and Observe relation are kept after its DTLS
    /// session ends, for its next session (mailbox bounds as in [sessions]).
    pub session_expiry: Secs,
    /// Longest wait a device may ask for with `?ttd=N`.
    pub max_ttd: Secs,
    /// Responses kept per session to answer retransmitted requests.
    pub dedup_entries: usize,
    /// ACK_TIMEOUT (RFC 7252 §4.8): the first wait for a device's ACK of a notification
    /// or separate response (times a random 1–1.5), doubling, 4 retransmissions.
    pub ack_timeout: Millis,
}

/// Device sessions: persistence, queues, retained commands and MQTT 5 limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sessions {
    /// Longest session expiry granted, whole seconds (MQTT 5 asks; MQTT 3.1.1
    /// clean_session = 0 gets exactly this). "0s" makes every session clean.
    #[serde(alias = "max_session_expiry_secs")]
    pub max_session_expiry: Secs,
    /// A device's queue of undelivered commands (offline or busy): messages, bytes, age.
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
    #[serde(alias = "queue_max_age_secs")]
    pub queue_max_age: Secs,
    /// A service's queue of undelivered messages (offline persistent session, or
    /// reading slower than the messages come): messages and bytes. Age as above.
    pub service_queue_max_messages: usize,
    pub service_queue_max_bytes: usize,
    /// QoS 1/2 messages sent to a device and not yet acknowledged (also capped by the
    /// device's MQTT 5 Receive Maximum).
    pub max_inflight: u16,
    /// QoS 1/2 messages a peer may have unacknowledged towards the gateway (announced
    /// as MQTT 5 Receive Maximum; exceeding it ends the session).
    pub receive_maximum: u16,
    /// Topic aliases a peer may define (MQTT 5 Topic Alias Maximum; 0 disables them).
    pub topic_alias_maximum: u16,
    /// Retained commands kept per device.
    pub max_retained_per_device: usize,
    /// Bytes (topic + payload) of the retained commands kept for one device, and for
    /// all devices together.
    pub max_retained_command_bytes_per_device: usize,
    pub max_retained_command_bytes: usize,
    /// Bytes (topic + payload) of the retained telemetry one device holds for services
    /// (so one device cannot fill the gateway-wide retained store).
    pub max_retained_telemetry_bytes_per_device: usize,
    /// Longest keep-alive allowed; a client asking for more (or for none) gets this
    /// (announced as MQTT 5 Server Keep Alive).
    #[serde(alias = "max_keep_alive_secs")]
    pub max_keep_alive: Secs,
    /// User properties allowed on one MQTT 5 message.
    pub max_user_properties: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
}

/// Rate limits: defaults for every principal, the per-source connection rate and the
/// gateway-wide ingress cap.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub messages_per_second: f64,
    pub message_burst: f64,
    pub bytes_per_second: f64,
    pub byte_burst: f64,
    /// Longest one message is held back (back-pressure) before the action applies.
    #[serde(alias = "max_delay_ms")]
    pub max_delay: Millis,
    /// How long a principal may stay over its rate before the action applies.
    #[serde(alias = "sustained_secs")]
    pub sustained: Secs,
    pub action: RateAction,
    /// New connections per second from one source address, before authentication.
    pub connections_per_second_per_source: f64,
    pub connection_burst_per_source: f64,
    /// Messages per second accepted from all peers together.
    pub global_messages_per_second: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateAction {
    /// Discard what is over the rate (acknowledged as usual).
    Drop,
    /// MQTT 5: acknowledge with 0x97 "quota exceeded" (3.1.1: acknowledged, dropped).
    QuotaExceeded,
    /// End the session (MQTT 5: 0x96 "message rate too high").
    Disconnect,
}

/// Overrides of a group's or a principal's rates; unset fields inherit.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateOverride {
    pub messages_per_second: Option<f64>,
    pub message_burst: Option<f64>,
    pub bytes_per_second: Option<f64>,
    pub byte_burst: Option<f64>,
}

impl RateOverride {
    fn apply(&self, to: &mut RateLimits) {
        if let Some(v) = self.messages_per_second {
            to.messages_per_second = v;
        }
        if let Some(v) = self.message_burst {
            to.message_burst = v;
        }
        if let Some(v) = self.bytes_per_second {
            to.bytes_per_second = v;
        }
        if let Some(v) = self.byte_burst {
            to.byte_burst = v;
        }
    }

    fn check(&self, key: &str) -> Result<(), (String, String)> {
        for (name, v) in [
            ("messages_per_second", self.messages_per_second),
            ("message_burst", self.message_burst),
            ("bytes_per_second", self.bytes_per_second),
            ("byte_burst", self.byte_burst),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err((format!("{key}.{name}"), format!("must be > 0 (got {v})")));
            }
        }
        Ok(())
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            messages_per_second: 100.0,
            message_burst: 200.0,
            bytes_per_second: 1_048_576.0,
            byte_burst: 2_097_152.0,
            max_delay: Millis::from_millis(1000),
            sustained: Secs::from_secs(10),
            action: RateAction::Drop,
            connections_per_second_per_source: 20.0,
            connection_burst_per_source: 50.0,
            global_messages_per_second: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Failures from one source (within `failure_window`) before it is backed off.
    pub max_failures: u32,
    #[serde(alias = "failure_window_secs")]
    pub failure_window: Secs,
    /// First back-off; doubles on every further failure, up to `backoff_max`.
    #[serde(alias = "backoff_initial_secs")]
    pub backoff_initial: Secs,
    #[serde(alias = "backoff_max_secs")]
    pub backoff_max: Secs,
    /// An (id, source) pair or a source with no failure for this long starts over;
    /// until then, every failure after a back-off backs it off again.
    #[serde(alias = "backoff_forget_secs")]
    pub backoff_forget: Secs,
    /// Distinct ids one source fails against within `failure_window` before the
    /// source as a whole is backed off.
    pub source_max_ids: u32,
    /// Failures from one source within `failure_window`, whatever the ids,
    /// before the source as a whole is backed off.
    pub source_max_failures: u32,
    /// Back-off records kept (pairs and sources each); the oldest are evicted beyond.
    pub backoff_max_entries: usize,
    /// Prefix length of one IPv6 source for back-off, connection rates and caps.
    pub ipv6_source_prefix: u8,
    /// Failed logins naming one registered id within `failure_window` that
    /// raise an alert (audit, metric, event); at most one alert per id per window.
    pub alert_failures: u32,
    /// Secret-hash key (HMAC-SHA256). Default: `{data_dir}/keys/secret-hash.key`,
    /// created on first start.
    pub secret_key_file: Option<PathBuf>,
    /// The master key(s) the devices' pre-shared keys and frame keys are sealed under:
    /// outside the data dir, created if missing. `PORTCULLIS_MASTER_KEY`, when set,
    /// is used instead.
    pub master_key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// JSON lines audit log. Default: `{data_dir}/audit.log`.
    pub file: Option<PathBuf>,
    /// Entries queued towards the writer before new ones are counted as dropped.
    pub queue: usize,
    /// Key of the HMAC chain; kept outside the data dir (created if missing).
    pub key_file: PathBuf,
    /// A file is rotated before it would grow past this size.
    pub max_file_bytes: u64,
    /// Rotated files kept.
    pub keep_files: usize,
    /// Identical refusals within this long of the first are counted, not written one
    /// by one. "0s" turns aggregation off.
    #[serde(alias = "aggregate_window_secs")]
    pub aggregate_window: Secs,
    /// How often a signed checkpoint is written and published.
    #[serde(alias = "checkpoint_interval_secs")]
    pub checkpoint_interval: Secs,
}

/// How a certificate names its principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityField {
    /// The subject's common name.
    Cn,
    /// A SAN URI `urn:portcullis:{id}`.
    SanUri,
}

/// What differs between a device group and a service group: the rights a group has
/// when its table does not set them, and the name of its tables.
pub trait GroupKind {
    /// `device_groups` or `service_groups`.
    const TABLE: &'static str;
    fn default_publish() -> Vec<String>;
    fn default_subscribe() -> Vec<String>;
}

/// Device groups: by default a device publishes under its own `devices/{id}/` and
/// subscribes to its own commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Devices;

/// Service groups: by default a service may do nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Services;

impl GroupKind for Devices {
    const TABLE: &'static str = "device_groups";
    fn default_publish() -> Vec<String> {
        vec!["devices/{id}/#".into()]
    }
    fn default_subscribe() -> Vec<String> {
        vec!["devices/{id}/commands/#".into()]
    }
}

impl GroupKind for Services {
    const TABLE: &'static str = "service_groups";
    fn default_publish() -> Vec<String> {
        Vec::new()
    }
    fn default_subscribe() -> Vec<String> {
        Vec::new()
    }
}

/// A group of principals (`[device_groups.NAME]` or `[service_groups.NAME]`): who may
/// claim its ids and what its members may do. One type for both kinds; the keys only
/// devices have (`disconnect_on_refusal`, `behaviour`) are refused in a service group
/// by `Config::check`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, bound = "")]
pub struct Group<K: GroupKind> {
    /// CA bundles (PEM) whose certificates may claim ids in this group.
    #[serde(default)]
    pub trust: Vec<PathBuf>,
    /// Certificate revocation lists (PEM) for those CAs; reloaded with the config.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    #[serde(default = "default_identity")]
    pub identity: IdentityField,
    /// Publish rights. Everything else is denied; a device's stay under
    /// `devices/{id}/`.
    #[serde(default = "K::default_publish")]
    pub publish: Vec<String>,
    /// Subscribe rights; a device's stay under `devices/{id}/commands/`.
    #[serde(default = "K::default_subscribe")]
    pub subscribe: Vec<String>,
    /// Devices only. MQTT 3.1.1 cannot carry a reason: refused QoS 1 publishes are
    /// acknowledged and dropped, or, with this set, the device is disconnected instead.
    #[serde(default)]
    pub disconnect_on_refusal: bool,
    /// Rates for the group's members (unset fields: `[rate_limits]`).
    #[serde(default)]
    pub rate: RateOverride,
    /// Devices only. Behaviour model of the group's devices (unset keys: `[behaviour]`).
    #[serde(default)]
    pub behaviour: BehaviourOverride,
    #[serde(skip)]
    pub kind: std::marker::PhantomData<K>,
}

impl<K: GroupKind> Default for Group<K> {
    /// A group with the kind's default rights, trusting no CA.
    fn default() -> Self {
        Group {
            trust: Vec::new(),
            crls: Vec::new(),
            identity: default_identity(),
            publish: K::default_publish(),
            subscribe: K::default_subscribe(),
            disconnect_on_refusal: false,
            rate: RateOverride::default(),
            behaviour: BehaviourOverride::default(),
            kind: std::marker::PhantomData,
        }
    }
}

pub type DeviceGroup = Group<Devices>;
pub type ServiceGroup = Group<Services>;

fn default_identity() -> IdentityField {
    IdentityField::Cn
}

fn loopback(port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

impl Default for Config {
    fn default() -> Self {
        let dev_ca = PathBuf::from("{data_dir}/pki/ca.pem");
        let mut device_groups = BTreeMap::new();
        device_groups.insert(
            "default".to_string(),
            DeviceGroup {
                trust: vec![dev_ca.clone()],
                ..DeviceGroup::default()
            },
        );
        let mut service_groups = BTreeMap::new();
        service_groups.insert(
            "default".to_string(),
            ServiceGroup {
                trust: vec![dev_ca],
                publish: vec!["devices/+/commands/#".into()],
                subscribe: vec!["devices/+/telemetry/#".into()],
                ..ServiceGroup::default()
            },
        );
        Config {
            renamed: Vec::new(),
            proxy_protocol: ProxyProtocol::default(),
            data_dir: PathBuf::from("data"),
            listeners: Listeners::default(),
            tls: Tls::default(),
            admin: Admin::default(),
            observability: Observability::default(),
            broker: Broker::default(),
            upstream: Upstream::default(),
            limits: Limits::default(),
            sessions: Sessions::default(),
            rate_limits: RateLimits::default(),
            rate_overrides: BTreeMap::new(),
            validation: validation::Validation::default(),
            auth: Auth::default(),
            audit: Audit::default(),
            behaviour: Behaviour::default(),
            device_groups,
            service_groups,
            coap: Coap::default(),
            serial: Serial::default(),
        }
    }
}

impl Default for Coap {
    fn default() -> Self {
        Coap {
            max_sessions: 10_000,
            max_sessions_per_source: 16,
            max_handshakes: 256,
            handshake_timeout: Secs::from_secs(10),
            idle_timeout: Secs::from_secs(300),
            max_body_size: 64 * 1024,
            session_expiry: Secs::from_secs(86_400),
            max_ttd: Secs::from_secs(60),
            dedup_entries: 16,
            ack_timeout: Millis::from_millis(2000),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            device_tls: loopback(8883),
            device_plain: loopback(1883),
            service_tls: loopback(8884),
            service_plain: None,
            coap_dtls: loopback(5684),
            coap: None,
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: None,
            key: None,
            handshake_timeout: Secs::from_secs(10),
        }
    }
}

impl Default for Observability {
    fn default() -> Self {
        Observability {
            listen: loopback(9464),
        }
    }
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            mode: BrokerMode::Embedded,
            uplinks: 2,
            max_segment_size: 8 * 1024 * 1024,
            max_segment_count: 4,
            max_links: 1024,
            link_queue: 4096,
            max_retained_messages: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
            max_subscriptions: 100_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 256 * 1024,
            max_topic_length: 256,
            max_topic_depth: 16,
            connect_timeout: Secs::from_secs(10),
            max_connections: 100_000,
            max_connections_per_source: 1_000,
            max_subscribe_filters: 16,
            drain_timeout: Secs::from_secs(5),
            write_timeout: Secs::from_secs(30),
            subscribe_rate: 10.0,
            subscribe_burst: 64.0,
            max_unauthenticated: 1_024,
            fd_reserve: 128,
        }
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            max_session_expiry: Secs::from_secs(86_400),
            queue_max_messages: 1_000,
            queue_max_bytes: 1024 * 1024,
            queue_max_age: Secs::from_secs(86_400),
            service_queue_max_messages: 10_000,
            service_queue_max_bytes: 16 * 1024 * 1024,
            max_inflight: 32,
            receive_maximum: 64,
            topic_alias_maximum: 16,
            max_retained_per_device: 32,
            max_retained_command_bytes_per_device: 1024 * 1024,
            max_retained_command_bytes: 64 * 1024 * 1024,
            max_retained_telemetry_bytes_per_device: 1024 * 1024,
            max_keep_alive: Secs::from_secs(600),
            max_user_properties: 16,
            max_subscriptions: 64,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            max_failures: 5,
            failure_window: Secs::from_secs(60),
            backoff_initial: Secs::from_secs(2),
            backoff_max: Secs::from_secs(300),
            backoff_forget: Secs::from_secs(86_400),
            source_max_ids: 10,
            source_max_failures: 100,
            backoff_max_entries: 100_000,
            ipv6_source_prefix: 64,
            alert_failures: 10,
            secret_key_file: None,
            master_key_file: PathBuf::from("{data_dir}/../portcullis-master.key"),
        }
    }
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            file: None,
            queue: 4096,
            key_file: PathBuf::from("{data_dir}/../portcullis-audit.key"),
            max_file_bytes: 16 * 1024 * 1024,
            keep_files: 8,
            aggregate_window: Secs::from_secs(60),
            checkpoint_interval: Secs::from_secs(60),
        }
    }
}

/// A configuration error: where, which key, and why. Never the offending value when
/// it could be a secret.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.reason)
        }
    }
}

/// `path` made absolute with `.` and `..` folded away, without touching the disk.
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

impl Config {
    /// Parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Parse and validate configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            // serde names an unknown key but not the group it sits in.
            let (key, reason) = match behaviour::unknown_group_key(text) {
                Some(key) => (
                    key,
                    "unknown key; a group's behaviour table takes the keys of [behaviour]"
                        .to_string(),
                ),
                None => (String::new(), toml_reason(&e, text)),
            };
            ConfigError {
                file: origin.to_string(),
                key,
                reason,
            }
        })?;
        config.validate().map_err(|(key, reason)| ConfigError {
            file: origin.to_string(),
            key,
            reason,
        })?;
        config.renamed = duration::renamed_keys(text);
        Ok(config)
    }

    /// Cross-field checks serde cannot express.
    fn validate(&self) -> Result<(), (String, String)> {
        // The master key must not travel with the registry it protects.
        if lexical(&self.resolve(&self.auth.master_key_file)).starts_with(lexical(&self.data_dir)) {
            return Err((
                "auth.master_key_file".into(),
                "must be outside data_dir: the registry it protects is there (and in its backups)"
                    .into(),
            ));
        }
        let positive: [(&str, u64); 23] = [
            (
                "sessions.max_retained_telemetry_bytes_per_device",
                self.sessions.max_retained_telemetry_bytes_per_device as u64,
            ),
            (
                "broker.max_subscriptions",
                self.broker.max_subscriptions as u64,
            ),
            ("limits.write_timeout", self.limits.write_timeout.as_secs()),
            (
                "tls.handshake_timeout",
                self.tls.handshake_timeout.as_secs(),
            ),
            ("limits.max_packet_size", self.limits.max_packet_size as u64),
            (
                "limits.max_topic_length",
                self.limits.max_topic_length as u64,
            ),
            ("limits.max_topic_depth", self.limits.max_topic_depth as u64),
            (
                "limits.connect_timeout",
                self.limits.connect_timeout.as_secs(),
            ),
            ("limits.max_connections", self.limits.max_connections as u64),
            (
                "limits.max_connections_per_source",
                self.limits.max_connections_per_source as u64,
            ),
            (
                "sessions.queue_max_messages",
                self.sessions.queue_max_messages as u64,
            ),
            (
                "sessions.service_queue_max_messages",
                self.sessions.service_queue_max_messages as u64,
            ),
            (
                "broker.max_retained_messages",
                self.broker.max_retained_messages as u64,
            ),
            (
                "broker.max_retained_bytes",
                self.broker.max_retained_bytes as u64,
            ),
            ("sessions.max_inflight", self.sessions.max_inflight as u64),
            (
                "sessions.receive_maximum",
                self.sessions.receive_maximum as u64,
            ),
            (
                "sessions.max_keep_alive",
                self.sessions.max_keep_alive.as_secs(),
            ),
            ("broker.uplinks", self.broker.uplinks as u64),
            ("broker.link_queue", self.broker.link_queue as u64),
            ("audit.max_file_bytes", self.audit.max_file_bytes),
            ("audit.keep_files", self.audit.keep_files as u64),
            (
                "audit.checkpoint_interval",
                self.audit.checkpoint_interval.as_secs(),
            ),
            ("auth.max_failures", self.auth.max_failures as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key.to_string(), "must be > 0 (got 0)".to_string()));
            }
        }
        if !(self.limits.subscribe_rate.is_finite() && self.limits.subscribe_rate > 0.0) {
            return Err((
                "limits.subscribe_rate".into(),
                format!(
                    "must be a number of filters per second > 0 (got {})",
                    self.limits.subscribe_rate
                ),
            ));
        }
        if !(self.limits.subscribe_burst.is_finite() && self.limits.subscribe_burst >= 1.0) {
            return Err((
                "limits.subscribe_burst".into(),
                format!(
                    "must be at least 1 filter (got {})",
                    self.limits.subscribe_burst
                ),
            ));
        }
        let per_device = self.sessions.max_retained_command_bytes_per_device;
        let total = self.sessions.max_retained_command_bytes;
        if per_device == 0 || per_device > total {
            return Err((
                "sessions.max_retained_command_bytes_per_device".into(),
                format!(
                    "must be > 0 and at most sessions.max_retained_command_bytes ({total}) (got {per_device})"
                ),
            ));
        }
        if self.limits.max_packet_size > 256 * 1024 * 1024 {
            return Err((
                "limits.max_packet_size".into(),
                format!(
                    "must be at most 268435456, the MQTT maximum (got {})",
                    self.limits.max_packet_size
                ),
            ));
        }
        if self.sessions.max_session_expiry.as_secs() > u64::from(u32::MAX) {
            return Err((
                "sessions.max_session_expiry".into(),
                format!(
                    "must be at most {}s, the MQTT maximum (got {}s)",
                    u32::MAX,
                    self.sessions.max_session_expiry.as_secs()
                ),
            ));
        }
        if self.limits.max_unauthenticated == 0 {
            return Err((
                "limits.max_unauthenticated".into(),
                "must be > 0 (got 0)".into(),
            ));
        }
        if !(32..=1_000_000).contains(&self.limits.fd_reserve) {
            return Err((
                "limits.fd_reserve".into(),
                format!(
                    "must be between 32 and 1000000 (got {})",
                    self.limits.fd_reserve
                ),
            ));
        }
        if self.limits.max_topic_length > 65_535 {
            return Err((
                "limits.max_topic_length".into(),
                format!(
                    "must be at most 65535 (got {})",
                    self.limits.max_topic_length
                ),
            ));
        }
        // The embedded broker's router queues at most 1000 events, and each link may
        // have two waiting (new packets, and a wake-up): the links never block on that
        // queue only while they are few (`portcullis_embedded::hand_over`).
        if self.broker.uplinks > MAX_UPLINKS {
            return Err((
                "broker.uplinks".into(),
                format!(
                    "must be at most {MAX_UPLINKS} (got {})",
                    self.broker.uplinks
                ),
            ));
        }
        if self.broker.max_links < self.broker.uplinks + 2 {
            return Err((
                "broker.max_links".into(),
                format!(
                    "must leave room for the {} uplinks, the downlink and the fan-out (got {})",
                    self.broker.uplinks, self.broker.max_links
                ),
            ));
        }
        if self.broker.max_segment_size < 1024 || self.broker.max_segment_count == 0 {
            return Err((
                "broker.max_segment_size".into(),
                "segments must be at least 1024 bytes and max_segment_count > 0".into(),
            ));
        }
        self.upstream
            .validate(self.broker.mode == BrokerMode::Upstream)?;
        if self.auth.backoff_initial.as_secs() == 0
            || self.auth.backoff_max.as_secs() > 7 * 86_400
            || self.auth.backoff_max.as_secs() < self.auth.backoff_initial.as_secs()
        {
            return Err((
                "auth.backoff_max".into(),
                format!(
                    "must be >= auth.backoff_initial > 0s and at most 7d (got {}s and {}s)",
                    self.auth.backoff_max.as_secs(),
                    self.auth.backoff_initial.as_secs()
                ),
            ));
        }
        let a = &self.auth;
        for (key, value, lo, hi) in [
            (
                "auth.backoff_forget",
                a.backoff_forget.as_secs(),
                a.backoff_max.as_secs(),
                30 * 86_400,
            ),
            ("auth.source_max_ids", a.source_max_ids.into(), 2, 10_000),
            (
                "auth.source_max_failures",
                a.source_max_failures.into(),
                a.max_failures.into(),
                1_000_000,
            ),
            (
                "auth.backoff_max_entries",
                a.backoff_max_entries as u64,
                1_000,
                10_000_000,
            ),
            (
                "auth.ipv6_source_prefix",
                a.ipv6_source_prefix.into(),
                32,
                128,
            ),
            ("auth.alert_failures", a.alert_failures.into(), 1, 100_000),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err((
                    key.to_string(),
                    format!("must be between {lo} and {hi} (got {value})"),
                ));
            }
        }
        for (key, addr, what) in [
            (
                "listeners.device_plain",
                self.listeners.device_plain,
                "MQTT",
            ),
            (
                "listeners.service_plain",
                self.listeners.service_plain,
                "MQTT",
            ),
            ("listeners.coap", self.listeners.coap, "CoAP"),
        ] {
            if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                let secure = if what == "CoAP" { "coap_dtls" } else { "TLS" };
                return Err((
                    key.to_string(),
                    format!(
                        "plain {what} is only allowed on loopback (got {}); use the {secure} listener",
                        addr.ip()
                    ),
                ));
            }
        }
        if let Some(addr) = self.admin.http_listen {
            if self.admin.http_token_file.is_none() {
                return Err((
                    "admin.http_token_file".into(),
                    "required when admin.http_listen is set: the file holding the bearer token"
                        .into(),
                ));
            }
            if !addr.ip().is_loopback() && !self.admin.http_tls {
                return Err((
                    "admin.http_listen".into(),
                    format!(
                        "the HTTP admin API without TLS is only allowed on loopback (got {}); set admin.http_tls = true",
                        addr.ip()
                    ),
                ));
            }
        }
        let c = &self.coap;
        for (key, value, lo, hi) in [
            ("coap.max_sessions", c.max_sessions as u64, 1, 10_000_000),
            (
                "coap.max_sessions_per_source",
                c.max_sessions_per_source as u64,
                1,
                1_000_000,
            ),
            ("coap.max_handshakes", c.max_handshakes as u64, 1, 1_000_000),
            (
                "coap.handshake_timeout",
                c.handshake_timeout.as_secs(),
                1,
                300,
            ),
            ("coap.idle_timeout", c.idle_timeout.as_secs(), 1, 86_400 * 7),
            ("coap.max_body_size", c.max_body_size as u64, 16, 64 << 20),
            ("coap.max_ttd", c.max_ttd.as_secs(), 0, 3_600),
            ("coap.dedup_entries", c.dedup_entries as u64, 1, 4_096),
            (
                "coap.ack_timeout",
                c.ack_timeout.as_millis() as u64,
                100,
                60_000,
            ),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err((
                    key.to_string(),
                    format!("must be between {lo} and {hi} (got {value})"),
                ));
            }
        }
        self.serial.validate()?;
        self.proxy_protocol.validate(
            self.listeners.device_tls.is_some(),
            self.listeners.device_plain.is_some(),
            self.listeners.coap_dtls.is_some(),
        )?;
        let r = &self.rate_limits;
        for (key, v) in [
            ("rate_limits.messages_per_second", r.messages_per_second),
            ("rate_limits.message_burst", r.message_burst),
            ("rate_limits.bytes_per_second", r.bytes_per_second),
            ("rate_limits.byte_burst", r.byte_burst),
            (
                "rate_limits.connections_per_second_per_source",
                r.connections_per_second_per_source,
            ),
            (
                "rate_limits.connection_burst_per_source",
                r.connection_burst_per_source,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err((key.to_string(), format!("must be > 0 (got {v})")));
            }
        }
        if r.global_messages_per_second == 0 {
            return Err((
                "rate_limits.global_messages_per_second".into(),
                "must be > 0 (got 0)".into(),
            ));
        }
        for (name, o) in &self.rate_overrides {
            let key = format!("rate_overrides.\"{name}\"");
            let ok = name
                .split_once('/')
                .is_some_and(|(kind, id)| matches!(kind, "device" | "service") && !id.is_empty());
            if !ok {
                return Err((key, "keys are \"device/ID\" or \"service/ID\"".into()));
            }
            o.check(&key)?;
        }
        for (name, g) in &self.device_groups {
            g.rate.check(&format!("device_groups.{name}.rate"))?;
        }
        for (name, g) in &self.service_groups {
            g.rate.check(&format!("service_groups.{name}.rate"))?;
        }
        self.behaviour.check("behaviour")?;
        for name in self.device_groups.keys() {
            self.behaviour_for(name)
                .check(&format!("device_groups.{name}.behaviour"))?;
        }
        self.validation.check()?;
        self.validation.check_groups(|g| {
            self.device_groups.contains_key(g) || self.service_groups.contains_key(g)
        })?;
        if self.device_groups.is_empty() {
            return Err((
                "device_groups".into(),
                "at least one device group is required".into(),
            ));
        }
        for (name, group) in &self.device_groups {
            check_group_name(name).map_err(|r| (format!("device_groups.{name}"), r))?;
            for (i, pattern) in group.publish.iter().enumerate() {
                let key = format!("device_groups.{name}.publish[{i}]");
                check_pattern(pattern).map_err(|r| (key.clone(), r))?;
                if !pattern.starts_with("devices/{id}/") {
                    return Err((
                        key,
                        format!(
                            "a device may only publish under devices/{{id}}/ (got {pattern:?})"
                        ),
                    ));
                }
            }
            for (i, pattern) in group.subscribe.iter().enumerate() {
                let key = format!("device_groups.{name}.subscribe[{i}]");
                check_pattern(pattern).map_err(|r| (key.clone(), r))?;
                if !pattern.starts_with("devices/{id}/commands/") {
                    return Err((
                        key,
                        format!(
                            "a device may only subscribe under devices/{{id}}/commands/ (got {pattern:?})"
                        ),
                    ));
                }
            }
        }
        for (name, group) in &self.service_groups {
            check_group_name(name).map_err(|r| (format!("service_groups.{name}"), r))?;
            // One group type for both kinds: the keys only devices have are refused
            // here, as unknown keys are.
            if group.disconnect_on_refusal {
                return Err((
                    format!("service_groups.{name}.disconnect_on_refusal"),
                    "only device groups have this key".into(),
                ));
            }
            if group.behaviour != BehaviourOverride::default() {
                return Err((
                    format!("service_groups.{name}.behaviour"),
                    "only device groups have a behaviour model".into(),
                ));
            }
            for (field, patterns) in [("publish", &group.publish), ("subscribe", &group.subscribe)]
            {
                for (i, pattern) in patterns.iter().enumerate() {
                    let key = format!("service_groups.{name}.{field}[{i}]");
                    check_pattern(pattern).map_err(|r| (key.clone(), r))?;
                    if field == "publish" && pattern.starts_with("portcullis/") {
                        return Err((
                            key,
                            "only the gateway may publish under portcullis/".to_string(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The rates of one principal: defaults, then its group's, then its own overrides.
    pub fn rates_for(&self, kind: &str, group: &str, id: &str) -> RateLimits {
        let mut r = self.rate_limits.clone();
        let group_override = match kind {
            "device" => self.device_groups.get(group).map(|g| &g.rate),
            _ => self.service_groups.get(group).map(|g| &g.rate),
        };
        if let Some(o) = group_override {
            o.apply(&mut r);
        }
        if let Some(o) = self.rate_overrides.get(&format!("{kind}/{id}")) {
            o.apply(&mut r);
        }
        r
    }

    /// The behaviour model of a device group: `[behaviour]`, then the group's own keys.
    /// A group that does not exist gets `[behaviour]`.
    pub fn behaviour_for(&self, group: &str) -> Behaviour {
        let mut b = self.behaviour.clone();
        if let Some(g) = self.device_groups.get(group) {
            g.behaviour.apply(&mut b);
        }
        b
    }

    /// A configured path with a leading `{data_dir}` replaced by the data dir.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match path.strip_prefix("{data_dir}") {
            Ok(rest) => self.data_dir.join(rest),
            Err(_) => path.to_path_buf(),
        }
    }

    /// Paths that default to a place under `data_dir`.
    fn path_or(&self, configured: &Option<PathBuf>, default: &str) -> PathBuf {
        configured
            .as_deref()
            .map(|p| self.resolve(p))
            .unwrap_or_else(|| self.data_dir.join(default))
    }
    pub fn server_cert(&self) -> PathBuf {
        self.path_or(&self.tls.cert, "pki/server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.path_or(&self.tls.key, "pki/server.key")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.path_or(&self.admin.socket, "admin.sock")
    }
    /// The HTTP admin API's token file, if one is configured.
    pub fn admin_token_file(&self) -> Option<PathBuf> {
        self.admin
            .http_token_file
            .as_deref()
            .map(|p| self.resolve(p))
    }
    pub fn secret_key_file(&self) -> PathBuf {
        self.path_or(&self.auth.secret_key_file, "keys/secret-hash.key")
    }
    pub fn audit_file(&self) -> PathBuf {
        self.path_or(&self.audit.file, "audit.log")
    }
    pub fn master_key_file(&self) -> PathBuf {
        self.resolve(&self.auth.master_key_file)
    }
    pub fn audit_key_file(&self) -> PathBuf {
        self.resolve(&self.audit.key_file)
    }
    pub fn registry_file(&self) -> PathBuf {
        self.data_dir.join("registry.redb")
    }
    /// Parked device sessions and retained commands, kept across restarts.
    pub fn sessions_file(&self) -> PathBuf {
        self.data_dir.join("sessions.redb")
    }
    /// The serial adapter's replay floors and counters (opened only with serial ports).
    pub fn serial_counters_file(&self) -> PathBuf {
        self.data_dir.join("serial-counters.redb")
    }
    /// The durable outbox of upstream mode.
    pub fn outbox_file(&self) -> PathBuf {
        self.data_dir.join("outbox.redb")
    }
    /// `[upstream]` paths, resolved.
    pub fn upstream_path(&self, path: &Option<PathBuf>) -> Option<PathBuf> {
        path.as_deref().map(|p| self.resolve(p))
    }
}

/// toml's message quotes the offending line, which may hold a secret: keep only the
/// position and the reason.
fn toml_reason(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

pub(crate) fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "group names are 1-64 characters of [A-Za-z0-9._-] (got {name:?})"
        ))
    }
}

/// Topic patterns (ACLs, validation rules): MQTT filters whose levels may also be
/// `{id}` or `{group}`.
pub(crate) fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty topic pattern".into());
    }
    if pattern.starts_with('$') {
        return Err(format!(
            "topics starting with '$' are reserved (got {pattern:?})"
        ));
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.is_empty() {
            return Err(format!("empty level in {pattern:?}"));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!("'#' must be the last level in {pattern:?}"));
        }
        let is_placeholder = matches!(*level, "{id}" | "{group}");
        if !is_placeholder
            && *level != "#"
            && *level != "+"
            && (level.contains(['+', '#', '\0', '{', '}']))
        {
            return Err(format!(
                "level {level:?} in {pattern:?} mixes a wildcard or placeholder with text"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_keys_read_new_and_old_names_and_name_the_renamed_ones() {
        let new = Config::parse(
            "[limits]\nconnect_timeout = \"1m 30s\"\n[rate_limits]\nmax_delay = \"250ms\"\n",
            "n.toml",
        )
        .unwrap();
        assert_eq!(new.limits.connect_timeout.as_secs(), 90);
        assert_eq!(new.rate_limits.max_delay.as_millis(), 250);
        assert!(new.renamed.is_empty(), "{:?}", new.renamed);
        let old = Config::parse(
            "[limits]\nconnect_timeout_secs = 90\n[rate_limits]\nmax_delay_ms = 250\n",
            "o.toml",
        )
        .unwrap();
        assert_eq!(old.limits, new.limits);
        assert_eq!(old.rate_limits, new.rate_limits);
        assert_eq!(
            old.renamed,
            [
                "limits.connect_timeout_secs: renamed; write `connect_timeout = \"90s\"` instead (the old key is still read)",
                "rate_limits.max_delay_ms: renamed; write `max_delay = \"250ms\"` instead (the old key is still read)",
            ]
        );
        let both = Config::parse(
            "[limits]\nconnect_timeout_secs = 90\nconnect_timeout = \"90s\"\n",
            "b.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(both.contains("duplicate field"), "{both}");
        let bad = Config::parse("[tls]\nhandshake_timeout = \"ten seconds\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("line 2") && bad.contains("\"30s\""), "{bad}");
        let zero = Config::parse("[limits]\nwrite_timeout = \"0s\"\n", "z.toml").unwrap_err();
        assert_eq!(
            (zero.key.as_str(), zero.reason.as_str()),
            ("limits.write_timeout", "must be > 0 (got 0)")
        );
    }

    /// Each of the renamed keys, written under its old name with a bare number in its
    /// old unit, gives the same configuration and names itself once.
    #[test]
    fn every_renamed_key_is_still_read_in_its_old_unit() {
        let shipped = Config::parse(SHIPPED, "shipped.toml").unwrap();
        for (old, new) in duration::RENAMED {
            let line = SHIPPED
                .lines()
                .find(|l| l.starts_with(&format!("{new} = ")))
                .unwrap_or_else(|| panic!("the shipped file sets {new}"));
            let quoted = line.split_once(" = ").unwrap().1.trim_matches('"');
            let d = humantime::parse_duration(quoted).unwrap();
            let n = if old.ends_with("_ms") {
                d.as_millis()
            } else {
                u128::from(d.as_secs())
            };
            let text = SHIPPED.replacen(line, &format!("{old} = {n}"), 1);
            let mut config =
                Config::parse(&text, "old.toml").unwrap_or_else(|e| panic!("{old}: {e}"));
            assert_eq!(config.renamed.len(), 1, "{old}: {:?}", config.renamed);
            assert!(
                config.renamed[0].contains(&format!(".{old}: renamed; write `{new} = ")),
                "{}",
                config.renamed[0]
            );
            config.renamed.clear();
            assert_eq!(config, shipped, "{old}");
        }
    }

    #[test]
    fn a_session_expiry_over_the_mqtt_maximum_is_refused() {
        let err =
            Config::parse("[sessions]\nmax_session_expiry = 4294967296\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "sessions.max_session_expiry");
        assert!(Config::parse("[sessions]\nmax_session_expiry = 4294967295\n", "x.toml").is_ok());
    }

    #[test]
    fn shipped_file_is_the_embedded_default() {
        let shipped = Config::parse(SHIPPED, "config/portcullis.toml").unwrap();
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn data_dir_placeholder_follows_the_data_dir() {
        let c = Config::parse("data_dir = \"/var/lib/portcullis\"\n", "x.toml").unwrap();
        let trust = &c.device_groups["default"].trust[0];
        assert_eq!(
            c.resolve(trust),
            PathBuf::from("/var/lib/portcullis/pki/ca.pem")
        );
        assert_eq!(
            c.resolve(Path::new("/etc/ca.pem")),
            PathBuf::from("/etc/ca.pem")
        );
    }

    #[test]
    fn rates_layer_defaults_group_and_principal() {
        let text = "[device_groups.default.rate]\nmessages_per_second = 10.0\n\
                    [rate_overrides.\"device/s1\"]\nmessage_burst = 3.0\n";
        let c = Config::parse(text, "x.toml").unwrap();
        let r = c.rates_for("device", "default", "s1");
        assert_eq!(r.messages_per_second, 10.0);
        assert_eq!(r.message_burst, 3.0);
        assert_eq!(r.bytes_per_second, RateLimits::default().bytes_per_second);
        let other = c.rates_for("device", "default", "s2");
        assert_eq!(other.message_burst, RateLimits::default().message_burst);
        let err =
            Config::parse("[rate_overrides.s1]\nmessage_burst = 1.0\n", "x.toml").unwrap_err();
        assert!(err.key.starts_with("rate_overrides"), "{err}");
        let err =
            Config::parse("[rate_limits]\nmessages_per_second = 0.0\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "rate_limits.messages_per_second");
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::parse("", "x.toml").unwrap(), Config::default());
    }

    #[test]
    fn device_and_service_groups_share_one_type_with_their_own_defaults() {
        let text = "[device_groups.meters]\n[service_groups.billing]\n";
        let c = Config::parse(text, "x.toml").unwrap();
        let meters = &c.device_groups["meters"];
        assert_eq!(meters.publish, ["devices/{id}/#"]);
        assert_eq!(meters.subscribe, ["devices/{id}/commands/#"]);
        let billing = &c.service_groups["billing"];
        assert!(billing.publish.is_empty() && billing.subscribe.is_empty());
        assert_eq!(meters.trust, billing.trust);
    }

    #[test]
    fn a_service_group_refuses_the_keys_only_devices_have() {
        for (key, text) in [
            (
                "service_groups.billing.behaviour",
                "[service_groups.billing.behaviour]\nenabled = false\n",
            ),
            (
                "service_groups.billing.disconnect_on_refusal",
                "[service_groups.billing]\ndisconnect_on_refusal = true\n",
            ),
        ] {
            let err = Config::parse(text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
            assert!(err.contains("only device groups"), "{err}");
        }
        // The same keys in a device group are fine.
        let ok = "[device_groups.meters]\ndisconnect_on_refusal = true\n\
                  [device_groups.meters.behaviour]\nenabled = false\n";
        assert!(Config::parse(ok, "x.toml").is_ok());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = Config::parse("[limits]\nmax_pakcet_size = 10\n", "x.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("x.toml"), "{text}");
        assert!(text.contains("max_pakcet_size"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn more_uplinks_than_the_broker_can_be_told_about_are_refused() {
        let err =
            Config::parse("[broker]\nuplinks = 257\nmax_links = 4096\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "broker.uplinks");
        assert!(err.to_string().contains("at most 256"), "{err}");
        assert!(Config::parse("[broker]\nuplinks = 256\n", "x.toml").is_ok());
    }

    #[test]
    fn zero_limit_names_the_key() {
        let err = Config::parse("[limits]\nmax_packet_size = 0\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "limits.max_packet_size");
        assert_eq!(
            err.to_string(),
            "x.toml: limits.max_packet_size: must be > 0 (got 0)"
        );
    }

    #[test]
    fn retained_command_bytes_per_device_must_fit_the_total() {
        for text in [
            "[sessions]\nmax_retained_command_bytes_per_device = 0\n",
            "[sessions]\nmax_retained_command_bytes_per_device = 2000\n\
             max_retained_command_bytes = 1000\n",
        ] {
            let err = Config::parse(text, "x.toml").unwrap_err();
            assert_eq!(err.key, "sessions.max_retained_command_bytes_per_device");
        }
    }

    #[test]
    fn descriptor_limits_are_bounds_checked_by_name() {
        let err = Config::parse("[limits]\nfd_reserve = 8\n", "x.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.toml: limits.fd_reserve: must be between 32 and 1000000 (got 8)"
        );
        let err = Config::parse("[limits]\nmax_unauthenticated = 0\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "limits.max_unauthenticated");
    }

    #[test]
    fn back_off_keys_out_of_bounds_name_the_key() {
        for (text, key) in [
            ("ipv6_source_prefix = 16", "auth.ipv6_source_prefix"),
            ("ipv6_source_prefix = 129", "auth.ipv6_source_prefix"),
            ("source_max_ids = 1", "auth.source_max_ids"),
            ("source_max_failures = 2", "auth.source_max_failures"),
            ("backoff_forget = 10", "auth.backoff_forget"),
            ("backoff_max_entries = 10", "auth.backoff_max_entries"),
            ("alert_failures = 0", "auth.alert_failures"),
        ] {
            let err = Config::parse(&format!("[auth]\n{text}\n"), "x.toml").unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(err.to_string().contains("must be between"), "{err}");
        }
        let ok = Config::parse("[auth]\nipv6_source_prefix = 128\n", "x.toml").unwrap();
        assert_eq!(ok.auth.ipv6_source_prefix, 128);
    }

    #[test]
    fn http_admin_is_off_by_default_and_needs_a_token_file_and_tls_off_loopback() {
        assert_eq!(Config::default().admin.http_listen, None);
        let err =
            Config::parse("[admin]\nhttp_listen = \"127.0.0.1:9465\"\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "admin.http_token_file");
        let off_loopback = "[admin]\nhttp_listen = \"0.0.0.0:9465\"\nhttp_token_file = \"/t\"\n";
        let err = Config::parse(off_loopback, "x.toml").unwrap_err();
        assert_eq!(err.key, "admin.http_listen");
        assert!(err.reason.contains("admin.http_tls = true"), "{err}");
        let with_tls =
            Config::parse(&format!("{off_loopback}http_tls = true\n"), "x.toml").unwrap();
        assert!(with_tls.admin.http_tls);
        let loopback =
            "[admin]\nhttp_listen = \"[::1]:9465\"\nhttp_token_file = \"{data_dir}/../t\"\n";
        let ok = Config::parse(loopback, "x.toml").unwrap();
        assert_eq!(ok.admin_token_file(), Some(PathBuf::from("data/../t")));
    }

    #[test]
    fn plain_listener_off_loopback_is_rejected() {
        let err =
            Config::parse("[listeners]\ndevice_plain = \"0.0.0.0:1883\"\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "listeners.device_plain");
    }

    #[test]
    fn device_acl_outside_own_namespace_is_rejected() {
        let text = "[device_groups.meters]\npublish = [\"devices/+/telemetry\"]\n";
        let err = Config::parse(text, "x.toml").unwrap_err();
        assert_eq!(err.key, "device_groups.meters.publish[0]");
    }

    #[test]
    fn service_may_not_publish_gateway_events() {
        let text = "[service_groups.ops]\npublish = [\"portcullis/events/#\"]\n";
        let err = Config::parse(text, "x.toml").unwrap_err();
        assert_eq!(err.key, "service_groups.ops.publish[0]");
    }

    #[test]
    fn malformed_pattern_is_rejected() {
        let text = "[service_groups.ops]\nsubscribe = [\"devices/#/x\"]\n";
        let err = Config::parse(text, "x.toml").unwrap_err();
        assert!(err.reason.contains("last level"), "{err}");
    }

    #[test]
    fn syntax_error_does_not_echo_the_line() {
        let text = "[auth]\nsecret_key_file = \"s3cr3t-value\n";
        let err = Config::parse(text, "x.toml").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
}
