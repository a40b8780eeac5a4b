//! Everything the front door refuses: each with the protocol's answer, an audit line
//! and a counter, and no way to tell an unknown id from a wrong credential.

mod common;

use common::raw::{Raw, publish_v4_raw};
use common::*;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn plain_pub(gw: &Gateway, id: &str, user: &str, pass: &str, version: &str) -> String {
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_plain,
            id,
            &[
                "-V",
                version,
                "-u",
                user,
                "-P",
                pass,
                "-t",
                &format!("devices/{id}/telemetry"),
                "-m",
                "x",
            ],
        ),
        T,
    );
    assert!(!out.status.success());
    text(&out)
}

#[test]
fn unknown_device_and_wrong_secret_get_the_same_answer() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    for version in ["mqttv311", "mqttv5"] {
        let unknown = plain_pub(&gw, "ghost", "ghost", SECRET, version);
        let wrong = plain_pub(
            &gw,
            "meter-1",
            "meter-1",
            "wrong-secret-wrong-secret",
            version,
        );
        assert!(unknown.to_lowercase().contains("not authori"), "{unknown}");
        assert_eq!(unknown, wrong, "the answers must not differ");
    }
    // The third failure for meter-1 from this source backs the pair off
    // (max_failures = 3), and even the back-off's answer is the same.
    let third = plain_pub(&gw, "meter-1", "meter-1", "wrong-secret-3", "mqttv5");
    let backed_off = plain_pub(&gw, "meter-1", "meter-1", SECRET, "mqttv5");
    assert_eq!(third, backed_off, "the answers must not differ");
    gw.wait_audit(&["\"refuse\"", "\"ghost\"", "unknown_principal"]);
    gw.wait_audit(&["\"refuse\"", "\"meter-1\"", "bad_secret"]);
    gw.wait_audit(&["\"refuse\"", "\"meter-1\"", "backed_off"]);
    assert_eq!(gw.refusals("connect", "unknown_principal"), 2);
    assert_eq!(gw.refusals("connect", "bad_secret"), 3);
    assert_eq!(gw.refusals("connect", "backed_off"), 1);
    assert!(!gw.audit().contains("wrong-secret"));
}

fn tls_pub(
    gw: &Gateway,
    client_id: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let topic = format!("devices/{client_id}/telemetry");
    let args = gw.client_cert(
        gw.device_tls,
        client_id,
        cert,
        key,
        &[&["-t", topic.as_str(), "-m", "x"], extra].concat(),
    );
    mosquitto("mosquitto_pub", &args, T)
}

