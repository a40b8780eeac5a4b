//! Running a scenario: every member of every group as a task, services first, then
//! devices; counters per group; the report at the end. MQTT members are here; CoAP
//! members in `coap`, serial members in `serial`.

mod coap;
mod serial;

use crate::mqtt::{self, Packet, Version, reason_name};
use crate::provision::{self, Secret};
use crate::report::{GroupStats, Quarantined, Report};
use crate::scenario::{Behaviour, Group, MQTT_FLOOD_INFLIGHT, Scenario, Transport};
use crate::transport::{self, Endpoint, Stream, Tls};
use anyhow::Result;
use rand::RngExt;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// How long a server may take to answer CONNECT or SUBSCRIBE.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1 messages a device leaves unacknowledged at most (within any server's
/// Receive Maximum; the gateway's default is 64).
const MAX_UNACKNOWLEDGED: usize = 32;
/// The largest packet the simulator reads.
const MAX_PACKET: usize = 16 << 20;

/// What every member can see.
struct Shared {
    start: Instant,
    end: Instant,
    grace: Duration,
    stats: Vec<Arc<GroupStats>>,
    devices: HashMap<String, Device>,
    /// A simulated service receives telemetry: latency is publish → delivery.
    service_listens: bool,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    fn running(&self) -> bool {
        Instant::now() < self.end
    }
}

/// What a service needs to know about a device.
struct Device {
    group: usize,
    /// The group's command acknowledgement topic suffix.
    ack: Option<String>,
    /// Subscribed to its commands now: a command sent now reaches it.
    listening: AtomicBool,
}

/// One member: who it is and how it connects.
struct Member {
    id: String,
    group: usize,
    version: Version,
    /// A CoAP device (DTLS to `endpoint.addr`), not MQTT.
    coap: bool,
    endpoint: Endpoint,
    source: Option<IpAddr>,
    secret: Secret,
    behaviour: Behaviour,
    /// A serial device: its end of its bus.
    serial: Option<serial::Link>,
}

/// Events the reader task hands to its member.
#[derive(Debug)]
enum Event {
    ConnAck(u8),
    PubAck {
        pkid: u16,
        code: u8,
    },
    SubAck(Vec<u8>),
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        pkid: u16,
    },
    Disconnect(u8),
    Closed,
}

/// A connection: the write half and the events its reader task decodes.
struct Conn {
    version: Version,
    w: WriteHalf<Stream>,
    rx: mpsc::UnboundedReceiver<Event>,
    out: Vec<u8>,
    pkid: u16,
}

impl Conn {
    fn start(stream: Stream, version: Version) -> Conn {
        let (r, w) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(read_events(r, version, tx));
        Conn {
            version,
            w,
            rx,
            out: Vec::with_capacity(1024),
            pkid: 0,
        }
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid % u16::MAX + 1;
        self.pkid
    }

    /// Write what is gathered; a server that stops reading ends the connection
    /// after `ANSWER_TIMEOUT` rather than holding the member forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        let r = match timeout(ANSWER_TIMEOUT, self.w.write_all(&self.out)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        self.out.clear();
        r
    }

    async fn publish(&mut self, topic: &str, qos: u8, payload: &[u8]) -> std::io::Result<u16> {
        let pkid = if qos > 0 { self.next_pkid() } else { 0 };
        mqtt::publish(&mut self.out, self.version, topic, qos, pkid, payload);
        self.flush().await?;
        Ok(pkid)
    }

    async fn subscribe(&mut self, filters: &[(&str, u8)]) -> std::io::Result<()> {
        let pkid = self.next_pkid();
        mqtt::subscribe(&mut self.out, self.version, pkid, filters);
        self.flush().await
    }

    async fn puback(&mut self, pkid: u16) -> std::io::Result<()> {
        mqtt::puback(&mut self.out, pkid);
        self.flush().await
    }

    async fn close(mut self) {
        mqtt::disconnect(&mut self.out);
        let _ = self.flush().await;
        let _ = self.w.shutdown().await;
    }
}

async fn read_events(mut r: ReadHalf<Stream>, v: Version, tx: mpsc::UnboundedSender<Event>) {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16384];
    loop {
        let mut used = 0;
        loop {
            match mqtt::decode(&buf[used..], v, MAX_PACKET) {
                Ok(Some((p, n))) => {
                    used += n;
                    let ev = match p {
                        Packet::ConnAck { code } => Event::ConnAck(code),
                        Packet::PubAck { pkid, code } => Event::PubAck { pkid, code },
                        Packet::SubAck { codes, .. } => Event::SubAck(codes.to_vec()),
                        Packet::Publish {
                            topic,
                            qos,
                            pkid,
                            payload,
                        } => Event::Publish {
                            topic: topic.to_string(),
                            payload: payload.to_vec(),
                            qos,
                            pkid,
                        },
                        Packet::Disconnect { code } => Event::Disconnect(code),
                        Packet::PingResp | Packet::Other(_) => continue,
                    };
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    let _ = tx.send(Event::Closed);
                    return;
                }
            }
        }
        buf.drain(..used);
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(Event::Closed);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Why a connection attempt did not give a session.
fn open_error(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection_refused",
        ConnectionReset | BrokenPipe | UnexpectedEof => "closed",
        InvalidData => "tls_error",
        _ => "io_error",
    }
}

