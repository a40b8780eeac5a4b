//! Scenario files: the target, how the fleet gets its credentials, and the groups of
//! simulated devices and services with their behaviour.

use crate::mqtt::Version;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// How long the fleet runs, in seconds.
    pub duration_secs: f64,
    /// After the run, how long to wait for outstanding acknowledgements and deliveries.
    #[serde(default = "default_grace")]
    pub grace_secs: f64,
    /// Stagger connection starts over this many seconds (0: all at once).
    #[serde(default)]
    pub ramp_up_secs: f64,
    pub target: Target,
    #[serde(default)]
    pub provision: Provision,
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
}

fn default_grace() -> f64 {
    3.0
}

/// Where the fleet connects. Addresses left out are not used; a group that needs one
/// that is missing is an error at load.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub device_plain: Option<SocketAddr>,
    pub device_tls: Option<SocketAddr>,
    pub service_plain: Option<SocketAddr>,
    pub service_tls: Option<SocketAddr>,
    /// Device listener, CoAP over DTLS (UDP): for `protocol = "coap"` groups.
    pub coap_dtls: Option<SocketAddr>,
    /// Serial buses by name: the device end of each (a pty socat made, or a tty),
    /// for `protocol = "serial"` groups. The gateway's `[[serial.ports]]` names the
    /// other end.
    #[serde(default)]
    pub serial: BTreeMap<String, PathBuf>,
    /// The CA that verifies the server's certificate.
    pub ca: Option<PathBuf>,
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".into()
}

/// How the fleet's principals get registered and their credentials made.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    /// `cli`: register every principal with `portcullis device|service import` before
    /// the run; `none`: the credentials are prepared in advance (certificates as
    /// `{dir}/{id}.pem` and `{id}.key`, secrets in `{dir}/secrets.toml`).
    #[serde(default = "default_mode")]
    pub mode: ProvisionMode,
    /// The gateway binary the CLI mode runs.
    #[serde(default = "default_portcullis")]
    pub portcullis: PathBuf,
    /// The gateway's config file, passed to the CLI as `--config`.
    pub config: Option<PathBuf>,
    /// A CA the gateway's groups trust, whose key signs the fleet's certificates.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Mode `cli`: where the import file is written for the moment of registration
    /// (certificates and secrets themselves stay in memory). Mode `none`: where the
    /// prepared credentials are read from.
    #[serde(default = "default_credentials_dir")]
    pub dir: PathBuf,
}

