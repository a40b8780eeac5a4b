//! MQTT session semantics owned by the gateway: QoS 2 both ways, persistent sessions
//! and offline command queues, retained commands, Last Will, take-over, keep-alive and
//! the MQTT 5 limits announced in CONNACK. Real mosquitto clients where they can
//! express it, raw MQTT where they cannot.

mod common;

use common::raw::Raw;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A service subscriber on the service listener, subscribed before returning.
fn service_sub(gw: &Gateway, topic: &str, extra: &[&str]) -> Sub {
    let args = gw.client(
        gw.service_tls,
        "analytics",
        &[&["-t", topic, "-v", "-d"], extra].concat(),
    );
    let sub = Sub::start(&args);
    sub.expect("SUBACK", T).expect("service subscribed");
    sub
}

fn service_pub(gw: &Gateway, topic: &str, msg: &str, extra: &[&str]) -> String {
    // An empty message is -n (null message); mosquitto refuses -m "" alongside it.
    let body: &[&str] = if msg.is_empty() {
        &["-n"]
    } else {
        &["-m", msg]
    };
    let args = gw.client(
        gw.service_tls,
        "analytics",
        &[&["-t", topic, "-d"], body, extra].concat(),
    );
    let out = mosquitto("mosquitto_pub", &args, T);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

fn setup() -> Gateway {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    gw
}

#[test]
fn qos2_telemetry_goes_through_the_full_handshake_and_arrives_once() {
    let gw = setup();
    let sub = service_sub(&gw, "devices/+/telemetry/#", &["-q", "2"]);
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                "-t",
                "devices/sensor-1/telemetry",
                "-m",
                "exactly-once",
                "-q",
                "2",
                "-d",
                "-V",
                "mqttv5",
            ],
        ),
        T,
    );
    let log = text(&out);
    assert!(log.contains("received PUBREC"), "{log}");
    assert!(log.contains("received PUBCOMP"), "{log}");
    let line = sub.expect("received PUBLISH", T).expect("delivered");
    assert!(line.contains("q2"), "delivered at QoS 2: {line}");
    sub.expect("sending PUBREC", T)
        .expect("the subscriber acknowledged with PUBREC");
    sub.expect("devices/sensor-1/telemetry exactly-once", T)
        .expect("payload");
    let again = sub.drain(Duration::from_millis(500));
    assert!(
        again.iter().all(|l| !l.contains("exactly-once")),
        "{again:?}"
    );
}

#[test]
fn qos2_retransmission_from_a_device_is_forwarded_once() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let sub = service_sub(&gw, "devices/+/telemetry/#", &["-q", "2"]);
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
    let publish = |dup: bool| {
        let mut f = common::raw::publish_v4_raw(b"devices/meter-1/telemetry", b"once", 2, 9);
        if dup {
            f[0] |= 0x08;
        }
        f
    };
    let pubrec = |raw: &mut Raw| match raw.recv_v4(T) {
        Some(rumqttc::mqttbytes::v4::Packet::PubRec(r)) => assert_eq!(r.pkid, 9),
        other => panic!("expected PUBREC, got {other:?}"),
    };
    raw.send(&publish(false));
    pubrec(&mut raw);
    // The PUBREC "was lost": the device sends the PUBLISH again, with DUP.
    raw.send(&publish(true));
    pubrec(&mut raw);
    raw.send(&[0x62, 0x02, 0x00, 0x09]);
    assert!(matches!(
        raw.recv_v4(T),
        Some(rumqttc::mqttbytes::v4::Packet::PubComp(_))
    ));
    sub.expect("devices/meter-1/telemetry once", T)
        .expect("delivered");
    let more = sub.drain(Duration::from_millis(700));
    assert!(
        more.iter().all(|l| !l.contains("telemetry once")),
        "forwarded twice: {more:?}"
    );
}

#[test]
fn a_resumed_session_full_of_unreleased_qos2_takes_their_retransmissions() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    // A v5 QoS 2 PUBLISH, no properties.
    let publish = |pkid: u16, dup: bool| {
        let topic = b"devices/meter-1/telemetry";
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic);
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0);
        body.extend_from_slice(b"{}");
        let mut f = vec![0x34 | if dup { 0x08 } else { 0 }, body.len() as u8];
        f.extend(body);
        f
    };
    let pubrec = |raw: &mut Raw, pkid: u16| match raw.recv_v5(T) {
        Some(v5::Packet::PubRec(r)) => assert_eq!(r.pkid, pkid),
        other => panic!("expected PUBREC {pkid}, got {other:?}"),
    };
    let mut raw = Raw::connect(gw.device_plain);
    connect_persistent(&mut raw);
    // As many as the Receive Maximum (64) accepted, none released: the PUBRECs "lost".
    for pkid in 1..=64 {
        raw.send(&publish(pkid, false));
        pubrec(&mut raw, pkid);
    }
    drop(raw);
    let mut raw = Raw::connect(gw.device_plain);
    assert!(connect_persistent(&mut raw).session_present);
    // The client resends them with DUP: retransmissions, not new publishes over the
    // Receive Maximum.
    raw.send(&publish(1, true));
    pubrec(&mut raw, 1);
    raw.send(&[0x62, 0x02, 0x00, 0x01]);
    assert!(matches!(raw.recv_v5(T), Some(v5::Packet::PubComp(_))));
}

