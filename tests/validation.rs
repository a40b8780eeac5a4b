//! Payload validation as a device sees it: rules per topic (JSON Schema, UTF-8) and
//! size limits, refused with MQTT 5 "payload format invalid" (3.1.1: acknowledged and
//! dropped), with an audit line that names the rule and what failed. Content standard
//! consumers refuse (control characters, noncharacters, U+FEFF, a UTF-8 payload that is
//! not) never reaches them; commands for ids that are not registered devices are refused.

mod common;

use common::raw::{Raw, publish_v4_raw};
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["temperature"],
  "properties": {
    "temperature": { "type": "number", "minimum": -40, "maximum": 150 },
    "unit": { "enum": ["C", "F"] }
  },
  "additionalProperties": false
}"#;

fn gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("telemetry.schema.json");
    std::fs::write(&schema, SCHEMA).unwrap();
    // The schema file lives in its own dir, kept alive for the test's duration.
    let extra = format!(
        "[validation]\nmax_payload_bytes = 2048\n\n\
         [[validation.rules]]\ntopic = \"devices/{{id}}/telemetry\"\nformat = \"json-schema\"\n\
         schema = \"{}\"\nmax_bytes = 512\n\n\
         [[validation.rules]]\ntopic = \"devices/+/logs/#\"\nformat = \"utf8\"\n",
        schema.display()
    );
    std::mem::forget(dir);
    let gw = Gateway::start_with(&extra);
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    gw
}

fn publish(gw: &Gateway, topic: &str, payload: &str, version: &str) -> String {
    let a = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", topic, "-m", payload, "-q", "1", "-d", "-V", version],
    );
    text(&mosquitto("mosquitto_pub", &a, T))
}

/// What `valve-1` receives on its commands within two seconds of subscribing.
fn valve_commands_for_two_seconds(gw: &Gateway) -> String {
    let a = gw.client(
        gw.device_plain,
        "valve-1",
        &[
            "-u",
            "valve-1",
            "-P",
            SECRET,
            "-t",
            "devices/valve-1/commands/#",
            "-v",
            "-W",
            "2",
        ],
    );
    text(&mosquitto("mosquitto_sub", &a, T))
}

#[test]
fn schema_breaking_telemetry_is_refused_with_its_reason() {
    let gw = gateway();
    let a = gw.client(
        gw.service_tls,
        "analytics",
        &["-t", "devices/+/telemetry/#", "-v"],
    );
    let sub = Sub::start(&a);
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));

    let ok = publish(
        &gw,
        "devices/sensor-1/telemetry",
        r#"{"temperature": 21.5, "unit": "C"}"#,
        "mqttv5",
    );
    assert!(ok.contains("received PUBACK (Mid: 1, RC:0)"), "{ok}");
    let bad = publish(
        &gw,
        "devices/sensor-1/telemetry",
        r#"{"temperature": 912}"#,
        "mqttv5",
    );
    assert!(bad.contains("RC:153"), "payload format invalid: {bad}");
    let line = gw.wait_audit(&["\"publish\"", "\"refuse\"", "temperature: 912"]);
    assert!(line.contains("rule 1"), "the audit names the rule: {line}");
    // 3.1.1: acknowledged, so the client does not stall, and dropped.
    let bad311 = publish(
        &gw,
        "devices/sensor-1/telemetry",
        r#"{"unit": "K"}"#,
        "mqttv311",
    );
    assert!(bad311.contains("received PUBACK"), "{bad311}");
    let seen = sub.drain(Duration::from_millis(700));
    assert!(seen.iter().any(|l| l.contains("21.5")), "{seen:?}");
    assert!(
        seen.iter()
            .all(|l| !l.contains("912") && !l.contains("\"K\"")),
        "{seen:?}"
    );
    assert_eq!(gw.refusals("validate", "schema"), 2);
}

#[test]
fn size_limits_apply_per_rule_and_globally() {
    let gw = gateway();
    let big_json = format!(
        r#"{{"temperature": 1, "unit": "C", "pad": "{}"}}"#,
        "x".repeat(600)
    );
    let out = publish(&gw, "devices/sensor-1/telemetry", &big_json, "mqttv5");
    assert!(out.contains("RC:153"), "{out}");
    let huge = "y".repeat(3000);
    let out = publish(&gw, "devices/sensor-1/status", &huge, "mqttv5");
    assert!(out.contains("RC:153"), "{out}");
    assert_eq!(gw.refusals("validate", "too_large"), 2);
    gw.wait_audit(&["\"refuse\"", "size limit (global)", "3000 bytes"]);
}

