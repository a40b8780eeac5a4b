//! The gateway's life and its registry: CLI commands while it runs, sessions ended by
//! disable / remove / rotate / kick / take-over, per-source back-off, SIGTERM drain.

mod common;

use common::raw::Raw;
use common::*;
use rumqttc::v5::mqttbytes::v5;
use std::net::IpAddr;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const NEW_SECRET: &str = "fedcba9876543210fedcba9876543210";

fn v5_connect(gw: &Gateway, id: &str, secret: &str) -> (Raw, Option<v5::ConnectReturnCode>) {
    let mut raw = Raw::connect(gw.device_plain);
    let code = raw.connect_v5(id, Some((id, secret)));
    (raw, code)
}

fn expect_disconnect(raw: &mut Raw, reason: v5::DisconnectReasonCode) {
    match raw.recv_v5(T) {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(d.reason_code, reason),
        other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
    }
    assert!(raw.closed_within(T).0);
}

#[test]
fn registry_commands_work_while_the_gateway_runs() {
    let gw = Gateway::start();
    let (cert, _) = gw.issue("sensor-1");
    let added = gw.cli_ok(&[
        "device",
        "add",
        "sensor-1",
        "--cert",
        cert.to_str().unwrap(),
    ]);
    assert!(added.contains("pinned sha256:"), "{added}");
    // Duplicate, bad id, no credential: refused with a reason, nothing changed.
    let dup = gw.cli(&["device", "add", "sensor-1", "--cert-any"]);
    assert_eq!(dup.status.code(), Some(2));
    assert!(text(&dup).contains("already exists"), "{}", text(&dup));
    let bad = gw.cli(&["device", "add", "bad/id", "--cert-any"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("[A-Za-z0-9._-]"), "{}", text(&bad));
    let none = gw.cli(&["device", "add", "sensor-9"]);
    assert_eq!(none.status.code(), Some(2));
    let short = gw.cli_stdin(
        &["device", "add", "sensor-9", "--secret-stdin"],
        Some("short"),
    );
    assert!(
        text(&short).contains("at least 16 bytes"),
        "{}",
        text(&short)
    );
    let nogroup = gw.cli(&["device", "add", "sensor-9", "--group", "nope", "--cert-any"]);
    assert!(
        text(&nogroup).contains("no device group"),
        "{}",
        text(&nogroup)
    );
    // Import: all or nothing.
    let import = gw.dir.path().join("fleet.toml");
    std::fs::write(
        &import,
        format!(
            "[[principal]]\nid = \"meter-1\"\nsecret = \"{SECRET}\"\n\n[[principal]]\nid = \"meter-2\"\ncert_any = true\ngroup = \"other\"\n"
        ),
    )
    .unwrap();
    assert!(
        gw.cli_ok(&["device", "import", import.to_str().unwrap()])
            .contains("\"imported\": 2")
    );
    let again = gw.cli(&["device", "import", import.to_str().unwrap()]);
    assert!(text(&again).contains("entry 1") && text(&again).contains("already exists"));
    let list = gw.cli_ok(&["device", "list"]);
    for id in ["sensor-1", "meter-1", "meter-2"] {
        assert!(list.contains(&format!("\"id\": \"{id}\"")), "{list}");
    }
    assert!(!list.contains("secret_hash"), "{list}");
    assert!(!list.contains(SECRET));
    // Generated secrets are printed once and work.
    let out = gw.cli_ok(&["device", "add", "meter-3", "--generate-secret"]);
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("secret printed")
        .to_string();
    let (_raw, code) = v5_connect(&gw, "meter-3", &secret);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
    let show = gw.cli_ok(&["device", "show", "meter-3"]);
    assert!(
        show.contains("\"sessions\"") && show.contains("mqtt5"),
        "{show}"
    );
    let clients = gw.cli_ok(&["clients", "list"]);
    assert!(clients.contains("meter-3"), "{clients}");
    assert!(clients.contains("\"messages_in\": 0"), "{clients}");
    assert!(clients.contains("\"rate_in\""), "{clients}");
    gw.cli_ok(&["device", "remove", "meter-2"]);
    assert!(!gw.cli_ok(&["device", "list"]).contains("meter-2"));
    gw.wait_audit(&["\"registry\"", "\"meter-2\"", "remove"]);
}

#[test]
fn a_generated_secret_is_printed_only_when_the_gateway_accepts_it() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    // The id exists: the gateway refuses, and no secret that nobody stored is shown.
    let out = gw.cli(&["device", "add", "meter-1", "--generate-secret"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert!(!text(&out).contains("secret:"), "{}", text(&out));
    let out = gw.cli(&["device", "rotate", "ghost", "--generate-secret"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("secret:"), "{}", text(&out));
}

#[test]
fn a_fleet_of_fifteen_thousand_imports_in_one_request() {
    let gw = Gateway::start();
    // Over a megabyte of request: more than the admin socket once took.
    let file = gw.dir.path().join("big-fleet.toml");
    let text: String = (1..=15_000)
        .map(|n| format!("[[principal]]\nid = \"fleet-{n}\"\nsecret = \"{SECRET}-{n}\"\n"))
        .collect();
    std::fs::write(&file, text).unwrap();
    let out = gw.cli_ok(&["device", "import", file.to_str().unwrap()]);
    assert!(out.contains("\"imported\": 15000"), "{out}");
    let (_raw, code) = v5_connect(&gw, "fleet-15000", &format!("{SECRET}-15000"));
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
}

#[test]
fn disable_enable_remove_and_kick_end_or_allow_sessions() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let (mut raw, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
    let out = gw.cli_ok(&["device", "disable", "meter-1"]);
    assert!(out.contains("\"sessions_ended\": 1"), "{out}");
    expect_disconnect(&mut raw, v5::DisconnectReasonCode::AdministrativeAction);
    let (_, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::NotAuthorized));
    gw.wait_audit(&["\"refuse\"", "\"meter-1\"", "disabled"]);

    gw.cli_ok(&["device", "enable", "meter-1"]);
    let (mut raw, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
    gw.cli_ok(&["clients", "kick", "meter-1"]);
    expect_disconnect(&mut raw, v5::DisconnectReasonCode::AdministrativeAction);

    let (mut raw, _) = v5_connect(&gw, "meter-1", SECRET);
    gw.cli_ok(&["device", "remove", "meter-1"]);
    expect_disconnect(&mut raw, v5::DisconnectReasonCode::AdministrativeAction);
    let (_, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::NotAuthorized));
}

#[test]
fn rotation_ends_sessions_of_the_old_credential() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let (mut raw, _) = v5_connect(&gw, "meter-1", SECRET);
    let out = gw.cli_stdin(
        &["device", "rotate", "meter-1", "--secret-stdin"],
        Some(NEW_SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    expect_disconnect(&mut raw, v5::DisconnectReasonCode::AdministrativeAction);
    let (_, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::NotAuthorized));
    let (_, code) = v5_connect(&gw, "meter-1", NEW_SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
}

#[test]
fn rotating_a_pinned_certificate_refuses_the_old_one() {
    let gw = Gateway::start();
    let (cert, key) = gw.issue("sensor-1");
    let old_cert = gw.dir.path().join("old.pem");
    let old_key = gw.dir.path().join("old.key");
    std::fs::copy(&cert, &old_cert).unwrap();
    std::fs::copy(&key, &old_key).unwrap();
    gw.cli_ok(&[
        "device",
        "add",
        "sensor-1",
        "--cert",
        cert.to_str().unwrap(),
    ]);
    gw.cli_ok(&["pki", "issue", "sensor-1", "--force"]);
    gw.cli_ok(&[
        "device",
        "rotate",
        "sensor-1",
        "--cert",
        cert.to_str().unwrap(),
    ]);
    let publish = |c: &std::path::Path, k: &std::path::Path| {
        let args = gw.client_cert(
            gw.device_tls,
            "sensor-1",
            c,
            k,
            &["-t", "devices/sensor-1/telemetry", "-m", "x"],
        );
        mosquitto("mosquitto_pub", &args, T)
    };
    assert!(!publish(&old_cert, &old_key).status.success());
    assert!(publish(&cert, &key).status.success());
}

#[test]
fn registry_edits_without_a_running_gateway_are_kept_and_audited() {
    let mut gw = Gateway::start();
    let (status, _) = gw.terminate();
    assert!(status.success());
    let (cert, key) = gw.issue("sensor-1");
    gw.cli_ok(&[
        "device",
        "add",
        "sensor-1",
        "--cert",
        cert.to_str().unwrap(),
    ]);
    gw.cli_ok(&["pki", "issue", "sensor-1", "--force"]);
    // Un-pin: any certificate of the group's CA naming sensor-1 will do from now on.
    gw.cli_ok(&["device", "rotate", "sensor-1", "--cert-any"]);
    let show = gw.cli_ok(&["device", "show", "sensor-1"]);
    assert!(show.contains("any from the group's CA"), "{show}");
    gw.wait_audit(&["\"registry\"", "\"sensor-1\"", "rotate"]);
    gw.restart_after_stop();
    let args = gw.client_cert(
        gw.device_tls,
        "sensor-1",
        &cert,
        &key,
        &["-t", "devices/sensor-1/telemetry", "-m", "x"],
    );
    let out = mosquitto("mosquitto_pub", &args, T);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_second_connection_with_the_same_identity_takes_over() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let (mut first, _) = v5_connect(&gw, "meter-1", SECRET);
    let (_second, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
    expect_disconnect(&mut first, v5::DisconnectReasonCode::SessionTakenOver);
}

#[test]
fn repeated_failures_back_off_the_source_but_not_other_sources() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let attacker: IpAddr = "127.0.0.5".parse().unwrap();
    let elsewhere: IpAddr = "127.0.0.6".parse().unwrap();
    for _ in 0..3 {
        let mut raw = Raw::connect_from(gw.device_plain, attacker);
        assert_eq!(
            raw.connect_v5("meter-1", Some(("meter-1", "not-the-secret-at-all"))),
            Some(v5::ConnectReturnCode::NotAuthorized)
        );
    }
    // Now even the right secret is refused from that source, before it is checked...
    let mut raw = Raw::connect_from(gw.device_plain, attacker);
    assert_eq!(
        raw.connect_v5("meter-1", Some(("meter-1", SECRET))),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    gw.wait_audit(&["\"refuse\"", "127.0.0.5", "backed_off"]);
    // ...while the device itself, connecting from elsewhere, is unaffected.
    let mut raw = Raw::connect_from(gw.device_plain, elsewhere);
    assert_eq!(
        raw.connect_v5("meter-1", Some(("meter-1", SECRET))),
        Some(v5::ConnectReturnCode::Success)
    );
    assert_eq!(gw.refusals("connect", "backed_off"), 1);
    assert_eq!(gw.refusals("connect", "bad_secret"), 3);
}

#[test]
fn sigterm_drains_sessions_and_keeps_the_registry() {
    let mut gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    gw.add_device_cert("sensor-1");
    let (mut v5_peer, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
    let sub_args = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/commands/#", "-V", "mqttv5", "-d"],
    );
    let sub = Sub::start(&sub_args);
    sub.expect("SUBACK", T).expect("mosquitto_sub subscribed");
    let (status, rest) = gw.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    expect_disconnect(&mut v5_peer, v5::DisconnectReasonCode::ServerShuttingDown);
    sub.expect("DISCONNECT", T)
        .unwrap_or_else(|seen| panic!("mosquitto_sub saw no DISCONNECT: {seen:?}"));
    // Restart on the same data dir: the registry is intact and in use.
    gw.restart_after_stop();
    let list = gw.cli_ok(&["device", "list"]);
    assert!(
        list.contains("meter-1") && list.contains("sensor-1"),
        "{list}"
    );
    let (_, code) = v5_connect(&gw, "meter-1", SECRET);
    assert_eq!(code, Some(v5::ConnectReturnCode::Success));
}

#[test]
fn a_log_written_to_a_file_carries_no_colour_codes() {
    let mut gw = Gateway::start();
    let (status, _) = gw.terminate();
    assert!(status.success(), "exit status {status:?}");
    let log = gw.stderr();
    assert!(log.contains("shutting down"), "no log line in {log:?}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escape codes in a log file: {log:?}"
    );
}

#[test]
fn a_device_that_stops_reading_is_dropped() {
    // The sending service is exempt from rate limits here: the point is the device.
    let gw = Gateway::start_with(
        "[rate_overrides.\"service/ops\"]\nmessages_per_second = 1000000.0\nmessage_burst = 1000000.0\nbytes_per_second = 1.0e10\nbyte_burst = 1.0e10\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    let out = gw.cli_stdin(&["service", "add", "ops", "--secret-stdin"], Some(SECRET));
    assert!(out.status.success(), "{}", text(&out));
    // The device subscribes to its commands, then never reads again.
    let (mut device, _) = v5_connect(&gw, "meter-1", SECRET);
    device.send_v5(v5::Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![v5::Filter::new(
            "devices/meter-1/commands/#",
            rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        )],
        properties: None,
    }));
    assert!(matches!(device.recv_v5(T), Some(v5::Packet::SubAck(_))));
    let mut service = Raw::connect(gw.service_plain);
    assert_eq!(service.connect_v4("ops", Some(("ops", SECRET))), Some(0));
    let payload = vec![b'x'; 100 * 1024];
    for _ in 0..300 {
        service.send(&common::raw::publish_v4_raw(
            b"devices/meter-1/commands/firmware",
            &payload,
            0,
            0,
        ));
    }
    gw.wait_audit(&["\"disconnect\"", "\"meter-1\"", "peer stopped reading"]);
}

/// A file with the old duration keys still works; `config check` and the start name
/// each old key with the line to write instead.
#[test]
fn old_duration_keys_are_read_and_named_with_their_new_form() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.toml");
    std::fs::write(&old, "[limits]\nconnect_timeout_secs = 30\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", old.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "old.toml: warning: limits.connect_timeout_secs: renamed; write `connect_timeout = \"30s\"` instead"
        ),
        "{stderr}"
    );
    // The test gateway's own configuration uses old keys (tls.handshake_timeout_secs…).
    let gw = Gateway::start();
    let log = gw.stderr();
    assert!(
        log.contains(
            "configuration: tls.handshake_timeout_secs: renamed; write `handshake_timeout = \"2s\"`"
        ),
        "{log}"
    );
}

/// `/metrics` speaks Prometheus text by default and OpenMetrics when asked, as
/// Prometheus asks.
#[test]
fn metrics_come_as_prometheus_text_or_openmetrics_as_the_scraper_asks() {
    let gw = Gateway::start();
    let (status, head, body) = http_get_raw(gw.observability, "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        body.contains("# TYPE portcullis_messages_accepted_total counter\n"),
        "{body}"
    );
    assert!(!body.contains("# EOF"), "{body}");
    let accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    let (status, head, body) = http_get_raw(gw.observability, "/metrics", accept);
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        body.contains("# TYPE portcullis_messages_accepted counter\n"),
        "{body}"
    );
    assert!(
        body.contains("\nportcullis_messages_accepted_total 0\n"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
}

#[test]
fn config_check_names_the_file_the_key_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, portcullis_shipped()).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_packet_size = 0\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let msg = text(&out);
    assert!(
        msg.contains("bad.toml: limits.max_packet_size: must be > 0 (got 0)"),
        "{msg}"
    );
    // [serial] rules name the port, the key and the value.
    let serial = dir.path().join("serial.toml");
    std::fs::write(
        &serial,
        "[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"pump-1\"]\n\
         [[serial.ports]]\npath = \"/dev/ttyUSB1\"\nbaud = 12\ndevices = [\"pump-2\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", serial.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(
            "serial.toml: serial.ports[1].baud: must be between 300 and 4000000 (got 12)"
        ),
        "{}",
        text(&out)
    );
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[auth]\nsecret = \"hunter2-hunter2\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", typo.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("unknown field"), "{}", text(&out));
    assert!(
        !text(&out).contains("hunter2"),
        "secret values are never echoed"
    );
}

