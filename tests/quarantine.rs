//! Behaviour and quarantine as a user sees them: a device that starts flooding is
//! quarantined and nothing it sends after the event reaches a service; quarantine
//! survives a restart and ends on an operator's release; credential stuffing raises an
//! alert but never quarantines the device; a cloned identity is flagged; a quarantined
//! device's Will is suppressed, its commands held, and its traffic diverted to the
//! forensic topic when policy says so.

mod common;

use common::raw::{Raw, publish_v4_raw};
use common::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A service group that may watch telemetry, quarantine events and the forensic
/// topic; the model learns in 3 s, so a test can show a learned baseline quickly.
const OPS: &str = r#"
[behaviour]
learning_secs = 3
[service_groups.ops]
trust = ["{data_dir}/pki/ca.pem"]
publish = ["devices/+/commands/#"]
subscribe = ["devices/+/telemetry/#", "portcullis/events/quarantine/#", "portcullis/events/auth_failures/#", "portcullis/forensic/#"]
"#;

fn ops_subscriber(gw: &Gateway, filters: &[&str]) -> Sub {
    if !gw.data().join("pki/clients/ops.pem").exists() {
        gw.issue("ops");
        gw.cli_ok(&["service", "add", "ops", "--cert-any", "--group", "ops"]);
    }
    let mut extra = vec!["-v"];
    for f in filters {
        extra.extend(["-t", f]);
    }
    let sub = Sub::start(&gw.client(gw.service_tls, "ops", &extra));
    gw.wait_audit(&["\"connect\"", "\"ops\"", "\"allow\""]);
    std::thread::sleep(Duration::from_millis(300));
    sub
}

/// A device on the plain listener, authenticated with its secret (MQTT 3.1.1).
fn device(gw: &Gateway, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4(id, Some((id, SECRET))),
        Some(0),
        "{id} connects"
    );
    raw
}

fn publish(raw: &mut Raw, id: &str, payload: &str) {
    let topic = format!("devices/{id}/telemetry");
    raw.send(&publish_v4_raw(topic.as_bytes(), payload.as_bytes(), 0, 0));
}

/// `portcullis quarantine show ID` as text.
fn show(gw: &Gateway, id: &str) -> String {
    gw.cli_ok(&["quarantine", "show", id])
}

/// The device's state, as `show` gives it (`quarantined`, `normal`, ...).
fn state(gw: &Gateway, id: &str) -> String {
    let shown = show(gw, id);
    shown
        .lines()
        .find_map(|l| l.strip_prefix("state:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no state in {shown}"))
        .to_string()
}

/// Wait until the device is in `want`; `show`'s text then.
fn wait_state(gw: &Gateway, id: &str, want: &str) -> String {
    wait_for(T, || (state(gw, id) == want).then(|| show(gw, id)))
        .unwrap_or_else(|| panic!("{id} not {want}: {}", show(gw, id)))
}

