//! Payload validation as a device sees it: rules per topic (JSON Schema, UTF-8) and
//! size limits, refused with MQTT 5 "payload format invalid" (3.1.1: acknowledged and
//! dropped), with an audit line that names the rule and what failed.

mod common;

use common::raw::{Raw, publish_v4_raw};
use common::*;
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