impl Member {
    /// TCP (+ TLS), CONNECT, CONNACK: a session, or the reason there is none.
    async fn session(&self, password: Option<&str>) -> Result<Conn, &'static str> {
        self.session_from(password, self.source).await
    }

    /// A session from a chosen source address.
    async fn session_from(
        &self,
        password: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<Conn, &'static str> {
        let stream = timeout(ANSWER_TIMEOUT, transport::open(&self.endpoint, source))
            .await
            .map_err(|_| "timeout")?
            .map_err(|e| open_error(&e))?;
        let mut conn = Conn::start(stream, self.version);
        let secret = match (&self.secret, password) {
            (_, Some(p)) => Some(p),
            (Secret::Password(p), None) => Some(p.as_str()),
            _ => None,
        };
        mqtt::connect(
            &mut conn.out,
            self.version,
            &mqtt::Connect {
                client_id: &self.id,
                username: secret.map(|_| self.id.as_str()),
                password: secret.map(str::as_bytes),
                keep_alive: 60,
                clean: true,
            },
        );
        conn.flush().await.map_err(|e| open_error(&e))?;
        match timeout(ANSWER_TIMEOUT, conn.rx.recv()).await {
            Err(_) => Err("timeout"),
            Ok(Some(Event::ConnAck(0))) => Ok(conn),
            Ok(Some(Event::ConnAck(code))) => Err(reason_name(self.version, code)),
            Ok(Some(Event::Disconnect(code))) => Err(reason_name(self.version, code)),
            Ok(_) => Err("closed"),
        }
    }

    fn topic(&self, suffix: &str) -> String {
        format!("devices/{}/{suffix}", self.id)
    }
}

/// Run a scenario: provision, then the fleet; the report when all members are done.
pub async fn run(s: &Scenario, progress: bool) -> Result<Report> {
    // Before anything is registered: a bus that is not there is the likeliest mistake.
    let buses = serial::Buses::open(s)?;
    let fleet = provision::prepare(s)?;
    let roots = match &s.target.ca {
        Some(ca) => Some(transport::roots(ca)?),
        None => None,
    };
    let server_name = transport::server_name(&s.target.server_name)?;
    let stats: Vec<Arc<GroupStats>> = s
        .groups
        .iter()
        .map(|g| Arc::new(GroupStats::new(&g.name, g.behaviour.name(), g.count)))
        .collect();
    let mut devices = HashMap::new();
    for (gi, g) in s.groups.iter().enumerate() {
        let ack = match &g.behaviour {
            Behaviour::WellBehaved { ack_topic, .. } => Some(ack_topic.clone()),
            _ => None,
        };
        for n in 1..=g.count {
            devices.insert(
                g.id(n),
                Device {
                    group: gi,
                    ack: ack.clone(),
                    listening: AtomicBool::new(false),
                },
            );
        }
    }
    let start = Instant::now() + Duration::from_millis(50);
    let shared = Arc::new(Shared {
        start,
        end: start + Duration::from_secs_f64(s.duration_secs),
        grace: Duration::from_secs_f64(s.grace_secs),
        stats,
        devices,
        service_listens: s
            .groups
            .iter()
            .any(|g| matches!(g.behaviour, Behaviour::Service { .. })),
    });

    let mut members: Vec<(Member, bool)> = Vec::new();
    for (gi, (g, secrets)) in s.groups.iter().zip(fleet.secrets).enumerate() {
        // A serial group has no address: it writes to its bus.
        let addr = match s.listener(g) {
            Some(addr) => addr,
            None if g.serial() => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => unreachable!("checked at load"),
        };
        for (i, secret) in secrets.into_iter().enumerate() {
            let tls = match (g.transport, &roots) {
                _ if g.coap() => None,
                (Transport::Tls, Some(roots)) => {
                    let identity = match &secret {
                        Secret::Certificate { chain, key } => {
                            Some((chain.clone(), key.clone_key()))
                        }
                        _ => None,
                    };
                    Some(Tls {
                        config: transport::client_config(roots.clone(), identity)?,
                        server_name: server_name.clone(),
                    })
                }
                _ => None,
            };
            let link = match s.bus_of(g) {
                Some(bus) if g.serial() => Some(buses.link(bus, &g.id(i + 1))?),
                _ => None,
            };
            members.push((
                Member {
                    id: g.id(i + 1),
                    group: gi,
                    version: g.protocol.mqtt(),
                    coap: g.coap(),
                    endpoint: Endpoint { addr, tls },
                    source: g.source(i + 1),
                    secret,
                    behaviour: g.behaviour.clone(),
                    serial: link,
                },
                matches!(g.behaviour, Behaviour::Service { .. }),
            ));
        }
    }

    let progress = progress.then(|| tokio::spawn(show_progress(shared.clone())));
    // Services first, each subscribed before any device starts.
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    let (services, devices): (Vec<_>, Vec<_>) = members.into_iter().partition(|(_, svc)| *svc);
    for (m, _) in services {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        let targets = command_targets(s, &m.behaviour);
        tasks.push(tokio::spawn(service(m, shared.clone(), targets, tx)));
    }
    // A service that is never answered must not hold the fleet back forever: its
    // report shows what went wrong.
    for rx in ready {
        let _ = timeout(ANSWER_TIMEOUT * 2, rx).await;
    }
    let ramp = Duration::from_secs_f64(s.ramp_up_secs);
    let count = devices.len().max(1) as u32;
    for (i, (m, _)) in devices.into_iter().enumerate() {
        let delay = ramp * i as u32 / count;
        tasks.push(tokio::spawn(device(m, shared.clone(), delay)));
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(p) = progress {
        p.abort();
        let _ = p.await;
    }
    let mut groups: Vec<_> = shared.stats.iter().map(|g| g.report()).collect();
    let quarantine_unknown = match behaviour_states(&s.provision) {
        Ok(states) => {
            for q in states {
                if let Some(d) = shared.devices.get(&q.id) {
                    groups[d.group].quarantined.push(q);
                }
            }
            None
        }
        Err(why) => Some(why),
    };
    Ok(Report {
        scenario: s.name.clone(),
        duration_secs: s.duration_secs,
        groups,
        quarantine_unknown,
    })
}

/// Devices the gateway does not hold as normal (`portcullis quarantine list --json`,
/// through the CLI the scenario provisions with).
fn behaviour_states(p: &crate::scenario::Provision) -> Result<Vec<Quarantined>, String> {
    let mut cmd = std::process::Command::new(&p.portcullis);
    cmd.args(["quarantine", "list", "--json"]);
    if let Some(config) = &p.config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", p.portcullis.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} quarantine list` failed: {}",
            p.portcullis.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("`{} quarantine list --json`: {e}", p.portcullis.display()))
}