#[test]
fn a_flooding_device_is_quarantined_persists_across_restart_and_is_released() {
    let mut gw = Gateway::start_with(OPS);
    gw.add_device_secret("pump-1", SECRET);
    let sub = ops_subscriber(
        &gw,
        &["devices/+/telemetry/#", "portcullis/events/quarantine/#"],
    );

    // Five seconds of its normal, 5 messages a second: the model learns it.
    let mut dev = device(&gw, "pump-1");
    let mut seq = 0u32;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        publish(&mut dev, "pump-1", &format!("n={seq}"));
        seq += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    // Then it floods, as fast as the socket takes it, for up to 4 s.
    dev.stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let flood = Instant::now();
    while flood.elapsed() < Duration::from_secs(4) {
        publish(&mut dev, "pump-1", &format!("n={seq}"));
        seq += 1;
    }
    let event = sub
        .expect("portcullis/events/quarantine/pump-1", T)
        .expect("a quarantine event");
    assert!(event.contains("\"to\":\"quarantined\""), "{event}");
    assert!(
        event.contains("above baseline") || event.contains("rate-limit hits"),
        "the reason in words and numbers: {event}"
    );
    // Nothing it sent after the event reaches the service.
    let after = sub.drain(Duration::from_secs(2));
    assert!(
        !after.iter().any(|l| l.starts_with("devices/pump-1/")),
        "telemetry after the quarantine event: {:?}",
        &after[..after.len().min(5)]
    );
    assert!(gw.metric("portcullis_quarantine_dropped_total ") > 0);
    assert!(gw.metric("portcullis_quarantines_total ") >= 1);
    let line = gw.wait_audit(&["\"quarantine\"", "\"pump-1\"", "normal → quarantined"]);
    assert!(line.contains("\"decision\":\"quarantined\""), "{line}");
    let list = gw.cli_ok(&["quarantine", "list"]);
    assert!(
        list.contains("pump-1") && list.contains("quarantined"),
        "{list}"
    );
    drop(dev);
    drop(sub);

    // A restart keeps the quarantine and its reason.
    gw.restart();
    assert_eq!(state(&gw, "pump-1"), "quarantined");
    let shown = show(&gw, "pump-1");
    assert!(
        shown.contains("above baseline") || shown.contains("rate-limit hits"),
        "{shown}"
    );
    let sub = ops_subscriber(&gw, &["devices/+/telemetry/#"]);
    let mut dev = device(&gw, "pump-1");
    publish(&mut dev, "pump-1", "after-restart");
    let seen = sub.drain(Duration::from_secs(1));
    assert!(
        !seen.iter().any(|l| l.contains("after-restart")),
        "still quarantined after the restart: {seen:?}"
    );

    // Released by the operator: it publishes normally again.
    let out = gw.cli_ok(&["quarantine", "release", "pump-1"]);
    assert!(out.contains("released"), "{out}");
    publish(&mut dev, "pump-1", "after-release");
    sub.expect("after-release", T)
        .expect("delivered after the release");
    assert_eq!(state(&gw, "pump-1"), "released");
    let shown = show(&gw, "pump-1");
    assert!(shown.contains("released by operator"), "{shown}");
    gw.wait_audit(&["\"quarantine\"", "\"pump-1\"", "quarantined → released"]);
}

#[test]
fn failed_logins_by_others_never_quarantine_a_device_and_raise_an_alert() {
    let gw = Gateway::start_with(OPS);
    gw.add_device_secret("lock-7", SECRET);
    gw.add_device_cert("cam-9");
    let sub = ops_subscriber(
        &gw,
        &[
            "devices/+/telemetry/#",
            "portcullis/events/auth_failures/#",
            "portcullis/events/quarantine/#",
        ],
    );
    // 25 wrong secrets naming each device, from 25 sources (so no source's own
    // back-off starts); the cert-only device gets password guesses too.
    for id in ["lock-7", "cam-9"] {
        for i in 0..25u8 {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 20 + i));
            let mut raw = Raw::connect_from(gw.device_plain, source);
            let code = raw.connect_v4(id, Some((id, "wrong-guess-wrong-guess-000")));
            assert_eq!(code, Some(5), "refused as not authorized");
        }
    }
    // The operator is told, with the sources named...
    for id in ["lock-7", "cam-9"] {
        let event = sub
            .expect(&format!("portcullis/events/auth_failures/{id}"), T)
            .expect("an auth-failure alert");
        assert!(event.contains("127.0.0.20"), "{event}");
        gw.wait_audit(&["\"auth_failures\"", "\"alert\"", &format!("\"{id}\"")]);
    }
    assert_eq!(gw.metric("portcullis_auth_failure_alerts_total "), 2);
    // ...and the devices themselves are treated as before: their telemetry flows.
    let args = gw.client(
        gw.device_plain,
        "lock-7",
        &[
            "-u",
            "lock-7",
            "-P",
            SECRET,
            "-t",
            "devices/lock-7/telemetry",
            "-m",
            "lock-ok",
            "-q",
            "1",
        ],
    );
    let out = mosquitto("mosquitto_pub", &args, T);
    assert!(out.status.success(), "{}", text(&out));
    sub.expect("devices/lock-7/telemetry lock-ok", T)
        .expect("the device's telemetry still reaches services");
    let args = gw.client(
        gw.device_tls,
        "cam-9",
        &["-t", "devices/cam-9/telemetry", "-m", "cam-ok", "-q", "1"],
    );
    let out = mosquitto("mosquitto_pub", &args, T);
    assert!(out.status.success(), "{}", text(&out));
    sub.expect("devices/cam-9/telemetry cam-ok", T)
        .expect("the cert-only device's telemetry still reaches services");
    let list = gw.cli_ok(&["quarantine", "list"]);
    assert!(
        !list.contains("lock-7") && !list.contains("cam-9"),
        "{list}"
    );
    assert_eq!(gw.metric("portcullis_quarantines_total "), 0);
}