fn portcullis_shipped() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/portcullis.toml"
    ))
    .unwrap()
}

#[test]
fn the_audit_log_verifies_and_an_edited_line_is_found() {
    let mut gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let (_raw, code) = v5_connect(&gw, "meter-1", "wrong-secret-wrong-secret");
    assert_eq!(code, Some(v5::ConnectReturnCode::NotAuthorized));
    let (status, _) = gw.terminate();
    assert!(status.success());
    // Registry edits with no gateway running continue the same chain.
    gw.cli_ok(&["device", "disable", "meter-1"]);
    let ok = gw.cli(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("verified"), "{}", text(&ok));
    // Change one decision in the middle of the log.
    let path = gw.data().join("audit.log");
    let log = std::fs::read_to_string(&path).unwrap();
    let line = log
        .lines()
        .position(|l| l.contains("bad_secret"))
        .expect("the refusal is in the log");
    let edited: Vec<String> = log
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == line {
                l.replace("refuse", "allow")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
    let bad = gw.cli(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains(&format!("line {}", line + 1)),
        "names the edited line {}: {}",
        line + 1,
        text(&bad)
    );
}

#[test]
fn banning_a_device_ends_its_session_and_refuses_it_until_lifted() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    let args = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/commands/#", "-V", "mqttv5", "-d"],
    );
    let mut sub = Sub::start(&args);
    sub.expect("SUBACK", T).expect("connected");
    let out = gw.cli_ok(&["ban", "add", "device/sensor-1", "--reason", "cloned key"]);
    assert!(out.contains("\"sessions_ended\": 1"), "{out}");
    sub.expect("DISCONNECT", T)
        .expect("the banned session ends");
    sub.kill();
    let pub_args = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/telemetry", "-m", "x"],
    );
    let refused = mosquitto("mosquitto_pub", &pub_args, T);
    assert!(!refused.status.success(), "{}", text(&refused));
    gw.wait_audit(&["\"connect\"", "\"refuse\"", "\"sensor-1\"", "banned"]);
    let list = gw.cli_ok(&["ban", "list"]);
    assert!(
        list.contains("device sensor-1") && list.contains("cloned key"),
        "{list}"
    );
    gw.cli_ok(&["ban", "remove", "device/sensor-1"]);
    let ok = mosquitto("mosquitto_pub", &pub_args, T);
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn a_banned_source_is_closed_before_anything_is_read_until_the_ban_expires() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let banned: IpAddr = "127.0.0.7".parse().unwrap();
    let other: IpAddr = "127.0.0.8".parse().unwrap();
    gw.cli_ok(&["ban", "add", "127.0.0.7/32", "--ttl", "2s"]);
    let mut raw = Raw::connect_from(gw.device_plain, banned);
    assert_eq!(raw.closed_within(T), (true, vec![]));
    assert_eq!(gw.refusals("connect", "banned"), 1);
    let mut ok = Raw::connect_from(gw.device_plain, other);
    assert_eq!(ok.connect_v4("meter-1", Some(("meter-1", SECRET))), Some(0));
    // Bad input is refused with the reason.
    let bad = gw.cli(&["ban", "add", "127.0.0.300"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad).contains("not an address or CIDR"),
        "{}",
        text(&bad)
    );
    // After the TTL, the source may connect again.
    std::thread::sleep(Duration::from_millis(2100));
    let mut raw = Raw::connect_from(gw.device_plain, banned);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
}