fn command_targets(s: &Scenario, b: &Behaviour) -> Vec<String> {
    let Behaviour::Service { command_groups, .. } = b else {
        return Vec::new();
    };
    command_groups
        .iter()
        .filter_map(|name| s.group(name))
        .flat_map(|g: &Group| (1..=g.count).map(|n| g.id(n)))
        .collect()
}

/// One line on the terminal (cut to its width): the time through the run and the
/// whole fleet's totals; past the run's end, that it is waiting out its grace period.
async fn show_progress(shared: Arc<Shared>) {
    let run = shared.end.saturating_duration_since(shared.start);
    let bar = indicatif::ProgressBar::new(run.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>14} [{bar:20}] {wide_msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let _clear = ClearOnDrop(bar.clone());
    loop {
        let now = Instant::now();
        let (mut conn, mut sent, mut ack, mut refused, mut dlv) = (0, 0, 0, 0, 0);
        for g in &shared.stats {
            let r = g.report();
            conn += r.connected;
            sent += r.sent;
            ack += r.acknowledged;
            refused += r.refused.values().sum::<u64>() + r.connect_refused.values().sum::<u64>();
            dlv += r.delivered;
        }
        let totals = format!("conn {conn} sent {sent} ack {ack} refused {refused} dlv {dlv}");
        if now < shared.end {
            let done = now.saturating_duration_since(shared.start);
            bar.set_position(done.as_secs());
            bar.set_prefix(format!("{}/{} s", done.as_secs(), run.as_secs()));
            bar.set_message(totals);
        } else {
            let over = now.saturating_duration_since(shared.end);
            bar.set_position(run.as_secs().max(1));
            bar.set_prefix(format!(
                "grace {}/{} s",
                over.as_secs(),
                shared.grace.as_secs()
            ));
            bar.set_message(format!("run over; waiting for the last answers · {totals}"));
        }
        sleep(Duration::from_millis(500)).await;
    }
}

/// Takes the progress line off the terminal when the task showing it ends.
struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Connect, retrying with back-off while the run lasts.
async fn connect_retrying(m: &Member, shared: &Shared) -> Option<Conn> {
    let stats = &shared.stats[m.group];
    let mut backoff = Duration::from_millis(100);
    while shared.running() {
        match m.session(None).await {
            Ok(conn) => {
                stats.add(&stats.connected, 1);
                return Some(conn);
            }
            Err(reason) => {
                stats.connect_refused(reason);
                sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    None
}

/// Telemetry payload: JSON carrying the send time (µs since the run started).
fn telemetry(buf: &mut Vec<u8>, seq: u64, sent_us: u64, pad: usize) {
    use std::io::Write;
    buf.clear();
    let _ = write!(buf, "{{\"seq\":{seq},\"sent_us\":{sent_us},\"temp\":21.5");
    if pad > buf.len() + 10 {
        let n = pad - buf.len() - 10;
        buf.extend_from_slice(b",\"pad\":\"");
        buf.resize(buf.len() + n, b'x');
        buf.push(b'"');
    }
    buf.push(b'}');
}

/// The `sent_us` field of a telemetry payload.
pub fn sent_us(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_us\":";
    let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

async fn device(mut m: Member, shared: Arc<Shared>, delay: Duration) {
    sleep_until(shared.start + delay).await;
    let stats = shared.stats[m.group].clone();
    if let Some(link) = m.serial.take() {
        return serial::device(&m, link, &shared, &stats).await;
    }
    match m.behaviour.clone() {
        Behaviour::WellBehaved {
            rate,
            jitter,
            boot_burst,
            daily_amplitude,
            day_secs,
            qos,
            topic,
            ack_topic,
            commands,
        } => {
            let plan = Plan {
                rate: Box::new(move |t| daily_rate(rate, daily_amplitude, day_secs, t)),
                jitter,
                boot_burst,
                qos,
                topic,
                ack_topic: commands.then_some(ack_topic),
            };
            if m.coap {
                coap::well_behaved(&m, &shared, &stats, plan).await
            } else {
                telemetry_loop(&m, &shared, &stats, plan).await
            }
        }
        _ if m.coap => coap::device(&m, &shared, &stats).await,
        Behaviour::SlowRamp { rate, factor, qos } => {
            let duration = (shared.end - shared.start).as_secs_f64();
            let plan = Plan {
                rate: Box::new(move |t| ramp_rate(rate, factor, duration, t)),
                jitter: 0.0,
                boot_burst: 0,
                qos,
                topic: "telemetry".into(),
                ack_topic: None,
            };
            telemetry_loop(&m, &shared, &stats, plan).await
        }
        Behaviour::Flood {
            inflight,
            payload_bytes,
        } => {
            flood(
                &m,
                &shared,
                &stats,
                inflight.unwrap_or(MQTT_FLOOD_INFLIGHT),
                payload_bytes,
            )
            .await
        }
        Behaviour::Oversized { bytes, rate } => {
            let (topic, payload) = (m.topic("telemetry"), vec![b'x'; bytes]);
            hostile_actions(&m, &shared, &stats, rate, |_| {
                Action::Publish(topic.clone(), payload.clone())
            })
            .await
        }
        Behaviour::SchemaBreaking { rate } => {
            let topic = m.topic("telemetry");
            hostile_actions(&m, &shared, &stats, rate, |n| {
                Action::Publish(topic.clone(), format!("not json {n}").into_bytes())
            })
            .await
        }
        Behaviour::TopicScan { rate } => {
            hostile_actions(&m, &shared, &stats, rate, |n| topic_scan(&m, n)).await
        }
        Behaviour::CredentialStuffing { rate } => stuffing(&m, &shared, &stats, rate).await,
        Behaviour::ClonedIdentity { interval_secs } => {
            cloned(&m, &shared, &stats, interval_secs).await
        }
        Behaviour::ReconnectStorm { rate } => storm(&m, &shared, &stats, rate).await,
        Behaviour::Slowloris { connections } => slowloris(&m, &shared, &stats, connections).await,
        Behaviour::Malformed { rate } => malformed(&m, &shared, &stats, rate).await,
        Behaviour::Service { .. }
        | Behaviour::Replay { .. }
        | Behaviour::Forged { .. }
        | Behaviour::Noise { .. } => {}
    }
}

struct Plan {
    /// Messages per second at t seconds into the run.
    rate: Box<dyn Fn(f64) -> f64 + Send + Sync>,
    jitter: f64,
    boot_burst: u32,
    qos: u8,
    topic: String,
    /// Where command acknowledgements go; none: no commands are taken.
    ack_topic: Option<String>,
}

/// Periodic telemetry and command handling, reconnecting when the session ends.
async fn telemetry_loop(m: &Member, shared: &Shared, stats: &GroupStats, plan: Plan) {
    let topic = m.topic(&plan.topic);
    let ack_topic = plan.ack_topic.as_ref().map(|t| m.topic(t));
    let commands = m.topic("commands/#");
    let mut payload = Vec::with_capacity(128);
    let mut seq = 0u64;
    // Packet id → (sent at µs, telemetry rather than a command acknowledgement).
    let mut pending: HashMap<u16, (u64, bool)> = HashMap::new();
    let mut booted = false;
    let listening = shared.devices.get(&m.id).map(|d| &d.listening);
    let listen = |on: bool| {
        if let Some(l) = listening {
            l.store(on, Relaxed);
        }
    };
    'session: while shared.running() {
        listen(false);
        let Some(mut conn) = connect_retrying(m, shared).await else {
            break;
        };
        // Messages in flight when the last session ended are lost with it.
        for _ in pending.drain().filter(|(_, (_, t))| *t) {
            stats.refused("unacknowledged");
        }
        if ack_topic.is_some() && conn.subscribe(&[(&commands, 1)]).await.is_err() {
            continue;
        }
        if !booted {
            booted = true;
            for _ in 0..plan.boot_burst.min(MAX_UNACKNOWLEDGED as u32) {
                seq += 1;
                let now = shared.now_us();
                telemetry(&mut payload, seq, now, 0);
                let Ok(pkid) = conn.publish(&topic, plan.qos, &payload).await else {
                    continue 'session;
                };
                stats.add(&stats.sent, 1);
                if plan.qos > 0 {
                    pending.insert(pkid, (now, true));
                } else {
                    stats.add(&stats.acknowledged, 1);
                }
            }
        }
        let mut next = Instant::now() + interval(&plan, shared);
        // Past the end, no more telemetry; the device stays for the grace period to
        // collect acknowledgements and the last commands.
        let stop = shared.end + shared.grace;
        loop {
            tokio::select! {
                _ = sleep_until(next.min(stop)) => {
                    if Instant::now() >= stop {
                        conn.close().await;
                        break 'session;
                    }
                    if !shared.running() {
                        // Past the end: only waiting for acknowledgements.
                        next = stop;
                        continue;
                    }
                    if pending.len() >= MAX_UNACKNOWLEDGED {
                        // The server's Receive Maximum: wait for acknowledgements, as a
                        // real client does when it is held back.
                        next = Instant::now() + Duration::from_millis(10);
                        continue;
                    }
                    seq += 1;
                    let now = shared.now_us();
                    telemetry(&mut payload, seq, now, 0);
                    let Ok(pkid) = conn.publish(&topic, plan.qos, &payload).await else {
                        stats.disconnected("closed");
                        continue 'session;
                    };
                    stats.add(&stats.sent, 1);
                    if plan.qos > 0 {
                        pending.insert(pkid, (now, true));
                    } else {
                        // QoS 0 has no acknowledgement: written is as good as it gets.
                        stats.add(&stats.acknowledged, 1);
                    }
                    next += interval(&plan, shared);
                }
                ev = conn.rx.recv() => match ev {
                    Some(Event::PubAck { pkid, code }) => {
                        if let Some((sent, telemetry)) = pending.remove(&pkid) && telemetry {
                            if code < 0x80 {
                                stats.add(&stats.acknowledged, 1);
                                if !shared.service_listens {
                                    stats.latency_us(shared.now_us().saturating_sub(sent));
                                }
                            } else {
                                stats.refused(reason_name(m.version, code));
                            }
                        }
                    }
                    Some(Event::SubAck(codes)) => {
                        for c in codes.iter().filter(|c| **c >= 0x80) {
                            stats.refused(reason_name(m.version, *c));
                        }
                        listen(codes.iter().all(|c| *c < 0x80));
                    }
                    Some(Event::Publish { payload: cmd, qos, pkid, .. }) => {
                        stats.add(&stats.commands_received, 1);
                        if qos > 0 && conn.puback(pkid).await.is_err() {
                            continue 'session;
                        }
                        if let Some(ack) = &ack_topic {
                            let mut body = b"{\"ack\":".to_vec();
                            body.extend_from_slice(&cmd);
                            body.push(b'}');
                            match conn.publish(ack, 1, &body).await {
                                Ok(pkid) => { pending.insert(pkid, (shared.now_us(), false)); }
                                Err(_) => continue 'session,
                            }
                        }
                    }
                    Some(Event::Disconnect(code)) => {
                        stats.disconnected(reason_name(m.version, code));
                        continue 'session;
                    }
                    Some(Event::Closed) | None => {
                        stats.disconnected("closed");
                        continue 'session;
                    }
                    Some(Event::ConnAck(_)) => {}
                }
            }
        }
    }
    listen(false);
    // Anything never acknowledged by the end of the grace period.
    for _ in pending.values().filter(|(_, t)| *t) {
        stats.refused("unacknowledged");
    }
}

fn interval(plan: &Plan, shared: &Shared) -> Duration {
    let t = shared.start.elapsed().as_secs_f64();
    jittered((plan.rate)(t), plan.jitter, &mut rand::rng())
}

/// The rate of a device on a daily cycle, t seconds into the run: `rate` swinging by
/// `amplitude` (a fraction) over `day_secs`.
pub fn daily_rate(rate: f64, amplitude: f64, day_secs: f64, t: f64) -> f64 {
    rate * (1.0 + amplitude * (2.0 * std::f64::consts::PI * t / day_secs).sin())
}

/// A rate growing linearly from `rate` to `rate × factor` over `duration` seconds.
pub fn ramp_rate(rate: f64, factor: f64, duration: f64, t: f64) -> f64 {
    rate * (1.0 + (factor - 1.0) * (t / duration).min(1.0))
}

/// The time to the next message at `rate` per second, times a factor drawn uniformly
/// from [1 − jitter, 1 + jitter).
pub fn jittered(rate: f64, jitter: f64, rng: &mut impl RngExt) -> Duration {
    let j = if jitter > 0.0 {
        rng.random_range(1.0 - jitter..1.0 + jitter)
    } else {
        1.0
    };
    Duration::from_secs_f64(j / rate.max(1e-3))
}

/// A service: subscribes, counts what arrives by the sender's group, sends commands.
async fn service(
    m: Member,
    shared: Arc<Shared>,
    targets: Vec<String>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let Behaviour::Service {
        subscribe,
        commands_per_second,
        ..
    } = m.behaviour.clone()
    else {
        return;
    };
    let stats = shared.stats[m.group].clone();
    let mut ready = Some(ready);
    // Services stay until the devices are done.
    let stop = shared.end + shared.grace + Duration::from_millis(500);
    let mut k = 0u64;
    let mut next_cmd = Instant::now();
    'session: while Instant::now() < stop {
        let Some(mut conn) = connect_retrying(&m, &shared).await else {
            break;
        };
        let filters: Vec<(&str, u8)> = subscribe.iter().map(|f| (f.as_str(), 1)).collect();
        if conn.subscribe(&filters).await.is_err() {
            continue;
        }
        loop {
            let commanding = commands_per_second > 0.0 && !targets.is_empty() && shared.running();
            let wake = if commanding { next_cmd.min(stop) } else { stop };
            tokio::select! {
                _ = sleep_until(wake) => {
                    if Instant::now() >= stop {
                        conn.close().await;
                        break 'session;
                    }
                    if !commanding {
                        continue;
                    }
                    next_cmd += Duration::from_secs_f64(1.0 / commands_per_second);
                    // The next device (round robin) that listens for commands now.
                    let Some(target) = (0..targets.len())
                        .map(|i| &targets[(k as usize + i) % targets.len()])
                        .find(|t| shared.devices.get(*t).is_some_and(|d| d.listening.load(Relaxed)))
                    else {
                        continue;
                    };
                    k += 1;
                    let topic = format!("devices/{target}/commands/ping");
                    if conn.publish(&topic, 1, k.to_string().as_bytes()).await.is_err() {
                        continue 'session;
                    }
                    stats.add(&stats.commands_sent, 1);
                }
                ev = conn.rx.recv() => match ev {
                    Some(Event::SubAck(codes)) => {
                        for c in codes.iter().filter(|c| **c >= 0x80) {
                            stats.refused(reason_name(m.version, *c));
                        }
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                        next_cmd = Instant::now();
                    }
                    Some(Event::Publish { topic, payload, qos, pkid }) => {
                        if qos > 0 && conn.puback(pkid).await.is_err() {
                            continue 'session;
                        }
                        account_delivery(&shared, &topic, &payload);
                    }
                    Some(Event::PubAck { code, .. }) => {
                        if code >= 0x80 {
                            stats.refused(reason_name(m.version, code));
                        }
                    }
                    Some(Event::Disconnect(code)) => {
                        stats.disconnected(reason_name(m.version, code));
                        continue 'session;
                    }
                    Some(Event::Closed) | None => {
                        stats.disconnected("closed");
                        continue 'session;
                    }
                    Some(Event::ConnAck(_)) => {}
                }
            }
        }
    }
}

/// Count a message a service received against the group of the device that sent it.
fn account_delivery(shared: &Shared, topic: &str, payload: &[u8]) {
    let Some(rest) = topic.strip_prefix("devices/") else {
        return;
    };
    let (id, suffix) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(device) = shared.devices.get(id) else {
        return;
    };
    let g = &shared.stats[device.group];
    if device.ack.as_deref() == Some(suffix) && payload.starts_with(b"{\"ack\":") {
        g.add(&g.commands_acknowledged, 1);
        return;
    }
    g.add(&g.delivered, 1);
    if let Some(sent) = sent_us(payload) {
        g.latency_us(shared.now_us().saturating_sub(sent));
    }
}

/// Publish QoS 1 as fast as the server acknowledges, `inflight` at a time.
async fn flood(m: &Member, shared: &Shared, stats: &GroupStats, inflight: u16, bytes: usize) {
    let topic = m.topic("telemetry");
    let mut payload = Vec::new();
    let mut seq = 0;
    'session: while shared.running() {
        let Some(mut conn) = connect_retrying(m, shared).await else {
            break;
        };
        let mut outstanding = 0u16;
        loop {
            while outstanding < inflight && shared.running() {
                seq += 1;
                telemetry(&mut payload, seq, shared.now_us(), bytes);
                let pkid = conn.next_pkid();
                mqtt::publish(&mut conn.out, m.version, &topic, 1, pkid, &payload);
                outstanding += 1;
                stats.add(&stats.sent, 1);
            }
            if !conn.out.is_empty() {
                let write = conn.flush();
                match timeout(
                    shared.end.saturating_duration_since(Instant::now()) + shared.grace,
                    write,
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        stats.disconnected("closed");
                        continue 'session;
                    }
                    Err(_) => break 'session,
                }
            }
            let deadline = shared.end + shared.grace;
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                conn.rx.recv(),
            )
            .await
            {
                Err(_) => break 'session,
                Ok(Some(Event::PubAck { code, .. })) => {
                    outstanding = outstanding.saturating_sub(1);
                    if code < 0x80 {
                        stats.add(&stats.acknowledged, 1);
                    } else {
                        stats.refused(reason_name(m.version, code));
                    }
                    if !shared.running() && outstanding == 0 {
                        conn.close().await;
                        break 'session;
                    }
                }
                Ok(Some(Event::Disconnect(code))) => {
                    stats.disconnected(reason_name(m.version, code));
                    continue 'session;
                }
                Ok(Some(Event::Closed) | None) => {
                    stats.disconnected("closed");
                    continue 'session;
                }
                Ok(Some(_)) => {}
            }
        }
    }
}