#[test]
fn qos2_command_reaches_a_qos2_subscriber_at_qos2() {
    let gw = setup();
    let device = Sub::start(&gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/commands/#", "-q", "2", "-v", "-d"],
    ));
    device.expect("SUBACK", T).expect("device subscribed");
    let log = service_pub(&gw, "devices/sensor-1/commands/reboot", "now", &["-q", "2"]);
    assert!(log.contains("received PUBCOMP"), "{log}");
    let line = device
        .expect("received PUBLISH", T)
        .expect("command delivered");
    assert!(line.contains("q2"), "delivered at QoS 2: {line}");
    device
        .expect("sending PUBREC", T)
        .expect("device acknowledged with PUBREC");
    device
        .expect("received PUBREL", T)
        .expect("gateway released it");
    device
        .expect("devices/sensor-1/commands/reboot now", T)
        .expect("payload");
}

#[test]
fn commands_sent_while_a_persistent_device_is_offline_arrive_in_order_when_it_returns() {
    let gw = setup();
    let sub_args = |extra: &[&str]| {
        gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                &["-t", "devices/sensor-1/commands/#", "-q", "1", "-v"],
                extra,
            ]
            .concat(),
        )
    };
    // Subscribe with a persistent session, then leave (-E: exit once subscribed).
    let out = mosquitto("mosquitto_sub", &sub_args(&["-c", "-E"]), T);
    assert!(out.status.success(), "{}", text(&out));
    for n in 1..=3 {
        service_pub(
            &gw,
            "devices/sensor-1/commands/step",
            &format!("cmd-{n}"),
            &["-q", "1"],
        );
    }
    // Back, still persistent: the three commands, in order.
    let out = mosquitto("mosquitto_sub", &sub_args(&["-c", "-C", "3", "-W", "8"]), T);
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        got,
        vec![
            "devices/sensor-1/commands/step cmd-1",
            "devices/sensor-1/commands/step cmd-2",
            "devices/sensor-1/commands/step cmd-3"
        ],
        "{}",
        text(&out)
    );
    gw.wait_audit(&["\"connect\"", "\"sensor-1\"", "session resumed"]);
}

#[test]
fn a_clean_session_discards_queued_commands_and_subscriptions() {
    let gw = setup();
    let sub_args = |extra: &[&str]| {
        gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                &["-t", "devices/sensor-1/commands/#", "-q", "1", "-v"],
                extra,
            ]
            .concat(),
        )
    };
    assert!(
        mosquitto("mosquitto_sub", &sub_args(&["-c", "-E"]), T)
            .status
            .success()
    );
    service_pub(&gw, "devices/sensor-1/commands/step", "stale", &["-q", "1"]);
    // Clean session: nothing from before.
    let out = mosquitto("mosquitto_sub", &sub_args(&["-W", "2"]), T);
    assert!(!text(&out).contains("stale"), "{}", text(&out));
}

/// meter-1 connects over MQTT 5 asking to resume a session kept for 300 s.
fn connect_persistent(raw: &mut Raw) -> v5::ConnAck {
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(300);
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "meter-1".into(),
        clean_start: false,
        properties: Some(props),
    };
    raw.connect_v5_full(connect, None, Some(("meter-1", SECRET)))
        .expect("CONNACK")
}

#[test]
fn subscriptions_survive_a_reconnect_of_a_persistent_session() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = Raw::connect(gw.device_plain);
    let ack = connect_persistent(&mut raw);
    assert!(!ack.session_present);
    raw.send_v5(v5::Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![v5::Filter::new(
            "devices/meter-1/commands/#",
            Q5::AtLeastOnce,
        )],
        properties: None,
    }));
    assert!(matches!(raw.recv_v5(T), Some(v5::Packet::SubAck(_))));
    raw.send_v5(v5::Packet::Disconnect(v5::Disconnect::new(
        v5::DisconnectReasonCode::NormalDisconnection,
    )));
    assert!(raw.closed_within(T).0);
    service_pub(
        &gw,
        "devices/meter-1/commands/x",
        "while-away",
        &["-q", "1"],
    );
    let mut raw = Raw::connect(gw.device_plain);
    assert!(connect_persistent(&mut raw).session_present);
    // No SUBSCRIBE this time: the session remembered it.
    match raw.recv_v5(T) {
        Some(v5::Packet::Publish(p)) => {
            assert_eq!(&p.topic[..], b"devices/meter-1/commands/x");
            assert_eq!(&p.payload[..], b"while-away");
        }
        other => panic!("expected the queued command, got {other:?}"),
    }
    service_pub(&gw, "devices/meter-1/commands/y", "live", &["-q", "1"]);
    loop {
        match raw.recv_v5(T) {
            Some(v5::Packet::Publish(p)) if &p.payload[..] == b"live" => break,
            Some(_) => continue,
            None => panic!("live command not delivered after resume"),
        }
    }
}