/// A device connecting from a chosen loopback address.
fn device_from(gw: &Gateway, id: &str, last_octet: u8) -> Raw {
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet));
    let mut raw = Raw::connect_from(gw.device_plain, source);
    assert_eq!(
        raw.connect_v4(id, Some((id, SECRET))),
        Some(0),
        "{id} connects"
    );
    raw
}

#[test]
fn a_cloned_identity_is_flagged() {
    let gw = Gateway::start();
    gw.add_device_secret("twin", SECRET);
    // Two places taking turns with one identity: the second take-over displaces a
    // session (from the other address) that had itself just taken over.
    let _a = device_from(&gw, "twin", 41);
    let _b = device_from(&gw, "twin", 42);
    let _c = device_from(&gw, "twin", 41);
    let shown = wait_state(&gw, "twin", "quarantined");
    assert!(shown.contains("cloned identity"), "{shown}");
    gw.wait_audit(&["\"clone\"", "\"twin\""]);

    // A device reconnecting from its own address while its old connections linger,
    // even twice in a row, is not a clone; nor is one take-over from a new address
    // (a device that moved).
    gw.add_device_secret("flaky", SECRET);
    let _a = device_from(&gw, "flaky", 43);
    let _b = device_from(&gw, "flaky", 43);
    let _c = device_from(&gw, "flaky", 43);
    gw.add_device_secret("mover", SECRET);
    let _a = device_from(&gw, "mover", 45);
    let _b = device_from(&gw, "mover", 46);
    std::thread::sleep(Duration::from_millis(500));
    for id in ["flaky", "mover"] {
        assert_eq!(state(&gw, id), "normal", "{}", show(&gw, id));
    }
    // The device that moved and then had its old address back at once is a clone.
    let _c = device_from(&gw, "mover", 45);
    let shown = wait_state(&gw, "mover", "quarantined");
    assert!(shown.contains("cloned identity"), "{shown}");
}

#[test]
fn a_quarantined_device_has_its_commands_held_and_its_will_suppressed() {
    let gw = Gateway::start_with(OPS);
    gw.add_device_secret("valve-2", SECRET);
    let sub = ops_subscriber(&gw, &["devices/+/telemetry/#"]);
    let out = gw.cli_ok(&[
        "quarantine",
        "add",
        "valve-2",
        "--reason",
        "tampered casing",
    ]);
    assert!(out.contains("quarantined"), "{out}");

    // The device listens for commands (persistent session) and leaves a Will.
    let mut holder = Sub::start(&gw.client(
        gw.device_plain,
        "valve-2",
        &[
            "-u",
            "valve-2",
            "-P",
            SECRET,
            "-c",
            "-q",
            "1",
            "-t",
            "devices/valve-2/commands/#",
            "-v",
            "-d",
            "--will-topic",
            "devices/valve-2/telemetry/status",
            "--will-payload",
            "valve-2 lost",
        ],
    ));
    holder.expect("SUBACK", T).expect("device connected");

    // A command for it waits while it is quarantined, and arrives on release.
    let cmd = gw.client(
        gw.service_tls,
        "ops",
        &[
            "-t",
            "devices/valve-2/commands/open",
            "-m",
            "open-now",
            "-q",
            "1",
        ],
    );
    let out = mosquitto("mosquitto_pub", &cmd, T);
    assert!(out.status.success(), "{}", text(&out));
    let held = holder.drain(Duration::from_secs(2));
    assert!(!held.iter().any(|l| l.contains("open-now")), "{held:?}");
    gw.cli_ok(&["quarantine", "release", "valve-2"]);
    holder
        .expect("open-now", T)
        .expect("the held command arrives after the release");

    // Quarantined again, its Will does not fire on an unexpected disconnect.
    gw.cli_ok(&["quarantine", "add", "valve-2"]);
    holder.kill();
    let seen = sub.drain(Duration::from_secs(2));
    assert!(!seen.iter().any(|l| l.contains("valve-2 lost")), "{seen:?}");
    assert_eq!(gw.metric("portcullis_wills_published_total "), 0);
    assert_eq!(state(&gw, "valve-2"), "quarantined");
    let shown = show(&gw, "valve-2");
    assert!(
        shown.contains("quarantined by operator: tampered casing"),
        "{shown}"
    );
}