#[test]
fn signed_audit_checkpoints_reach_a_subscribed_service() {
    let gw = Gateway::start_with(
        "[service_groups.auditors]\ntrust = []\nsubscribe = [\"portcullis/events/audit\"]\n",
    );
    let out = gw.cli_stdin(
        &[
            "service",
            "add",
            "keeper",
            "--group",
            "auditors",
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    // The checkpoint written at start is retained: a subscriber gets it at once.
    let args = gw.client(
        gw.service_plain,
        "keeper",
        &[
            "-u",
            "keeper",
            "-P",
            SECRET,
            "-t",
            "portcullis/events/audit",
            "-C",
            "1",
            "-W",
            "5",
        ],
    );
    let out = mosquitto("mosquitto_sub", &args, T);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let checkpoint: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    let seq = checkpoint["seq"].as_u64().expect("seq");
    let mac = checkpoint["mac"].as_str().expect("mac").to_string();
    assert_eq!(checkpoint["signature"].as_str().map(str::len), Some(64));
    // The log on disk contains exactly that line: verify against the checkpoint.
    let verified = gw.cli(&["audit", "verify", "--checkpoint", &format!("{seq}:{mac}")]);
    assert!(verified.status.success(), "{}", text(&verified));
    let wrong = gw.cli(&[
        "audit",
        "verify",
        "--checkpoint",
        &format!("{seq}:{}", "0".repeat(64)),
    ]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_pre_shared_key_is_printed_once_and_kept_only_encrypted_under_a_master_key_outside_the_data_dir()
 {
    use std::os::unix::fs::PermissionsExt;
    let mut gw = Gateway::start();
    let out = gw.cli_ok(&["device", "add", "coap-1", "--psk-generate"]);
    let psk = out
        .lines()
        .find_map(|l| l.strip_prefix("psk: "))
        .expect("psk printed")
        .to_string();
    assert_eq!(psk.len(), 32, "{out}");
    // Shown as set, never shown itself.
    let show = gw.cli_ok(&["device", "show", "coap-1"]);
    assert!(show.contains("\"psk\": true"), "{show}");
    assert!(!show.contains(&psk), "{show}");
    // Nowhere in the data dir in clear (the registry, its logs).
    for file in files_under(&gw.data()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(psk.len()).any(|w| w == psk.as_bytes()),
            "the key in clear in {}",
            file.display()
        );
    }
    // The master key sits beside the data dir, owner-only.
    let master = gw.dir.path().join("portcullis-master.key");
    let mode = std::fs::metadata(&master).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // From stdin, bounded; a device credential only; never on the command line.
    let short = gw.cli_stdin(&["device", "add", "coap-2", "--psk-stdin"], Some("short\n"));
    assert!(!short.status.success());
    assert!(text(&short).contains("16 to 64 bytes"), "{}", text(&short));
    gw.cli_stdin(
        &["device", "add", "coap-2", "--psk-stdin"],
        Some("a-long-enough-pre-shared-key\n"),
    );
    assert!(
        gw.cli_ok(&["device", "show", "coap-2"])
            .contains("\"psk\": true")
    );
    let service = gw.cli(&["service", "add", "svc-9", "--psk-generate"]);
    assert!(!service.status.success());
    assert!(
        text(&service).contains("device credential"),
        "{}",
        text(&service)
    );
    assert!(!text(&service).contains("psk: "), "{}", text(&service));
    // There is no flag for a key on the command line: clap refuses it before anything
    // runs, and the would-be key is written nowhere (registry, audit log, gateway log).
    let on_argv = "in-the-clear-on-argv";
    let argv = gw.cli(&["device", "add", "coap-3", "--psk", on_argv]);
    assert_eq!(argv.status.code(), Some(2), "{}", text(&argv));
    assert!(
        text(&argv).contains("unexpected argument '--psk'"),
        "{}",
        text(&argv)
    );
    for file in files_under(gw.dir.path()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes
                .windows(on_argv.len())
                .any(|w| w == on_argv.as_bytes()),
            "{on_argv} in {}",
            file.display()
        );
    }
    let show = gw.cli(&["device", "show", "coap-3"]);
    assert!(
        text(&show).contains("no such device: coap-3"),
        "{}",
        text(&show)
    );
    // Rotating the master key seals both keys again and drops the old key.
    let before = std::fs::read_to_string(&master).unwrap();
    let out = gw.cli_ok(&["master-key", "rotate"]);
    assert!(
        out.contains("2 record(s) sealed again, 1 old key(s) dropped"),
        "{out}"
    );
    let after = std::fs::read_to_string(&master).unwrap();
    let keys = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    assert_eq!(keys(&after).len(), 1);
    assert!(!keys(&before).contains(&keys(&after)[0]));
    gw.wait_audit(&["master_key", "rotated"]);
    assert!(gw.cli_ok(&["registry", "check"]).starts_with("ok"));
    // With the gateway stopped and the master key swapped, the check names the device
    // whose key no longer opens.
    gw.terminate();
    std::fs::write(&master, format!("{}\n", "ab".repeat(32))).unwrap();
    let check = gw.cli(&["registry", "check"]);
    assert!(!check.status.success());
    assert!(
        text(&check).contains("coap-1") && text(&check).contains("does not open"),
        "{}",
        text(&check)
    );
    // A master key file gone (moved, a restore that missed it) is not replaced by a new
    // key while the registry holds keys sealed under the old one: the command says so.
    std::fs::write(&master, &after).unwrap();
    std::fs::rename(&master, gw.dir.path().join("moved.key")).unwrap();
    let missing = gw.cli(&["device", "list"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(
        text(&missing).contains("portcullis-master.key")
            && text(&missing).contains("holds 2 sealed device keys")
            && text(&missing).contains("PORTCULLIS_MASTER_KEY"),
        "{}",
        text(&missing)
    );
    assert!(!master.exists(), "a new master key was created");
    std::fs::rename(gw.dir.path().join("moved.key"), &master).unwrap();
    assert!(gw.cli_ok(&["registry", "check"]).starts_with("ok"));
}

/// Whether `needle` is anywhere in a file under `dir`, by the file it is in.
fn file_holding(dir: &std::path::Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    files_under(dir).into_iter().find(|file| {
        let bytes = std::fs::read(file).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

#[test]
fn a_serial_key_is_printed_once_for_flashing_and_kept_only_sealed_beside_a_psk() {
    let mut gw = Gateway::start();
    let added = gw.cli(&[
        "device",
        "add",
        "pump-1",
        "--psk-generate",
        "--serial-key-generate",
    ]);
    assert!(added.status.success(), "{}", text(&added));
    let out = String::from_utf8_lossy(&added.stdout).into_owned();
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("serial key: "))
        .expect("serial key printed")
        .to_string();
    assert_eq!(key.len(), 64, "{out}");
    let raw = hex::decode(&key).expect("printed in hex");
    assert_eq!(out.matches(&key).count(), 1, "printed once: {out}");
    // What it is for, on stderr, without the key.
    let note = String::from_utf8_lossy(&added.stderr).into_owned();
    assert!(note.contains("flash the serial key"), "{note}");
    assert!(!note.contains(&key), "{note}");
    // Both credentials held; neither shown.
    assert!(out.lines().any(|l| l.starts_with("psk: ")), "{out}");
    for listing in [
        gw.cli_ok(&["device", "show", "pump-1"]),
        gw.cli_ok(&["device", "list"]),
    ] {
        assert!(listing.contains("\"serial_key\": true"), "{listing}");
        assert!(listing.contains("\"psk\": true"), "{listing}");
        assert!(!listing.contains(&key), "{listing}");
    }
    // Nowhere in clear, in hex or raw: not the registry, the audit log or the gateway's
    // log.
    for needle in [key.as_bytes(), &raw[..]] {
        assert_eq!(file_holding(gw.dir.path(), needle), None);
    }
    let registry = std::fs::read(gw.data().join("registry.redb")).unwrap();
    let record = String::from_utf8_lossy(&registry);
    assert!(record.contains("\"frame_key\""), "the key is kept, sealed");

    // From stdin: 64 hex digits. Anything else is refused, naming the flag and the
    // length, and nothing is added.
    let given = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let ok = gw.cli_stdin(
        &["device", "add", "pump-2", "--serial-key-stdin"],
        Some(&format!("{given}\n")),
    );
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(!text(&ok).contains(given), "{}", text(&ok));
    assert!(
        gw.cli_ok(&["device", "show", "pump-2"])
            .contains("\"serial_key\": true")
    );
    for wrong in [&given[..62], "short", &format!("{given}00")[..]] {
        let refused = gw.cli_stdin(
            &["device", "add", "pump-3", "--serial-key-stdin"],
            Some(&format!("{wrong}\n")),
        );
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
        let msg = text(&refused);
        assert!(
            msg.contains("--serial-key-stdin") && msg.contains("exactly 32 bytes: 64 hex digits"),
            "{msg}"
        );
        assert!(!msg.contains(wrong), "the key is not echoed: {msg}");
    }
    assert!(text(&gw.cli(&["device", "show", "pump-3"])).contains("no such device: pump-3"));
    // A device credential only: a service is refused, and no key is shown.
    let service = gw.cli(&["service", "add", "svc-9", "--serial-key-generate"]);
    assert!(!service.status.success());
    assert!(
        text(&service).contains("device credential"),
        "{}",
        text(&service)
    );
    assert!(
        !text(&service).contains("serial key: "),
        "{}",
        text(&service)
    );
    // The flags take no value: a key on the command line is refused before anything
    // runs, and written nowhere.
    let on_argv = "0123456789abcdef".repeat(4);
    for args in [
        ["device", "add", "pump-4", "--serial-key-stdin", &on_argv],
        ["device", "add", "pump-4", "--serial-key", &on_argv],
    ] {
        let argv = gw.cli(&args);
        assert_eq!(argv.status.code(), Some(2), "{}", text(&argv));
        assert!(
            text(&argv).contains("unexpected argument"),
            "{}",
            text(&argv)
        );
    }
    assert_eq!(file_holding(gw.dir.path(), on_argv.as_bytes()), None);
    // Rotated: a new key, printed once; the PSK stays.
    let rotated = gw.cli_ok(&["device", "rotate", "pump-1", "--serial-key-generate"]);
    let new_key = rotated
        .lines()
        .find_map(|l| l.strip_prefix("serial key: "))
        .expect("new serial key printed");
    assert_ne!(new_key, key);
    assert!(rotated.contains("\"psk\": true"), "{rotated}");
    // From an import file, and sealed again by a master key rotation like a PSK.
    let import = gw.dir.path().join("pumps.toml");
    std::fs::write(
        &import,
        format!(
            "[[principal]]\nid = \"pump-5\"\nserial_key = \"{}\"\n",
            "5a".repeat(32)
        ),
    )
    .unwrap();
    gw.cli_ok(&["device", "import", import.to_str().unwrap()]);
    assert!(
        gw.cli_ok(&["device", "show", "pump-5"])
            .contains("\"serial_key\": true")
    );
    let out = gw.cli_ok(&["master-key", "rotate"]);
    assert!(out.contains("3 record(s) sealed again"), "{out}");
    assert!(gw.cli_ok(&["registry", "check"]).starts_with("ok"));
    gw.terminate();
}