#[test]
fn a_disconnect_with_a_long_reason_string_still_sets_the_session_expiry() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = Raw::connect(gw.device_plain);
    assert!(!connect_persistent(&mut raw).session_present);
    // A Reason String long enough that the property length takes two bytes, then
    // Session Expiry Interval 0: the session ends with this connection.
    let reason = "sensor retired by its operator ".repeat(8);
    let mut props = vec![0x1F];
    props.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    props.extend_from_slice(reason.as_bytes());
    props.extend_from_slice(&[0x11, 0, 0, 0, 0]);
    assert!(props.len() > 127);
    raw.send(&common::raw::disconnect_v5_raw(0x00, &props));
    assert!(raw.closed_within(T).0);
    let mut raw = Raw::connect(gw.device_plain);
    assert!(
        !connect_persistent(&mut raw).session_present,
        "the DISCONNECT's session expiry 0 ended the session"
    );
}

#[test]
fn an_unacknowledged_command_is_resent_with_dup_after_reconnect() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let connect = || {
        let mut props = v5::ConnectProperties::new();
        props.session_expiry_interval = Some(300);
        v5::Connect {
            keep_alive: 30,
            client_id: "meter-1".into(),
            clean_start: false,
            properties: Some(props),
        }
    };
    let mut raw = Raw::connect(gw.device_plain);
    raw.connect_v5_full(connect(), None, Some(("meter-1", SECRET)));
    raw.send_v5(v5::Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![v5::Filter::new(
            "devices/meter-1/commands/#",
            Q5::AtLeastOnce,
        )],
        properties: None,
    }));
    assert!(matches!(raw.recv_v5(T), Some(v5::Packet::SubAck(_))));
    service_pub(&gw, "devices/meter-1/commands/fw", "update", &["-q", "1"]);
    let first = match raw.recv_v5(T) {
        Some(v5::Packet::Publish(p)) => p,
        other => panic!("{other:?}"),
    };
    assert!(!first.dup);
    // Gone without PUBACK.
    drop(raw);
    let mut raw = Raw::connect(gw.device_plain);
    assert!(
        raw.connect_v5_full(connect(), None, Some(("meter-1", SECRET)))
            .unwrap()
            .session_present
    );
    match raw.recv_v5(T) {
        Some(v5::Packet::Publish(p)) => {
            assert!(p.dup, "a resend carries DUP");
            assert_eq!(p.pkid, first.pkid);
            assert_eq!(&p.payload[..], b"update");
        }
        other => panic!("expected the resend, got {other:?}"),
    }
}

#[test]
fn offline_queue_overflow_is_counted_and_audited() {
    let gw = Gateway::start_with("[sessions]\nqueue_max_messages = 2\n");
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    let sub_args = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/commands/#", "-q", "1", "-c", "-E"],
    );
    assert!(mosquitto("mosquitto_sub", &sub_args, T).status.success());
    for n in 1..=4 {
        service_pub(
            &gw,
            "devices/sensor-1/commands/x",
            &format!("c{n}"),
            &["-q", "1"],
        );
    }
    gw.wait_audit(&["\"queue\"", "\"refuse\"", "\"sensor-1\"", "queue full"]);
    let overflow = wait_for(T, || {
        let n = gw.metric("portcullis_queue_overflow_total ");
        (n == 2).then_some(n)
    });
    assert_eq!(overflow, Some(2));
}

/// What sensor-1 receives on its commands (`%r %t %p` per line), with `extra` options.
fn sensor1_commands(gw: &Gateway, extra: &[&str]) -> String {
    let base = [
        "-t",
        "devices/sensor-1/commands/#",
        "-q",
        "1",
        "-F",
        "%r %t %p",
    ];
    let args = gw.client(gw.device_tls, "sensor-1", &[&base[..], extra].concat());
    String::from_utf8_lossy(&mosquitto("mosquitto_sub", &args, T).stdout).into_owned()
}

#[test]
fn retained_command_is_delivered_on_subscribe_and_cleared_by_an_empty_one() {
    let gw = setup();
    service_pub(
        &gw,
        "devices/sensor-1/commands/config",
        "mode=eco",
        &["-q", "1", "-r"],
    );
    let fetch = || sensor1_commands(&gw, &["-W", "2"]);
    let got = fetch();
    assert_eq!(
        got.trim(),
        "1 devices/sensor-1/commands/config mode=eco",
        "{got}"
    );
    service_pub(
        &gw,
        "devices/sensor-1/commands/config",
        "",
        &["-q", "1", "-r"],
    );
    let got = fetch();
    assert!(got.trim().is_empty(), "cleared, yet got {got:?}");
}

#[test]
fn retained_commands_per_device_are_capped() {
    let gw = Gateway::start_with("[sessions]\nmax_retained_per_device = 1\n");
    // Commands are only for registered devices.
    gw.add_device_cert("sensor-1");
    gw.add_service_cert("analytics");
    service_pub(&gw, "devices/sensor-1/commands/a", "1", &["-q", "1", "-r"]);
    let log = service_pub(
        &gw,
        "devices/sensor-1/commands/b",
        "2",
        &["-q", "1", "-r", "-V", "mqttv5"],
    );
    assert!(log.contains("RC:151"), "quota exceeded: {log}");
    gw.wait_audit(&["\"publish\"", "\"refuse\"", "retained"]);
}