/// Wait for the answer to one hostile publish or subscribe: true when accepted.
async fn answer(conn: &mut Conn, m: &Member, stats: &GroupStats, until: Instant) -> Option<bool> {
    let deadline = (Instant::now() + ANSWER_TIMEOUT).min(until);
    loop {
        match tokio::time::timeout_at(deadline, conn.rx.recv()).await {
            Err(_) => {
                stats.refused("timeout");
                return None;
            }
            Ok(Some(Event::PubAck { code, .. })) => {
                return Some(record(stats, m.version, code));
            }
            Ok(Some(Event::SubAck(codes))) => {
                let mut accepted = false;
                for c in codes {
                    accepted |= record(stats, m.version, c);
                }
                return Some(accepted);
            }
            Ok(Some(Event::Disconnect(code))) => {
                stats.refused(reason_name(m.version, code));
                stats.disconnected(reason_name(m.version, code));
                return None;
            }
            Ok(Some(Event::Closed) | None) => {
                stats.refused("closed");
                stats.disconnected("closed");
                return None;
            }
            // What a granted subscription delivers (a server that let the scan in).
            Ok(Some(Event::Publish { qos, pkid, .. })) => {
                if qos > 0 && conn.puback(pkid).await.is_err() {
                    return None;
                }
            }
            Ok(Some(_)) => {}
        }
    }
}