#[test]
fn a_utf8_rule_refuses_binary_payloads() {
    let gw = gateway();
    gw.add_device_secret("meter-1", "0123456789abcdef0123456789abcdef");
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4(
            "meter-1",
            Some(("meter-1", "0123456789abcdef0123456789abcdef"))
        ),
        Some(0)
    );
    raw.send(&publish_v4_raw(
        b"devices/meter-1/logs/boot",
        &[0x6f, 0x6b, 0xff],
        1,
        3,
    ));
    // Acknowledged (3.1.1), dropped, counted and audited.
    assert!(raw.recv_v4(T).is_some());
    assert_eq!(gw.refusals("validate", "not_utf8"), 1);
    gw.wait_audit(&["\"refuse\"", "not valid UTF-8"]);
}

#[test]
fn config_check_refuses_a_broken_schema_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("broken.json");
    std::fs::write(&schema, "{ not json").unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[validation.rules]]\ntopic = \"devices/+/telemetry\"\nformat = \"json-schema\"\nschema = \"{}\"\n",
            schema.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("broken.json"), "{}", text(&out));
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// An MQTT 5 client on a plain listener, logged in with `SECRET`.
struct Client {
    raw: Raw,
    pkid: u16,
}

impl Client {
    fn connect(addr: std::net::SocketAddr, id: &str) -> Client {
        let mut raw = Raw::connect(addr);
        assert_eq!(
            raw.connect_v5(id, Some((id, SECRET))),
            Some(v5::ConnectReturnCode::Success),
            "{id} connects"
        );
        Client { raw, pkid: 0 }
    }

    /// A QoS 1 PUBLISH; the PUBACK's reason.
    fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        props: Option<v5::PublishProperties>,
    ) -> v5::PubAckReason {
        self.pkid = self.pkid % 60_000 + 1;
        let mut p = v5::Publish::new(topic, Q5::AtLeastOnce, payload.to_vec(), props);
        p.pkid = self.pkid;
        p.retain = retain;
        self.raw.send_v5(v5::Packet::Publish(p));
        loop {
            match self.raw.recv_v5(T) {
                Some(v5::Packet::PubAck(a)) if a.pkid == self.pkid => return a.reason,
                Some(_) => {}
                None => panic!("no PUBACK for {topic:?}"),
            }
        }
    }
}

fn props(f: impl FnOnce(&mut v5::PublishProperties)) -> Option<v5::PublishProperties> {
    let mut p = v5::PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    };
    f(&mut p);
    Some(p)
}

/// A paho-mqtt consumer (tests/peers/paho_consumer.py) on the service TLS listener.
/// The interpreter is `$PORTCULLIS_PYTHON`, else `python3`; without paho-mqtt the test
/// fails (it never sees SUBSCRIBED).
fn paho_consumer(gw: &Gateway, id: &str, filter: &str) -> Sub {
    let python = std::env::var("PORTCULLIS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/peers/paho_consumer.py"
    );
    let pki = gw.data().join("pki/clients");
    let mut cmd = Command::new(&python);
    cmd.arg("-u")
        .arg(script)
        .arg("127.0.0.1")
        .arg(gw.service_tls.port().to_string())
        .arg(gw.ca())
        .arg(pki.join(format!("{id}.pem")))
        .arg(pki.join(format!("{id}.key")))
        .arg(id)
        .arg(filter);
    let sub = Sub::spawn(cmd, &format!("{python} (set PORTCULLIS_PYTHON)"));
    if let Err(seen) = sub.expect("SUBSCRIBED", T) {
        panic!("the paho-mqtt consumer did not subscribe (pip install paho-mqtt): {seen:?}");
    }
    sub
}