#[test]
fn retained_telemetry_reaches_a_service_that_subscribes_later() {
    let gw = setup();
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                "-t",
                "devices/sensor-1/telemetry/state",
                "-m",
                "on",
                "-q",
                "1",
                "-r",
            ],
        ),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    let args = gw.client(
        gw.service_tls,
        "analytics",
        &[
            "-t",
            "devices/+/telemetry/#",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "5",
            "-F",
            "%r %t %p",
        ],
    );
    let got = String::from_utf8_lossy(&mosquitto("mosquitto_sub", &args, T).stdout).into_owned();
    assert_eq!(got.trim(), "1 devices/sensor-1/telemetry/state on");
}

fn will_holder(gw: &Gateway, extra: &[&str]) -> Sub {
    let sub = Sub::start(
        &gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                &[
                    "-t",
                    "devices/sensor-1/commands/#",
                    "-d",
                    "--will-topic",
                    "devices/sensor-1/telemetry/status",
                    "--will-payload",
                    "gone",
                ],
                extra,
            ]
            .concat(),
        ),
    );
    sub.expect("SUBACK", T).expect("device connected");
    sub
}

#[test]
fn last_will_fires_on_an_unexpected_disconnect() {
    let gw = setup();
    let watcher = service_sub(&gw, "devices/+/telemetry/#", &[]);
    let mut holder = will_holder(&gw, &[]);
    holder.kill();
    watcher
        .expect("devices/sensor-1/telemetry/status gone", T)
        .expect("Will published");
    gw.wait_audit(&["\"will\"", "\"sensor-1\""]);
}

#[test]
fn last_will_does_not_fire_after_a_normal_disconnect_or_a_kick() {
    let gw = setup();
    let watcher = service_sub(&gw, "devices/+/telemetry/#", &[]);
    // Normal DISCONNECT: mosquitto_pub with a Will, exiting cleanly.
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                "-t",
                "devices/sensor-1/telemetry",
                "-m",
                "hello",
                "--will-topic",
                "devices/sensor-1/telemetry/status",
                "--will-payload",
                "gone",
            ],
        ),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    // Kicked by the operator.
    let _holder = will_holder(&gw, &["-V", "mqttv5"]);
    gw.cli_ok(&["clients", "kick", "sensor-1"]);
    gw.wait_audit(&["\"disconnect\"", "\"sensor-1\"", "kicked by operator"]);
    let seen = watcher.drain(Duration::from_millis(1000));
    assert!(
        seen.iter().any(|l| l.contains("telemetry hello")),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|l| !l.contains("gone")),
        "Will fired: {seen:?}"
    );
    assert_eq!(gw.metric("portcullis_wills_published_total "), 0);
}

#[test]
fn a_will_delay_is_cancelled_when_the_device_returns_in_time() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let watcher = service_sub(&gw, "devices/+/telemetry/#", &[]);
    let connect_with_will = |delay: u32| {
        let mut raw = Raw::connect(gw.device_plain);
        let mut props = v5::ConnectProperties::new();
        props.session_expiry_interval = Some(60);
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: "meter-1".into(),
            clean_start: false,
            properties: Some(props),
        };
        let will = v5::LastWill {
            topic: "devices/meter-1/telemetry/status".into(),
            message: format!("gone-after-{delay}").into(),
            qos: Q5::AtMostOnce,
            retain: false,
            properties: Some(v5::LastWillProperties {
                delay_interval: Some(delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: vec![],
            }),
        };
        let ack = raw.connect_v5_full(connect, Some(will), Some(("meter-1", SECRET)));
        assert_eq!(ack.map(|a| a.code), Some(v5::ConnectReturnCode::Success));
        raw
    };
    // Lost, but back within the 3 s delay: no Will.
    drop(connect_with_will(3));
    let _back = connect_with_will(1);
    let seen = watcher.drain(Duration::from_millis(3500));
    assert!(seen.iter().all(|l| !l.contains("gone-after-3")), "{seen:?}");
    // Lost for good: the Will comes after its delay.
    drop(_back);
    watcher
        .expect("devices/meter-1/telemetry/status gone-after-1", T)
        .expect("delayed Will published");
}

#[test]
fn take_over_ends_the_first_connection_and_keeps_the_persistent_session() {
    let gw = setup();
    let args = |extra: &[&str]| {
        gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                &[
                    "-t",
                    "devices/sensor-1/commands/#",
                    "-q",
                    "1",
                    "-v",
                    "-d",
                    "-c",
                    "-V",
                    "mqttv5",
                ],
                extra,
            ]
            .concat(),
        )
    };
    let mut first = Sub::start(&args(&[]));
    first.expect("SUBACK", T).expect("first connected");
    let second = Sub::start(&args(&[]));
    second.expect("CONNACK", T).expect("second connected");
    first
        .expect("DISCONNECT", T)
        .expect("first told it was taken over");
    // mosquitto_sub would reconnect (and take the session back): stop it here.
    first.kill();
    gw.wait_audit(&["\"takeover\"", "\"sensor-1\""]);
    assert_eq!(gw.metric("portcullis_session_takeovers_total "), 1);
    service_pub(
        &gw,
        "devices/sensor-1/commands/x",
        "for-second",
        &["-q", "1"],
    );
    second
        .expect("devices/sensor-1/commands/x for-second", T)
        .expect("the session moved to the new connection");
}

