//! Upstream mode end to end, against a real Mosquitto (Debian's `mosquitto`, started
//! here on a free loopback port): devices publish numbered QoS 1 streams through the
//! gateway, a persistent subscriber on Mosquitto checks every number, and the link is
//! broken in the ways the issue names. Every message a device got a PUBACK for must
//! arrive upstream; duplicates (QoS 1 allows them) are counted and printed.

mod common;

use common::raw::Raw;
use common::*;
use rumqttc::v5::mqttbytes::{QoS, v5};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16) -> bool {
    wait_for(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .is_some()
}

/// A Mosquitto broker of the test's own, with persistence (a stop and start keeps
/// the subscriber's session and what is queued for it).
struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        Mosquitto::start_with("", &[])
    }

    /// With extra lines in its configuration (`{dir}` is its directory), and files
    /// written there first.
    fn start_with(extra: &str, files: &[(&str, &str)]) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // max_queued_messages: the subscriber's queue while it is away, far beyond
        // what a test sends (Mosquitto 2.0.11 with 0, "unbounded", drops a client
        // whose publish its ACL denies).
        // `extra` first: global settings (per_listener_settings must precede every
        // security setting) and listeners of its own; the test's plain listener last.
        let conf = format!(
            "persistence true\npersistence_location {}/\nmax_queued_messages 1000000\n\
             max_inflight_messages 100\n{}\nlistener {port} 127.0.0.1\nallow_anonymous true\n",
            dir.path().display(),
            extra.replace("{dir}", &dir.path().display().to_string())
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        // Started as root, Mosquitto drops to its own user, which must be able to
        // write its persistence file here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let mut m = Mosquitto {
            dir,
            port,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new("mosquitto")
            .args([
                "-c",
                self.dir.path().join("mosquitto.conf").to_str().unwrap(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        assert!(wait_listening(self.port), "mosquitto did not listen");
    }

    /// SIGTERM: Mosquitto saves its sessions and queues, and goes.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGHUP: Mosquitto reads its ACL file again.
    fn reload(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status();
        }
    }

    /// A QoS 1 publish straight to the broker (retained if asked).
    fn publish(&self, topic: &str, payload: &str, retain: bool) -> Output {
        let mut a = vec![
            s("-p"),
            self.port.to_string(),
            s("-q"),
            s("1"),
            s("-t"),
            s(topic),
            s("-m"),
            s(payload),
        ];
        if retain {
            a.push(s("-r"));
        }
        mosquitto("mosquitto_pub", &a, Duration::from_secs(5))
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The gateway in upstream mode towards `url`.
fn gateway(url: &str, extra: &str) -> Gateway {
    Gateway::start_with(&format!(
        "[broker]\nmode = \"upstream\"\n[upstream]\nurls = [\"{url}\"]\nclient_id = \"gw-test\"\n\
         keep_alive = \"5s\"\nreconnect_max = \"500ms\"\n{extra}\n[behaviour]\nenabled = false\n"
    ))
}

/// The persistent subscriber on the upstream broker, started before anything is sent.
fn checker(m: &Mosquitto) -> Sub {
    checker_on(m, "devices/+/telemetry/#")
}

fn checker_on(m: &Mosquitto, filter: &str) -> Sub {
    let sub = Sub::start(&[
        s("-h"),
        s("127.0.0.1"),
        s("-p"),
        m.port.to_string(),
        s("-c"),
        s("-i"),
        s("checker"),
        s("-q"),
        s("1"),
        s("-t"),
        s(filter),
        s("-v"),
    ]);
    // Subscribed once a probe sent straight to Mosquitto comes back.
    let probe = wait_for(Duration::from_secs(10), || {
        m.publish(
            &filter.replace('+', "probe").replace('#', "x"),
            "probe",
            false,
        );
        sub.expect("probe", Duration::from_millis(500)).ok()
    });
    assert!(probe.is_some(), "the checker did not subscribe");
    sub
}

/// mosquitto_sub as device d1 through the gateway, on its commands (`-c`: a persistent
/// session), with `extra` arguments.
fn d1_commands(gw: &Gateway, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        s("-h"),
        s("127.0.0.1"),
        s("-p"),
        gw.device_plain.port().to_string(),
        s("-i"),
        s("d1"),
        s("-u"),
        s("d1"),
        s("-P"),
        s("s3cret-device-pw"),
        s("-q"),
        s("1"),
        s("-t"),
        s("devices/d1/commands/#"),
        s("-v"),
    ];
    a.extend(extra.iter().map(|e| s(e)));
    a
}

/// A device publishing a numbered QoS 1 stream, one message in flight, resending
/// the same number until it gets a PUBACK; it reconnects whenever the gateway is
/// away. Returns the numbers acknowledged.
fn device(
    addr: Arc<Mutex<SocketAddr>>,
    id: &'static str,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let at = *addr.lock().unwrap();
            let Some(mut raw) = Raw::try_connect(at) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            if raw.connect_v5(id, Some((id, "s3cret-device-pw")))
                != Some(v5::ConnectReturnCode::Success)
            {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            while !stop.load(Ordering::Relaxed) {
                let pkid = (n % 60_000) as u16 + 1;
                let mut p = v5::Publish::new(
                    format!("devices/{id}/telemetry/seq"),
                    QoS::AtLeastOnce,
                    n.to_string().into_bytes(),
                    None,
                );
                p.pkid = pkid;
                raw.send_v5(v5::Packet::Publish(p));
                match raw.recv_v5(Duration::from_secs(5)) {
                    Some(v5::Packet::PubAck(a))
                        if a.pkid == pkid && a.reason == v5::PubAckReason::Success =>
                    {
                        acked.push(n);
                        n += 1;
                        // Under the default rate (100/s): no message is held back.
                        std::thread::sleep(Duration::from_millis(12));
                    }
                    // Anything else (the gateway went away, a refusal): connect again
                    // and send the same number.
                    _ => break,
                }
            }
        }
        acked
    })
}