/// Count one answer code: a refusal by its reason, or an accepted hostile action.
fn record(stats: &GroupStats, v: Version, code: u8) -> bool {
    if code < 0x80 {
        stats.add(&stats.acknowledged, 1);
        stats.add(&stats.accepted, 1);
        true
    } else {
        stats.refused(reason_name(v, code));
        false
    }
}

/// One hostile publish or subscribe.
enum Action {
    Publish(String, Vec<u8>),
    Subscribe(String),
}

/// One hostile action per 1/rate seconds, each answered before the next; a session
/// the server ends is opened again.
async fn hostile_actions(
    m: &Member,
    shared: &Shared,
    stats: &GroupStats,
    rate: f64,
    mut next: impl FnMut(u64) -> Action,
) {
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut n = 0;
    'session: while shared.running() {
        let Some(mut conn) = connect_retrying(m, shared).await else {
            break;
        };
        while shared.running() {
            n += 1;
            let at = Instant::now();
            stats.add(&stats.sent, 1);
            let sent = match next(n) {
                Action::Publish(topic, payload) => {
                    conn.publish(&topic, 1, &payload).await.map(drop)
                }
                Action::Subscribe(filter) => conn.subscribe(&[(&filter, 1)]).await,
            };
            let answered = match sent {
                Ok(()) => answer(&mut conn, m, stats, shared.end + shared.grace)
                    .await
                    .is_some(),
                Err(_) => {
                    stats.refused("closed");
                    stats.disconnected("closed");
                    false
                }
            };
            sleep_until(at + period).await;
            if !answered {
                continue 'session;
            }
        }
        conn.close().await;
    }
}