fn connack_v5(gw: &Gateway, keep_alive: u16) -> v5::ConnAck {
    let mut raw = Raw::connect(gw.device_plain);
    let connect = v5::Connect {
        keep_alive,
        client_id: "meter-1".into(),
        clean_start: true,
        properties: None,
    };
    raw.connect_v5_full(connect, None, Some(("meter-1", SECRET)))
        .expect("CONNACK")
}

#[test]
fn connack_announces_the_gateway_limits() {
    let gw = Gateway::start_with(
        "[sessions]\nreceive_maximum = 7\ntopic_alias_maximum = 3\nmax_keep_alive_secs = 120\nmax_session_expiry_secs = 600\n",
    );
    gw.add_device_secret("meter-1", SECRET);
    let ack = connack_v5(&gw, 0);
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let p = ack.properties.expect("properties");
    assert_eq!(p.receive_max, Some(7));
    assert_eq!(p.topic_alias_max, Some(3));
    assert_eq!(p.max_packet_size, Some(262_144));
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.max_qos, None, "absent means QoS 2 is available");
    // Keep-alive 0 ("never") and over the cap are both replaced by the cap.
    assert_eq!(p.server_keep_alive, Some(120));
    let p = connack_v5(&gw, 600).properties.unwrap();
    assert_eq!(p.server_keep_alive, Some(120));
    let p = connack_v5(&gw, 60).properties.unwrap();
    assert_eq!(
        p.server_keep_alive, None,
        "a keep-alive within the cap is kept"
    );
}

#[test]
fn a_silent_client_is_dropped_at_one_and_a_half_keep_alives() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = Raw::connect(gw.device_plain);
    let connect = v5::Connect {
        keep_alive: 1,
        client_id: "meter-1".into(),
        clean_start: true,
        properties: None,
    };
    raw.connect_v5_full(connect, None, Some(("meter-1", SECRET)));
    match raw.recv_v5(T) {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    gw.wait_audit(&["\"disconnect\"", "\"meter-1\"", "keep-alive expired"]);
}

#[test]
fn topic_aliases_are_resolved_before_authorization() {
    let gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let sub = service_sub(&gw, "devices/+/telemetry/#", &[]);
    let mut raw = Raw::connect(gw.device_plain);
    raw.connect_v5("meter-1", Some(("meter-1", SECRET)));
    let publish = |topic: &str, payload: &str, alias: u16| {
        let props = v5::PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        };
        let mut p = v5::Publish::new(
            topic,
            Q5::AtMostOnce,
            payload.as_bytes().to_vec(),
            Some(props),
        );
        p.pkid = 0;
        v5::Packet::Publish(p)
    };
    raw.send_v5(publish("devices/meter-1/telemetry/power", "first", 1));
    raw.send_v5(publish("", "second", 1));
    sub.expect("devices/meter-1/telemetry/power first", T)
        .expect("first");
    sub.expect("devices/meter-1/telemetry/power second", T)
        .expect("alias resolved");
    // An alias does not bypass the ACL: redefining it to a foreign topic is refused.
    raw.send_v5(publish("devices/meter-2/telemetry", "forged", 2));
    raw.send_v5(publish("", "forged-again", 2));
    let seen = sub.drain(Duration::from_millis(700));
    assert!(seen.iter().all(|l| !l.contains("forged")), "{seen:?}");
    assert_eq!(gw.refusals("authorize", "topic_not_allowed"), 2);
    // Beyond the announced maximum: protocol error.
    raw.send_v5(publish("devices/meter-1/telemetry", "x", 1000));
    match raw.recv_v5(T) {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::TopicAliasInvalid)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[test]
fn response_topic_is_authorized_and_correlation_data_reaches_the_service() {
    let gw = setup();
    let sub = service_sub(
        &gw,
        "devices/+/telemetry/#",
        &["-V", "mqttv5", "-F", "%t %p rt=%R cd=%D"],
    );
    let publish = |response: &str| {
        let args = gw.client(
            gw.device_tls,
            "sensor-1",
            &[
                "-t",
                "devices/sensor-1/telemetry/req",
                "-m",
                "ask",
                "-q",
                "1",
                "-d",
                "-V",
                "mqttv5",
                "-D",
                "publish",
                "response-topic",
                response,
                "-D",
                "publish",
                "correlation-data",
                "abc123",
                "-D",
                "publish",
                "user-property",
                "$portcullis.qos2",
                "forged",
            ],
        );
        text(&mosquitto("mosquitto_pub", &args, T))
    };
    let out = publish("devices/sensor-1/telemetry/reply");
    assert!(out.contains("received PUBACK (Mid: 1, RC:0)"), "{out}");
    let line = sub
        .expect("devices/sensor-1/telemetry/req ask", T)
        .expect("delivered");
    assert_eq!(
        line,
        "devices/sensor-1/telemetry/req ask rt=devices/sensor-1/telemetry/reply cd=abc123"
    );
    let out = publish("devices/sensor-2/telemetry/reply");
    assert!(
        out.contains("RC:135"),
        "response topic outside the ACL: {out}"
    );
    gw.wait_audit(&["\"publish\"", "\"refuse\"", "response topic not allowed"]);
}

