//! The benchmark suite: the same load against Portcullis (full pipeline), rumqttd
//! direct and Mosquitto direct, interleaved, with the server pinned to one CPU and the
//! load generator to another. Medians of the repetitions with min–max, and ratios.
//! On request, the same gateway and policy with the behaviour model off runs beside
//! them, so the model's cost is measured in the same run. The CoAP workloads (`coap`)
//! run against the gateway's targets only, and so does the serial one (`serial`),
//! each of its runs beside a baseline of its own: the same frames through a pty pair
//! with no gateway (`Target::PtyReader`).

mod coap;
mod serial;

use crate::mqtt::{self, Packet, Version};
use crate::provision::Issuer;
use crate::transport::{self, Endpoint, Stream, Tls};
use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The gateway under the bench policy: the full pipeline.
    Portcullis,
    /// rumqttd direct (plain TCP only).
    Rumqttd,
    /// Mosquitto direct.
    Mosquitto,
    /// The gateway under the same policy with `[behaviour] enabled = false`: the
    /// baseline for the behaviour model's cost.
    PortcullisNoModel,
    /// The gateway under the same policy in upstream mode, forwarding through its
    /// durable outbox to a Mosquitto of its own (persistence off, on the server's CPU
    /// too); the subscriber reads from that Mosquitto.
    PortcullisUpstream,
    /// The serial workload's baseline, run with it whatever the targets: the same
    /// frames through a pty pair of its own to a thread that only counts the bytes.
    #[value(skip)]
    PtyReader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Throughput,
    Latency,
    Idle,
    Isolation,
    /// CoAP over DTLS: confirmable POSTs from many sessions, and idle sessions.
    Coap,
    /// Serial: authenticated DATA frames from devices on one bus (a pty pair), paced
    /// to a line rate or unthrottled, each answered ACK by the gateway.
    Serial,
}

pub struct Options {
    pub reps: usize,
    pub secs: f64,
    pub targets: Vec<Target>,
    pub workloads: Vec<Workload>,
    pub portcullis: PathBuf,
    /// The `portcullis-sim` binary, whose `broker` command is the rumqttd baseline.
    pub sim: PathBuf,
    pub policy: PathBuf,
    pub idle: usize,
    /// Idle DTLS sessions per CoAP idle run.
    pub coap_idle: usize,
    /// Pin the server and the load generator to their CPUs (`taskset`). Off only to
    /// check the harness itself, where the figures do not matter.
    pub pin: bool,
    pub server_cpu: usize,
    pub load_cpu: usize,
    /// Where the upstream target's Mosquitto runs (`None`: the server's CPU).
    pub upstream_cpu: Option<usize>,
    pub json: Option<PathBuf>,
}

const PUBLISHERS: usize = 10;
const PAYLOAD: usize = 64;
const TOPIC_FILTER: &str = "devices/+/telemetry";
/// QoS 1 messages a publisher keeps in flight.
const WINDOW: usize = 32;
/// The gateway's configuration for `Target::PortcullisNoModel`, in the work dir.
const NO_MODEL_CONFIG: &str = "portcullis-no-model.toml";
/// The gateway's configuration for `Target::PortcullisUpstream`, in the work dir.
const UPSTREAM_CONFIG: &str = "portcullis-upstream.toml";

/// One measured figure of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub workload: String,
    pub case: String,
    pub target: Target,
    pub rep: usize,
    pub figures: BTreeMap<String, f64>,
}

// ---------------------------------------------------------------------------
// Servers

struct Server {
    child: Child,
    /// Upstream mode: the broker the gateway forwards to.
    upstream: Option<Child>,
    target: Target,
    device_plain: SocketAddr,
    device_tls: Option<SocketAddr>,
    service_plain: SocketAddr,
    observability: Option<SocketAddr>,
    /// The gateway's CoAP over DTLS listener.
    coap_dtls: Option<SocketAddr>,
    /// The gateway's log (stderr) for this run.
    log: Option<PathBuf>,
}

impl Server {
    /// An error if the server exited before it was stopped, with the end of its log:
    /// a run whose server died measured nothing.
    fn still_running(&mut self) -> Result<()> {
        let Ok(Some(status)) = self.child.try_wait() else {
            return Ok(());
        };
        let tail = self
            .log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            })
            .unwrap_or_default();
        bail!(
            "{:?} exited during the run ({status}); its log ends:\n{tail}",
            self.target
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in bytes.
    fn rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS for pid {}", self.pid()))?;
        Ok(kb * 1024)
    }

    /// User + system CPU time, seconds (with the upstream broker's, in upstream mode).
    fn cpu(&self) -> Result<f64> {
        Ok(process_cpu(self.pid())? + self.upstream_cpu()?)
    }

    /// CPU seconds of the upstream target's own broker (0 for the other targets).
    fn upstream_cpu(&self) -> Result<f64> {
        match &self.upstream {
            Some(c) => process_cpu(c.id()),
            None => Ok(0.0),
        }
    }

    /// A counter of the gateway's `/metrics`, if it has one.
    fn metric(&self, name: &str) -> Option<f64> {
        self.metrics_text()?
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The gateway's `/metrics`.
    fn metrics_text(&self) -> Option<String> {
        http_get(self.observability?, "/metrics").ok()
    }

    fn forward_histogram(&self) -> Option<Vec<(f64, u64)>> {
        let addr = self.observability?;
        let text = http_get(addr, "/metrics").ok()?;
        Some(
            text.lines()
                .filter_map(|l| {
                    let rest = l.strip_prefix("portcullis_forward_latency_seconds_bucket{le=\"")?;
                    let (le, n) = rest.split_once("\"} ")?;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le, n.trim().parse().ok()?))
                })
                .collect(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.stop_upstream();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_upstream();
    }
}