#[test]
fn poison_topics_and_properties_are_refused_consumers_stay_connected_and_the_device_is_quarantined()
{
    let gw = Gateway::start();
    gw.add_device_secret("poisoner", SECRET);
    gw.add_device_secret("good", SECRET);
    gw.add_service_cert("analytics");
    gw.add_service_cert("watcher");
    let mosq = Sub::start(&gw.client(
        gw.service_tls,
        "analytics",
        &[
            "-t",
            "devices/+/telemetry/#",
            "-v",
            "-V",
            "mqttv5",
            "-q",
            "1",
        ],
    ));
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    let mut paho = paho_consumer(&gw, "watcher", "devices/+/telemetry/#");
    std::thread::sleep(Duration::from_millis(300));

    let mut good = Client::connect(gw.device_plain, "good");
    let mut bad = Client::connect(gw.device_plain, "poisoner");
    let t = "devices/poisoner/telemetry";
    use v5::PubAckReason::{PayloadFormatInvalid as Format, TopicNameInvalid as Topic};
    let poisons: Vec<(
        String,
        Vec<u8>,
        Option<v5::PublishProperties>,
        v5::PubAckReason,
    )> = vec![
        (format!("{t}/\u{1}"), b"poison".to_vec(), None, Topic),
        (format!("{t}/x\u{FFFF}"), b"poison".to_vec(), None, Topic),
        (
            t.into(),
            b"poison".to_vec(),
            props(|p| p.user_properties = vec![("note".into(), "\u{FEFF}hi".into())]),
            Format,
        ),
        (
            t.into(),
            b"poison".to_vec(),
            props(|p| p.user_properties = vec![("k\u{7}".into(), "v".into())]),
            Format,
        ),
        (
            t.into(),
            b"poison".to_vec(),
            props(|p| p.content_type = Some("text/\u{85}plain".into())),
            Format,
        ),
        (
            t.into(),
            b"poison".to_vec(),
            props(|p| p.response_topic = Some(format!("{t}/\u{FDD0}"))),
            Format,
        ),
        (
            t.into(),
            b"poison \xff".to_vec(),
            props(|p| p.payload_format_indicator = Some(1)),
            Format,
        ),
    ];
    // 4 rounds of 7: past the default 20 validation failures per window.
    for round in 0..4 {
        let payload = format!("good-{round}");
        assert_eq!(
            good.publish("devices/good/telemetry", payload.as_bytes(), false, None),
            v5::PubAckReason::Success
        );
        for (topic, payload, props, want) in &poisons {
            let got = bad.publish(topic, payload, false, props.clone());
            assert_eq!(got, *want, "round {round}: {topic:?} {props:?}");
        }
    }
    let state = wait_for(T, || {
        let shown = gw.cli_ok(&["quarantine", "show", "poisoner"]);
        shown.contains("quarantined").then_some(shown)
    });
    assert!(state.is_some(), "the poisoning device is quarantined");
    assert_eq!(
        good.publish("devices/good/telemetry", b"good-last", false, None),
        v5::PubAckReason::Success
    );

    let wanted = ["good-0", "good-1", "good-2", "good-3", "good-last"];
    for (name, sub) in [("mosquitto_sub", &mosq), ("paho-mqtt", &paho)] {
        let mut seen = Vec::new();
        for w in wanted {
            match sub.expect(w, T) {
                Ok(line) => seen.push(line),
                Err(rest) => panic!("{name} did not receive {w}; it saw {seen:?} then {rest:?}"),
            }
        }
        let rest = sub.drain(Duration::from_millis(500));
        seen.extend(rest);
        assert!(
            seen.iter()
                .all(|l| !l.contains("poison") && !l.contains("DISCONNECTED")),
            "{name}: {seen:?}"
        );
    }
    assert!(!mosq_exited(mosq), "mosquitto_sub stayed connected");
    assert!(!paho.exited(), "the paho-mqtt consumer stayed connected");
    assert_eq!(gw.refusals("validate", "topic_forbidden_character"), 8);
    assert_eq!(gw.refusals("validate", "property_forbidden_character"), 16);
    assert_eq!(gw.refusals("validate", "payload_not_utf8"), 4);
    gw.wait_audit(&["\"refuse\"", "\"poisoner\"", "U+FEFF"]);
}

fn mosq_exited(mut sub: Sub) -> bool {
    sub.exited()
}