#[test]
fn certificate_from_a_ca_the_group_does_not_trust_is_refused() {
    let gw = Gateway::start();
    // sensor-x holds a certificate from the "other" CA but is in group "default".
    let (cert, key) = gw.issue_other("sensor-x");
    gw.cli_ok(&["device", "add", "sensor-x", "--cert-any"]);
    let out = tls_pub(&gw, "sensor-x", &cert, &key, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("not authori"),
        "{}",
        text(&out)
    );
    gw.wait_audit(&["\"refuse\"", "\"sensor-x\"", "certificate_untrusted"]);
    assert_eq!(gw.refusals("connect", "certificate_untrusted"), 1);
    // The same kind of certificate is fine for a device of the group that trusts it.
    let (cert, key) = gw.issue_other("sensor-y");
    gw.cli_ok(&[
        "device",
        "add",
        "sensor-y",
        "--group",
        "other",
        "--cert-any",
    ]);
    let out = tls_pub(&gw, "sensor-y", &cert, &key, &[]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn certificate_identity_must_equal_the_client_id() {
    let gw = Gateway::start();
    let (cert, key) = gw.add_device_cert("sensor-1");
    gw.add_device_cert("sensor-2");
    let out = tls_pub(&gw, "sensor-2", &cert, &key, &["-V", "mqttv5"]);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("not authori"),
        "{}",
        text(&out)
    );
    gw.wait_audit(&[
        "\"refuse\"",
        "\"sensor-2\"",
        "certificate_identity_mismatch",
    ]);
    assert_eq!(gw.refusals("connect", "certificate_identity_mismatch"), 1);
}

#[test]
fn pinned_certificate_refuses_another_one_with_the_same_identity() {
    let gw = Gateway::start();
    let (cert, key) = gw.issue("sensor-1");
    gw.cli_ok(&[
        "device",
        "add",
        "sensor-1",
        "--cert",
        cert.to_str().unwrap(),
    ]);
    assert!(tls_pub(&gw, "sensor-1", &cert, &key, &[]).status.success());
    // A second certificate for the same name from the same CA is not the pinned one.
    let out = gw.cli_ok(&["pki", "issue", "sensor-1", "--force"]);
    assert!(out.contains("sha256"));
    let out = tls_pub(&gw, "sensor-1", &cert, &key, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    gw.wait_audit(&["\"refuse\"", "\"sensor-1\"", "certificate_not_registered"]);
}

#[test]
fn client_id_must_equal_the_username() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let answer = plain_pub(&gw, "meter-1", "someone-else", SECRET, "mqttv311");
    assert!(answer.contains("not authori"), "{answer}");
    gw.wait_audit(&["\"refuse\"", "\"meter-1\"", "username_mismatch"]);
    assert_eq!(gw.refusals("connect", "username_mismatch"), 1);
}

#[test]
fn device_cannot_publish_to_another_device_or_its_own_commands() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    let sub = Sub::start(&gw.client(
        gw.service_tls,
        "analytics",
        &["-t", "devices/+/telemetry/#", "-v"],
    ));
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));
    let publish = |topic: &str, version: &str| {
        let a = gw.client(
            gw.device_tls,
            "sensor-1",
            &["-t", topic, "-m", "forged", "-q", "1", "-d", "-V", version],
        );
        text(&mosquitto("mosquitto_pub", &a, T))
    };
    // MQTT 5 says why: PUBACK reason 0x87 (135) not authorized.
    let out = publish("devices/sensor-2/telemetry", "mqttv5");
    assert!(out.contains("received PUBACK (Mid: 1, RC:135)"), "{out}");
    let out = publish("devices/sensor-1/commands/reboot", "mqttv5");
    assert!(out.contains("received PUBACK (Mid: 1, RC:135)"), "{out}");
    // MQTT 3.1.1 cannot: the publish is acknowledged so the client does not stall, and dropped.
    let out = publish("devices/sensor-2/telemetry", "mqttv311");
    assert!(out.contains("received PUBACK"), "{out}");
    let seen = sub.drain(Duration::from_millis(700));
    assert!(seen.iter().all(|l| !l.contains("forged")), "{seen:?}");
    gw.wait_audit(&[
        "\"publish\"",
        "\"refuse\"",
        "devices/sensor-2/telemetry",
        "not allowed",
    ]);
    gw.wait_audit(&[
        "\"publish\"",
        "\"refuse\"",
        "devices/sensor-1/commands/reboot",
    ]);
    assert_eq!(gw.refusals("authorize", "topic_not_allowed"), 3);
}

#[test]
fn refusal_can_disconnect_a_mqtt311_device_by_policy() {
    let gw = Gateway::start_with("[device_groups.strict]\ndisconnect_on_refusal = true\n");
    let out = gw.cli_stdin(
        &[
            "device",
            "add",
            "meter-9",
            "--group",
            "strict",
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4("meter-9", Some(("meter-9", SECRET))),
        Some(0)
    );
    raw.send(&publish_v4_raw(b"devices/meter-1/telemetry", b"x", 1, 7));
    let (closed, _) = raw.closed_within(T);
    assert!(
        closed,
        "a refused publish must end the session under this policy"
    );
}

#[test]
fn device_cannot_subscribe_outside_its_commands() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    for (version, code) in [("mqttv311", "128"), ("mqttv5", "135")] {
        let a = gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                "-t",
                "devices/sensor-2/commands/#",
                "-d",
                "-V",
                version,
                "-W",
                "3",
            ],
        );
        let out = text(&mosquitto("mosquitto_sub", &a, T));
        assert!(
            out.contains(&format!("Subscribed (mid: 1): {code}")),
            "{out}"
        );
    }
    gw.wait_audit(&["\"subscribe\"", "\"refuse\"", "devices/sensor-2/commands/#"]);
    assert_eq!(gw.refusals("authorize", "filter_not_allowed"), 2);
}