impl Server {
    fn stop_upstream(&mut self) {
        if let Some(mut c) = self.upstream.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// User + system CPU time of a process, seconds.
fn process_cpu(pid: u32) -> Result<f64> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time of one of this process's threads, seconds.
fn thread_cpu(tid: u32) -> Result<f64> {
    stat_cpu(&format!("/proc/{}/task/{tid}/stat", std::process::id()))
}

/// User + system CPU time from a `/proc` stat file, seconds.
fn stat_cpu(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str) -> Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited at start: {status}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("{what} is not listening on {addr}")
}

/// Everything the runs share: the work dir, credentials, binaries.
struct Bench {
    _work: WorkDir,
    opts: Options,
    dir: PathBuf,
    secrets: BTreeMap<String, String>,
    /// Gateways started so far: each run's gateway logs to a file of its own.
    started: std::cell::Cell<usize>,
    /// CoAP devices' DTLS credentials (made once: each takes milliseconds, which
    /// would otherwise be counted against the gateway's handshake rate).
    coap_credentials: BTreeMap<String, coap::Credentials>,
    /// The serial workload's devices, their counters kept from run to run.
    serial_devices: std::sync::Mutex<Vec<crate::serial::SerialDevice>>,
    issuer: Issuer,
    ca: PathBuf,
}

/// The bench's work dir, removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `program`, on `cpu` when given (through `taskset`).
fn pinned(cpu: Option<usize>, program: &Path) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Bench {
    /// The gateway's configuration for `target` (one of the gateway's).
    fn portcullis_config(&self, target: Target) -> PathBuf {
        match target {
            Target::PortcullisNoModel => self.dir.join(NO_MODEL_CONFIG),
            Target::PortcullisUpstream => self.dir.join(UPSTREAM_CONFIG),
            _ => self.dir.join("portcullis.toml"),
        }
    }

    fn start(&self, target: Target) -> Result<Server> {
        match target {
            Target::Portcullis | Target::PortcullisNoModel => self.start_portcullis(target),
            Target::PortcullisUpstream => {
                // Its own Mosquitto, as Mosquitto direct runs (persistence off).
                let port = free_port()?;
                let conf = self.dir.join("mosquitto-upstream.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "user root\npersistence false\nmax_queued_messages 0\n\
                         max_inflight_messages 0\nlog_dest file {log}\n\
                         listener {port} 127.0.0.1\nallow_anonymous true\n",
                        log = self.dir.join("mosquitto-upstream.log").display(),
                    ),
                )?;
                let cpu = self.opts.upstream_cpu.unwrap_or(self.opts.server_cpu);
                let mut broker = self.mosquitto_on(&conf, cpu)?;
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                wait_listening(addr, &mut broker, "mosquitto (upstream)")?;
                let config = std::fs::read_to_string(self.dir.join("portcullis.toml"))?;
                std::fs::write(
                    self.dir.join(UPSTREAM_CONFIG),
                    upstream_config(&config, &self.opts.policy, addr)?,
                )?;
                // Every run starts with an empty outbox.
                let _ = std::fs::remove_file(self.dir.join("data/outbox.redb"));
                let mut server = match self.start_portcullis(target) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = broker.kill();
                        return Err(e);
                    }
                };
                server.upstream = Some(broker);
                server.service_plain = addr;
                Ok(server)
            }
            Target::PtyReader => bail!("the pty reader is the serial workload's, not a server"),
            Target::Rumqttd => {
                let port = free_port()?;
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let exe = &self.opts.sim;
                let mut child = pinned(self.opts.pin.then_some(self.opts.server_cpu), exe)
                    .args(["broker", "--listen", &addr.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting rumqttd (portcullis-sim broker)")?;
                wait_listening(addr, &mut child, "rumqttd")?;
                Ok(Server {
                    child,
                    upstream: None,
                    target,
                    device_plain: addr,
                    device_tls: None,
                    service_plain: addr,
                    observability: None,
                    coap_dtls: None,
                    log: None,
                })
            }
            Target::Mosquitto => {
                let (plain, tls) = (free_port()?, free_port()?);
                let conf = self.dir.join("mosquitto.conf");
                // `user root`: started by root, mosquitto would otherwise switch to its
                // own user, which cannot read the bench's files (ignored when not root).
                let pki = self.dir.join("data/pki");
                std::fs::write(
                    &conf,
                    format!(
                        "user root\nper_listener_settings true\npersistence false\nmax_queued_messages 0\n\
                         max_inflight_messages 0\nlog_dest file {log}\n\
                         listener {plain} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n\
                         listener {tls} 127.0.0.1\nallow_anonymous false\ncafile {ca}\ncertfile {cert}\n\
                         keyfile {key}\nrequire_certificate true\nuse_identity_as_username true\n",
                        pw = self.dir.join("mosquitto.passwd").display(),
                        log = self.dir.join("mosquitto.log").display(),
                        ca = self.ca.display(),
                        cert = pki.join("server.pem").display(),
                        key = pki.join("server.key").display(),
                    ),
                )?;
                let mut child = self.mosquitto(&conf)?;
                let addr: SocketAddr = ([127, 0, 0, 1], plain).into();
                wait_listening(addr, &mut child, "mosquitto")?;
                wait_listening(([127, 0, 0, 1], tls).into(), &mut child, "mosquitto (TLS)")?;
                Ok(Server {
                    child,
                    upstream: None,
                    target,
                    device_plain: addr,
                    device_tls: Some(([127, 0, 0, 1], tls).into()),
                    service_plain: addr,
                    observability: None,
                    coap_dtls: None,
                    log: None,
                })
            }
        }
    }

    /// Mosquitto with this configuration, on the server's CPU.
    fn mosquitto(&self, conf: &Path) -> Result<Child> {
        self.mosquitto_on(conf, self.opts.server_cpu)
    }

    /// Mosquitto with this configuration, on `cpu`.
    fn mosquitto_on(&self, conf: &Path, cpu: usize) -> Result<Child> {
        pinned(self.opts.pin.then_some(cpu), Path::new("mosquitto"))
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto (apt-get install mosquitto)")
    }

    fn start_portcullis(&self, target: Target) -> Result<Server> {
        self.started.set(self.started.get() + 1);
        let log = self
            .dir
            .join(format!("portcullis-{}.log", self.started.get()));
        let mut child = pinned(
            self.opts.pin.then_some(self.opts.server_cpu),
            &self.opts.portcullis,
        )
        .args(["serve", "--config"])
        .arg(self.portcullis_config(target))
        .current_dir(&self.dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", self.opts.portcullis.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    let done = line.contains("observability");
                    banner.push(line);
                    if done {
                        break;
                    }
                }
                _ => {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    bail!("portcullis did not start ({status}): {banner:?}; its log:\n{log}")
                }
            }
        }
        // Keep reading stdout so the gateway never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let addr = |label: &str| -> Result<SocketAddr> {
            banner
                .iter()
                .find(|l| l.contains(label))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| anyhow!("no {label} in the banner {banner:?}"))
        };
        // Upstream mode has no service listener: the subscriber reads the broker.
        let service_plain = match target {
            Target::PortcullisUpstream => ([127, 0, 0, 1], 0).into(),
            _ => addr("service listener (plain MQTT):")?,
        };
        Ok(Server {
            upstream: None,
            target,
            device_plain: addr("device listener (plain MQTT):")?,
            device_tls: Some(addr("device listener (MQTT over TLS):")?),
            service_plain,
            observability: Some(addr("observability")?),
            coap_dtls: addr("device listener (CoAP over DTLS, UDP):").ok(),
            log: Some(log),
            child,
        })
    }

    /// A client of `target`: the endpoint and what it presents.
    fn client(&self, s: &Server, id: &str, tls: bool, service: bool) -> Result<Client> {
        let endpoint = if tls {
            let (cert, key) = self.issuer.issue(id)?;
            let identity = match crate::provision::identity(&cert, &key)? {
                crate::provision::Secret::Certificate { chain, key } => Some((chain, key)),
                _ => None,
            };
            Endpoint {
                addr: s
                    .device_tls
                    .ok_or_else(|| anyhow!("{:?} has no TLS listener", s.target))?,
                tls: Some(Tls {
                    config: transport::client_config(transport::roots(&self.ca)?, identity)?,
                    server_name: transport::server_name("localhost")?,
                }),
            }
        } else {
            Endpoint {
                addr: if service {
                    s.service_plain
                } else {
                    s.device_plain
                },
                tls: None,
            }
        };
        let password = match (s.target, tls) {
            (Target::Rumqttd, _) | (_, true) => None,
            _ => Some(
                self.secrets
                    .get(id)
                    .cloned()
                    .ok_or_else(|| anyhow!("no secret for {id}"))?,
            ),
        };
        Ok(Client {
            id: id.to_string(),
            endpoint,
            password,
            source: None,
        })
    }
}

#[derive(Clone)]
struct Client {
    id: String,
    endpoint: Endpoint,
    password: Option<String>,
    source: Option<IpAddr>,
}

