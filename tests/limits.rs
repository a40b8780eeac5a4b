//! Rate limits as a user sees them: a flooding device is held back and cannot starve
//! a well-behaved one; sustained abuse meets the configured action; a source opening
//! connections too fast is cut off before anything is read.

mod common;

use common::raw::Raw;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// `mosquitto_pub -l` for a device on the plain listener, fed from stdin.
fn line_publisher(gw: &Gateway, id: &str) -> std::process::Child {
    Command::new("mosquitto_pub")
        .args(gw.client(
            gw.device_plain,
            id,
            &[
                "-u",
                id,
                "-P",
                SECRET,
                "-t",
                &format!("devices/{id}/telemetry"),
                "-l",
            ],
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub (install mosquitto-clients)")
}

#[test]
fn a_flooding_device_does_not_starve_a_well_behaved_one() {
    let gw = Gateway::start_all(
        "",
        "",
        "messages_per_second = 100.0\nmessage_burst = 100.0\n",
    );
    gw.add_device_secret("flood-1", SECRET);
    gw.add_device_secret("steady-1", SECRET);
    gw.add_service_cert("analytics");
    let args = gw.client(
        gw.service_tls,
        "analytics",
        &["-t", "devices/+/telemetry/#", "-v"],
    );
    let sub = Sub::start(&args);
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));

    let mut flood = line_publisher(&gw, "flood-1");
    let mut steady = line_publisher(&gw, "steady-1");
    // The flooder writes as fast as its pipe takes it, from its own thread.
    let mut flood_in = flood.stdin.take().unwrap();
    let flooding = std::thread::spawn(move || {
        let line = "x".repeat(32) + "\n";
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            if flood_in.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    });
    // The well-behaved device: 20 messages a second for 3 seconds.
    let mut steady_in = steady.stdin.take().unwrap();
    let sent = 60;
    for n in 0..sent {
        writeln!(steady_in, "steady-{n}").unwrap();
        steady_in.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(steady_in);
    let seen = sub.drain(Duration::from_secs(3));
    let _ = flood.kill();
    let _ = flood.wait();
    let _ = steady.wait();
    flooding.join().unwrap();
    let steady_got = (0..sent)
        .filter(|n| {
            seen.iter()
                .any(|l| l == &format!("devices/steady-1/telemetry steady-{n}"))
        })
        .count();
    let flood_got = seen
        .iter()
        .filter(|l| l.starts_with("devices/flood-1/"))
        .count();
    assert!(
        steady_got * 100 >= sent * 99,
        "well-behaved device delivered {steady_got}/{sent} while another flooded"
    );
    // The flooder got its rate (100/s plus the burst) over ~6 s, not its offered load.
    assert!(flood_got > 0, "the flooder is slowed, not silenced");
    assert!(flood_got <= 100 * 7 + 100, "flooder delivered {flood_got}");
    assert!(gw.metric("portcullis_rate_limit_waits_total ") > 0);
}

fn v5_device(gw: &Gateway, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v5(id, Some((id, SECRET))),
        Some(v5::ConnectReturnCode::Success)
    );
    raw
}

fn publish_v5(raw: &mut Raw, topic: &str, pkid: u16, qos: Q5) {
    let mut p = v5::Publish::new(topic, qos, b"x".to_vec(), None);
    p.pkid = pkid;
    raw.send_v5(v5::Packet::Publish(p));
}