#[test]
fn diverted_traffic_goes_to_the_forensic_topic_at_a_reduced_rate() {
    let extra = format!(
        "{OPS}\n[device_groups.lab]\ntrust = [\"{{data_dir}}/pki/ca.pem\"]\n\
         [device_groups.lab.behaviour]\nquarantine_traffic = \"divert\"\n\
         forensic_messages_per_second = 2.0\n"
    );
    let gw = Gateway::start_with(&extra);
    let out = gw.cli_stdin(
        &["device", "add", "cam-9", "--group", "lab", "--secret-stdin"],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    let sub = ops_subscriber(&gw, &["devices/+/telemetry/#", "portcullis/forensic/#"]);
    gw.cli_ok(&["quarantine", "add", "cam-9"]);
    let mut dev = device(&gw, "cam-9");
    for i in 0..20 {
        publish(&mut dev, "cam-9", &format!("frame-{i}"));
    }
    let seen = sub.drain(Duration::from_secs(2));
    let forensic: Vec<&String> = seen
        .iter()
        .filter(|l| l.starts_with("portcullis/forensic/cam-9/devices/cam-9/telemetry frame-"))
        .collect();
    assert!(
        !seen.iter().any(|l| l.starts_with("devices/cam-9/")),
        "{seen:?}"
    );
    // The forensic rate (2/s, burst 2) over ~2 s: a handful, not all twenty.
    assert!(
        (1..=8).contains(&forensic.len()),
        "{} diverted: {seen:?}",
        forensic.len()
    );
    assert!(gw.metric("portcullis_quarantine_diverted_total ") >= 1);
}

#[test]
fn a_quarantined_devices_retained_messages_are_purged() {
    let gw = Gateway::start_with(OPS);
    gw.add_device_secret("meter-4", SECRET);
    let retained = |payload: &str| {
        let args = gw.client(
            gw.device_plain,
            "meter-4",
            &[
                "-u",
                "meter-4",
                "-P",
                SECRET,
                "-t",
                "devices/meter-4/telemetry/state",
                "-m",
                payload,
                "-r",
                "-q",
                "1",
            ],
        );
        let out = mosquitto("mosquitto_pub", &args, T);
        assert!(out.status.success(), "{}", text(&out));
    };
    retained("{\"v\":1}");
    // A service subscribing now gets the retained state ...
    let sub = ops_subscriber(&gw, &["devices/meter-4/telemetry/#"]);
    sub.expect("devices/meter-4/telemetry/state {\"v\":1}", T)
        .expect("retained message delivered before quarantine");
    drop(sub);
    // ... and after the quarantine, none.
    gw.cli_ok(&["quarantine", "add", "meter-4"]);
    gw.wait_audit(&["\"quarantine\"", "\"meter-4\"", "normal → quarantined"]);
    std::thread::sleep(Duration::from_millis(500));
    let sub = ops_subscriber(&gw, &["devices/meter-4/telemetry/#"]);
    let seen = sub.drain(Duration::from_secs(2));
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("devices/meter-4/telemetry/state")),
        "{seen:?}"
    );
}

#[test]
fn a_quarantined_flooder_is_read_no_faster_than_its_rate() {
    // 20 msg/s, halved in quarantine; "drop" after 1 s over the rate would otherwise
    // read a flooder as fast as it writes.
    let gw = Gateway::start_all(
        "",
        "",
        "messages_per_second = 20.0\nmessage_burst = 20.0\nsustained_secs = 1\naction = \"drop\"\n",
    );
    gw.add_device_secret("siren-3", SECRET);
    gw.cli_ok(&["quarantine", "add", "siren-3"]);
    let mut dev = device(&gw, "siren-3");
    dev.stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut sent = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        publish(&mut dev, "siren-3", "x");
        sent += 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    let read = gw.metric("portcullis_quarantine_dropped_total ");
    // 10/s with a burst of 10, over about 3 s; the rest waited in the socket.
    assert!(read > 0, "nothing read");
    assert!(read <= 60, "{read} of {sent} read in 3 s");
}