impl Client {
    /// Connected (CONNACK success), MQTT 3.1.1.
    async fn connect(&self) -> Result<Stream> {
        let mut s = transport::open(&self.endpoint, self.source)
            .await
            .with_context(|| format!("{} connecting to {}", self.id, self.endpoint.addr))?;
        let mut out = Vec::new();
        mqtt::connect(
            &mut out,
            Version::V4,
            &mqtt::Connect {
                client_id: &self.id,
                username: self.password.as_ref().map(|_| self.id.as_str()),
                password: self.password.as_deref().map(str::as_bytes),
                keep_alive: 300,
                clean: true,
            },
        );
        s.write_all(&out).await?;
        let mut buf = [0u8; 64];
        let mut have = 0;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf[have..]))
                .await
                .map_err(|_| anyhow!("{}: no CONNACK", self.id))??;
            if n == 0 {
                bail!("{}: closed before CONNACK", self.id);
            }
            have += n;
            if let Some((Packet::ConnAck { code }, _)) =
                mqtt::decode(&buf[..have], Version::V4, 64)?
            {
                if code != 0 {
                    bail!("{}: refused with CONNACK {code}", self.id);
                }
                return Ok(s);
            }
        }
    }
}

async fn subscribe(s: &mut Stream, filter: &str, qos: u8) -> Result<()> {
    let mut out = Vec::new();
    mqtt::subscribe(&mut out, Version::V4, 1, &[(filter, qos)]);
    s.write_all(&out).await?;
    let mut buf = [0u8; 64];
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            bail!("closed before SUBACK");
        }
        have += n;
        if let Some((Packet::SubAck { codes, .. }, _)) =
            mqtt::decode(&buf[..have], Version::V4, 64)?
        {
            if codes.iter().any(|c| *c >= 0x80) {
                bail!("subscription refused");
            }
            return Ok(());
        }
    }
}

fn payload(buf: &mut Vec<u8>, sent_us: u64) {
    use std::io::Write;
    buf.clear();
    let _ = write!(buf, "{{\"sent_us\":{sent_us},\"v\":\"");
    while buf.len() < PAYLOAD - 2 {
        buf.push(b'x');
    }
    buf.extend_from_slice(b"\"}");
}

// ---------------------------------------------------------------------------
// The subscriber: counts, acknowledges, measures latency.

struct Sink {
    received: AtomicU64,
    /// Counting (and measuring) only inside the window.
    counting: AtomicBool,
    latency: std::sync::Mutex<Histogram<u64>>,
    /// Only this publisher's messages count (isolation), or all.
    only: Option<String>,
}

impl Sink {
    fn new(only: Option<String>) -> Arc<Sink> {
        Arc::new(Sink {
            received: AtomicU64::new(0),
            counting: AtomicBool::new(false),
            latency: std::sync::Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
            only,
        })
    }
}

async fn sink(mut s: Stream, sink: Arc<Sink>, start: Instant, measure: bool) {
    let mut buf = vec![0u8; 1 << 17];
    let mut have = 0;
    let mut acks = Vec::with_capacity(4096);
    loop {
        let n = match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        let mut used = 0;
        let now_us = start.elapsed().as_micros() as u64;
        let counting = sink.counting.load(Relaxed);
        let mut count = 0;
        {
            let mut h = measure.then(|| sink.latency.lock().unwrap_or_else(|e| e.into_inner()));
            // A packet that does not decode ends the reader: it would never be consumed.
            while let Some((p, len)) = match mqtt::decode(&buf[used..have], Version::V4, 1 << 20) {
                Ok(next) => next,
                Err(_) => return,
            } {
                if let Packet::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                } = p
                {
                    if qos > 0 {
                        mqtt::puback(&mut acks, pkid);
                    }
                    let mine = match &sink.only {
                        Some(id) => topic.split('/').nth(1) == Some(id.as_str()),
                        None => true,
                    };
                    if counting && mine {
                        count += 1;
                        if let (Some(h), Some(sent)) = (h.as_mut(), crate::fleet::sent_us(payload))
                        {
                            h.saturating_record(now_us.saturating_sub(sent).max(1));
                        }
                    }
                }
                used += len;
            }
        }
        sink.received.fetch_add(count, Relaxed);
        buf.copy_within(used..have, 0);
        have -= used;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        if !acks.is_empty() {
            if s.write_all(&acks).await.is_err() {
                return;
            }
            acks.clear();
        }
    }
}

/// The subscriber on a thread of its own (same CPU), so that publishers running
/// flat out cannot starve it of the generator's time: connected and subscribed when
/// this returns.
async fn sink_thread(
    c: Client,
    qos: u8,
    state: Arc<Sink>,
    start: Instant,
    measure: bool,
) -> Result<()> {
    sink_thread_on(c, TOPIC_FILTER, qos, state, start, measure).await
}

/// `sink_thread`, subscribed to `filter`.
async fn sink_thread_on(
    c: Client,
    filter: &'static str,
    qos: u8,
    state: Arc<Sink>,
    start: Instant,
    measure: bool,
) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(anyhow!(e)));
                return;
            }
        };
        rt.block_on(async move {
            let mut stream = match c.connect().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if let Err(e) = subscribe(&mut stream, filter, qos).await {
                let _ = tx.send(Err(e));
                return;
            }
            let _ = tx.send(Ok(()));
            sink(stream, state, start, measure).await;
        });
    });
    rx.await
        .map_err(|_| anyhow!("the subscriber thread ended"))?
}

// ---------------------------------------------------------------------------
// Publishers

/// As fast as the server takes it: QoS 0 in batches, or QoS 1 with `WINDOW` in flight.
async fn blast(
    mut s: Stream,
    topic: String,
    qos: u8,
    stop: Arc<AtomicBool>,
    start: Instant,
    sent: Arc<AtomicU64>,
) {
    let mut out = Vec::with_capacity(16 << 10);
    // One payload for all: the throughput runs do not measure latency, and formatting
    // a timestamp per message would cost the generator more than the server.
    let mut body = Vec::with_capacity(PAYLOAD);
    payload(&mut body, start.elapsed().as_micros() as u64);
    let mut inbuf = vec![0u8; 1 << 14];
    let mut have = 0;
    let mut inflight = 0usize;
    let mut pkid = 0u16;
    while !stop.load(Relaxed) {
        out.clear();
        let n = if qos == 0 { 64 } else { WINDOW - inflight };
        for _ in 0..n {
            pkid = pkid % u16::MAX + 1;
            mqtt::publish(&mut out, Version::V4, &topic, qos, pkid, &body);
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
        sent.fetch_add(n as u64, Relaxed);
        if qos == 0 {
            tokio::task::yield_now().await;
            continue;
        }
        inflight += n;
        // Wait for at least one acknowledgement.
        let r = match tokio::time::timeout(Duration::from_millis(500), s.read(&mut inbuf[have..]))
            .await
        {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(r)) => r,
        };
        have += r;
        let mut used = 0;
        while let Some((p, len)) = match mqtt::decode(&inbuf[used..have], Version::V4, 1 << 16) {
            Ok(next) => next,
            Err(_) => return,
        } {
            if matches!(p, Packet::PubAck { .. }) {
                inflight = inflight.saturating_sub(1);
            }
            used += len;
        }
        inbuf.copy_within(used..have, 0);
        have -= used;
    }
}

/// The offered rate of paced publishers, changeable while they run (f64 bits).
struct Rate(AtomicU64);