impl Default for Provision {
    fn default() -> Self {
        Provision {
            mode: default_mode(),
            portcullis: default_portcullis(),
            config: None,
            ca_cert: None,
            ca_key: None,
            dir: default_credentials_dir(),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionMode {
    Cli,
    None,
}

fn default_mode() -> ProvisionMode {
    ProvisionMode::Cli
}
fn default_portcullis() -> PathBuf {
    "portcullis".into()
}
fn default_credentials_dir() -> PathBuf {
    "sim-credentials".into()
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Device,
    Service,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Plain,
    Tls,
}

/// What a group speaks.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    #[serde(rename = "mqtt5")]
    Mqtt5,
    #[serde(rename = "mqtt311")]
    Mqtt311,
    /// CoAP over DTLS 1.2 with a pre-shared key, to `[target] coap_dtls`.
    #[serde(rename = "coap")]
    Coap,
    /// Authenticated frames (docs/serial-protocol.md) on a bus of `[target.serial]`.
    #[serde(rename = "serial")]
    Serial,
}

impl Protocol {
    /// The MQTT version of an MQTT group (CoAP and serial groups have none; 5 stands
    /// in).
    pub fn mqtt(self) -> Version {
        match self {
            Protocol::Mqtt311 => Version::V4,
            Protocol::Mqtt5 | Protocol::Coap | Protocol::Serial => Version::V5,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Credential {
    /// A client certificate whose common name is the id (TLS only).
    Certificate,
    /// A secret as the MQTT password, the id as client id and username.
    Secret,
    /// A DTLS pre-shared key whose identity is the id (CoAP only).
    Psk,
    /// A 32-byte serial frame key (serial only).
    SerialKey,
    /// Nothing: for brokers without authentication, and for hostile behaviours that
    /// never get as far as authenticating.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default = "default_kind")]
    pub kind: Kind,
    pub count: usize,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// Default: `psk` for CoAP groups, `serial-key` for serial groups, `certificate`
    /// for the others (`credential()`).
    #[serde(default)]
    pub credential: Option<Credential>,
    /// Serial groups: the bus of `[target.serial]` the members are on (default: the
    /// only one, when there is one).
    pub bus: Option<String>,
    /// Ids are `{id_prefix}{n}`, n from 1; default `{name}-`.
    pub id_prefix: Option<String>,
    /// The gateway group the principals are registered in.
    #[serde(default = "default_gateway_group")]
    pub gateway_group: String,
    /// Source addresses, spread over this IPv4 loopback block (default 127.0.0.1 only).
    pub sources: Option<String>,
    pub behaviour: Behaviour,
}

fn default_kind() -> Kind {
    Kind::Device
}
fn default_protocol() -> Protocol {
    Protocol::Mqtt5
}
fn default_transport() -> Transport {
    Transport::Tls
}
fn default_gateway_group() -> String {
    "default".into()
}

/// What the members of a group do.
#[derive(Debug, Deserialize, Clone)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Behaviour {
    /// Periodic telemetry with jitter, a boot burst, a daily cycle, and command handling.
    WellBehaved {
        /// Mean messages per second per device.
        rate: f64,
        /// Each interval is the mean one times a factor in [1 - jitter, 1 + jitter].
        #[serde(default = "default_jitter")]
        jitter: f64,
        /// Messages sent at once after connecting (at most 32: the simulator's own
        /// limit of unacknowledged messages).
        #[serde(default)]
        boot_burst: u32,
        /// The rate swings by this fraction over a simulated day.
        #[serde(default)]
        daily_amplitude: f64,
        /// Length of the simulated day, in seconds.
        #[serde(default = "default_day")]
        day_secs: f64,
        #[serde(default = "default_qos")]
        qos: u8,
        /// Telemetry topic suffix under `devices/{id}/`.
        #[serde(default = "default_telemetry")]
        topic: String,
        /// Where command acknowledgements go, under `devices/{id}/`.
        #[serde(default = "default_ack_topic")]
        ack_topic: String,
        /// Receive commands: subscribe to `devices/{id}/commands/#` (MQTT), observe
        /// `/c` (CoAP).
        #[serde(default = "default_true")]
        commands: bool,
    },
    /// A service: subscribes to device telemetry, measures delivery, sends commands.
    Service {
        #[serde(default = "default_service_filter")]
        subscribe: Vec<String>,
        /// Commands per second, sent round-robin to the devices of `command_groups`.
        #[serde(default)]
        commands_per_second: f64,
        #[serde(default)]
        command_groups: Vec<String>,
    },
    /// Publishes as fast as the gateway lets it, `inflight` QoS 1 messages at a time
    /// (serial: frames, one unanswered for `SERIAL_FLOOD_EXPIRY` no longer counting).
    Flood {
        /// Unanswered at a time; default 32 for MQTT, 1 (NSTART) for CoAP, 64 for
        /// serial.
        inflight: Option<u16>,
        #[serde(default = "default_flood_payload")]
        payload_bytes: usize,
    },
    /// Publishes payloads of `bytes` bytes, `rate` per second.
    Oversized {
        #[serde(default = "default_oversize")]
        bytes: usize,
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// Publishes telemetry that is not JSON, `rate` per second.
    SchemaBreaking {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// Publishes and subscribes outside its namespace.
    TopicScan {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// Tries wrong secrets for its id, `rate` attempts per second.
    CredentialStuffing {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// Two sessions with one identity, reconnecting in turn.
    ClonedIdentity {
        #[serde(default = "default_clone_interval")]
        interval_secs: f64,
    },
    /// Connects and disconnects as fast as it can.
    ReconnectStorm {
        #[serde(default = "default_storm_rate")]
        rate: f64,
    },
    /// Opens connections (TCP, and TLS on a TLS listener) and never finishes CONNECT.
    Slowloris {
        #[serde(default = "default_slowloris")]
        connections: u32,
    },
    /// Connects properly, then sends a malformed packet; repeats `rate` times per second.
    Malformed {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// CoAP: captures the records of its own genuine requests and sends them again,
    /// into its live DTLS session and from another port. Serial: sends a genuine
    /// frame, then one it recorded earlier. `rate` cycles per second.
    Replay {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// Serial: frames naming the member, signed under a key that is not its own.
    Forged {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
    },
    /// Serial: each cycle, line noise (`bytes` random bytes; every fourth cycle a run
    /// longer than any frame), a frame cut short, then a good frame.
    Noise {
        #[serde(default = "default_hostile_rate")]
        rate: f64,
        #[serde(default = "default_noise_bytes")]
        bytes: usize,
    },
    /// Starts at `rate` and grows linearly to `rate * factor` over the run.
    SlowRamp {
        rate: f64,
        factor: f64,
        #[serde(default = "default_qos")]
        qos: u8,
    },
}

fn default_jitter() -> f64 {
    0.2
}
fn default_day() -> f64 {
    86_400.0
}
fn default_qos() -> u8 {
    1
}
fn default_telemetry() -> String {
    "telemetry".into()
}
fn default_ack_topic() -> String {
    "telemetry/ack".into()
}
fn default_service_filter() -> Vec<String> {
    vec!["devices/+/telemetry/#".into()]
}
/// A flooder's unanswered messages at a time, unless given: MQTT's in flight, and
/// CoAP's NSTART (RFC 7252: one outstanding request).
pub const MQTT_FLOOD_INFLIGHT: u16 = 32;
pub const COAP_FLOOD_INFLIGHT: u16 = 1;
/// A serial flooder's frames unanswered at a time, and how long one waits before it
/// no longer counts: the gateway drops frames over the port's rate unanswered, so at
/// least 64 / 50 ms = 1280 frames a second, far over `serial.max_frames_per_second`'s
/// default 200.
pub const SERIAL_FLOOD_INFLIGHT: u16 = 64;
pub const SERIAL_FLOOD_EXPIRY: std::time::Duration = std::time::Duration::from_millis(50);

fn default_true() -> bool {
    true
}
fn default_flood_payload() -> usize {
    64
}
fn default_oversize() -> usize {
    1 << 20
}
fn default_hostile_rate() -> f64 {
    5.0
}
fn default_clone_interval() -> f64 {
    1.0
}
fn default_noise_bytes() -> usize {
    64
}
fn default_storm_rate() -> f64 {
    200.0
}
fn default_slowloris() -> u32 {
    10
}

impl Behaviour {
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::WellBehaved { .. } => "well-behaved",
            Behaviour::Service { .. } => "service",
            Behaviour::Flood { .. } => "flood",
            Behaviour::Oversized { .. } => "oversized",
            Behaviour::SchemaBreaking { .. } => "schema-breaking",
            Behaviour::TopicScan { .. } => "topic-scan",
            Behaviour::CredentialStuffing { .. } => "credential-stuffing",
            Behaviour::ClonedIdentity { .. } => "cloned-identity",
            Behaviour::ReconnectStorm { .. } => "reconnect-storm",
            Behaviour::Slowloris { .. } => "slowloris",
            Behaviour::Malformed { .. } => "malformed",
            Behaviour::SlowRamp { .. } => "slow-ramp",
            Behaviour::Replay { .. } => "replay",
            Behaviour::Forged { .. } => "forged",
            Behaviour::Noise { .. } => "noise",
        }
    }

    pub fn hostile(&self) -> bool {
        !matches!(
            self,
            Behaviour::WellBehaved { .. } | Behaviour::Service { .. }
        )
    }
}

impl Group {
    /// What the members present: as given, or the protocol's usual.
    pub fn credential(&self) -> Credential {
        match (self.credential, self.protocol) {
            (Some(c), _) => c,
            (None, Protocol::Coap) => Credential::Psk,
            (None, Protocol::Serial) => Credential::SerialKey,
            (None, _) => Credential::Certificate,
        }
    }

    pub fn coap(&self) -> bool {
        self.protocol == Protocol::Coap
    }

    pub fn serial(&self) -> bool {
        self.protocol == Protocol::Serial
    }

    pub fn id(&self, n: usize) -> String {
        match &self.id_prefix {
            Some(p) => format!("{p}{n}"),
            None => format!("{}-{n}", self.name),
        }
    }

    /// The source address of member `n` (from 1).
    pub fn source(&self, n: usize) -> Option<IpAddr> {
        let (base, size) = parse_block(self.sources.as_deref()?).ok()?;
        // Skip the block's first address and, for blocks over 2, its last.
        let usable = if size > 2 { size - 2 } else { size };
        let offset = if size > 2 { 1 } else { 0 } + (n as u32 - 1) % usable;
        Some(IpAddr::V4(Ipv4Addr::from(u32::from(base) + offset)))
    }
}

/// `127.a.b.c/len` → (first address, number of addresses).
pub fn parse_block(text: &str) -> Result<(Ipv4Addr, u32)> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("sources {text:?}: not an IPv4 address"))?;
    let len: u32 = len
        .parse()
        .ok()
        .filter(|l| (8..=32).contains(l))
        .with_context(|| format!("sources {text:?}: prefix length must be 8 to 32"))?;
    if !addr.is_loopback() {
        bail!("sources {text:?}: only loopback (127.0.0.0/8) is allowed");
    }
    let size = 1u32 << (32 - len);
    let base = u32::from(addr) & !(size - 1);
    Ok((Ipv4Addr::from(base), size))
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut s = Scenario::parse(&text).with_context(|| format!("{}", path.display()))?;
        // Relative paths are relative to the scenario file.
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(ca) = s.target.ca.as_mut() {
            fix(ca);
        }
        for bus in s.target.serial.values_mut() {
            fix(bus);
        }
        for p in [
            s.provision.config.as_mut(),
            s.provision.ca_cert.as_mut(),
            s.provision.ca_key.as_mut(),
            Some(&mut s.provision.dir),
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if s.provision.portcullis.components().count() > 1 {
            fix(&mut s.provision.portcullis);
        }
        Ok(s)
    }

    pub fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e))?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<()> {
        if !(self.duration_secs > 0.0 && self.duration_secs.is_finite()) {
            bail!("duration_secs must be a positive number");
        }
        for (name, v) in [
            ("duration_secs", self.duration_secs),
            ("grace_secs", self.grace_secs),
            ("ramp_up_secs", self.ramp_up_secs),
        ] {
            // A day at most: beyond that a run is a mistake, not a scenario.
            if !(0.0..=86_400.0).contains(&v) {
                bail!("{name} must be between 0 and 86400 seconds, not {v}");
            }
        }
        if self.groups.is_empty() {
            bail!("no [[group]]: a scenario needs at least one");
        }
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for g in &self.groups {
            let at = format!("group {:?}", g.name);
            if !names.insert(g.name.as_str()) {
                bail!("{at}: the name is used twice");
            }
            // Every member is a connection and a registered principal: beyond this, a
            // run would exhaust the machine before it started.
            const MAX_MEMBERS: usize = 1_000_000;
            if g.count == 0 || g.count > MAX_MEMBERS {
                bail!("{at}: count must be between 1 and {MAX_MEMBERS}");
            }
            for n in 1..=g.count {
                let id = g.id(n);
                if !ids.insert(id.clone()) {
                    bail!("{at}: id {id:?} is also another member's (set id_prefix apart)");
                }
            }
            if let Some(s) = &g.sources {
                parse_block(s).with_context(|| at.clone())?;
            }
            // The clone connects from a second address (the member's twin): with none
            // given, both would share one and no gateway would see a clone.
            if matches!(g.behaviour, Behaviour::ClonedIdentity { .. }) && g.sources.is_none() {
                bail!("{at}: cloned-identity needs `sources` (a loopback block)");
            }
            if g.coap() {
                check_coap(g).with_context(|| at.clone())?;
            } else if g.serial() {
                check_serial(g, self).with_context(|| at.clone())?;
                check_behaviour(&g.behaviour, self).with_context(|| at.clone())?;
                continue;
            } else if g.credential() == Credential::Psk {
                bail!("{at}: a pre-shared key is for protocol = \"coap\" groups");
            } else if g.credential() == Credential::SerialKey {
                bail!("{at}: a serial key is for protocol = \"serial\" groups");
            } else if matches!(g.behaviour, Behaviour::Replay { .. }) {
                bail!(
                    "{at}: replay is for protocol = \"coap\" groups and protocol = \"serial\" groups"
                );
            }
            if g.bus.is_some() {
                bail!("{at}: bus is for protocol = \"serial\" groups");
            }
            if matches!(
                g.behaviour,
                Behaviour::Forged { .. } | Behaviour::Noise { .. }
            ) {
                bail!(
                    "{at}: {} is for protocol = \"serial\" groups",
                    g.behaviour.name()
                );
            }
            if g.credential() == Credential::Certificate && g.transport == Transport::Plain {
                bail!("{at}: a certificate needs transport = \"tls\"");
            }
            let service = matches!(g.behaviour, Behaviour::Service { .. });
            if service != (g.kind == Kind::Service) {
                bail!("{at}: behaviour \"service\" is for kind = \"service\" groups, and only it");
            }
            if self.listener(g).is_none() {
                bail!("{at}: [target] has no {} address", listener_key(g));
            }
            if !g.coap() && g.transport == Transport::Tls && self.target.ca.is_none() {
                bail!("{at}: TLS needs [target] ca, the CA that verifies the server");
            }
            check_behaviour(&g.behaviour, self).with_context(|| at.clone())?;
        }
        Ok(())
    }

    /// The address a group connects to; none for a serial group (it writes to its
    /// bus).
    pub fn listener(&self, g: &Group) -> Option<SocketAddr> {
        if g.coap() {
            return self.target.coap_dtls;
        }
        if g.serial() {
            return None;
        }
        match (g.kind, g.transport) {
            (Kind::Device, Transport::Plain) => self.target.device_plain,
            (Kind::Device, Transport::Tls) => self.target.device_tls,
            (Kind::Service, Transport::Plain) => self.target.service_plain,
            (Kind::Service, Transport::Tls) => self.target.service_tls,
        }
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The name of a serial group's bus: as given, or the only one of `[target.serial]`.
    pub fn bus_of<'a>(&'a self, g: &'a Group) -> Option<&'a str> {
        match &g.bus {
            Some(name) => Some(name.as_str()),
            None if self.target.serial.len() == 1 => {
                self.target.serial.keys().next().map(String::as_str)
            }
            None => None,
        }
    }
}

fn listener_key(g: &Group) -> &'static str {
    if g.coap() {
        return "coap_dtls";
    }
    match (g.kind, g.transport) {
        (Kind::Device, Transport::Plain) => "device_plain",
        (Kind::Device, Transport::Tls) => "device_tls",
        (Kind::Service, Transport::Plain) => "service_plain",
        (Kind::Service, Transport::Tls) => "service_tls",
    }
}

/// What a CoAP group may be: a device with a pre-shared key (or none, an unknown
/// identity), over DTLS, with a behaviour the CoAP simulator has.
fn check_coap(g: &Group) -> Result<()> {
    if g.kind != Kind::Device {
        bail!("CoAP is for devices: kind = \"device\"");
    }
    if g.transport == Transport::Plain {
        bail!("CoAP groups speak DTLS to [target] coap_dtls: leave transport out");
    }
    if !matches!(g.credential(), Credential::Psk | Credential::None) {
        bail!(
            "a CoAP device presents a pre-shared key: credential = \"psk\" (the default) or \"none\""
        );
    }
    match g.behaviour {
        Behaviour::WellBehaved { .. }
        | Behaviour::Flood { .. }
        | Behaviour::CredentialStuffing { .. }
        | Behaviour::Slowloris { .. }
        | Behaviour::Replay { .. } => Ok(()),
        Behaviour::Forged { .. } | Behaviour::Noise { .. } => {
            bail!("behaviour {:?} is for serial groups", g.behaviour.name())
        }
        _ => bail!(
            "behaviour {:?} is for MQTT groups; a CoAP group can be well-behaved, flood, \
             credential-stuffing (a wrong key), slowloris (stalled handshakes) or replay",
            g.behaviour.name()
        ),
    }
}

/// What a serial group may be: devices with a frame key (or none, frames for an id
/// the gateway does not know) on a bus of `[target.serial]`, with a behaviour the
/// serial simulator has.
fn check_serial(g: &Group, s: &Scenario) -> Result<()> {
    if g.kind != Kind::Device {
        bail!("serial is for devices: kind = \"device\"");
    }
    if g.transport == Transport::Plain {
        bail!("serial groups write frames to a bus of [target.serial]: leave transport out");
    }
    if g.sources.is_some() {
        bail!("serial groups have no source address: leave sources out");
    }
    if !matches!(g.credential(), Credential::SerialKey | Credential::None) {
        bail!(
            "a serial device signs its frames with its frame key: credential = \"serial-key\" \
             (the default) or \"none\""
        );
    }
    match (&g.bus, s.bus_of(g)) {
        (_, Some(name)) if s.target.serial.contains_key(name) => {}
        (Some(name), _) => {
            let known: Vec<&str> = s.target.serial.keys().map(String::as_str).collect();
            bail!("bus {name:?} is not in [target.serial] (it has {known:?})");
        }
        (None, _) if s.target.serial.is_empty() => {
            bail!("[target.serial] names no bus (e.g. field = \"/tmp/portcullis-field-dev\")");
        }
        (None, _) => bail!("bus is needed: [target.serial] has more than one"),
    }
    match g.behaviour {
        Behaviour::WellBehaved { qos: 0, .. } => {
            bail!("every serial frame is answered (ACK or NAK): leave qos out")
        }
        Behaviour::Flood { payload_bytes, .. } if payload_bytes > 1024 => {
            bail!(
                "payload_bytes must be at most 1024 (a serial frame's payload), not {payload_bytes}"
            )
        }
        Behaviour::WellBehaved { .. }
        | Behaviour::Flood { .. }
        | Behaviour::Replay { .. }
        | Behaviour::Forged { .. }
        | Behaviour::Noise { .. } => Ok(()),
        _ => bail!(
            "behaviour {:?} is not for serial groups; a serial group can be well-behaved, \
             forged, replay, flood or noise",
            g.behaviour.name()
        ),
    }
}

/// A rate per second the simulator can pace: 0.001 to 1 000 000.
fn positive(name: &str, v: f64) -> Result<()> {
    if !(1e-3..=1e6).contains(&v) {
        bail!("{name} must be a positive number from 0.001 to 1000000, not {v}");
    }
    Ok(())
}

/// A payload size MQTT can carry (and memory can hold): at most 256 MiB.
fn size(name: &str, v: usize) -> Result<()> {
    if v > 256 << 20 {
        bail!("{name} must be at most 268435456 bytes, not {v}");
    }
    Ok(())
}

fn check_behaviour(b: &Behaviour, s: &Scenario) -> Result<()> {
    match b {
        Behaviour::WellBehaved {
            rate,
            jitter,
            daily_amplitude,
            day_secs,
            qos,
            ..
        } => {
            positive("rate", *rate)?;
            positive("day_secs", *day_secs)?;
            if !(0.0..1.0).contains(jitter) {
                bail!("jitter must be in [0, 1), not {jitter}");
            }
            if !(0.0..1.0).contains(daily_amplitude) {
                bail!("daily_amplitude must be in [0, 1), not {daily_amplitude}");
            }
            if *qos > 1 {
                bail!("qos must be 0 or 1");
            }
        }
        Behaviour::Service {
            subscribe,
            commands_per_second,
            command_groups,
        } => {
            if subscribe.is_empty() {
                bail!("subscribe needs at least one filter");
            }
            if *commands_per_second != 0.0 {
                positive("commands_per_second", *commands_per_second)?;
            }
            for name in command_groups {
                match s.group(name) {
                    Some(g) if matches!(g.behaviour, Behaviour::WellBehaved { .. }) => {}
                    Some(_) => bail!("command_groups: {name:?} is not a well-behaved group"),
                    None => bail!("command_groups: no group {name:?}"),
                }
            }
        }
        Behaviour::Flood {
            inflight,
            payload_bytes,
        } => {
            if *inflight == Some(0) {
                bail!("inflight must be at least 1");
            }
            size("payload_bytes", *payload_bytes)?;
        }
        Behaviour::Noise { rate, bytes } => {
            positive("rate", *rate)?;
            if *bytes > 65_536 {
                bail!("bytes must be at most 65536, not {bytes}");
            }
        }
        Behaviour::Oversized { rate, bytes } => {
            positive("rate", *rate)?;
            size("bytes", *bytes)?;
        }
        Behaviour::SchemaBreaking { rate }
        | Behaviour::TopicScan { rate }
        | Behaviour::CredentialStuffing { rate }
        | Behaviour::ReconnectStorm { rate }
        | Behaviour::Replay { rate }
        | Behaviour::Forged { rate }
        | Behaviour::Malformed { rate } => positive("rate", *rate)?,
        Behaviour::ClonedIdentity { interval_secs } => positive("interval_secs", *interval_secs)?,
        Behaviour::Slowloris { connections } => {
            if *connections == 0 {
                bail!("connections must be at least 1");
            }
        }
        Behaviour::SlowRamp { rate, factor, qos } => {
            positive("rate", *rate)?;
            positive("factor", *factor)?;
            if *qos > 1 {
                bail!("qos must be 0 or 1");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
duration_secs = 5
[target]
device_plain = "127.0.0.1:1883"
device_tls = "127.0.0.1:8883"
service_tls = "127.0.0.1:8884"
ca = "ca.pem"
"#;

    fn parse(groups: &str) -> Result<Scenario> {
        Scenario::parse(&format!("{BASE}{groups}"))
    }

    #[test]
    fn a_mixed_scenario_parses_with_defaults() {
        let s = parse(
            r#"
[[group]]
name = "sensors"
count = 3
sources = "127.20.0.0/24"
behaviour = { kind = "well-behaved", rate = 2.0, boot_burst = 4 }
[[group]]
name = "analytics"
kind = "service"
count = 1
behaviour = { kind = "service", commands_per_second = 1.0, command_groups = ["sensors"] }
[[group]]
name = "flooder"
count = 1
protocol = "mqtt311"
transport = "plain"
credential = "secret"
behaviour = { kind = "flood" }
"#,
        )
        .unwrap();
        assert_eq!(s.grace_secs, 3.0);
        let g = &s.groups[0];
        assert_eq!(g.protocol, Protocol::Mqtt5);
        assert_eq!(g.credential(), Credential::Certificate);
        assert_eq!(g.transport, Transport::Tls);
        assert_eq!(g.id(2), "sensors-2");
        assert_eq!(g.source(1), Some("127.20.0.1".parse().unwrap()));
        assert_eq!(g.source(254), Some("127.20.0.254".parse().unwrap()));
        assert_eq!(g.source(255), Some("127.20.0.1".parse().unwrap()));
        assert!(matches!(
            g.behaviour,
            Behaviour::WellBehaved {
                boot_burst: 4,
                qos: 1,
                ..
            }
        ));
        assert_eq!(s.groups[2].protocol.mqtt(), Version::V4);
        assert!(s.groups[2].behaviour.hostile());
        assert!(matches!(
            s.groups[2].behaviour,
            Behaviour::Flood {
                inflight: None,
                payload_bytes: 64
            }
        ));
    }

    #[test]
    fn mistakes_are_refused_with_what_was_wrong() {
        let cases = [
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='well-behaved', rate=1.0, speed=3}",
                "unknown field `speed`",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='teleport'}",
                "unknown variant `teleport`",
            ),
            (
                "[[group]]\nname='a'\ncount=0\nbehaviour={kind='flood'}",
                "count must be between 1 and 1000000",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='cloned-identity'}",
                "cloned-identity needs `sources`",
            ),
            (
                "[[group]]\nname='a'\ncount=1000001\nbehaviour={kind='flood'}",
                "count must be between 1 and 1000000",
            ),
            (
                "[[group]]\nname='a'\ncount=1\ntransport='plain'\nbehaviour={kind='flood'}",
                "a certificate needs transport = \"tls\"",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nkind='service'\ntransport='plain'\ncredential='secret'\nbehaviour={kind='service'}",
                "[target] has no service_plain address",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nsources='10.0.0.0/8'\nbehaviour={kind='flood'}",
                "only loopback",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='well-behaved', rate=-1.0}",
                "rate must be a positive number",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nkind='service'\nbehaviour={kind='service', command_groups=['x']}",
                "no group \"x\"",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='service'}",
                "behaviour \"service\" is for kind = \"service\"",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='oversized', rate=1e-320}",
                "rate must be a positive number from 0.001",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='flood', payload_bytes=1000000000000}",
                "payload_bytes must be at most",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nkind='service'\nbehaviour={kind='service', subscribe=[]}",
                "at least one filter",
            ),
            (
                "[[group]]\nname='a'\ncount=2\nid_prefix='b-'\nbehaviour={kind='flood'}\n[[group]]\nname='b'\ncount=1\nbehaviour={kind='flood'}",
                "id \"b-1\" is also another member's",
            ),
        ];
        for (groups, want) in cases {
            let err = format!("{:#}", parse(groups).unwrap_err());
            assert!(err.contains(want), "{groups}\n→ {err}\nwanted {want}");
        }
        let err = format!(
            "{:#}",
            Scenario::parse("name='x'\nduration_secs=1\n[target]\n").unwrap_err()
        );
        assert!(err.contains("missing field `group`"), "{err}");
    }

    #[test]
    fn coap_groups_default_to_a_pre_shared_key_and_their_own_listener() {
        let s = Scenario::parse(&format!(
            "{BASE}coap_dtls = \"127.0.0.1:5684\"\n{}",
            r#"
[[group]]
name = "meters"
count = 2
protocol = "coap"
behaviour = { kind = "well-behaved", rate = 1.0, commands = false }
[[group]]
name = "flooder"
count = 1
protocol = "coap"
behaviour = { kind = "flood" }
[[group]]
name = "replayer"
count = 1
protocol = "coap"
behaviour = { kind = "replay" }
[[group]]
name = "stranger"
count = 1
protocol = "coap"
credential = "none"
behaviour = { kind = "credential-stuffing" }
"#
        ))
        .unwrap();
        let g = &s.groups[0];
        assert!(g.coap());
        assert_eq!(g.credential(), Credential::Psk);
        assert_eq!(s.listener(g), Some("127.0.0.1:5684".parse().unwrap()));
        assert!(matches!(
            g.behaviour,
            Behaviour::WellBehaved {
                commands: false,
                ..
            }
        ));
        assert!(matches!(
            s.groups[1].behaviour,
            Behaviour::Flood { inflight: None, .. }
        ));
        assert_eq!(s.groups[2].behaviour.name(), "replay");
        assert!(s.groups[2].behaviour.hostile());
        assert_eq!(s.groups[3].credential(), Credential::None);
    }

    #[test]
    fn coap_mistakes_are_refused_with_what_to_do() {
        let coap = |b: &str| format!("[[group]]\nname='a'\ncount=1\nprotocol='coap'\n{b}");
        let with_listener =
            |g: String| Scenario::parse(&format!("{BASE}coap_dtls = \"127.0.0.1:5684\"\n{g}"));
        let cases = [
            (
                coap("behaviour={kind='topic-scan'}"),
                "is for MQTT groups; a CoAP group can be well-behaved",
            ),
            (
                coap("kind='service'\nbehaviour={kind='service'}"),
                "CoAP is for devices",
            ),
            (
                coap("transport='plain'\nbehaviour={kind='flood'}"),
                "leave transport out",
            ),
            (
                coap("credential='secret'\nbehaviour={kind='flood'}"),
                "presents a pre-shared key",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='replay'}".to_string(),
                "replay is for protocol = \"coap\" groups",
            ),
            (
                "[[group]]\nname='a'\ncount=1\ncredential='psk'\nbehaviour={kind='flood'}"
                    .to_string(),
                "a pre-shared key is for protocol = \"coap\" groups",
            ),
            (
                coap("behaviour={kind='flood', inflight=0}"),
                "inflight must be at least 1",
            ),
        ];
        for (groups, want) in cases {
            let err = format!("{:#}", with_listener(groups.clone()).unwrap_err());
            assert!(err.contains(want), "{groups}\n→ {err}\nwanted {want}");
        }
        // Without the listener's address.
        let err = format!(
            "{:#}",
            parse(&coap("behaviour={kind='flood'}")).unwrap_err()
        );
        assert!(err.contains("[target] has no coap_dtls address"), "{err}");
    }

    const BUSES: &str = "[target.serial]\nfield = \"/tmp/field-dev\"\nflood = \"/tmp/flood-dev\"\n";

    #[test]
    fn serial_groups_sign_with_a_frame_key_on_a_bus_of_the_target() {
        let s = Scenario::parse(&format!(
            "{BASE}{BUSES}{}",
            r#"
[[group]]
name = "pumps"
count = 3
protocol = "serial"
bus = "field"
behaviour = { kind = "well-behaved", rate = 1.0 }
[[group]]
name = "forger"
count = 1
protocol = "serial"
bus = "field"
behaviour = { kind = "forged" }
[[group]]
name = "noisy"
count = 1
protocol = "serial"
bus = "field"
behaviour = { kind = "noise", bytes = 16 }
[[group]]
name = "flooder"
count = 1
protocol = "serial"
bus = "flood"
behaviour = { kind = "flood" }
[[group]]
name = "replayer"
count = 1
protocol = "serial"
bus = "field"
behaviour = { kind = "replay" }
"#
        ))
        .unwrap();
        let g = &s.groups[0];
        assert!(g.serial());
        assert_eq!(g.credential(), Credential::SerialKey);
        assert_eq!(s.bus_of(g), Some("field"));
        assert_eq!(s.listener(g), None);
        assert_eq!(s.groups[1].behaviour.name(), "forged");
        assert!(s.groups[1].behaviour.hostile());
        assert!(matches!(
            s.groups[2].behaviour,
            Behaviour::Noise { bytes: 16, .. }
        ));
        assert_eq!(s.bus_of(&s.groups[3]), Some("flood"));
        // One bus: it needs no naming.
        let one = Scenario::parse(&format!(
            "{BASE}[target.serial]\nonly = \"/tmp/a\"\n[[group]]\nname='a'\ncount=1\nprotocol='serial'\nbehaviour={{kind='forged'}}"
        ))
        .unwrap();
        assert_eq!(one.bus_of(&one.groups[0]), Some("only"));
    }

    #[test]
    fn serial_mistakes_are_refused_with_what_to_do() {
        let serial = |b: &str| format!("[[group]]\nname='a'\ncount=1\nprotocol='serial'\n{b}");
        let with_buses = |g: String| Scenario::parse(&format!("{BASE}{BUSES}{g}"));
        let cases = [
            (
                serial("bus='field'\nbehaviour={kind='topic-scan'}"),
                "is not for serial groups; a serial group can be well-behaved",
            ),
            (
                serial("behaviour={kind='forged'}"),
                "bus is needed: [target.serial] has more than one",
            ),
            (
                serial("bus='attic'\nbehaviour={kind='forged'}"),
                "bus \"attic\" is not in [target.serial]",
            ),
            (
                serial("bus='field'\ncredential='psk'\nbehaviour={kind='forged'}"),
                "credential = \"serial-key\"",
            ),
            (
                serial("bus='field'\nkind='service'\nbehaviour={kind='service'}"),
                "serial is for devices",
            ),
            (
                serial("bus='field'\nsources='127.0.0.1'\nbehaviour={kind='forged'}"),
                "leave sources out",
            ),
            (
                serial("bus='field'\nbehaviour={kind='well-behaved', rate=1.0, qos=0}"),
                "leave qos out",
            ),
            (
                serial("bus='field'\nbehaviour={kind='flood', payload_bytes=2000}"),
                "payload_bytes must be at most 1024",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbehaviour={kind='forged'}".to_string(),
                "forged is for protocol = \"serial\" groups",
            ),
            (
                "[[group]]\nname='a'\ncount=1\nbus='field'\nbehaviour={kind='flood'}".to_string(),
                "bus is for protocol = \"serial\" groups",
            ),
            (
                "[[group]]\nname='a'\ncount=1\ncredential='serial-key'\nbehaviour={kind='flood'}"
                    .to_string(),
                "a serial key is for protocol = \"serial\" groups",
            ),
        ];
        for (groups, want) in cases {
            let err = format!("{:#}", with_buses(groups.clone()).unwrap_err());
            assert!(err.contains(want), "{groups}\n→ {err}\nwanted {want}");
        }
        let err = format!(
            "{:#}",
            parse(&serial("behaviour={kind='forged'}")).unwrap_err()
        );
        assert!(err.contains("[target.serial] names no bus"), "{err}");
    }

    #[test]
    fn source_blocks_are_loopback_and_aligned() {
        assert_eq!(
            parse_block("127.1.2.3/16").unwrap(),
            ("127.1.0.0".parse().unwrap(), 65536)
        );
        assert_eq!(
            parse_block("127.0.0.9").unwrap(),
            ("127.0.0.9".parse().unwrap(), 1)
        );
        assert!(parse_block("127.0.0.1/4").is_err());
        assert!(parse_block("192.168.0.1/24").is_err());
    }
}