#[test]
fn a_reload_changes_the_quarantine_policy_of_a_live_session() {
    let gw = Gateway::start_with(OPS);
    gw.add_device_secret("gate-5", SECRET);
    let sub = ops_subscriber(&gw, &["portcullis/forensic/#"]);
    gw.cli_ok(&["quarantine", "add", "gate-5"]);
    let mut dev = device(&gw, "gate-5");
    publish(&mut dev, "gate-5", "before-reload");
    let seen = sub.drain(Duration::from_secs(1));
    assert!(seen.is_empty(), "dropped, not diverted: {seen:?}");

    // Divert from now on: the live session follows the new policy.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let text = text.replace(
        "[behaviour]\nlearning_secs = 3\n",
        "[behaviour]\nlearning_secs = 3\nquarantine_traffic = \"divert\"\n",
    );
    assert!(text.contains("divert"));
    std::fs::write(&gw.config, text).unwrap();
    gw.cli_ok(&["config", "reload"]);
    publish(&mut dev, "gate-5", "after-reload");
    sub.expect(
        "portcullis/forensic/gate-5/devices/gate-5/telemetry after-reload",
        T,
    )
    .expect("diverted after the reload");
}

#[test]
fn probation_tightens_the_rate_limit() {
    // 40 msg/s is plenty for a device sending 20/s; probation cuts it to 10/s, and
    // over it MQTT 5 would hear "quota exceeded" (3.1.1: dropped and counted).
    let gw = Gateway::start_all(
        // Kept on probation (no quarantine after a few windows), to see it alone.
        "[behaviour]\nlearning_secs = 3\nprobation_rate_factor = 0.25\nprobation_windows = 1000\n",
        "",
        "messages_per_second = 40.0\nmessage_burst = 40.0\nmax_delay_ms = 0\naction = \"quota_exceeded\"\n",
    );
    gw.add_device_secret("fan-8", SECRET);
    let mut dev = device(&gw, "fan-8");
    let paced = |dev: &mut Raw, per_second: u64, secs: u64| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            publish(dev, "fan-8", "{}");
            n += 1;
            let next = start + Duration::from_millis(n * 1000 / per_second);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    };
    // Its normal: 5 a second. Nothing is refused.
    paced(&mut dev, 5, 5);
    assert_eq!(gw.refusals("limits", "rate_limited"), 0);
    // Four times that: within its configured rate, but an anomaly.
    paced(&mut dev, 20, 8);
    let shown = show(&gw, "fan-8");
    assert!(shown.contains("normal → probation"), "{shown}");
    assert_eq!(state(&gw, "fan-8"), "probation", "{shown}");
    assert!(
        gw.refusals("limits", "rate_limited") > 0,
        "probation did not tighten the limit: {shown}"
    );
}

#[test]
fn retained_quota_refusals_are_not_counted_as_acl_denials() {
    let gw = Gateway::start_with("[sessions]\nmax_retained_per_device = 1\n");
    gw.add_device_secret("meter-6", SECRET);
    gw.add_device_secret("meter-7", SECRET);
    // 30 retained messages on new topics: one kept, 29 over the device's quota (more
    // than the 20 ACL denials a minute that quarantine a device).
    let mut raw = device(&gw, "meter-6");
    for n in 0..30u16 {
        let topic = format!("devices/meter-6/state/{n}");
        let mut frame = publish_v4_raw(topic.as_bytes(), b"1", 1, n + 1);
        frame[0] |= 0x01;
        raw.send(&frame);
        assert!(raw.recv_v4(T).is_some(), "PUBACK {n}");
    }
    assert_eq!(gw.refusals("limits", "retained_limit"), 29);
    assert_eq!(gw.refusals("authorize", "retained_limit"), 0);
    // The same number of ACL denials does quarantine (the contrast the rule is for).
    let mut other = device(&gw, "meter-7");
    for n in 0..30u16 {
        other.send(&publish_v4_raw(b"devices/meter-6/state/x", b"1", 1, n + 1));
        let _ = other.recv_v4(Duration::from_millis(500));
    }
    wait_state(&gw, "meter-7", "quarantined");
    assert_eq!(state(&gw, "meter-6"), "normal", "{}", show(&gw, "meter-6"));
}