/// Publish to other devices' topics and its own commands; subscribe to everything.
fn topic_scan(m: &Member, n: u64) -> Action {
    match n % 5 {
        0 => Action::Subscribe("#".into()),
        1 => Action::Publish(format!("devices/scan-{n}/telemetry"), b"{}".to_vec()),
        2 => Action::Subscribe("devices/+/telemetry/#".into()),
        3 => Action::Publish(m.topic("commands/reboot"), b"{}".to_vec()),
        _ => Action::Subscribe(format!("devices/scan-{n}/commands/#")),
    }
}

/// Wrong secrets for the member's id, one attempt per 1/rate seconds.
async fn stuffing(m: &Member, shared: &Shared, stats: &GroupStats, rate: f64) {
    let period = Duration::from_secs_f64(1.0 / rate);
    while shared.running() {
        let at = Instant::now();
        let guess = provision::random_secret();
        stats.add(&stats.sent, 1);
        match m.session(Some(&guess)).await {
            Ok(conn) => {
                stats.add(&stats.accepted, 1);
                stats.add(&stats.connected, 1);
                conn.close().await;
            }
            Err(reason) => stats.connect_refused(reason),
        }
        sleep_until(at + period).await;
    }
}

/// Two sessions with one identity, each connecting in turn every `interval` seconds,
/// from two places: the member's address and its twin (the last octet's top bit
/// flipped, still loopback), when the member has a loopback IPv4 source.
async fn cloned(m: &Member, shared: &Shared, stats: &GroupStats, interval: f64) {
    let period = Duration::from_secs_f64(interval);
    let twin = match m.source {
        Some(IpAddr::V4(ip)) if ip.is_loopback() => {
            let [a, b, c, d] = ip.octets();
            Some(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d ^ 0x80)))
        }
        other => other,
    };
    let mut live: Vec<Conn> = Vec::new();
    let mut turn = 0u64;
    while shared.running() {
        let at = Instant::now();
        stats.add(&stats.sent, 1);
        turn += 1;
        let source = if turn.is_multiple_of(2) {
            twin
        } else {
            m.source
        };
        match m.session_from(None, source).await {
            Ok(conn) => {
                stats.add(&stats.connected, 1);
                live.push(conn);
            }
            Err(reason) => stats.connect_refused(reason),
        }
        // What happened to the older sessions.
        let mut kept = Vec::new();
        for mut c in live.drain(..) {
            let mut ended = false;
            while let Ok(ev) = c.rx.try_recv() {
                match ev {
                    Event::Disconnect(code) => {
                        stats.disconnected(reason_name(m.version, code));
                        ended = true;
                    }
                    Event::Closed => {
                        if !ended {
                            stats.disconnected("closed");
                        }
                        ended = true;
                    }
                    _ => {}
                }
            }
            if !ended {
                kept.push(c);
            }
        }
        live = kept;
        // Keep at most two: the clone pair.
        while live.len() > 2 {
            live.remove(0).close().await;
        }
        sleep_until(at + period).await;
    }
    // Read the last takeover before closing.
    sleep(Duration::from_millis(200)).await;
    for mut c in live {
        let mut ended = false;
        while let Ok(ev) = c.rx.try_recv() {
            match ev {
                Event::Disconnect(code) if !ended => {
                    stats.disconnected(reason_name(m.version, code));
                    ended = true;
                }
                Event::Closed if !ended => {
                    stats.disconnected("closed");
                    ended = true;
                }
                _ => {}
            }
        }
        c.close().await;
    }
}