impl Rate {
    fn new(per_s: f64) -> Arc<Rate> {
        Arc::new(Rate(AtomicU64::new(per_s.to_bits())))
    }
    fn set(&self, per_s: f64) {
        self.0.store(per_s.to_bits(), Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

/// Publishers at a total rate, paced every half millisecond: what is due is shared
/// round robin, one write per publisher per tick.
async fn paced(
    conns: Vec<(Stream, String)>,
    rate: Arc<Rate>,
    qos: u8,
    stop: Arc<AtomicBool>,
    start: Instant,
    sent: Arc<AtomicU64>,
) {
    let mut writers = Vec::new();
    for (s, topic) in conns {
        let (mut r, w) = tokio::io::split(s);
        // Acknowledgements are read and dropped.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 14];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        writers.push((w, topic, Vec::<u8>::with_capacity(8192), 0u16));
    }
    let mut last = Instant::now();
    let mut due = 0.0f64;
    let mut body = Vec::new();
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_micros(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Relaxed) {
        tick.tick().await;
        let now = Instant::now();
        due += (now - last).as_secs_f64() * rate.get();
        last = now;
        let n = due as u64;
        due -= n as f64;
        let len = writers.len();
        for _ in 0..n {
            let (_, topic, out, pkid) = &mut writers[next % len];
            next += 1;
            payload(&mut body, start.elapsed().as_micros() as u64);
            *pkid = *pkid % u16::MAX + 1;
            mqtt::publish(out, Version::V4, topic, qos, *pkid, &body);
        }
        for (w, _, out, _) in writers.iter_mut() {
            if !out.is_empty() {
                if w.write_all(out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        sent.fetch_add(n, Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Workloads

fn publisher_id(n: usize) -> String {
    format!("bench-pub-{n}")
}

struct Window {
    warm: Duration,
    secs: Duration,
}

impl Bench {
    fn window(&self) -> Window {
        Window {
            warm: Duration::from_secs(1),
            secs: Duration::from_secs_f64(self.opts.secs),
        }
    }

    /// QoS 0 has no flow control: publishers flat out make every server drop what its
    /// subscriber cannot take, and measure the collapse rather than the capacity. So
    /// the offered rate climbs in steps, and the figure is the highest rate delivered
    /// without loss (at least 95% of what was offered in the step).
    async fn throughput_qos0(&self, s: &Server, tls: bool) -> Result<BTreeMap<String, f64>> {
        const STEPS: [f64; 20] = [
            10e3, 20e3, 40e3, 60e3, 80e3, 100e3, 120e3, 140e3, 160e3, 180e3, 200e3, 220e3, 240e3,
            260e3, 280e3, 300e3, 330e3, 360e3, 400e3, 500e3,
        ];
        let start = Instant::now();
        let sub = self.client(s, "bench-sub", false, true)?;
        let sink_state = Sink::new(None);
        sink_thread(sub, 0, sink_state.clone(), start, false).await?;
        sink_state.counting.store(true, Relaxed);
        let mut conns = Vec::new();
        for n in 1..=PUBLISHERS {
            let id = if tls {
                tls_publisher_id(n)
            } else {
                publisher_id(n)
            };
            let c = self.client(s, &id, tls, false)?;
            conns.push((c.connect().await?, format!("devices/{id}/telemetry")));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let rate = Rate::new(STEPS[0]);
        tokio::spawn(paced(
            conns,
            rate.clone(),
            0,
            stop.clone(),
            start,
            sent.clone(),
        ));
        let mut f = BTreeMap::new();
        let (mut best, mut peak, mut overloaded) = (0.0f64, 0.0f64, 0);
        for step in STEPS {
            rate.set(step);
            sleep(Duration::from_millis(300)).await;
            let (r0, s0, c0, t0) = (
                sink_state.received.load(Relaxed),
                sent.load(Relaxed),
                s.cpu()?,
                Instant::now(),
            );
            sleep(Duration::from_millis(700)).await;
            let secs = t0.elapsed().as_secs_f64();
            let delivered = (sink_state.received.load(Relaxed) - r0) as f64 / secs;
            let offered = (sent.load(Relaxed) - s0) as f64 / secs;
            let cpu = s.cpu()? - c0;
            peak = peak.max(delivered);
            if delivered >= 0.95 * offered {
                if delivered > best {
                    best = delivered;
                    f.insert("offered_per_s".into(), offered);
                    f.insert(
                        "server_cpu_us_per_msg".into(),
                        cpu * 1e6 / (delivered * secs).max(1.0),
                    );
                    f.insert("server_cpu_share".into(), cpu / secs);
                }
                overloaded = 0;
            } else {
                overloaded += 1;
                if overloaded == 2 {
                    break;
                }
            }
        }
        stop.store(true, Relaxed);
        f.insert("msg_per_s".into(), best);
        f.insert("peak_delivered_per_s".into(), peak);
        Ok(f)
    }

    async fn throughput(&self, s: &Server, qos: u8, tls: bool) -> Result<BTreeMap<String, f64>> {
        if qos == 0 {
            return self.throughput_qos0(s, tls).await;
        }
        let start = Instant::now();
        let sub = self.client(s, "bench-sub", false, true)?;
        let sink_state = Sink::new(None);
        sink_thread(sub, qos, sink_state.clone(), start, false).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        for n in 1..=PUBLISHERS {
            // TLS publishers are principals of their own, with certificates.
            let id = if tls {
                tls_publisher_id(n)
            } else {
                publisher_id(n)
            };
            let c = self.client(s, &id, tls, false)?;
            let stream = c.connect().await?;
            tokio::spawn(blast(
                stream,
                format!("devices/{}/telemetry", c.id),
                qos,
                stop.clone(),
                start,
                sent.clone(),
            ));
        }
        let w = self.window();
        sleep(w.warm).await;
        let cpu0 = s.cpu()?;
        let gateway_cpu0 = process_cpu(s.pid())?;
        let broker_cpu0 = s.upstream_cpu()?;
        let t0 = Instant::now();
        sink_state.counting.store(true, Relaxed);
        let sent0 = sent.load(Relaxed);
        let fsyncs0 = s.metric("portcullis_outbox_fsyncs_total");
        let mut f_extra = BTreeMap::new();
        sleep(w.secs).await;
        sink_state.counting.store(false, Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = s.cpu()? - cpu0;
        if s.target == Target::PortcullisUpstream {
            // The gateway's own share, without its upstream broker's.
            let gateway = process_cpu(s.pid())? - gateway_cpu0;
            let received = sink_state.received.load(Relaxed).max(1) as f64;
            f_extra.insert("gateway_cpu_us_per_msg".into(), gateway * 1e6 / received);
            // And the broker's behind it, to set beside Mosquitto direct's.
            let broker = s.upstream_cpu()? - broker_cpu0;
            f_extra.insert("broker_cpu_us_per_msg".into(), broker * 1e6 / received);
            if let (Some(a), Some(b)) = (fsyncs0, s.metric("portcullis_outbox_fsyncs_total")) {
                f_extra.insert("fsyncs_per_s".into(), (b - a) / elapsed);
            }
        }
        let sent = sent.load(Relaxed) - sent0;
        stop.store(true, Relaxed);
        let received = sink_state.received.load(Relaxed) as f64;
        let mut f = f_extra;
        f.insert("msg_per_s".into(), received / elapsed);
        f.insert("offered_per_s".into(), sent as f64 / elapsed);
        f.insert(
            "server_cpu_us_per_msg".into(),
            cpu * 1e6 / received.max(1.0),
        );
        f.insert("server_cpu_share".into(), cpu / elapsed);
        Ok(f)
    }

    async fn latency(&self, s: &Server, rate: f64) -> Result<BTreeMap<String, f64>> {
        let start = Instant::now();
        let sub = self.client(s, "bench-sub", false, true)?;
        let sink_state = Sink::new(None);
        sink_thread(sub, 1, sink_state.clone(), start, true).await?;
        let mut conns = Vec::new();
        for n in 1..=PUBLISHERS {
            let c = self.client(s, &publisher_id(n), false, false)?;
            conns.push((c.connect().await?, format!("devices/{}/telemetry", c.id)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        tokio::spawn(paced(
            conns,
            Rate::new(rate),
            1,
            stop.clone(),
            start,
            sent.clone(),
        ));
        let w = self.window();
        sleep(w.warm).await;
        let fwd0 = s.forward_histogram();
        sink_state.counting.store(true, Relaxed);
        let sent0 = sent.load(Relaxed);
        sleep(w.secs).await;
        let sent = sent.load(Relaxed) - sent0;
        // Messages sent inside the window still arriving.
        sleep(Duration::from_millis(300)).await;
        sink_state.counting.store(false, Relaxed);
        stop.store(true, Relaxed);
        let fwd1 = s.forward_histogram();
        let h = sink_state
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if h.is_empty() {
            bail!("no message reached the subscriber ({sent} sent in the window)");
        }
        let mut f = BTreeMap::new();
        f.insert("offered_per_s".into(), sent as f64 / w.secs.as_secs_f64());
        f.insert("p50_us".into(), h.value_at_quantile(0.5) as f64);
        f.insert("p99_us".into(), h.value_at_quantile(0.99) as f64);
        f.insert("p999_us".into(), h.value_at_quantile(0.999) as f64);
        f.insert("max_us".into(), h.max() as f64);
        if let (Some(a), Some(b)) = (fwd0, fwd1) {
            if let Some(p99) = bucket_quantile(&a, &b, 0.99) {
                f.insert("gateway_forward_p99_le_us".into(), p99 * 1e6);
            }
            if let Some(p50) = bucket_quantile(&a, &b, 0.5) {
                f.insert("gateway_forward_p50_le_us".into(), p50 * 1e6);
            }
        }
        Ok(f)
    }

    async fn idle(&self, s: &Server, tls: bool) -> Result<BTreeMap<String, f64>> {
        let n = self.opts.idle;
        sleep(Duration::from_millis(500)).await;
        let rss0 = s.rss()?;
        let sock0 = sockstat_tcp();
        let mut clients = Vec::with_capacity(n);
        for i in 1..=n {
            let id = if tls {
                format!("idlet-{i}")
            } else {
                format!("idle-{i}")
            };
            let mut c = self.client(s, &id, tls, false)?;
            c.source = Some(source(i));
            clients.push(c);
        }
        let t0 = Instant::now();
        let mut streams = Vec::with_capacity(n);
        // 256 connecting at a time.
        for chunk in clients.chunks(256) {
            let mut tasks = Vec::new();
            for c in chunk {
                let c = c.clone();
                tasks.push(tokio::spawn(async move { c.connect().await }));
            }
            for t in tasks {
                streams.push(t.await??);
            }
        }
        let connect_secs = t0.elapsed().as_secs_f64();
        sleep(Duration::from_secs(2)).await;
        let rss1 = s.rss()?;
        let sock1 = sockstat_tcp();
        let mut f = BTreeMap::new();
        f.insert("connections".into(), n as f64);
        f.insert("connections_per_s".into(), n as f64 / connect_secs);
        f.insert(
            "bytes_per_connection".into(),
            (rss1 as f64 - rss0 as f64) / n as f64,
        );
        f.insert("rss_idle_mb".into(), rss0 as f64 / 1e6);
        f.insert("rss_connected_mb".into(), rss1 as f64 / 1e6);
        if let (Some(a), Some(b)) = (sock0, sock1) {
            f.insert(
                "sockstat_tcp_mem_pages_delta".into(),
                b.1 as f64 - a.1 as f64,
            );
            f.insert("sockstat_tcp_inuse_delta".into(), b.0 as f64 - a.0 as f64);
        }
        for mut st in streams {
            let _ = st.shutdown().await;
        }
        Ok(f)
    }

    /// A steady device at 50 msg/s, alone or beside a device flooding QoS 0.
    async fn isolation(&self, s: &Server, flood: bool) -> Result<BTreeMap<String, f64>> {
        let start = Instant::now();
        let sub = self.client(s, "bench-sub", false, true)?;
        let sink_state = Sink::new(Some("iso-steady".into()));
        sink_thread(sub, 1, sink_state.clone(), start, true).await?;
        let stop = Arc::new(AtomicBool::new(false));
        if flood {
            let c = self.client(s, "iso-flood", false, false)?;
            let stream = c.connect().await?;
            tokio::spawn(blast(
                stream,
                "devices/iso-flood/telemetry".into(),
                0,
                stop.clone(),
                start,
                Arc::new(AtomicU64::new(0)),
            ));
        }
        let c = self.client(s, "iso-steady", false, false)?;
        let steady = c.connect().await?;
        let sent = Arc::new(AtomicU64::new(0));
        tokio::spawn(paced(
            vec![(steady, "devices/iso-steady/telemetry".into())],
            Rate::new(50.0),
            1,
            stop.clone(),
            start,
            sent.clone(),
        ));
        let w = self.window();
        sleep(w.warm).await;
        sink_state.counting.store(true, Relaxed);
        let sent0 = sent.load(Relaxed);
        sleep(w.secs).await;
        let sent = sent.load(Relaxed) - sent0;
        sleep(Duration::from_millis(500)).await;
        sink_state.counting.store(false, Relaxed);
        stop.store(true, Relaxed);
        let received = sink_state.received.load(Relaxed);
        let h = sink_state
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut f = BTreeMap::new();
        f.insert(
            "delivery_pct".into(),
            100.0 * received.min(sent) as f64 / sent.max(1) as f64,
        );
        f.insert("p50_us".into(), h.value_at_quantile(0.5) as f64);
        f.insert("p99_us".into(), h.value_at_quantile(0.99) as f64);
        Ok(f)
    }
}

/// Source address of idle client i: spread over 127.1.0.0/16.
fn source(i: usize) -> IpAddr {
    let i = i as u32;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1,
        ((i >> 8) & 0xFF) as u8,
        (i & 0xFF).max(1) as u8,
    ))
}

/// (TCP sockets in use, TCP memory pages) from /proc/net/sockstat.
fn sockstat_tcp() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let get = |k: &str| {
        f.iter()
            .position(|x| *x == k)
            .and_then(|i| f.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    Some((get("inuse")?, get("mem")?))
}

/// The upper bound of the bucket holding quantile q of the observations between two
/// snapshots of a cumulative histogram.
fn bucket_quantile(a: &[(f64, u64)], b: &[(f64, u64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, u64)> = b
        .iter()
        .map(|(le, n)| {
            let before = a
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, m)| *m)
                .unwrap_or(0);
            (*le, n.saturating_sub(before))
        })
        .collect();
    let total = deltas.iter().map(|(_, n)| *n).max()?;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    deltas.iter().find(|(_, n)| *n >= want).map(|(le, _)| *le)
}

// ---------------------------------------------------------------------------
// Setup and the run

fn pin_self(cpu: usize) {
    let ok = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("warning: could not pin the load generator to CPU {cpu} (taskset)");
    }
}

fn setup(mut opts: Options) -> Result<Bench> {
    // Commands run in the work dir: the gateway binary by its absolute path.
    opts.portcullis = std::fs::canonicalize(&opts.portcullis).with_context(|| {
        format!(
            "{}: no gateway binary (cargo build --release)",
            opts.portcullis.display()
        )
    })?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("portcullis-bench-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Secrets, keys and the registry live here: the owner's only, gone when the bench
    // ends (however it ends).
    let work = WorkDir(dir.clone());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let policy = std::fs::read_to_string(&opts.policy)
        .with_context(|| format!("reading the policy {}", opts.policy.display()))?;
    let config = format!(
        "# Written by portcullis-sim bench: listeners on port 0, then {}\n\
         data_dir = \"{}/data\"\n[listeners]\ndevice_tls = \"127.0.0.1:0\"\n\
         device_plain = \"127.0.0.1:0\"\nservice_tls = \"127.0.0.1:0\"\n\
         service_plain = \"127.0.0.1:0\"\ncoap_dtls = \"127.0.0.1:0\"\n[observability]\nlisten = \"127.0.0.1:0\"\n\n{policy}",
        opts.policy.display(),
        dir.display()
    );
    // The serial workload's bus, named by every gateway target's configuration.
    let config = if opts.workloads.contains(&Workload::Serial) {
        serial::with_bus(&config, &opts.policy, &dir)?
    } else {
        config
    };
    std::fs::write(dir.join("portcullis.toml"), &config)?;
    if opts.targets.contains(&Target::PortcullisNoModel) {
        std::fs::write(
            dir.join(NO_MODEL_CONFIG),
            no_model_config(&config, &opts.policy)?,
        )?;
    }
    // Principals: throughput publishers (group bench), the subscriber service,
    // isolation devices and idle devices (group default).
    let mut secrets = BTreeMap::new();
    let mut devices = String::new();
    let mut entry =
        |id: String, group: &str, cert: bool, secrets: &mut BTreeMap<String, String>| {
            let secret = crate::provision::random_secret();
            devices.push_str(&format!(
                "[[principal]]\nid = \"{id}\"\ngroup = \"{group}\"\n{}\n",
                if cert {
                    "cert_any = true".to_string()
                } else {
                    format!("secret = \"{secret}\"")
                }
            ));
            secrets.insert(id, secret);
        };
    for n in 1..=PUBLISHERS {
        entry(publisher_id(n), "bench", false, &mut secrets);
    }
    for id in ["iso-steady", "iso-flood"] {
        entry(id.into(), "default", false, &mut secrets);
    }
    for i in 1..=opts.idle {
        entry(format!("idle-{i}"), "default", false, &mut secrets);
        entry(format!("idlet-{i}"), "default", true, &mut secrets);
    }
    let sub_secret = crate::provision::random_secret();
    secrets.insert("bench-sub".into(), sub_secret.clone());
    for n in 1..=PUBLISHERS {
        devices.push_str(&format!(
            "[[principal]]\nid = \"{}\"\ngroup = \"bench\"\ncert_any = true\n",
            tls_publisher_id(n)
        ));
    }
    // CoAP devices, with pre-shared keys: the request workload's in group bench (its
    // rate above the offered load), the idle sessions' in group default.
    let mut coap_credentials = BTreeMap::new();
    if opts.workloads.contains(&Workload::Coap) {
        let ids = (1..=coap::DEVICES)
            .map(|n| (coap::device_id(n), "bench"))
            .chain((1..=opts.coap_idle).map(|n| (coap::idle_id(n), "default")));
        for (id, group) in ids {
            let psk = crate::provision::random_secret();
            devices.push_str(&format!(
                "[[principal]]\nid = \"{id}\"\ngroup = \"{group}\"\npsk = \"{psk}\"\n"
            ));
            let credentials = coap::Credentials::new(&id, psk.as_bytes())
                .map_err(|e| anyhow!("DTLS credentials for {id}: {e}"))?;
            coap_credentials.insert(id, credentials);
        }
    }
    // Serial devices (group bench), with frame keys.
    let mut serial_keys = BTreeMap::new();
    if opts.workloads.contains(&Workload::Serial) {
        for n in 1..=serial::DEVICES {
            let (id, key) = (serial::device_id(n), serial::new_key());
            devices.push_str(&format!(
                "[[principal]]\nid = \"{id}\"\ngroup = \"bench\"\nserial_key = \"{}\"\n",
                hex::encode(key)
            ));
            serial_keys.insert(id, key);
        }
    }
    let exe = opts.portcullis.clone();
    let bench = |args: &[&str]| -> Result<()> {
        let out = Command::new(&exe)
            .args(args)
            .arg("--config")
            .arg(dir.join("portcullis.toml"))
            .current_dir(&dir)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "portcullis {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    bench(&["pki", "init"])?;
    if opts.targets.contains(&Target::PortcullisNoModel) {
        // Found now rather than when the first no-model run fails to start.
        let out = Command::new(&exe)
            .args(["config", "check"])
            .arg(dir.join(NO_MODEL_CONFIG))
            .current_dir(&dir)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "the portcullis-no-model configuration does not load: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::write(dir.join("devices.toml"), devices)?;
    std::fs::write(
        dir.join("services.toml"),
        format!("[[principal]]\nid = \"bench-sub\"\nsecret = \"{sub_secret}\"\n"),
    )?;
    // Registered offline (no gateway running): the registry is a file.
    let ca = dir.join("data/pki/ca.pem");
    let issuer = Issuer::load(&ca, &dir.join("data/pki/ca.key"))?;
    let mut b = Bench {
        _work: work,
        opts,
        dir: dir.clone(),
        secrets,
        started: std::cell::Cell::new(0),
        coap_credentials,
        serial_devices: std::sync::Mutex::new(serial::devices(&serial_keys)),
        issuer,
        ca,
    };
    {
        let server = b.start_portcullis(Target::Portcullis)?;
        bench(&[
            "device",
            "import",
            dir.join("devices.toml").to_str().unwrap(),
        ])?;
        bench(&[
            "service",
            "import",
            dir.join("services.toml").to_str().unwrap(),
        ])?;
        drop(server);
    }
    let _ = std::fs::remove_file(dir.join("devices.toml"));
    let _ = std::fs::remove_file(dir.join("services.toml"));
    // Mosquitto's password file: the same ids and secrets, hashed by mosquitto_passwd.
    let pw = dir.join("mosquitto.passwd");
    let text: String = b
        .secrets
        .iter()
        .map(|(id, s)| format!("{id}:{s}\n"))
        .collect();
    std::fs::write(&pw, text)?;
    if b.opts.targets.contains(&Target::Mosquitto) {
        let ok = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&pw)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            bail!("mosquitto_passwd -U failed (apt-get install mosquitto)");
        }
    }
    b.dir = dir;
    Ok(b)
}

/// `config` with the behaviour model off for every group: a top-level `[behaviour]`
/// table with `enabled = false`, which no group's own `behaviour` table overrides.
fn no_model_config(config: &str, policy: &Path) -> Result<String> {
    let table: toml::Table =
        toml::from_str(config).with_context(|| format!("{}: not valid TOML", policy.display()))?;
    if table.contains_key("behaviour") {
        bail!(
            "{}: has a top-level [behaviour] table; the portcullis-no-model target appends \
             its own ([behaviour] enabled = false): remove it from the policy, or leave the \
             target out",
            policy.display()
        );
    }
    let groups = table.get("device_groups").and_then(|g| g.as_table());
    for (name, group) in groups.into_iter().flatten() {
        let enabled = group
            .get("behaviour")
            .and_then(|b| b.get("enabled"))
            .is_some();
        if enabled {
            bail!(
                "{}: device_groups.{name}.behaviour sets enabled, which would override the \
                 portcullis-no-model target's [behaviour] enabled = false: remove it from the \
                 policy, or leave the target out",
                policy.display()
            );
        }
    }
    let sep = if config.ends_with('\n') { "" } else { "\n" };
    Ok(format!("{config}{sep}\n[behaviour]\nenabled = false\n"))
}

/// `config` in upstream mode towards the broker at `addr`.
fn upstream_config(config: &str, policy: &Path, addr: SocketAddr) -> Result<String> {
    let mut table: toml::Table =
        toml::from_str(config).with_context(|| format!("{}: not valid TOML", policy.display()))?;
    let broker = table
        .entry("broker")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(broker) = broker else {
        bail!("{}: broker is not a table", policy.display());
    };
    broker.insert("mode".into(), "upstream".into());
    let mut upstream = toml::Table::new();
    upstream.insert(
        "urls".into(),
        toml::Value::Array(vec![format!("mqtt://{addr}").into()]),
    );
    upstream.insert("client_id".into(), "portcullis-bench".into());
    table.insert("upstream".into(), toml::Value::Table(upstream));
    Ok(toml::to_string(&table)?)
}

fn tls_publisher_id(n: usize) -> String {
    format!("bench-tls-{n}")
}

/// Cases of a workload: a name, and what runs.
fn cases(w: Workload) -> Vec<&'static str> {
    match w {
        Workload::Throughput => vec!["qos0-tcp", "qos1-tcp", "qos0-tls", "qos1-tls"],
        Workload::Latency => vec!["1k", "10k"],
        Workload::Idle => vec!["plain", "mtls"],
        Workload::Isolation => vec!["solo", "flood"],
        Workload::Coap => vec!["con-post", "idle-dtls"],
        Workload::Serial => vec!["115200", "921600", "unthrottled"],
    }
}

/// The targets a workload's runs take turns on: the serial workload's baseline first.
fn targets_of(w: Workload, targets: &[Target]) -> Vec<Target> {
    match w {
        Workload::Serial => std::iter::once(Target::PtyReader)
            .chain(targets.iter().copied())
            .collect(),
        _ => targets.to_vec(),
    }
}

fn applies(w: Workload, target: Target, case: &str) -> bool {
    if target == Target::PtyReader {
        return w == Workload::Serial;
    }
    // CoAP and serial are the gateway's alone.
    if matches!(w, Workload::Coap | Workload::Serial) {
        return !matches!(target, Target::Rumqttd | Target::Mosquitto);
    }
    // rumqttd direct runs without TLS (the embedded broker has no listener of its own).
    !(target == Target::Rumqttd && (case.ends_with("tls") || case == "mtls"))
}

pub fn run(opts: Options) -> Result<Vec<Sample>> {
    if !(0.1..=3600.0).contains(&opts.secs) {
        bail!("--secs must be from 0.1 to 3600, not {}", opts.secs);
    }
    if !Path::new("/proc/self/status").exists() {
        bail!("the benchmarks read /proc: Linux only");
    }
    if opts.pin {
        pin_self(opts.load_cpu);
    }
    let b = setup(opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut samples = Vec::new();
    for &w in &b.opts.workloads {
        for case in cases(w) {
            for rep in 1..=b.opts.reps {
                for target in targets_of(w, &b.opts.targets) {
                    if !applies(w, target, case) {
                        continue;
                    }
                    // A serial run's bus exists before the gateway starts and outlives it.
                    let bus = match w {
                        Workload::Serial => Some(serial::start_bus(&b.dir)?),
                        _ => None,
                    };
                    let figures = if target == Target::PtyReader {
                        match &bus {
                            Some(bus) => rt.block_on(b.serial_pty(bus, case)),
                            None => Err(anyhow!("no serial bus")),
                        }
                    } else {
                        let mut server = b.start(target)?;
                        let figures = rt.block_on(async {
                            match (w, case) {
                                (Workload::Throughput, c) => {
                                    let qos = if c.starts_with("qos1") { 1 } else { 0 };
                                    let tls = c.ends_with("tls");
                                    b.throughput(&server, qos, tls).await
                                }
                                (Workload::Latency, "1k") => b.latency(&server, 1_000.0).await,
                                (Workload::Latency, _) => b.latency(&server, 10_000.0).await,
                                (Workload::Idle, c) => b.idle(&server, c == "mtls").await,
                                (Workload::Isolation, c) => {
                                    b.isolation(&server, c == "flood").await
                                }
                                (Workload::Coap, "con-post") => b.coap_requests(&server).await,
                                (Workload::Coap, _) => b.coap_idle(&server).await,
                                (Workload::Serial, c) => match &bus {
                                    Some(bus) => b.serial_frames(&server, bus, c).await,
                                    None => Err(anyhow!("no serial bus")),
                                },
                            }
                        });
                        // Figures of a run whose server died are not figures.
                        let figures = server.still_running().and(figures);
                        drop(server);
                        figures
                    };
                    drop(bus);
                    // Connections of the run end before the next server starts.
                    rt.block_on(async { sleep(Duration::from_millis(200)).await });
                    let figures =
                        figures.with_context(|| format!("{w:?} {case} against {target:?}"))?;
                    let sample = Sample {
                        workload: format!("{w:?}").to_lowercase(),
                        case: case.to_string(),
                        target,
                        rep,
                        figures,
                    };
                    eprintln!("{}", line(&sample));
                    samples.push(sample);
                }
            }
        }
    }
    println!("{}", summary(&samples));
    if let Some(path) = &b.opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&samples)? + "\n")?;
    }
    Ok(samples)
}

fn line(s: &Sample) -> String {
    let figs: Vec<String> = s
        .figures
        .iter()
        .map(|(k, v)| format!("{k}={v:.1}"))
        .collect();
    format!(
        "{} {} {:?} rep {}: {}",
        s.workload,
        s.case,
        s.target,
        s.rep,
        figs.join(" ")
    )
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// The table: per workload, case and figure, each target's median (min–max), and
/// Portcullis's ratio to each baseline. The no-model columns appear only when that
/// target ran.
pub fn summary(samples: &[Sample]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for s in samples {
        for k in s.figures.keys() {
            let key = (s.workload.clone(), s.case.clone(), k.clone());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let ran = |t: Target| samples.iter().any(|s| s.target == t);
    let (no_model, upstream, pty) = (
        ran(Target::PortcullisNoModel),
        ran(Target::PortcullisUpstream),
        ran(Target::PtyReader),
    );
    let mut targets = vec![Target::Portcullis, Target::Rumqttd, Target::Mosquitto];
    let (mut head, mut rule) = (String::new(), String::new());
    if no_model {
        targets.push(Target::PortcullisNoModel);
        head.push_str(" portcullis-no-model | P/no-model |");
        rule.push_str("---|---|");
    }
    if upstream {
        targets.push(Target::PortcullisUpstream);
        head.push_str(" portcullis-upstream | U/mosquitto |");
        rule.push_str("---|---|");
    }
    if pty {
        targets.push(Target::PtyReader);
        head.push_str(" pty-reader | P/pty-reader |");
        rule.push_str("---|---|");
    }
    let column = |t: Target| targets.iter().position(|x| *x == t).unwrap_or(0);
    let _ = writeln!(
        out,
        "| workload | case | figure | portcullis | rumqttd | mosquitto | P/rumqttd | P/mosquitto |{head}\n|---|---|---|---|---|---|---|---|{rule}"
    );
    for (w, c, k) in keys {
        let mut medians = BTreeMap::new();
        let mut cells = Vec::new();
        for &t in &targets {
            let v: Vec<f64> = samples
                .iter()
                .filter(|s| s.workload == w && s.case == c && s.target == t)
                .filter_map(|s| s.figures.get(&k).copied())
                .collect();
            if v.is_empty() {
                cells.push("–".to_string());
                continue;
            }
            let (m, lo, hi) = median_min_max(v);
            medians.insert(t, m);
            cells.push(format!("{} ({}–{})", fmt(m), fmt(lo), fmt(hi)));
        }
        let ratio = |t: Target| match (medians.get(&Target::Portcullis), medians.get(&t)) {
            (Some(p), Some(b)) if *b != 0.0 => format!("{:.2}", p / b),
            _ => "–".into(),
        };
        let _ = write!(
            out,
            "| {w} | {c} | {k} | {} | {} | {} | {} | {} |",
            cells[0],
            cells[1],
            cells[2],
            ratio(Target::Rumqttd),
            ratio(Target::Mosquitto)
        );
        if no_model {
            let _ = write!(
                out,
                " {} | {} |",
                cells[3],
                ratio(Target::PortcullisNoModel)
            );
        }
        if upstream {
            let u = medians.get(&Target::PortcullisUpstream);
            let ratio = match (u, medians.get(&Target::Mosquitto)) {
                (Some(u), Some(m)) if *m != 0.0 => format!("{:.2}", u / m),
                _ => "–".into(),
            };
            let _ = write!(
                out,
                " {} | {ratio} |",
                cells[column(Target::PortcullisUpstream)]
            );
        }
        if pty {
            let _ = write!(
                out,
                " {} | {} |",
                cells[column(Target::PtyReader)],
                ratio(Target::PtyReader)
            );
        }
        out.push('\n');
    }
    out
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One throughput repetition's msg/s for a case and target.
    fn throughput_sample(case: &str, target: Target, rep: usize, v: f64) -> Sample {
        Sample {
            workload: "throughput".into(),
            case: case.into(),
            target,
            rep,
            figures: BTreeMap::from([("msg_per_s".to_string(), v)]),
        }
    }

    #[test]
    fn bucket_quantile_reads_the_window_between_snapshots() {
        let a = vec![(0.0001, 10), (0.001, 10), (f64::INFINITY, 10)];
        let b = vec![(0.0001, 60), (0.001, 109), (f64::INFINITY, 110)];
        // 100 new observations: 50 ≤ 100 µs, 49 more ≤ 1 ms, 1 above.
        assert_eq!(bucket_quantile(&a, &b, 0.5), Some(0.0001));
        assert_eq!(bucket_quantile(&a, &b, 0.99), Some(0.001));
        assert_eq!(bucket_quantile(&a, &b, 1.0), Some(f64::INFINITY));
        assert_eq!(bucket_quantile(&b, &b, 0.5), None);
    }

    #[test]
    fn summary_gives_medians_ranges_and_ratios() {
        let mk = |t, rep, v| throughput_sample("qos0-tcp", t, rep, v);
        let samples = vec![
            mk(Target::Portcullis, 1, 100.0),
            mk(Target::Portcullis, 2, 300.0),
            mk(Target::Portcullis, 3, 200.0),
            mk(Target::Rumqttd, 1, 400.0),
            mk(Target::Mosquitto, 1, 100.0),
        ];
        let t = summary(&samples);
        assert!(t.contains("| throughput | qos0-tcp | msg_per_s | 200 (100–300) | 400 (400–400) | 100 (100–100) | 0.50 | 2.00 |\n"), "{t}");
        assert!(!t.contains("no-model"), "{t}");
    }

    #[test]
    fn summary_compares_the_gateway_with_its_model_off_when_that_ran() {
        let mk = |t, rep, v| throughput_sample("qos1-tls", t, rep, v);
        let samples = vec![
            mk(Target::Portcullis, 1, 90.0),
            mk(Target::PortcullisNoModel, 1, 100.0),
            mk(Target::Portcullis, 2, 95.0),
            mk(Target::PortcullisNoModel, 2, 98.0),
            mk(Target::Portcullis, 3, 93.0),
            mk(Target::PortcullisNoModel, 3, 102.0),
        ];
        let t = summary(&samples);
        let mut lines = t.lines();
        assert_eq!(
            lines.next(),
            Some(
                "| workload | case | figure | portcullis | rumqttd | mosquitto | P/rumqttd | P/mosquitto | portcullis-no-model | P/no-model |"
            ),
            "{t}"
        );
        assert_eq!(
            lines.next(),
            Some("|---|---|---|---|---|---|---|---|---|---|")
        );
        // Baselines that did not run stay empty; the ratio is with the model over without.
        assert_eq!(
            lines.next(),
            Some(
                "| throughput | qos1-tls | msg_per_s | 93.00 (90.00–95.00) | – | – | – | – | 100 (98.00–102) | 0.93 |"
            ),
            "{t}"
        );
    }

    #[test]
    fn no_model_target_is_named_the_same_on_the_command_line_and_in_json() {
        use clap::ValueEnum;
        let parsed = Target::from_str("portcullis-no-model", false).unwrap();
        assert_eq!(parsed, Target::PortcullisNoModel);
        assert_eq!(
            serde_json::to_value(parsed).unwrap(),
            serde_json::json!("portcullis-no-model")
        );
        assert_eq!(
            serde_json::to_value(Target::Portcullis).unwrap(),
            serde_json::json!("portcullis")
        );
    }

    #[test]
    fn no_model_config_turns_the_model_off_for_every_group() {
        let policy = Path::new("bench.toml");
        let config = "[device_groups.bench.behaviour]\nmax_messages_per_second = 1.0\n";
        let off = no_model_config(config, policy).unwrap();
        let c = portcullis_config::Config::parse(&off, "no-model").unwrap();
        assert!(!c.behaviour.enabled);
        assert!(!c.behaviour_for("bench").enabled);
        assert_eq!(c.behaviour_for("bench").max_messages_per_second, 1.0);
        // Either would leave the model on somewhere: refused with the key to remove.
        let top = no_model_config("[behaviour]\nsigma = 5.0\n", policy).unwrap_err();
        assert!(top.to_string().contains("[behaviour]"), "{top}");
        let group = "[device_groups.legacy.behaviour]\nenabled = true\n";
        let err = no_model_config(group, policy).unwrap_err();
        assert!(
            err.to_string().contains("device_groups.legacy.behaviour"),
            "{err}"
        );
    }

    #[test]
    fn payload_is_64_bytes_of_json() {
        let mut b = Vec::new();
        payload(&mut b, 123_456_789);
        assert_eq!(b.len(), PAYLOAD);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["sent_us"], 123_456_789);
    }
}