#[test]
fn over_the_rate_mqtt5_gets_quota_exceeded() {
    let gw = Gateway::start_all(
        "",
        "",
        "messages_per_second = 1.0\nmessage_burst = 2.0\nmax_delay_ms = 1\naction = \"quota_exceeded\"\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = v5_device(&gw, "meter-1");
    for pkid in 1..=3 {
        publish_v5(&mut raw, "devices/meter-1/telemetry", pkid, Q5::AtLeastOnce);
    }
    let mut reasons = Vec::new();
    while reasons.len() < 3 {
        match raw.recv_v5(T) {
            Some(v5::Packet::PubAck(a)) => reasons.push(a.reason),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(
        reasons,
        vec![
            v5::PubAckReason::Success,
            v5::PubAckReason::Success,
            v5::PubAckReason::QuotaExceeded
        ]
    );
    assert_eq!(gw.refusals("limits", "rate_limited"), 1);
    gw.wait_audit(&["\"publish\"", "\"refuse\"", "over the message or byte rate"]);
}

#[test]
fn sustained_abuse_is_disconnected_when_configured() {
    let gw = Gateway::start_all(
        "",
        "",
        "messages_per_second = 20.0\nmessage_burst = 5.0\nsustained_secs = 1\naction = \"disconnect\"\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = v5_device(&gw, "meter-1");
    raw.stream.set_nonblocking(false).unwrap();
    let started = Instant::now();
    // Flood (QoS 0) until the gateway says enough.
    let reason = loop {
        for _ in 0..50 {
            publish_v5(&mut raw, "devices/meter-1/telemetry", 0, Q5::AtMostOnce);
        }
        if let Some(v5::Packet::Disconnect(d)) = raw.recv_v5(Duration::from_millis(50)) {
            break d.reason_code;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never disconnected"
        );
    };
    assert_eq!(reason, v5::DisconnectReasonCode::MessageRateTooHigh);
    gw.wait_audit(&["\"disconnect\"", "\"meter-1\"", "message rate too high"]);
}

#[test]
fn a_source_opening_connections_too_fast_is_cut_off_before_reading() {
    let gw = Gateway::start_all(
        "",
        "",
        "connections_per_second_per_source = 0.5\nconnection_burst_per_source = 3.0\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    let source: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Raw::connect_from(gw.device_plain, source));
    }
    let mut fourth = Raw::connect_from(gw.device_plain, source);
    let (closed, bytes) = fourth.closed_within(T);
    assert!(closed && bytes.is_empty());
    assert_eq!(gw.refusals("connect", "connection_rate"), 1);
    // Another source is not affected.
    let mut other = Raw::connect_from(gw.device_plain, "127.0.0.10".parse().unwrap());
    assert_eq!(
        other.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
}

#[test]
fn commands_to_a_device_are_held_to_its_rate_not_lost() {
    let gw = Gateway::start_with(
        "[rate_overrides.\"device/meter-1\"]\nmessages_per_second = 2.0\nmessage_burst = 2.0\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    let out = gw.cli_stdin(&["service", "add", "ops", "--secret-stdin"], Some(SECRET));
    assert!(out.status.success(), "{}", text(&out));
    let mut device = v5_device(&gw, "meter-1");
    device.send_v5(v5::Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![v5::Filter::new(
            "devices/meter-1/commands/#",
            Q5::AtMostOnce,
        )],
        properties: None,
    }));
    assert!(matches!(device.recv_v5(T), Some(v5::Packet::SubAck(_))));
    let mut service = Raw::connect(gw.service_plain);
    assert_eq!(service.connect_v4("ops", Some(("ops", SECRET))), Some(0));
    let started = Instant::now();
    for n in 0..8 {
        service.send(&common::raw::publish_v4_raw(
            format!("devices/meter-1/commands/c{n}").as_bytes(),
            b"x",
            0,
            0,
        ));
    }
    let mut times = Vec::new();
    while times.len() < 8 {
        match device.recv_v5(T) {
            Some(v5::Packet::Publish(_)) => times.push(started.elapsed()),
            other => panic!("expected command {} of 8, got {other:?}", times.len() + 1),
        }
    }
    // The burst of 2 at once, then about 2 a second: the 8th after ~3 s, none lost.
    assert!(times[7] >= Duration::from_millis(2500), "{times:?}");
    assert!(gw.metric("portcullis_rate_limit_waits_total ") > 0);
}

/// A flood of connections that never log in, more than the gateway has descriptors
/// (run under `prlimit --nofile=256:256`), while connections time out and the audit
/// log rotates every few lines: the oldest unauthenticated connections are shed, a
/// device logs in, and the audit log keeps every entry, its chain intact.
#[test]
fn connections_that_never_log_in_cannot_exhaust_descriptors_or_the_audit_log() {
    let mut gw = Gateway::start_limited(
        Some(256),
        "[audit]\nmax_file_bytes = 8192\nkeep_files = 100000\naggregate_window_secs = 0\n",
        "",
        "",
    );
    gw.add_device_secret("meter-1", SECRET);
    let addr = gw.device_plain;
    let flood = std::thread::spawn(move || {
        let held: Vec<_> = (0..600)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
            })
            .collect();
        // Held past a connect timeout (2 s): those refused are audited meanwhile.
        std::thread::sleep(Duration::from_secs(5));
        held.len()
    });
    std::thread::sleep(Duration::from_secs(2));
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_plain,
            "meter-1",
            &[
                "-u",
                "meter-1",
                "-P",
                SECRET,
                "-t",
                "devices/meter-1/telemetry",
                "-m",
                "still here",
                "-q",
                "1",
            ],
        ),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(flood.join().unwrap() > 256);
    // Every audit file, rotated ones too.
    let audit = || -> Vec<String> {
        gw.data()
            .read_dir()
            .unwrap()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("audit.log") && !name.ends_with(".lock")
            })
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    };
    let logged = |needles: &[&str]| {
        audit()
            .iter()
            .flat_map(|f| f.lines())
            .any(|l| needles.iter().all(|n| l.contains(n)))
    };
    wait_for(T, || {
        logged(&["\"connect\"", "\"allow\"", "\"meter-1\""]).then_some(())
    })
    .expect("the device's login is audited");
    assert_eq!(gw.metric("portcullis_audit_entries_dropped_total "), 0);
    assert_eq!(gw.metric("portcullis_audit_rotation_failures_total "), 0);
    let files = audit();
    assert!(files.len() > 1, "the audit log rotated");
    assert!(
        !files.iter().any(|f| f.contains("audit-dropped")),
        "audit entries were lost"
    );
    // The oldest of those that never logged in were shed to make room.
    wait_for(T, || logged(&["unauthenticated_shed"]).then_some(())).expect("shedding is audited");
    assert!(gw.refusals("connect", "unauthenticated_shed") > 0);
    // The chain is verified once the gateway has stopped: while it runs it may still
    // be writing (and, with files this small, rotating) the closed connections' lines,
    // renaming files under the verifier.
    let (status, _) = gw.terminate();
    assert!(status.success(), "{status}");
    let verified = gw.cli(&["audit", "verify"]);
    assert!(verified.status.success(), "{}", text(&verified));
}