/// Connect and disconnect, `rate` times per second.
async fn storm(m: &Member, shared: &Shared, stats: &GroupStats, rate: f64) {
    let period = Duration::from_secs_f64(1.0 / rate);
    while shared.running() {
        let at = Instant::now();
        stats.add(&stats.sent, 1);
        match m.session(None).await {
            Ok(conn) => {
                stats.add(&stats.connected, 1);
                conn.close().await;
            }
            Err(reason) => stats.connect_refused(reason),
        }
        sleep_until(at + period).await;
    }
}

/// Open connections and never send CONNECT; the latency records how long the server
/// took to close each.
async fn slowloris(m: &Member, shared: &Shared, stats: &GroupStats, connections: u32) {
    let mut waits = Vec::new();
    for _ in 0..connections {
        stats.add(&stats.sent, 1);
        let opened = Instant::now();
        // TCP, and the TLS handshake on a TLS listener: the connection is open, only
        // CONNECT never comes.
        let mut stream = match timeout(ANSWER_TIMEOUT, transport::open(&m.endpoint, m.source)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                stats.connect_refused(open_error(&e));
                continue;
            }
            Err(_) => {
                stats.connect_refused("timeout");
                continue;
            }
        };
        let stop = shared.end + shared.grace;
        waits.push(async move {
            // One byte of a CONNECT, then nothing.
            let _ = stream.write_all(&[0x10]).await;
            let _ = stream.flush().await;
            let mut buf = [0u8; 64];
            loop {
                match timeout(
                    stop.saturating_duration_since(Instant::now()),
                    stream.read(&mut buf),
                )
                .await
                {
                    Err(_) => return None,
                    Ok(Ok(0) | Err(_)) => return Some(opened.elapsed()),
                    Ok(Ok(_)) => {}
                }
            }
        });
    }
    for closed in futures_join(waits).await {
        match closed {
            Some(after) => {
                stats.connect_refused("closed_by_server");
                stats.latency_us(after.as_micros() as u64);
            }
            None => {
                stats.add(&stats.accepted, 1);
            }
        }
    }
}