/// Devices d1..d3 registered and publishing.
struct Fleet {
    addr: Arc<Mutex<SocketAddr>>,
    stop: Arc<AtomicBool>,
    devices: Vec<(&'static str, JoinHandle<Vec<u64>>)>,
}

impl Fleet {
    fn start(gw: &Gateway) -> Fleet {
        let ids = ["d1", "d2", "d3"];
        for id in ids {
            gw.add_device_secret(id, "s3cret-device-pw");
        }
        let addr = Arc::new(Mutex::new(gw.device_plain));
        let stop = Arc::new(AtomicBool::new(false));
        let devices = ids
            .into_iter()
            .map(|id| (id, device(addr.clone(), id, stop.clone())))
            .collect();
        Fleet {
            addr,
            stop,
            devices,
        }
    }

    /// Follow a restarted gateway to its new port.
    fn follow(&self, gw: &Gateway) {
        *self.addr.lock().unwrap() = gw.device_plain;
    }

    fn finish(self) -> BTreeMap<&'static str, Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.devices
            .into_iter()
            .map(|(id, h)| (id, h.join().unwrap()))
            .collect()
    }
}

/// Wait until every acknowledged number has arrived upstream; panic naming what is
/// missing. Prints the duplicates.
fn verify(case: &str, acked: &BTreeMap<&'static str, Vec<u64>>, checker: &Sub) {
    let mut seen: HashMap<(String, u64), u32> = HashMap::new();
    // Each device's numbers in the order they first arrived.
    let mut first: HashMap<String, Vec<u64>> = HashMap::new();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 100, "{case}: the devices hardly published: {total}");
    let mut missing: Vec<(String, u64)>;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for line in checker.drain(Duration::from_millis(500)) {
            let mut parts = line.split(' ');
            let (Some(topic), Some(n)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(id) = topic.split('/').nth(1) else {
                continue;
            };
            if let Ok(n) = n.parse::<u64>() {
                let count = seen.entry((id.to_string(), n)).or_default();
                if *count == 0 {
                    first.entry(id.to_string()).or_default().push(n);
                }
                *count += 1;
            }
        }
        missing = acked
            .iter()
            .flat_map(|(id, ns)| ns.iter().map(move |n| (id.to_string(), *n)))
            .filter(|k| !seen.contains_key(k))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
    }
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    let unacked_extra = seen.len() - (total - missing.len());
    println!(
        "{case}: {total} acknowledged, {} arrived, {} missing, {duplicates} duplicates, \
         {unacked_extra} arrived without an acknowledgement (sent again by the device)",
        total - missing.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{case}: {} acknowledged messages never arrived upstream, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Order per device: a number never arrives for the first time after a later one.
    for (id, ns) in &first {
        if let Some(w) = ns.windows(2).find(|w| w[0] > w[1]) {
            panic!(
                "{case}: {id}'s messages arrived out of order: {} before {}",
                w[0], w[1]
            );
        }
    }
}

#[test]
fn nothing_acknowledged_is_lost_while_the_upstream_broker_is_stopped_for_30_seconds() {
    let mut m = Mosquitto::start();
    let checker = checker(&m);
    let gw = gateway(&m.url(), "");
    let fleet = Fleet::start(&gw);
    std::thread::sleep(Duration::from_secs(3));
    m.stop();
    // Devices keep publishing, and keep being acknowledged: the outbox holds it all.
    let before = gw.metric("portcullis_outbox_committed_total");
    std::thread::sleep(Duration::from_secs(30));
    let during = gw.metric("portcullis_outbox_committed_total") - before;
    assert!(
        during > 1000,
        "the devices were held back while the broker was away: {during}"
    );
    assert!(gw.metric("portcullis_outbox_messages") > 0);
    m.spawn();
    std::thread::sleep(Duration::from_secs(3));
    let acked = fleet.finish();
    verify("upstream stopped 30 s", &acked, &checker);
    gw.wait_audit(&["upstream", "lost"]);
}

#[test]
fn nothing_acknowledged_is_lost_when_the_gateway_is_killed_mid_stream() {
    let m = Mosquitto::start();
    let checker = checker(&m);
    let mut gw = gateway(&m.url(), "");
    let fleet = Fleet::start(&gw);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        gw.kill9();
        gw.restart_after_stop();
        fleet.follow(&gw);
    }
    std::thread::sleep(Duration::from_secs(2));
    let acked = fleet.finish();
    verify("gateway SIGKILLed three times", &acked, &checker);
}

