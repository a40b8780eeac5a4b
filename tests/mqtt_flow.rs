//! Telemetry up and commands down, end to end, with real mosquitto clients over
//! mutual TLS (MQTT 3.1.1 and 5, QoS 0 and 1).

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn sub_args(
    gw: &Gateway,
    name: &str,
    listener: SocketAddr,
    topic: &str,
    extra: &[&str],
) -> Vec<String> {
    gw.client(listener, name, &[&["-t", topic, "-v"], extra].concat())
}

fn pub_args(
    gw: &Gateway,
    name: &str,
    listener: SocketAddr,
    topic: &str,
    msg: &str,
    extra: &[&str],
) -> Vec<String> {
    gw.client(
        listener,
        name,
        &[&["-t", topic, "-m", msg, "-d"], extra].concat(),
    )
}

#[test]
fn banner_names_every_listener_and_the_dev_ca() {
    let gw = Gateway::start();
    let banner = gw.banner.join("\n");
    for label in [
        "device listener (MQTT over TLS): 127.0.0.1:",
        "device listener (plain MQTT): 127.0.0.1:",
        "service listener (MQTT over TLS): 127.0.0.1:",
        "admin socket:",
        "observability (/healthz /readyz /metrics): 127.0.0.1:",
        "development CA:",
    ] {
        assert!(banner.contains(label), "{label} missing from:\n{banner}");
    }
    assert_eq!(gw.http_get("/healthz").0, 200);
    assert_eq!(gw.http_get("/readyz").0, 200);
    assert!(gw.ca().exists());
}

#[test]
fn device_telemetry_reaches_a_service_at_qos_0_and_1_in_both_protocol_versions() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    let sub = Sub::start(&sub_args(
        &gw,
        "analytics",
        gw.service_tls,
        "devices/+/telemetry/#",
        &["-q", "1"],
    ));
    // The subscription is in place once the service's session is registered.
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));
    for (version, qos, msg) in [
        ("mqttv311", "0", "v311-q0"),
        ("mqttv311", "1", "v311-q1"),
        ("mqttv5", "0", "v5-q0"),
        ("mqttv5", "1", "v5-q1"),
    ] {
        let out = mosquitto(
            "mosquitto_pub",
            &pub_args(
                &gw,
                "sensor-1",
                gw.device_tls,
                "devices/sensor-1/telemetry",
                msg,
                &["-V", version, "-q", qos],
            ),
            T,
        );
        assert!(out.status.success(), "{}", text(&out));
        if qos == "1" {
            assert!(text(&out).contains("received PUBACK"), "{}", text(&out));
        }
        let line = sub
            .expect(msg, T)
            .unwrap_or_else(|seen| panic!("{msg} not received; saw {seen:?}"));
        assert_eq!(line, format!("devices/sensor-1/telemetry {msg}"));
    }
    assert!(gw.metric("portcullis_messages_accepted_total ") >= 4);
    // Delivered to the service: the four messages and their payload bytes.
    assert_eq!(gw.metric("portcullis_messages_delivered_total "), 4);
    assert_eq!(
        gw.metric("portcullis_delivered_bytes_total "),
        7 + 7 + 5 + 5
    );
    // The gateway's own accept → broker-link latency, and sessions by protocol.
    assert!(gw.metric("portcullis_forward_latency_seconds_count ") >= 4);
    assert_eq!(
        gw.metric("portcullis_sessions{protocol=\"mqtt3.1.1\",kind=\"service\"} "),
        1
    );
}

#[test]
fn service_command_reaches_the_device() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    for version in ["mqttv311", "mqttv5"] {
        let sub = Sub::start(&sub_args(
            &gw,
            "sensor-1",
            gw.device_tls,
            "devices/sensor-1/commands/#",
            &["-q", "1", "-V", version],
        ));
        gw.wait_audit(&["\"connect\"", "\"sensor-1\"", version_label(version)]);
        std::thread::sleep(Duration::from_millis(200));
        let msg = format!("reboot-{version}");
        let out = mosquitto(
            "mosquitto_pub",
            &pub_args(
                &gw,
                "analytics",
                gw.service_tls,
                "devices/sensor-1/commands/reboot",
                &msg,
                &["-q", "1"],
            ),
            T,
        );
        assert!(text(&out).contains("received PUBACK"), "{}", text(&out));
        let line = sub
            .expect(&msg, T)
            .unwrap_or_else(|seen| panic!("command not received; saw {seen:?}"));
        assert_eq!(line, format!("devices/sensor-1/commands/reboot {msg}"));
    }
}

fn version_label(v: &str) -> &'static str {
    if v == "mqttv5" { "mqtt5" } else { "mqtt3.1.1" }
}

#[test]
fn a_device_with_a_secret_publishes_on_the_plain_loopback_listener() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-7", "0123456789abcdef0123456789abcdef");
    gw.add_service_cert("analytics");
    let sub = Sub::start(&sub_args(
        &gw,
        "analytics",
        gw.service_tls,
        "devices/+/telemetry/#",
        &[],
    ));
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_plain,
            "meter-7",
            &[
                "-u",
                "meter-7",
                "-P",
                "0123456789abcdef0123456789abcdef",
                "-t",
                "devices/meter-7/telemetry/power",
                "-m",
                "42",
                "-q",
                "1",
            ],
        ),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    sub.expect("devices/meter-7/telemetry/power 42", T)
        .unwrap_or_else(|seen| panic!("not received; saw {seen:?}"));
    gw.wait_audit(&["\"connect\"", "\"allow\"", "\"meter-7\"", "\"secret\""]);
    assert!(!gw.audit().contains("0123456789abcdef0123456789abcdef"));
}