#[test]
fn service_outside_its_group_acl_is_refused() {
    let gw = Gateway::start();
    gw.add_service_cert("analytics");
    let a = gw.client(
        gw.service_tls,
        "analytics",
        &[
            "-t",
            "devices/sensor-1/telemetry",
            "-m",
            "spoof",
            "-q",
            "1",
            "-d",
            "-V",
            "mqttv5",
        ],
    );
    let out = text(&mosquitto("mosquitto_pub", &a, T));
    assert!(out.contains("RC:135"), "{out}");
    let a = gw.client(
        gw.service_tls,
        "analytics",
        &["-t", "#", "-d", "-V", "mqttv5", "-W", "3"],
    );
    let out = text(&mosquitto("mosquitto_sub", &a, T));
    assert!(out.contains("Subscribed (mid: 1): 135"), "{out}");
    // Nobody but the gateway publishes gateway events.
    let a = gw.client(
        gw.service_tls,
        "analytics",
        &[
            "-t",
            "portcullis/events/quarantine/x",
            "-m",
            "fake",
            "-q",
            "1",
            "-d",
            "-V",
            "mqttv5",
        ],
    );
    assert!(text(&mosquitto("mosquitto_pub", &a, T)).contains("RC:135"));
    gw.wait_audit(&[
        "\"publish\"",
        "\"refuse\"",
        "\"analytics\"",
        "devices/sensor-1/telemetry",
    ]);
}

/// Connect a secret-authenticated device over the plain listener, MQTT 5.
fn v5_session(gw: &Gateway) -> Raw {
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v5("meter-1", Some(("meter-1", SECRET))),
        Some(v5::ConnectReturnCode::Success)
    );
    raw
}

#[test]
fn publish_topic_with_wildcard_empty_level_or_nul_is_a_protocol_error() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    for topic in [
        &b"devices/meter-1/+"[..],
        b"devices/meter-1/#",
        b"devices//meter-1",
        b"devices/meter-1/a\0b",
    ] {
        // MQTT 3.1.1: the connection is closed.
        let mut raw = Raw::connect(gw.device_plain);
        assert_eq!(
            raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
            Some(0)
        );
        raw.send(&publish_v4_raw(topic, b"x", 1, 1));
        let (closed, bytes) = raw.closed_within(T);
        assert!(closed, "{topic:?}");
        assert!(bytes.is_empty(), "no PUBACK for {topic:?}: {bytes:?}");
        // MQTT 5: DISCONNECT with a reason, then closed.
        let mut raw = v5_session(&gw);
        let mut frame = publish_v4_raw(topic, b"x", 1, 1);
        // Same frame plus an empty MQTT 5 property section after the packet id.
        let header_len = 2;
        let pos = header_len + 2 + topic.len() + 2;
        frame.insert(pos, 0);
        frame[1] += 1;
        raw.send(&frame);
        match raw.recv_v5(T) {
            Some(v5::Packet::Disconnect(d)) => assert!(
                matches!(
                    d.reason_code,
                    v5::DisconnectReasonCode::TopicNameInvalid
                        | v5::DisconnectReasonCode::MalformedPacket
                        | v5::DisconnectReasonCode::ProtocolError
                ),
                "{topic:?}: {d:?}"
            ),
            other => panic!("{topic:?}: expected DISCONNECT, got {other:?}"),
        }
        assert!(raw.closed_within(T).0);
    }
    let refused =
        gw.refusals("decode", "topic_invalid") + gw.refusals("decode", "malformed_packet");
    assert_eq!(refused, 8);
    gw.wait_audit(&["\"refuse\"", "\"meter-1\"", "empty level"]);
}

#[test]
fn connect_never_sent_is_closed_at_the_deadline() {
    let gw = Gateway::start();
    let mut raw = Raw::connect(gw.device_plain);
    let (closed, bytes) = raw.closed_within(T);
    assert!(closed && bytes.is_empty());
    gw.wait_audit(&["\"connect\"", "\"refuse\"", "connect_timeout"]);
    assert_eq!(gw.refusals("connect", "connect_timeout"), 1);
}