#[test]
fn unsubscribe_reports_which_filters_existed_and_never_stalls_later_subscribes() {
    let gw = setup();
    let out = gw.cli_stdin(&["service", "add", "ops", "--secret-stdin"], Some(SECRET));
    assert!(out.status.success(), "{}", text(&out));
    let mut raw = Raw::connect(gw.service_plain);
    raw.connect_v5("ops", Some(("ops", SECRET)));
    let subscribe = |raw: &mut Raw, pkid: u16| {
        raw.send_v5(v5::Packet::Subscribe(v5::Subscribe {
            pkid,
            filters: vec![v5::Filter::new("devices/+/telemetry/#", Q5::AtLeastOnce)],
            properties: None,
        }));
        match raw.recv_v5(T) {
            Some(v5::Packet::SubAck(a)) => assert_eq!(a.pkid, pkid),
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    };
    subscribe(&mut raw, 1);
    raw.send_v5(v5::Packet::Unsubscribe(v5::Unsubscribe {
        pkid: 2,
        filters: vec![
            "devices/+/telemetry/#".into(),
            "devices/never/telemetry".into(),
        ],
        properties: None,
    }));
    match raw.recv_v5(T) {
        Some(v5::Packet::UnsubAck(a)) => assert_eq!(
            a.reasons,
            vec![
                v5::UnsubAckReason::Success,
                v5::UnsubAckReason::NoSubscriptionExisted
            ]
        ),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    subscribe(&mut raw, 3);
    // And the subscription is live at once: a device publish right after the SUBACK arrives.
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.device_tls,
            "sensor-1",
            &["-t", "devices/sensor-1/telemetry", "-m", "after-suback"],
        ),
        T,
    );
    assert!(out.status.success());
    match raw.recv_v5(T) {
        Some(v5::Packet::Publish(p)) => assert_eq!(&p.payload[..], b"after-suback"),
        other => panic!("expected the telemetry, got {other:?}"),
    }
}

/// Commands big enough that resending the in-flight ones fills a socket many times
/// over (32 in flight × 200 KB).
const STALL_COMMANDS: usize = 40;

/// A persistent device with `STALL_COMMANDS` large commands queued while it is away,
/// resumed by a peer holding its credential that never reads: the first such peer is
/// dropped by the write deadline with the commands in flight, the second is stuck in
/// the resend that follows CONNACK (the write the attack found without a deadline).
fn stalled_session() -> (Gateway, std::net::TcpStream) {
    let gw = Gateway::start_with("[sessions]\nqueue_max_bytes = 16777216\n");
    gw.add_device_secret("meter-1", SECRET);
    gw.add_service_cert("analytics");
    let out = mosquitto("mosquitto_sub", &device_sub_args(&gw, &["-E"]), T);
    assert!(out.status.success(), "{}", text(&out));
    let body = gw.dir.path().join("command.bin");
    for n in 0..STALL_COMMANDS {
        let payload = format!("cmd-{n:02}-{}", "x".repeat(200_000));
        std::fs::write(&body, payload).unwrap();
        let args = gw.client(
            gw.service_tls,
            "analytics",
            &[
                "-t",
                "devices/meter-1/commands/big",
                "-q",
                "1",
                "-f",
                body.to_str().unwrap(),
            ],
        );
        let out = mosquitto("mosquitto_pub", &args, T);
        assert!(out.status.success(), "{}", text(&out));
    }
    let first = stalled_peer(&gw);
    gw.wait_audit(&["\"disconnect\"", "\"meter-1\"", "peer stopped reading"]);
    let second = stalled_peer(&gw);
    wait_for(T, || {
        (gw.audit().matches("session resumed").count() >= 2).then_some(())
    })
    .expect("the second stalled peer resumed the session");
    drop(first);
    (gw, second)
}

/// CONNECT as meter-1 (persistent) on a socket with a tiny receive buffer, and never
/// read.
fn stalled_peer(gw: &Gateway) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(gw.device_plain).await.expect("connect")
    });
    let mut stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("meter-1");
    connect.keep_alive = 600;
    connect.clean_session = false;
    connect.set_login("meter-1", SECRET);
    let mut frame = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect)
        .write(&mut frame, usize::MAX)
        .unwrap();
    std::io::Write::write_all(&mut stream, &frame).unwrap();
    stream
}