#[test]
fn a_service_cannot_send_a_poison_command_either() {
    let gw = Gateway::start_with(SECRET_SERVICES);
    gw.add_device_secret("valve-1", SECRET);
    add_secret_service(&gw, "ops");
    let mut ops = Client::connect(gw.service_plain, "ops");
    assert_eq!(
        ops.publish("devices/valve-1/commands/\u{FEFF}open", b"1", false, None),
        v5::PubAckReason::TopicNameInvalid
    );
    let bom = props(|p| p.user_properties = vec![("by".into(), "\u{FEFF}ops".into())]);
    assert_eq!(
        ops.publish("devices/valve-1/commands/open", b"1", false, bom),
        v5::PubAckReason::PayloadFormatInvalid
    );
    assert_eq!(gw.refusals("validate", "topic_forbidden_character"), 1);
    assert_eq!(gw.refusals("validate", "property_forbidden_character"), 1);
}

/// A service group whose members log in with a secret on the plain listener.
const SECRET_SERVICES: &str = r#"
[service_groups.cluster]
trust = []
publish = ["devices/+/commands/#"]
subscribe = ["devices/+/telemetry/#"]
"#;

fn add_secret_service(gw: &Gateway, id: &str) {
    let out = gw.cli_stdin(
        &["service", "add", id, "--group", "cluster", "--secret-stdin"],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn retained_commands_for_unregistered_ids_are_all_refused() {
    let gw = Gateway::start_with(SECRET_SERVICES);
    add_secret_service(&gw, "ops");
    let mut ops = Client::connect(gw.service_plain, "ops");
    let payload = vec![b'x'; 2048];
    for n in 0..300 {
        let topic = format!("devices/ghost-{n}/commands/r0");
        assert_eq!(
            ops.publish(&topic, &payload, true, None),
            v5::PubAckReason::TopicNameInvalid,
            "{topic}"
        );
    }
    // Live ones too: nobody is there to receive them.
    assert_eq!(
        ops.publish("devices/ghost-1/commands/r0", b"x", false, None),
        v5::PubAckReason::TopicNameInvalid
    );
    assert_eq!(gw.refusals("authorize", "unknown_device"), 301);
    gw.wait_audit(&[
        "\"refuse\"",
        "devices/ghost-299/commands/r0",
        "not a registered device",
    ]);
}

#[test]
fn retained_commands_over_the_per_device_byte_cap_are_refused_and_the_rest_kept() {
    let gw = Gateway::start_with(&format!(
        "{SECRET_SERVICES}\n[sessions]\nmax_retained_command_bytes_per_device = 4096\n"
    ));
    gw.add_device_secret("valve-1", SECRET);
    add_secret_service(&gw, "ops");
    let mut ops = Client::connect(gw.service_plain, "ops");
    let payload = vec![b'a'; 3000];
    assert_eq!(
        ops.publish("devices/valve-1/commands/a", &payload, true, None),
        v5::PubAckReason::Success
    );
    assert_eq!(
        ops.publish("devices/valve-1/commands/b", &payload, true, None),
        v5::PubAckReason::QuotaExceeded,
        "the second 3000 bytes are over the 4096 of this device"
    );
    assert_eq!(gw.refusals("limits", "retained_device_bytes"), 1);
    gw.wait_audit(&["\"refuse\"", "max_retained_command_bytes_per_device"]);
    // Replacing the kept one is fine; the device gets only what was kept.
    assert_eq!(
        ops.publish("devices/valve-1/commands/a", b"kept", true, None),
        v5::PubAckReason::Success
    );
    let out = valve_commands_for_two_seconds(&gw);
    assert!(out.contains("devices/valve-1/commands/a kept"), "{out}");
    assert!(!out.contains("commands/b"), "{out}");
}

#[test]
fn a_removed_device_loses_its_retained_commands_and_gets_no_new_ones() {
    let gw = Gateway::start_with(SECRET_SERVICES);
    gw.add_device_secret("valve-1", SECRET);
    add_secret_service(&gw, "ops");
    let mut ops = Client::connect(gw.service_plain, "ops");
    assert_eq!(
        ops.publish("devices/valve-1/commands/mode", b"eco", true, None),
        v5::PubAckReason::Success
    );
    gw.cli_ok(&["device", "remove", "valve-1"]);
    assert_eq!(
        ops.publish("devices/valve-1/commands/mode", b"boost", true, None),
        v5::PubAckReason::TopicNameInvalid,
        "a removed device is not registered"
    );
    // Registered again, it starts with no desired state.
    gw.add_device_secret("valve-1", SECRET);
    let out = valve_commands_for_two_seconds(&gw);
    assert!(!out.contains("commands/mode"), "{out}");
}