#[test]
fn stalled_tls_handshake_does_not_delay_other_peers() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    // Peers that open the TLS port and then say nothing, or half a ClientHello.
    let mut stalled: Vec<Raw> = (0..20).map(|_| Raw::connect(gw.device_tls)).collect();
    for raw in stalled.iter_mut().step_by(2) {
        raw.send(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01]);
    }
    let a = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/telemetry", "-m", "x", "-q", "1"],
    );
    let out = mosquitto("mosquitto_pub", &a, T);
    assert!(out.status.success(), "{}", text(&out));
    // The stalled peers were still waiting while the real client got through...
    assert_eq!(gw.metric("portcullis_tls_handshake_failures_total "), 0);
    // ...and are cut off at the handshake deadline.
    for raw in stalled.iter_mut() {
        assert!(raw.closed_within(T).0);
    }
    let failures = wait_for(T, || {
        let n = gw.metric("portcullis_tls_handshake_failures_total ");
        (n == 20).then_some(n)
    });
    assert_eq!(failures, Some(20));
    gw.wait_audit(&["\"handshake\"", "\"refuse\"", "not finished in time"]);
}

fn connect_frame_v4(level: u8, flags: u8, client_id: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 30];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn malformed_connect_is_refused_and_closed() {
    let gw = Gateway::start();
    // Bad protocol level: the 3.1.1 answer "unacceptable protocol version", then close.
    let mut raw = Raw::connect(gw.device_plain);
    raw.send(&connect_frame_v4(3, 0x02, b"meter-1"));
    let (closed, bytes) = raw.closed_within(T);
    assert!(closed);
    assert_eq!(bytes, vec![0x20, 0x02, 0x00, 0x01]);
    // Reserved connect flag set.
    let mut raw = Raw::connect(gw.device_plain);
    raw.send(&connect_frame_v4(4, 0x03, b"meter-1"));
    assert_eq!(raw.closed_within(T), (true, vec![]));
    // Invalid UTF-8 in the client id.
    let mut raw = Raw::connect(gw.device_plain);
    raw.send(&connect_frame_v4(4, 0x02, &[0x6d, 0xff, 0xfe]));
    assert_eq!(raw.closed_within(T), (true, vec![]));
    // MQTT 5 CONNECT with the session expiry property twice.
    let mut raw = Raw::connect(gw.device_plain);
    let props = [0x11, 0, 0, 0, 10, 0x11, 0, 0, 0, 20];
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        5,
        0x02,
        0,
        30,
        props.len() as u8,
    ];
    body.extend_from_slice(&props);
    body.extend_from_slice(&[0, 7]);
    body.extend_from_slice(b"meter-1");
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend_from_slice(&body);
    raw.send(&frame);
    assert!(raw.closed_within(T).0);
    gw.wait_audit(&["\"connect\"", "\"refuse\"", "duplicate"]);
    gw.wait_audit(&["\"connect\"", "\"refuse\"", "UTF-8"]);
    assert_eq!(gw.refusals("connect", "malformed_connect"), 4);
}

#[test]
fn malformed_packets_after_connect_end_the_session() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    // SUBSCRIBE with reserved flags 0 instead of 2: MQTT 5 gets DISCONNECT 0x81.
    let mut raw = v5_session(&gw);
    raw.send(&[0x80, 0x08, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x00, 0x00]);
    match raw.recv_v5(T) {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::MalformedPacket)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(raw.closed_within(T).0);
    // MQTT 3.1.1: subscribe filter with invalid UTF-8: closed without an answer.
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
    raw.send(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 0xff, 0x00]);
    assert_eq!(raw.closed_within(T), (true, vec![]));
    // A second CONNECT is a protocol error.
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
    raw.send_v4(v4::Packet::Connect(v4::Connect::new("meter-1")));
    assert!(raw.closed_within(T).0);
    assert_eq!(gw.refusals("decode", "malformed_packet"), 3);
    gw.wait_audit(&["\"packet\"", "\"refuse\"", "\"meter-1\"", "reserved flags"]);
}

#[test]
fn enhanced_authentication_is_refused_with_its_reason() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = Raw::connect(gw.device_plain);
    let mut props = v5::ConnectProperties::new();
    props.authentication_method = Some("SCRAM-SHA-256".into());
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "meter-1".into(),
        clean_start: true,
        properties: Some(props),
    };
    raw.send_v5(v5::Packet::Connect(connect, None, None));
    match raw.recv_v5(T) {
        Some(v5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, v5::ConnectReturnCode::BadAuthenticationMethod)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(raw.closed_within(T).0);
    assert_eq!(gw.refusals("connect", "auth_method_unsupported"), 1);
}