fn device_sub_args(gw: &Gateway, extra: &[&str]) -> Vec<String> {
    gw.client(
        gw.device_plain,
        "meter-1",
        &[
            &[
                "-u",
                "meter-1",
                "-P",
                SECRET,
                "-c",
                "-q",
                "1",
                "-t",
                "devices/meter-1/commands/#",
            ],
            extra,
        ]
        .concat(),
    )
}

/// The real device connects (persistent) and receives every queued command.
fn device_gets_every_command(gw: &Gateway) {
    let count = STALL_COMMANDS.to_string();
    let out = mosquitto(
        "mosquitto_sub",
        &device_sub_args(gw, &["-C", &count, "-W", "30", "-F", "%p"]),
        Duration::from_secs(40),
    );
    let got: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.get(..7).map(str::to_string))
        .collect();
    let want: std::collections::BTreeSet<String> = (0..STALL_COMMANDS)
        .map(|n| format!("cmd-{n:02}-"))
        .collect();
    assert!(
        out.status.success() && got == want,
        "the device got {} of {STALL_COMMANDS} commands: {}",
        got.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kick_ends_a_session_stuck_writing_to_a_peer_that_never_reads() {
    let (gw, _peer) = stalled_session();
    let out = gw.cli_ok(&["clients", "kick", "meter-1"]);
    assert!(out.contains("\"sessions_ended\": 1"), "{out}");
    device_gets_every_command(&gw);
}

#[test]
fn the_real_device_takes_over_a_session_stuck_writing_to_a_peer_that_never_reads() {
    let (gw, _peer) = stalled_session();
    device_gets_every_command(&gw);
    assert!(!gw.audit().contains("session_busy"), "{}", gw.audit());
}

#[test]
fn a_peer_that_never_reads_the_resent_commands_is_dropped_at_the_write_deadline() {
    let (gw, _peer) = stalled_session();
    // Nothing else connects: the write deadline alone ends the stuck session.
    wait_for(Duration::from_secs(60), || {
        (gw.audit().matches("peer stopped reading").count() >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("the stuck session never ended:\n{}", gw.audit()));
    device_gets_every_command(&gw);
}

#[test]
fn a_ban_ends_a_session_stuck_writing_to_a_peer_that_never_reads() {
    let (gw, _peer) = stalled_session();
    let out = gw.cli_ok(&["ban", "add", "device/meter-1", "--reason", "stolen key"]);
    assert!(out.contains("\"sessions_ended\": 1"), "{out}");
    // Ended, not only told to end: no session of meter-1 is left while it is banned.
    wait_for(T, || {
        (!gw.cli_ok(&["clients", "list"]).contains("meter-1")).then_some(())
    })
    .unwrap_or_else(|| panic!("the banned session is still there"));
    // A banned session is discarded with its commands (as on disable); unbanned, the
    // real device connects at once, not "session busy".
    gw.cli_ok(&["ban", "remove", "device/meter-1"]);
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
                "back",
            ],
        ),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!gw.audit().contains("session_busy"), "{}", gw.audit());
}

/// meter-1's persistent MQTT 5 session, subscribed to its commands at QoS 1.
fn persistent_subscriber(gw: &Gateway, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.device_plain);
    let ack = connect_persistent_as(&mut raw, id);
    assert!(!ack.session_present);
    raw.send_v5(v5::Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![v5::Filter::new(
            format!("devices/{id}/commands/#"),
            Q5::AtLeastOnce,
        )],
        properties: None,
    }));
    assert!(matches!(raw.recv_v5(T), Some(v5::Packet::SubAck(_))));
    raw
}

fn connect_persistent_as(raw: &mut Raw, id: &str) -> v5::ConnAck {
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(300);
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start: false,
        properties: Some(props),
    };
    raw.connect_v5_full(connect, None, Some((id, SECRET)))
        .expect("CONNACK")
}

fn next_publish(raw: &mut Raw) -> v5::Publish {
    match raw.recv_v5(T) {
        Some(v5::Packet::Publish(p)) => p,
        other => panic!("expected a command, got {other:?}"),
    }
}

/// Wait until the session file has committed at least once more than `before`.
fn committed_after(gw: &Gateway, before: u64) {
    wait_for(T, || {
        (gw.metric("portcullis_session_store_commits_total") > before).then_some(())
    })
    .expect("the session file committed the change");
}