#[test]
fn nothing_acknowledged_is_lost_when_the_gateway_dies_while_the_upstream_is_away() {
    let mut m = Mosquitto::start();
    let checker = checker(&m);
    let mut gw = gateway(&m.url(), "");
    let fleet = Fleet::start(&gw);
    std::thread::sleep(Duration::from_secs(2));
    m.stop();
    std::thread::sleep(Duration::from_secs(3));
    // Everything acknowledged since the broker went is only in the outbox.
    gw.kill9();
    gw.restart_after_stop();
    fleet.follow(&gw);
    std::thread::sleep(Duration::from_secs(5));
    m.spawn();
    std::thread::sleep(Duration::from_secs(3));
    let acked = fleet.finish();
    verify(
        "gateway SIGKILLed while the broker was stopped",
        &acked,
        &checker,
    );
}

/// A TCP proxy between the gateway and Mosquitto. `cut` black-holes the connections
/// open at that moment: their bytes are read and thrown away, nothing is closed,
/// as a dead route or a silent middlebox would. Later connections pass.
struct Proxy {
    port: u16,
    cut_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
}

impl Proxy {
    fn start(to: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (cut, counter) = (cut_below.clone(), next.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let generation = counter.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let cut = cut.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if generation < cut.load(Ordering::SeqCst) {
                                continue;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Proxy {
            port,
            cut_below,
            next,
        }
    }

    fn cut(&self) {
        self.cut_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[test]
fn a_link_that_goes_silent_is_noticed_by_keep_alive_and_everything_unacknowledged_is_resent() {
    let m = Mosquitto::start();
    let checker = checker(&m);
    let proxy = Proxy::start(m.port);
    let gw = gateway(&format!("mqtt://127.0.0.1:{}", proxy.port), "");
    let fleet = Fleet::start(&gw);
    std::thread::sleep(Duration::from_secs(3));
    proxy.cut();
    // Keep-alive 5 s: PINGREQ unanswered by the next one, then a new connection.
    let noticed = wait_for(Duration::from_secs(30), || {
        gw.stderr()
            .contains("no answer to keep-alive")
            .then_some(())
    });
    assert!(
        noticed.is_some(),
        "the silent link was not noticed: {}",
        gw.stderr()
    );
    std::thread::sleep(Duration::from_secs(3));
    let acked = fleet.finish();
    verify("link black-holed", &acked, &checker);
    assert!(gw.metric("portcullis_upstream_connects_total") >= 2);
    assert!(
        gw.metric("portcullis_upstream_resent_total") > 0,
        "nothing was in flight when the link went silent?"
    );
}

#[test]
fn commands_from_the_cluster_reach_a_connected_device_and_retained_ones_a_later_subscriber() {
    let m = Mosquitto::start();
    let gw = gateway(&m.url(), "");
    gw.add_device_secret("d1", "s3cret-device-pw");
    let device = Sub::start(&d1_commands(&gw, &[]));
    let upstream_pub = |topic: &str, payload: &str, retain: bool| {
        let out = m.publish(topic, payload, retain);
        assert!(out.status.success(), "{}", text(&out));
    };
    // The device's subscription is in place once a command sent now arrives.
    let got = wait_for(Duration::from_secs(10), || {
        upstream_pub("devices/d1/commands/reboot", "now", false);
        device
            .expect("devices/d1/commands/reboot now", Duration::from_millis(500))
            .ok()
    });
    assert!(
        got.is_some(),
        "a command from the cluster did not reach the device"
    );
    // Not another device's.
    upstream_pub("devices/d2/commands/reboot", "not-yours", false);
    upstream_pub("devices/d1/commands/config", "cfg-1", true);
    device
        .expect("devices/d1/commands/config cfg-1", Duration::from_secs(5))
        .unwrap();
    drop(device);
    // A later subscription gets the retained command at once.
    let out = mosquitto(
        "mosquitto_sub",
        &d1_commands(&gw, &["-W", "3"]),
        Duration::from_secs(10),
    );
    let out = text(&out);
    assert!(out.contains("devices/d1/commands/config cfg-1"), "{out}");
    assert!(!out.contains("not-yours"), "{out}");
}

#[test]
fn upstream_mode_without_a_broker_url_or_client_id_is_refused_by_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("p.toml");
    for (text, key) in [
        ("[broker]\nmode = \"upstream\"\n", "upstream.urls"),
        (
            "[broker]\nmode = \"upstream\"\n[upstream]\nurls = [\"mqtt://127.0.0.1:1\"]\n",
            "upstream.client_id",
        ),
        (
            "[broker]\nmode = \"upstream\"\n[upstream]\nurls = [\"mqtts://h:8883\"]\nclient_id = \"a\"\n",
            "upstream.ca",
        ),
        ("[upstream]\nurls = [\"tcp://h\"]\n", "mqtt://"),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["config", "check", path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// One QoS 1 publish as a device; whether the gateway acknowledged it.
fn publish_as(gw: &Gateway, id: &str, topic: &str, payload: &str) -> bool {
    let Some(mut raw) = Raw::try_connect(gw.device_plain) else {
        return false;
    };
    if raw.connect_v5(id, Some((id, "s3cret-device-pw"))) != Some(v5::ConnectReturnCode::Success) {
        return false;
    }
    let mut p = v5::Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec(), None);
    p.pkid = 1;
    raw.send_v5(v5::Packet::Publish(p));
    matches!(
        raw.recv_v5(Duration::from_secs(5)),
        Some(v5::Packet::PubAck(a)) if a.reason == v5::PubAckReason::Success
    )
}

#[test]
fn a_message_the_broker_refuses_goes_to_the_dead_letters_and_can_be_retried_or_purged() {
    // The broker's ACL lets nobody publish under devices/d2/.
    let refuse_d2 =
        "topic readwrite devices/d1/#\ntopic readwrite devices/probe/#\ntopic read devices/#\n";
    let m = Mosquitto::start_with("acl_file {dir}/acl\n", &[("acl", refuse_d2)]);
    let acl = m.dir.path().join("acl");
    let checker = checker_on(&m, "devices/+/telemetry/#");
    let gw = gateway(&m.url(), "");
    for id in ["d1", "d2"] {
        gw.add_device_secret(id, "s3cret-device-pw");
    }
    // Acknowledged by the gateway (it is on disk), then refused upstream.
    assert!(publish_as(&gw, "d2", "devices/d2/telemetry/t", "refused-1"));
    let listed = wait_for(Duration::from_secs(10), || {
        let out = gw.cli_ok(&["outbox", "list"]);
        out.contains("devices/d2/telemetry/t").then_some(out)
    })
    .unwrap_or_else(|| panic!("no dead letter: {}", gw.cli_ok(&["outbox", "list"])));
    assert!(listed.contains("1 dead letter(s)"), "{listed}");
    assert!(
        listed.contains("refused by the broker: NotAuthorized"),
        "{listed}"
    );
    assert_eq!(gw.metric("portcullis_outbox_dead_letters"), 1);
    gw.wait_audit(&["outbox", "dead letters", "NotAuthorized"]);
    // It does not hold the others back.
    assert!(publish_as(&gw, "d1", "devices/d1/telemetry/t", "passes"));
    checker
        .expect("devices/d1/telemetry/t passes", Duration::from_secs(10))
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&gw.cli_ok(&["outbox", "list", "--json"])).unwrap();
    let seq = json["dead_letters"][0]["seq"].as_u64().unwrap();
    let shown = gw.cli_ok(&["outbox", "show", &seq.to_string()]);
    assert!(
        shown.contains("refused-1") && shown.contains("sends:    1"),
        "{shown}"
    );
    // The operator fixes the broker's ACL and sends it again.
    std::fs::write(&acl, "topic readwrite devices/#\n").unwrap();
    m.reload();
    std::thread::sleep(Duration::from_millis(500));
    let out = gw.cli_ok(&["outbox", "retry", &seq.to_string()]);
    assert!(out.contains("1 dead letter(s) put back"), "{out}");
    checker
        .expect("devices/d2/telemetry/t refused-1", Duration::from_secs(10))
        .unwrap();
    assert_eq!(gw.metric("portcullis_outbox_dead_letters"), 0);
    // Purge: a second refusal, removed for good.
    std::fs::write(&acl, refuse_d2).unwrap();
    m.reload();
    std::thread::sleep(Duration::from_millis(500));
    assert!(publish_as(&gw, "d2", "devices/d2/telemetry/t", "refused-2"));
    wait_for(Duration::from_secs(10), || {
        (gw.metric("portcullis_outbox_dead_letters") == 1).then_some(())
    })
    .expect("a second dead letter");
    let out = gw.cli_ok(&["outbox", "purge", "--all"]);
    assert!(out.contains("1 dead letter(s) purged"), "{out}");
    let out = gw.cli_ok(&["outbox", "list"]);
    assert!(out.contains("0 dead letter(s)"), "{out}");
    // Naming nothing is the operator's mistake.
    let out = gw.cli(&["outbox", "retry"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// A device connection for the outbox-full tests, publishing QoS 1 one at a time.
struct Device {
    raw: Raw,
    pkid: u16,
}

impl Device {
    fn connect(gw: &Gateway, id: &str) -> Device {
        let mut raw = Raw::try_connect(gw.device_plain).expect("gateway listening");
        assert_eq!(
            raw.connect_v5(id, Some((id, "s3cret-device-pw"))),
            Some(v5::ConnectReturnCode::Success)
        );
        Device { raw, pkid: 0 }
    }

    /// The reason code of the PUBACK (None: no PUBACK within `wait`).
    fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        qos: QoS,
        wait: Duration,
    ) -> Option<v5::PubAckReason> {
        self.pkid = self.pkid % 60_000 + 1;
        let mut p = v5::Publish::new(topic, qos, payload, None);
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { self.pkid };
        self.raw.send_v5(v5::Packet::Publish(p));
        if qos == QoS::AtMostOnce {
            return Some(v5::PubAckReason::Success);
        }
        match self.raw.recv_v5(wait) {
            Some(v5::Packet::PubAck(a)) => Some(a.reason),
            _ => None,
        }
    }
}

/// ~8 KB: about 128 fit in an outbox of 1 MiB.
fn payload(n: u32) -> Vec<u8> {
    format!("{n:06}:{}", "x".repeat(8000)).into_bytes()
}

/// The checker, a gateway whose outbox holds 1 MiB (with `policy` keys), d1 connected
/// to it, and the broker stopped.
fn outbox_of_one_mib(m: &mut Mosquitto, policy: &str) -> (Sub, Gateway, Device) {
    let checker = checker(m);
    let gw = gateway(
        &m.url(),
        &format!("[upstream.outbox]\nmax_bytes = 1048576\nfull_wait = \"500ms\"\n{policy}"),
    );
    gw.add_device_secret("d1", "s3cret-device-pw");
    m.stop();
    let d = Device::connect(&gw, "d1");
    (checker, gw, d)
}

#[test]
fn a_full_outbox_holds_devices_back_then_refuses_with_quota_exceeded_and_loses_nothing_taken() {
    let mut m = Mosquitto::start();
    let (checker, gw, mut d) = outbox_of_one_mib(&mut m, "");
    let mut taken = Vec::new();
    let mut refused = None;
    for n in 0..400 {
        let started = Instant::now();
        match d.publish(
            "devices/d1/telemetry/big",
            payload(n),
            QoS::AtLeastOnce,
            Duration::from_secs(5),
        ) {
            Some(v5::PubAckReason::Success) => taken.push(n),
            Some(v5::PubAckReason::QuotaExceeded) => {
                refused = Some((n, started.elapsed()));
                break;
            }
            other => panic!("message {n}: {other:?}"),
        }
    }
    let (n, waited) = refused.expect("the outbox never filled");
    assert!((100..140).contains(&n), "refused at message {n}");
    // It waited for room first (back-pressure), then said so.
    assert!(
        waited >= Duration::from_millis(450),
        "refused after {waited:?}"
    );
    assert!(gw.metric("portcullis_outbox_bytes") <= 1_048_576);
    assert!(gw.metric("portcullis_outbox_refused_full_total") >= 1);
    // Held back: a load balancer is told to send new devices elsewhere.
    let (code, body) = gw.http_get("/readyz");
    assert_eq!((code, body.trim()), (503, "not ready: the outbox is full"));
    gw.wait_audit(&["outbox", "is full"]);
    // MQTT 3.1.1 has no way to say so: the device is disconnected unacknowledged.
    let mut v4 = Raw::try_connect(gw.device_plain).unwrap();
    assert_eq!(
        v4.connect_v4("d1", Some(("d1", "s3cret-device-pw"))),
        Some(0)
    );
    v4.send(&common::raw::publish_v4_raw(
        b"devices/d1/telemetry/big",
        &payload(999),
        1,
        7,
    ));
    let (closed, frames) = v4.closed_within(Duration::from_secs(5));
    assert!(
        closed && frames.is_empty(),
        "closed {closed}, answered {frames:?}"
    );
    // The broker returns: everything taken arrives, and there is room again.
    m.spawn();
    let mut d = Device::connect(&gw, "d1");
    let after = wait_for(Duration::from_secs(20), || {
        (d.publish(
            "devices/d1/telemetry/big",
            payload(1000),
            QoS::AtLeastOnce,
            Duration::from_secs(5),
        ) == Some(v5::PubAckReason::Success))
        .then_some(())
    });
    assert!(after.is_some(), "no room after the broker returned");
    assert_eq!(gw.http_get("/readyz").0, 200);
    let mut lines = Vec::new();
    let all = wait_for(Duration::from_secs(20), || {
        lines.extend(checker.drain(Duration::from_millis(500)));
        taken
            .iter()
            .all(|n| {
                let want = format!("devices/d1/telemetry/big {n:06}:");
                lines.iter().any(|l| l.starts_with(&want))
            })
            .then_some(())
    });
    assert!(
        all.is_some(),
        "messages taken while the outbox filled were not delivered"
    );
}

#[test]
fn drop_oldest_qos0_makes_room_from_qos0_messages_only() {
    // QoS 0 messages too wait for the checker while it reconnects.
    let mut m = Mosquitto::start_with("queue_qos0_messages true\n", &[]);
    let (checker, gw, mut d) = outbox_of_one_mib(&mut m, "when_full = \"drop-oldest-qos0\"\n");
    // A QoS 1 message first, then QoS 0 ones well past the bound.
    let wait = Duration::from_secs(5);
    let ok = Some(v5::PubAckReason::Success);
    assert_eq!(
        d.publish(
            "devices/d1/telemetry/q1",
            payload(0),
            QoS::AtLeastOnce,
            wait
        ),
        ok
    );
    // 1.6 MB: past the bound, within the device's byte burst (2 MiB).
    for n in 1..200 {
        d.publish("devices/d1/telemetry/q0", payload(n), QoS::AtMostOnce, wait);
    }
    // Full of QoS 0: a QoS 1 message still finds room (waiting for it would have
    // been refused after full_wait).
    assert_eq!(
        d.publish(
            "devices/d1/telemetry/q1",
            payload(200),
            QoS::AtLeastOnce,
            wait
        ),
        ok
    );
    let dropped = gw.metric("portcullis_outbox_dropped_full_total");
    assert!(dropped > 30, "dropped {dropped}");
    assert!(gw.metric("portcullis_outbox_bytes") <= 1_048_576);
    m.spawn();
    let mut lines = Vec::new();
    let both = wait_for(Duration::from_secs(20), || {
        lines.extend(checker.drain(Duration::from_millis(500)));
        let has = |p: &str| lines.iter().any(|l| l.starts_with(p));
        (has("devices/d1/telemetry/q1 000000:")
            && has("devices/d1/telemetry/q1 000200:")
            && has("devices/d1/telemetry/q0 000199:"))
        .then_some(())
    });
    assert!(
        both.is_some(),
        "QoS 1 messages or the newest QoS 0 one missing: {:?}",
        lines
            .iter()
            .map(|l| &l[..l.len().min(32)])
            .collect::<Vec<_>>()
    );
    // The oldest QoS 0 messages were the ones dropped.
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("devices/d1/telemetry/q0 000001:"))
    );
}

#[test]
fn a_message_older_than_its_time_to_live_is_dropped_counted_and_audited_not_sent() {
    let mut m = Mosquitto::start();
    let checker = checker(&m);
    let gw = gateway(&m.url(), "[upstream.outbox]\nmessage_ttl = \"2s\"\n");
    gw.add_device_secret("d1", "s3cret-device-pw");
    m.stop();
    let mut d = Device::connect(&gw, "d1");
    let ok = Some(v5::PubAckReason::Success);
    for n in 0..5 {
        let p = format!("stale-{n}").into_bytes();
        assert_eq!(
            d.publish(
                "devices/d1/telemetry/t",
                p,
                QoS::AtLeastOnce,
                Duration::from_secs(5)
            ),
            ok
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    m.spawn();
    let fresh = wait_for(Duration::from_secs(20), || {
        d.publish(
            "devices/d1/telemetry/t",
            b"fresh".to_vec(),
            QoS::AtLeastOnce,
            Duration::from_secs(5),
        );
        checker
            .expect("devices/d1/telemetry/t fresh", Duration::from_secs(1))
            .ok()
    });
    assert!(fresh.is_some(), "nothing passed after the broker returned");
    assert_eq!(gw.metric("portcullis_outbox_expired_total"), 5);
    gw.wait_audit(&["outbox", "5 message(s) expired"]);
    let late = checker.drain(Duration::from_millis(500));
    assert!(!late.iter().any(|l| l.contains("stale-")), "{late:?}");
}

#[test]
fn the_brokers_receive_maximum_is_respected() {
    // Mosquitto announces max_inflight_messages as its Receive Maximum, and drops a
    // client that sends more unacknowledged publishes than that.
    let m = Mosquitto::start_with("max_inflight_messages 2\n", &[]);
    let checker = checker(&m);
    let gw = gateway(&m.url(), "");
    let fleet = Fleet::start(&gw);
    std::thread::sleep(Duration::from_secs(4));
    let acked = fleet.finish();
    verify("receive maximum 2", &acked, &checker);
    assert_eq!(gw.metric("portcullis_upstream_disconnects_total"), 0);
    assert!(gw.stderr().contains("receive_maximum=2"), "{}", gw.stderr());
}

#[test]
fn fifty_kills_at_random_points_lose_nothing_acknowledged() {
    let m = Mosquitto::start();
    let checker = checker(&m);
    let mut gw = gateway(&m.url(), "");
    let fleet = Fleet::start(&gw);
    // A different point of the stream each time: commits, sends, acknowledgements.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..50 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 350));
        gw.kill9();
        gw.restart_after_stop();
        fleet.follow(&gw);
    }
    std::thread::sleep(Duration::from_secs(1));
    let acked = fleet.finish();
    verify("fifty SIGKILLs", &acked, &checker);
    assert!(!gw.stderr().contains("panicked"), "{}", gw.stderr());
}

/// A gateway in upstream mode under its own client id, with extra `[upstream]` keys.
fn replica(url: &str, id: &str, extra: &str) -> Gateway {
    Gateway::start_with(&format!(
        "[broker]\nmode = \"upstream\"\n[upstream]\nurls = [\"{url}\"]\nclient_id = \"{id}\"\n\
         keep_alive = \"5s\"\nreconnect_max = \"500ms\"\n{extra}\n"
    ))
}

fn quarantined(gw: &Gateway, id: &str) -> bool {
    gw.cli_ok(&["quarantine", "list"])
        .lines()
        .any(|l| l.starts_with(id) && l.contains("quarantined"))
}

#[test]
fn replicas_share_quarantine_and_bans_through_authenticated_control_messages() {
    let m = Mosquitto::start();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("control.key");
    std::fs::write(
        &key,
        "6f1d0c3b2a99e4f7c8d5b6a1e0f3c2d49a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d\n",
    )
    .unwrap();
    let extra = format!("control_key_file = \"{}\"", key.display());
    let a = replica(&m.url(), "gw-a", &extra);
    let b = replica(&m.url(), "gw-b", &extra);
    for gw in [&a, &b] {
        gw.add_device_secret("d1", "s3cret-device-pw");
        wait_for(Duration::from_secs(10), || {
            (gw.metric("portcullis_upstream_connected") == 1).then_some(())
        })
        .expect("connected upstream");
    }
    // What goes over the cluster, captured as an attacker on the broker would.
    let wire = Sub::start(&[
        s("-p"),
        m.port.to_string(),
        s("-t"),
        s("portcullis/control/#"),
        s("-v"),
    ]);
    std::thread::sleep(Duration::from_millis(300));

    // A quarantine on A takes effect on B.
    a.cli_ok(&["quarantine", "add", "d1", "--reason", "seen scanning"]);
    let told = Instant::now();
    wait_for(Duration::from_secs(10), || {
        quarantined(&b, "d1").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "not quarantined on B: {}",
            b.cli_ok(&["quarantine", "list"])
        )
    });
    let took = told.elapsed();
    println!("quarantine on A seen on B after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let shown = b.cli_ok(&["quarantine", "show", "d1"]);
    assert!(shown.contains("replica gw-a"), "{shown}");
    b.wait_audit(&["control", "allow", "from replica gw-a"]);
    // B did not tell it back: A's record holds one quarantine.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.metric("portcullis_control_applied_total"), 0);

    // A release on A is released on B.
    a.cli_ok(&["quarantine", "release", "d1"]);
    wait_for(Duration::from_secs(10), || {
        (!quarantined(&b, "d1")).then_some(())
    })
    .expect("released on B");

    // A ban on A holds on B: d1 is refused there.
    a.cli_ok(&["ban", "add", "device/d1", "--reason", "stolen"]);
    wait_for(Duration::from_secs(10), || {
        b.cli_ok(&["ban", "list"])
            .contains("\"device d1\"")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the ban did not reach B: {}\n{}", b.audit(), a.audit()));
    let mut raw = Raw::try_connect(b.device_plain).unwrap();
    assert_ne!(
        raw.connect_v5("d1", Some(("d1", "s3cret-device-pw"))),
        Some(v5::ConnectReturnCode::Success)
    );

    // Forged (no key) and replayed (captured genuine) messages are refused and audited.
    let refused = b.metric("portcullis_control_refused_total");
    let forged = format!(
        "{}.{{\"from\":\"gw-a\",\"seq\":99999999999999999,\"at_ms\":{},\"action\":\"ban_remove\",\"target\":\"device/d1\"}}",
        "0".repeat(64),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let publish = |payload: &str| {
        let out = m.publish("portcullis/control/ban", payload, false);
        assert!(out.status.success(), "{}", text(&out));
    };
    publish(&forged);
    let captured = wire
        .drain(Duration::from_millis(500))
        .into_iter()
        .find_map(|l| {
            l.strip_prefix("portcullis/control/quarantine ")
                .map(str::to_string)
        })
        .expect("a captured control message");
    publish(&captured);
    wait_for(Duration::from_secs(10), || {
        (b.metric("portcullis_control_refused_total") >= refused + 2).then_some(())
    })
    .expect("both refused");
    b.wait_audit(&["control", "refuse", "bad_mac"]);
    b.wait_audit(&["control", "refuse", "replayed"]);
    // Still banned, still released: neither changed anything.
    assert!(b.cli_ok(&["ban", "list"]).contains("device d1"));
    assert!(!quarantined(&b, "d1"));
}

/// Mosquitto's password file in `dir`, for user gw-up (hashed by mosquitto_passwd).
fn password_file(dir: &std::path::Path, password: &str) -> PathBuf {
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, format!("gw-up:{password}\n")).unwrap();
    let ok = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(&passwd)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "mosquitto_passwd -U failed");
    passwd
}

#[test]
fn mutual_tls_credentials_and_a_prefix_towards_the_broker() {
    // A PKI of the broker's own: its server certificate, and the gateway's client
    // certificate, from a CA the gateway is told to trust for the upstream only.
    let pki = tempfile::tempdir().unwrap();
    let cfg = pki.path().join("pki.toml");
    std::fs::write(&cfg, format!("data_dir = \"{}\"\n", pki.path().display())).unwrap();
    for args in [vec!["pki", "init"], vec!["pki", "issue", "gw-up"]] {
        let mut a = args.clone();
        a.extend(["--config", cfg.to_str().unwrap()]);
        run_ok(&a);
    }
    let p = |rel: &str| pki.path().join(rel).display().to_string();
    let creds = pki.path().join("upstream.credentials");
    std::fs::write(&creds, "gw-up\nupstream-pw-1\n").unwrap();
    let passwd = password_file(pki.path(), "upstream-pw-1");
    let tls_port = free_port();
    let m = Mosquitto::start_with(
        &format!(
            "user root\nper_listener_settings true\nlistener {tls_port} 127.0.0.1\n\
             allow_anonymous false\npassword_file {pw}\ncafile {ca}\ncertfile {cert}\n\
             keyfile {key}\nrequire_certificate true\n",
            pw = passwd.display(),
            ca = p("pki/ca.pem"),
            cert = p("pki/server.pem"),
            key = p("pki/server.key"),
        ),
        &[],
    );
    assert!(wait_listening(tls_port), "the broker's TLS listener");
    let checker = checker_on(&m, "site-a/devices/+/telemetry/#");
    let gw = gateway(
        &format!("mqtts://localhost:{tls_port}"),
        &format!(
            "ca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n\
             credentials_file = \"{}\"\nprefix = \"site-a\"\n",
            p("pki/ca.pem"),
            p("pki/clients/gw-up.pem"),
            p("pki/clients/gw-up.key"),
            creds.display()
        ),
    );
    wait_for(Duration::from_secs(10), || {
        (gw.metric("portcullis_upstream_connected") == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("not connected over mutual TLS: {}", gw.stderr()));
    gw.add_device_secret("d1", "s3cret-device-pw");
    // Telemetry arrives under the prefix.
    assert!(publish_as(&gw, "d1", "devices/d1/telemetry/t", "over-tls"));
    checker
        .expect(
            "site-a/devices/d1/telemetry/t over-tls",
            Duration::from_secs(10),
        )
        .unwrap();
    // A command published under the prefix reaches the device without it.
    let device = Sub::start(&d1_commands(&gw, &[]));
    let got = wait_for(Duration::from_secs(10), || {
        m.publish("site-a/devices/d1/commands/ping", "hello", false);
        device
            .expect("devices/d1/commands/ping hello", Duration::from_millis(500))
            .ok()
    });
    assert!(got.is_some(), "a prefixed command did not reach the device");
    // The password never reached the log.
    assert!(!gw.stderr().contains("upstream-pw-1"));
}

#[test]
fn a_wrong_upstream_password_is_refused_and_said_without_the_password() {
    let passwd_dir = tempfile::tempdir().unwrap();
    let passwd = password_file(passwd_dir.path(), "the-right-one");
    let m = Mosquitto::start_with(
        &format!(
            "user root\nallow_anonymous false\npassword_file {}\n",
            passwd.display()
        ),
        &[],
    );
    let creds = passwd_dir.path().join("creds");
    std::fs::write(&creds, "gw-up\nwrong-password-7\n").unwrap();
    let gw = gateway(
        &m.url(),
        &format!("credentials_file = \"{}\"\n", creds.display()),
    );
    gw.wait_audit(&["upstream", "refuse", "cannot connect"]);
    assert_eq!(gw.metric("portcullis_upstream_connected"), 0);
    let log = format!("{}{}", gw.stderr(), gw.audit());
    assert!(!log.contains("wrong-password-7"), "{log}");
}

#[test]
fn a_command_for_a_device_away_is_kept_in_its_persistent_session_and_delivered_on_return() {
    let m = Mosquitto::start();
    let mut gw = gateway(&m.url(), "");
    away_then_back(&m, &mut gw, false);
}

#[test]
fn a_command_sent_while_the_gateway_is_down_reaches_the_device_session_it_kept_on_disk() {
    let m = Mosquitto::start();
    let mut gw = gateway(&m.url(), "");
    away_then_back(&m, &mut gw, true);
}

/// d1 subscribes with a persistent session and leaves; a command is published to the
/// cluster (with `kill`: while the gateway is killed, so only the broker's session
/// for the gateway and the gateway's session kept on disk can carry it); d1 comes
/// back and must get it.
fn away_then_back(m: &Mosquitto, gw: &mut Gateway, kill: bool) {
    gw.add_device_secret("d1", "s3cret-device-pw");
    let persistent = || Sub::start(&d1_commands(gw, &["-c"]));
    let command = |name: &str| {
        let out = m.publish(&format!("devices/d1/commands/{name}"), "go", false);
        assert!(out.status.success(), "{}", text(&out));
    };
    let mut device = persistent();
    let subscribed = wait_for(Duration::from_secs(10), || {
        command("probe");
        device
            .expect("devices/d1/commands/probe go", Duration::from_millis(500))
            .ok()
    });
    assert!(subscribed.is_some(), "the device did not subscribe");
    let commits = gw.metric("portcullis_session_store_commits_total");
    device.kill();
    // Away: the gateway parks its session; the command waits in it.
    wait_for(Duration::from_secs(10), || {
        (!gw.cli_ok(&["clients", "list"]).contains("\"d1\"")).then_some(())
    })
    .expect("the device's connection closed");
    if kill {
        // The parked session is on disk once the session file has committed since.
        wait_for(Duration::from_secs(10), || {
            (gw.metric("portcullis_session_store_commits_total") > commits).then_some(())
        })
        .expect("the parked session was committed");
        gw.kill9();
    }
    command("while-away");
    if kill {
        gw.restart_after_stop();
        assert_eq!(gw.metric("portcullis_sessions_restored_total"), 1);
    }
    std::thread::sleep(Duration::from_millis(500));
    let back = Sub::start(&d1_commands(gw, &["-c"]));
    back.expect("devices/d1/commands/while-away go", Duration::from_secs(10))
        .unwrap_or_else(|seen| {
            panic!("the command kept for the device was not delivered: {seen:?}")
        });
}