#[test]
fn connections_over_the_per_source_cap_are_refused() {
    let gw = Gateway::start_full("", "max_connections_per_source = 2");
    let _held: Vec<Raw> = (0..2).map(|_| Raw::connect(gw.device_plain)).collect();
    // The accept loop takes connections in arrival order: the third is over the cap.
    let mut third = Raw::connect(gw.device_plain);
    let (closed, bytes) = third.closed_within(T);
    assert!(closed && bytes.is_empty());
    assert_eq!(gw.refusals("connect", "connection_limit"), 1);
    gw.wait_audit(&["\"connect\"", "\"refuse\"", "connection_limit"]);
}

fn connect_from(
    gw: &Gateway,
    source: &str,
    id: &str,
    secret: &str,
) -> Option<v5::ConnectReturnCode> {
    let mut raw = Raw::connect_from(gw.device_plain, source.parse().unwrap());
    raw.connect_v5(id, Some((id, secret)))
}

#[test]
fn wrong_secrets_for_one_device_do_not_lock_out_another_behind_the_same_address() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-a", SECRET);
    gw.add_device_secret("meter-b", SECRET);
    for _ in 0..10 {
        assert_eq!(
            connect_from(&gw, "127.0.0.5", "meter-a", "not-the-secret-at-all"),
            Some(v5::ConnectReturnCode::NotAuthorized)
        );
    }
    // Behind the same NAT address, another device logs in...
    assert_eq!(
        connect_from(&gw, "127.0.0.5", "meter-b", SECRET),
        Some(v5::ConnectReturnCode::Success)
    );
    // ...while the guessed id stays backed off from there, even with its secret.
    assert_eq!(
        connect_from(&gw, "127.0.0.5", "meter-a", SECRET),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(
        connect_from(&gw, "127.0.0.6", "meter-a", SECRET),
        Some(v5::ConnectReturnCode::Success)
    );
}

#[test]
fn spraying_unknown_ids_from_one_source_backs_the_source_off() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    for n in 0..50 {
        assert_eq!(
            connect_from(&gw, "127.0.0.7", &format!("ghost-{n}"), SECRET),
            Some(v5::ConnectReturnCode::NotAuthorized)
        );
    }
    // The source as a whole is now refused before any credential is checked.
    assert_eq!(
        connect_from(&gw, "127.0.0.7", "meter-1", SECRET),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    gw.wait_audit(&["\"refuse\"", "127.0.0.7", "\"meter-1\"", "backed_off"]);
    assert!(gw.refusals("connect", "backed_off") >= 1);
    assert!(gw.refusals("connect", "unknown_principal") < 50);
    assert_eq!(
        connect_from(&gw, "127.0.0.8", "meter-1", SECRET),
        Some(v5::ConnectReturnCode::Success)
    );
}

#[test]
fn a_guesser_is_still_backed_off_after_waiting_out_the_cap() {
    let gw = Gateway::start_with(
        "[auth]\nmax_failures = 3\nbackoff_initial_secs = 4\nbackoff_max_secs = 4\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    for _ in 0..3 {
        connect_from(&gw, "127.0.0.9", "meter-1", "not-the-secret-at-all");
    }
    assert_eq!(
        connect_from(&gw, "127.0.0.9", "meter-1", SECRET),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    // Each back-off lasts the cap, 4 s: the attempts that must meet it have that long
    // to arrive, even on a loaded machine.
    std::thread::sleep(Duration::from_millis(4200));
    // The cap is over: one guess is let through and checked...
    assert_eq!(
        connect_from(&gw, "127.0.0.9", "meter-1", "still-not-the-secret"),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    // ...and backs the pair off again at once, rather than starting a fresh count.
    assert_eq!(
        connect_from(&gw, "127.0.0.9", "meter-1", SECRET),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    // Counted just after the CONNACK is written.
    wait_for(T, || {
        (gw.refusals("connect", "backed_off") == 2).then_some(())
    })
    .expect("both right-secret attempts refused by the back-off");
    assert_eq!(gw.refusals("connect", "bad_secret"), 4);
}