async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Malformed packets, one per session, each from a fresh connection.
const MALFORMED: &[&[u8]] = &[
    // Reserved packet type 15 in MQTT 3.1.1 / AUTH out of place.
    &[0xF0, 0x00],
    // PUBLISH with QoS 3.
    &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
    // SUBSCRIBE with reserved flags 0000.
    &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
    // Remaining length over four bytes.
    &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
    // PINGREQ with a body.
    &[0xC0, 0x01, 0x00],
];

async fn malformed(m: &Member, shared: &Shared, stats: &GroupStats, rate: f64) {
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut n = 0;
    while shared.running() {
        let at = Instant::now();
        let Some(mut conn) = connect_retrying(m, shared).await else {
            break;
        };
        conn.out.extend_from_slice(MALFORMED[n % MALFORMED.len()]);
        n += 1;
        stats.add(&stats.sent, 1);
        if conn.flush().await.is_err() {
            stats.refused("closed");
        } else {
            match timeout(Duration::from_secs(3), async {
                loop {
                    match conn.rx.recv().await {
                        Some(Event::Disconnect(code)) => return Some(code),
                        Some(Event::Closed) | None => return None,
                        Some(_) => {}
                    }
                }
            })
            .await
            {
                Ok(Some(code)) => stats.refused(reason_name(m.version, code)),
                Ok(None) => stats.refused("closed"),
                Err(_) => {
                    stats.add(&stats.accepted, 1);
                }
            }
        }
        sleep_until(at + period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_behaved_timing_has_its_jitter_and_daily_cycle() {
        let mut rng = rand::rng();
        let n = 20_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let d = jittered(10.0, 0.2, &mut rng).as_secs_f64();
            assert!((0.08..0.12).contains(&d), "{d}");
            sum += d;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.1).abs() < 0.001, "mean interval {mean}");
        assert_eq!(jittered(4.0, 0.0, &mut rng), Duration::from_millis(250));
        // Peak a quarter into the day, trough at three quarters, the mean over a day.
        let day = 86_400.0;
        assert!((daily_rate(2.0, 0.5, day, day / 4.0) - 3.0).abs() < 1e-9);
        assert!((daily_rate(2.0, 0.5, day, 3.0 * day / 4.0) - 1.0).abs() < 1e-9);
        let mean: f64 = (0..1440)
            .map(|m| daily_rate(2.0, 0.5, day, m as f64 * 60.0))
            .sum::<f64>()
            / 1440.0;
        assert!((mean - 2.0).abs() < 1e-6, "{mean}");
    }

    #[test]
    fn a_slow_ramp_reaches_its_factor_at_the_end_and_stays() {
        assert_eq!(ramp_rate(5.0, 20.0, 100.0, 0.0), 5.0);
        assert_eq!(ramp_rate(5.0, 20.0, 100.0, 50.0), 52.5);
        assert_eq!(ramp_rate(5.0, 20.0, 100.0, 100.0), 100.0);
        assert_eq!(ramp_rate(5.0, 20.0, 100.0, 500.0), 100.0);
    }

    #[test]
    fn telemetry_payload_is_json_with_its_send_time() {
        let mut buf = Vec::new();
        telemetry(&mut buf, 7, 123_456, 0);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(sent_us(&buf), Some(123_456));
        telemetry(&mut buf, 8, 9, 64);
        assert_eq!(buf.len(), 64);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["sent_us"], 9);
        assert_eq!(sent_us(b"not json"), None);
    }
}