#[test]
fn a_parked_session_its_queued_and_unacknowledged_commands_and_retained_commands_survive_a_restart()
{
    let mut gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    let raw = persistent_subscriber(&gw, "meter-1");
    drop(raw);
    service_pub(&gw, "devices/meter-1/commands/fw", "cmd-1", &["-q", "1"]);
    // Back for a moment: cmd-1 arrives and is left unacknowledged.
    let mut raw = Raw::connect(gw.device_plain);
    assert!(connect_persistent_as(&mut raw, "meter-1").session_present);
    let first = next_publish(&mut raw);
    assert_eq!(&first.payload[..], b"cmd-1");
    drop(raw);
    service_pub(&gw, "devices/meter-1/commands/fw", "cmd-2", &["-q", "1"]);
    service_pub(
        &gw,
        "devices/sensor-1/commands/config",
        "mode=eco",
        &["-q", "1", "-r"],
    );
    gw.restart();
    let mut raw = Raw::connect(gw.device_plain);
    assert!(
        connect_persistent_as(&mut raw, "meter-1").session_present,
        "the parked session came back from disk"
    );
    let resent = next_publish(&mut raw);
    assert_eq!(&resent.payload[..], b"cmd-1");
    assert!(resent.dup, "the unacknowledged command is resent with DUP");
    assert_eq!(resent.pkid, first.pkid);
    let queued = next_publish(&mut raw);
    assert_eq!(&queued.payload[..], b"cmd-2");
    // The restored subscription routes new commands too, with no SUBSCRIBE.
    service_pub(&gw, "devices/meter-1/commands/fw", "cmd-3", &["-q", "1"]);
    assert_eq!(&next_publish(&mut raw).payload[..], b"cmd-3");
    assert_eq!(gw.metric("portcullis_sessions_restored_total"), 1);
    // A retained command kept across the restart reaches a device that subscribes.
    let got = sensor1_commands(&gw, &["-C", "1", "-W", "5"]);
    assert!(
        got.contains("1 devices/sensor-1/commands/config mode=eco"),
        "{got}"
    );
    gw.wait_audit(&["\"sessions\"", "1 parked device sessions restored"]);
}

#[test]
fn after_sigkill_a_parked_session_keeps_its_queued_command_and_a_connected_one_its_subscriptions() {
    let mut gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    gw.add_device_secret("meter-2", SECRET);
    drop(persistent_subscriber(&gw, "meter-1"));
    // meter-2 stays connected through the kill.
    let _connected = persistent_subscriber(&gw, "meter-2");
    // The park and the SUBSCRIBE above are committed before the count is taken.
    let before = wait_for(T, || {
        let n = gw.metric("portcullis_session_store_commits_total");
        std::thread::sleep(Duration::from_millis(200));
        (gw.metric("portcullis_session_store_commits_total") == n).then_some(n)
    })
    .expect("the session file settles");
    service_pub(&gw, "devices/meter-1/commands/fw", "queued", &["-q", "1"]);
    committed_after(&gw, before);
    gw.kill9();
    gw.restart_after_stop();
    let mut raw = Raw::connect(gw.device_plain);
    assert!(connect_persistent_as(&mut raw, "meter-1").session_present);
    assert_eq!(&next_publish(&mut raw).payload[..], b"queued");
    let mut raw2 = Raw::connect(gw.device_plain);
    assert!(
        connect_persistent_as(&mut raw2, "meter-2").session_present,
        "the connected session's record survived the kill"
    );
    service_pub(&gw, "devices/meter-2/commands/fw", "after", &["-q", "1"]);
    assert_eq!(&next_publish(&mut raw2).payload[..], b"after");
}

#[test]
fn a_kept_session_is_dropped_when_its_device_was_removed_while_the_gateway_was_down() {
    let mut gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    drop(persistent_subscriber(&gw, "meter-1"));
    service_pub(&gw, "devices/meter-1/commands/fw", "stale", &["-q", "1"]);
    let (status, _) = gw.terminate();
    assert!(status.success());
    // Removed while the gateway is down, registered again once it is back: a new
    // registration starts a new session.
    gw.cli_ok(&["device", "remove", "meter-1"]);
    gw.restart_after_stop();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = Raw::connect(gw.device_plain);
    assert!(!connect_persistent_as(&mut raw, "meter-1").session_present);
    assert!(
        raw.recv_v5(Duration::from_secs(1)).is_none(),
        "nothing from before"
    );
    assert_eq!(gw.metric("portcullis_session_records_dropped_total"), 1);
}

#[test]
fn retained_commands_of_a_device_removed_while_the_gateway_was_down_do_not_come_back() {
    let mut gw = setup();
    service_pub(
        &gw,
        "devices/sensor-1/commands/config",
        "mode=eco",
        &["-q", "1", "-r"],
    );
    let (status, _) = gw.terminate();
    assert!(status.success());
    gw.cli_ok(&["device", "remove", "sensor-1"]);
    gw.restart_after_stop();
    // Registered again, with the certificate it already has.
    gw.cli_ok(&["device", "add", "sensor-1", "--cert-any"]);
    let got = sensor1_commands(&gw, &["-W", "2"]);
    assert!(
        got.trim().is_empty(),
        "the old desired state came back: {got:?}"
    );
}

#[test]
fn a_session_discarded_by_a_clean_start_stays_discarded_after_a_restart() {
    let mut gw = setup();
    gw.add_device_secret("meter-1", SECRET);
    drop(persistent_subscriber(&gw, "meter-1"));
    service_pub(&gw, "devices/meter-1/commands/fw", "stale", &["-q", "1"]);
    // Back with a clean session (MQTT 3.1.1 clean_session = 1), then gone.
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
    drop(raw);
    gw.restart();
    let mut raw = Raw::connect(gw.device_plain);
    assert!(!connect_persistent_as(&mut raw, "meter-1").session_present);
    assert!(
        raw.recv_v5(Duration::from_secs(1)).is_none(),
        "nothing from before"
    );
}
