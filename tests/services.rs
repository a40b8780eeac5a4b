//! Service sessions as ordinary MQTT clients expect them: persistent sessions with
//! bounded queues, each message at its subscription's QoS, the MQTT 5 subscription
//! options (No Local, Retain As Published, Retain Handling, Subscription Identifiers),
//! shared subscriptions, acknowledgements that never wait behind deliveries, and the
//! client's Maximum Packet Size. Raw MQTT 5 where mosquitto clients cannot say it.

mod common;

use common::raw::Raw;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(700);
const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A gateway with a device `sensor-1` and services `alpha` and `beta` (secrets, group
/// `cluster`: they may publish and subscribe under `jobs/`, read telemetry and
/// commands, and send commands).
fn setup(extra: &str) -> Gateway {
    setup_limits(extra, "")
}

/// As `setup`, with extra keys in the `[limits]` table.
fn setup_limits(extra: &str, limits: &str) -> Gateway {
    let gw = Gateway::start_full(
        &format!(
            r#"
[service_groups.cluster]
trust = []
publish = ["devices/+/commands/#", "jobs/#"]
subscribe = ["devices/+/telemetry/#", "devices/+/commands/#", "jobs/#"]
{extra}"#
        ),
        limits,
    );
    gw.add_device_secret("sensor-1", SECRET);
    for id in ["alpha", "beta"] {
        let out = gw.cli_stdin(
            &["service", "add", id, "--group", "cluster", "--secret-stdin"],
            Some(SECRET),
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    gw
}

#[derive(Clone, Copy)]
struct Opts {
    clean: bool,
    expiry: Option<u32>,
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
    topic_alias_max: Option<u16>,
}

const CLEAN: Opts = Opts {
    clean: true,
    expiry: None,
    receive_maximum: None,
    max_packet_size: None,
    topic_alias_max: None,
};

/// An MQTT 5 client on the plain service (or device) listener.
struct Client {
    raw: Raw,
    next_pkid: u16,
    /// Publishes that arrived while waiting for something else (a SUBACK, a PUBACK),
    /// kept for `received`.
    early: Vec<v5::Publish>,
}

impl Client {
    fn connect(addr: std::net::SocketAddr, id: &str, o: Opts) -> (Client, v5::ConnAck) {
        let mut raw = Raw::connect(addr);
        let properties = v5::ConnectProperties {
            session_expiry_interval: o.expiry,
            receive_maximum: o.receive_maximum,
            max_packet_size: o.max_packet_size,
            topic_alias_max: o.topic_alias_max,
            ..v5::ConnectProperties::new()
        };
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: id.to_string(),
            clean_start: o.clean,
            properties: Some(properties),
        };
        let ack = raw
            .connect_v5_full(connect, None, Some((id, SECRET)))
            .expect("CONNACK");
        assert_eq!(ack.code, v5::ConnectReturnCode::Success, "{id}");
        (
            Client {
                raw,
                next_pkid: 1,
                early: Vec::new(),
            },
            ack,
        )
    }

    fn service(gw: &Gateway, id: &str, o: Opts) -> (Client, v5::ConnAck) {
        Client::connect(gw.service_plain, id, o)
    }

    fn device(gw: &Gateway) -> Client {
        Client::connect(gw.device_plain, "sensor-1", CLEAN).0
    }

    fn pkid(&mut self) -> u16 {
        let p = self.next_pkid;
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        p
    }

    /// SUBSCRIBE and wait for the SUBACK (publishes that come first are kept unread).
    fn subscribe(
        &mut self,
        filters: Vec<v5::Filter>,
        id: Option<usize>,
    ) -> Vec<v5::SubscribeReasonCode> {
        let pkid = self.pkid();
        let properties = id.map(|id| v5::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        self.raw.send_v5(v5::Packet::Subscribe(v5::Subscribe {
            pkid,
            filters,
            properties,
        }));
        loop {
            match self.raw.recv_v5(T) {
                Some(v5::Packet::SubAck(a)) => {
                    assert_eq!(a.pkid, pkid);
                    return a.return_codes;
                }
                Some(v5::Packet::Publish(p)) => self.early.push(p),
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }

    fn sub(&mut self, filter: &str, qos: Q5) {
        let codes = self.subscribe(vec![v5::Filter::new(filter, qos)], None);
        assert!(
            matches!(codes[..], [v5::SubscribeReasonCode::Success(_)]),
            "{filter}: {codes:?}"
        );
    }

    /// PUBLISH; a QoS 1 publish waits for its PUBACK.
    fn publish(&mut self, topic: &str, payload: &str, qos: Q5, retain: bool) {
        let mut p = v5::Publish::new(topic, qos, payload.as_bytes().to_vec(), None);
        p.retain = retain;
        if qos != Q5::AtMostOnce {
            p.pkid = self.pkid();
        }
        self.raw.send_v5(v5::Packet::Publish(p.clone()));
        if qos == Q5::AtLeastOnce {
            loop {
                match self.raw.recv_v5(T) {
                    Some(v5::Packet::PubAck(a)) if a.pkid == p.pkid => {
                        assert_eq!(a.reason, v5::PubAckReason::Success, "{topic}");
                        return;
                    }
                    Some(v5::Packet::Publish(p)) => self.early.push(p),
                    Some(_) => {}
                    None => panic!("no PUBACK for {topic}"),
                }
            }
        }
    }

    /// Every PUBLISH that arrives until the line stays quiet for `QUIET`; QoS 1
    /// ones are acknowledged when `ack` is set.
    fn received(&mut self, ack: bool) -> Vec<v5::Publish> {
        let mut got = std::mem::take(&mut self.early);
        for p in &got {
            if ack && p.qos == Q5::AtLeastOnce {
                self.raw
                    .send_v5(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)));
            }
        }
        while let Some(p) = self.raw.recv_v5(QUIET) {
            if let v5::Packet::Publish(p) = p {
                if ack && p.qos == Q5::AtLeastOnce {
                    self.raw
                        .send_v5(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)));
                }
                got.push(p);
            }
        }
        got
    }

    fn disconnect(mut self) {
        self.raw.send_v5(v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )));
        let _ = self.raw.closed_within(T);
    }
}

fn payloads(got: &[v5::Publish]) -> Vec<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn persistent(expiry: u32) -> Opts {
    Opts {
        clean: false,
        expiry: Some(expiry),
        ..CLEAN
    }
}

#[test]
fn a_persistent_service_session_keeps_subscriptions_and_messages_while_away() {
    let gw = setup("");
    let (mut svc, ack) = Client::service(&gw, "alpha", persistent(300));
    assert!(!ack.session_present);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    svc.disconnect();
    let mut d = Client::device(&gw);
    for n in 0..3 {
        d.publish(
            "devices/sensor-1/telemetry",
            &format!("m{n}"),
            Q5::AtLeastOnce,
            false,
        );
    }
    let (mut svc, ack) = Client::service(&gw, "alpha", persistent(300));
    assert!(ack.session_present, "the session was kept");
    let got = svc.received(true);
    assert_eq!(payloads(&got), vec!["m0", "m1", "m2"]);
    // Still subscribed: the next message arrives live.
    d.publish("devices/sensor-1/telemetry", "live", Q5::AtLeastOnce, false);
    assert_eq!(payloads(&svc.received(true)), vec!["live"]);
}

#[test]
fn a_clean_service_session_starts_empty_and_leaves_nothing_behind() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", persistent(300));
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    svc.disconnect();
    let (svc, ack) = Client::service(&gw, "alpha", CLEAN);
    assert!(!ack.session_present);
    svc.disconnect();
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "gone", Q5::AtLeastOnce, false);
    let (mut svc, ack) = Client::service(&gw, "alpha", persistent(300));
    assert!(!ack.session_present);
    assert!(
        svc.received(true).is_empty(),
        "no subscription survived the clean start"
    );
}

#[test]
fn mosquitto_sub_with_a_persistent_session_gets_what_was_sent_while_it_was_away() {
    let gw = setup("");
    let args = |extra: &[&str]| {
        let mut a = vec![
            s("-h"),
            s("127.0.0.1"),
            s("-p"),
            gw.service_plain.port().to_string(),
            s("-i"),
            s("alpha"),
            s("-u"),
            s("alpha"),
            s("-P"),
            s(SECRET),
            s("-c"),
            s("-q"),
            s("1"),
            s("-t"),
            s("devices/+/telemetry/#"),
            s("-v"),
        ];
        a.extend(extra.iter().map(|x| s(x)));
        a
    };
    // MQTT 3.1.1, clean session = 0: subscribe once, leave.
    let out = mosquitto("mosquitto_sub", &args(&["-E"]), T);
    assert!(out.status.success(), "{}", text(&out));
    let mut d = Client::device(&gw);
    d.publish(
        "devices/sensor-1/telemetry",
        "while-away",
        Q5::AtLeastOnce,
        false,
    );
    let out = mosquitto("mosquitto_sub", &args(&["-C", "1", "-W", "5"]), T);
    assert!(
        text(&out).contains("devices/sensor-1/telemetry while-away"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_parked_service_session_expires_with_its_queue_counted() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", persistent(1));
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    svc.disconnect();
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "late", Q5::AtLeastOnce, false);
    std::thread::sleep(Duration::from_millis(3000));
    let (mut svc, ack) = Client::service(&gw, "alpha", persistent(1));
    assert!(!ack.session_present, "expired after 1 s");
    assert!(svc.received(true).is_empty());
    assert!(gw.metric("portcullis_queue_expired_total ") >= 1);
}

#[test]
fn a_full_service_queue_refuses_counts_and_audits() {
    let gw = setup("[sessions]\nservice_queue_max_messages = 2\n");
    let (mut svc, _) = Client::service(&gw, "alpha", persistent(300));
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    svc.disconnect();
    let mut d = Client::device(&gw);
    for n in 0..5 {
        d.publish(
            "devices/sensor-1/telemetry",
            &format!("m{n}"),
            Q5::AtLeastOnce,
            false,
        );
    }
    // Every message through the broker before the service returns.
    wait_for(T, || {
        (gw.metric("portcullis_queue_overflow_total ") == 3).then_some(())
    })
    .expect("three refused by the full queue");
    let (mut svc, _) = Client::service(&gw, "alpha", persistent(300));
    assert_eq!(
        payloads(&svc.received(true)),
        vec!["m0", "m1"],
        "the oldest are kept"
    );
    assert_eq!(gw.metric("portcullis_queue_overflow_total "), 3);
    gw.wait_audit(&["\"queue\"", "\"alpha\"", "queue full (messages)"]);
}

#[test]
fn each_message_arrives_at_the_lower_of_its_qos_and_the_subscriptions() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "q0", Q5::AtMostOnce, false);
    d.publish("devices/sensor-1/telemetry", "q1", Q5::AtLeastOnce, false);
    let got = svc.received(true);
    let qos: Vec<_> = got
        .iter()
        .map(|p| (String::from_utf8_lossy(&p.payload).into_owned(), p.qos))
        .collect();
    assert_eq!(
        qos,
        vec![(s("q0"), Q5::AtMostOnce), (s("q1"), Q5::AtLeastOnce)],
        "a QoS 0 message stays QoS 0"
    );
}

#[test]
fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    svc.sub("devices/sensor-1/telemetry", Q5::AtMostOnce);
    svc.sub("devices/+/telemetry", Q5::AtMostOnce);
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "once", Q5::AtLeastOnce, false);
    let got = svc.received(true);
    assert_eq!(payloads(&got), vec!["once"]);
    assert_eq!(got[0].qos, Q5::AtLeastOnce);
}

#[test]
fn no_local_keeps_a_services_own_messages_from_it() {
    let gw = setup("");
    let (mut a, _) = Client::service(&gw, "alpha", CLEAN);
    let (mut b, _) = Client::service(&gw, "beta", CLEAN);
    let mut nl = v5::Filter::new("jobs/#", Q5::AtLeastOnce);
    nl.nolocal = true;
    a.subscribe(vec![nl.clone()], None);
    b.subscribe(vec![nl], None);
    a.publish("jobs/1", "from-alpha", Q5::AtLeastOnce, false);
    assert!(a.received(true).is_empty(), "alpha does not hear itself");
    assert_eq!(payloads(&b.received(true)), vec!["from-alpha"]);
    // Without No Local, a service hears its own messages.
    a.sub("jobs/#", Q5::AtLeastOnce);
    a.publish("jobs/2", "echo", Q5::AtLeastOnce, false);
    assert_eq!(payloads(&a.received(true)), vec!["echo"]);
}

#[test]
fn retain_as_published_keeps_the_flag_on_live_messages() {
    let gw = setup("");
    let (mut a, _) = Client::service(&gw, "alpha", CLEAN);
    let (mut b, _) = Client::service(&gw, "beta", CLEAN);
    let mut rap = v5::Filter::new("devices/+/telemetry/#", Q5::AtLeastOnce);
    rap.preserve_retain = true;
    a.subscribe(vec![rap], None);
    b.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    d.publish(
        "devices/sensor-1/telemetry/state",
        "kept",
        Q5::AtLeastOnce,
        true,
    );
    d.publish(
        "devices/sensor-1/telemetry",
        "plain",
        Q5::AtLeastOnce,
        false,
    );
    let flags = |got: Vec<v5::Publish>| got.iter().map(|p| p.retain).collect::<Vec<_>>();
    assert_eq!(flags(a.received(true)), vec![true, false]);
    assert_eq!(
        flags(b.received(true)),
        vec![false, false],
        "live: retain cleared"
    );
}

#[test]
fn retain_handling_decides_when_retained_messages_are_sent() {
    let gw = setup("");
    // A witness: once it has both, the broker has routed them (and kept them as
    // retained). A publish still on its way when a service subscribes reaches it live.
    let (mut witness, _) = Client::service(&gw, "beta", CLEAN);
    witness.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    for (t, qos) in [("a", Q5::AtMostOnce), ("b", Q5::AtLeastOnce)] {
        d.publish(&format!("devices/sensor-1/telemetry/{t}"), t, qos, true);
    }
    assert_eq!(witness.received(true).len(), 2);
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    let with = |rh| {
        let mut f = v5::Filter::new("devices/+/telemetry/#", Q5::AtLeastOnce);
        f.retain_forward_rule = rh;
        vec![f]
    };
    svc.subscribe(with(v5::RetainForwardRule::OnNewSubscribe), None);
    let got = svc.received(true);
    assert_eq!(payloads(&got), vec!["a", "b"]);
    assert!(
        got.iter().all(|p| p.retain),
        "sent at subscribe time: retained"
    );
    assert_eq!(
        got[0].qos,
        Q5::AtMostOnce,
        "a retained message keeps its own QoS"
    );
    svc.subscribe(with(v5::RetainForwardRule::OnNewSubscribe), None);
    assert!(
        svc.received(true).is_empty(),
        "1: not for an existing subscription"
    );
    svc.subscribe(with(v5::RetainForwardRule::OnEverySubscribe), None);
    assert_eq!(svc.received(true).len(), 2, "0: at every subscribe");
    svc.subscribe(with(v5::RetainForwardRule::Never), None);
    assert!(svc.received(true).is_empty(), "2: never");
}

#[test]
fn subscription_identifiers_come_back_with_every_matching_message() {
    let gw = setup("");
    let (mut svc, ack) = Client::service(&gw, "alpha", CLEAN);
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.subscription_identifiers_available, Some(1));
    assert_eq!(props.shared_subscription_available, Some(1));
    svc.subscribe(
        vec![v5::Filter::new("devices/+/telemetry/#", Q5::AtLeastOnce)],
        Some(11),
    );
    svc.subscribe(
        vec![v5::Filter::new(
            "devices/sensor-1/telemetry/#",
            Q5::AtLeastOnce,
        )],
        Some(22),
    );
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "x", Q5::AtLeastOnce, false);
    let got = svc.received(true);
    assert_eq!(got.len(), 1);
    let mut ids = got[0]
        .properties
        .clone()
        .expect("properties")
        .subscription_identifiers;
    ids.sort();
    assert_eq!(ids, vec![11, 22]);
}

#[test]
fn a_services_puback_is_not_held_behind_a_full_delivery_window() {
    let gw = setup("");
    let o = Opts {
        receive_maximum: Some(1),
        ..CLEAN
    };
    let (mut svc, _) = Client::service(&gw, "alpha", o);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "1", Q5::AtLeastOnce, false);
    d.publish("devices/sensor-1/telemetry", "2", Q5::AtLeastOnce, false);
    // One delivery is out and unacknowledged: the window is full. The service's own
    // publish is still acknowledged.
    let first = svc.received(false);
    assert_eq!(
        payloads(&first),
        vec!["1"],
        "one in flight, the other waits"
    );
    svc.publish(
        "devices/sensor-1/commands/reboot",
        "now",
        Q5::AtLeastOnce,
        false,
    );
    // Acknowledging the first lets the second out.
    svc.raw
        .send_v5(v5::Packet::PubAck(v5::PubAck::new(first[0].pkid, None)));
    assert_eq!(payloads(&svc.received(true)), vec!["2"]);
}

#[test]
fn the_clients_maximum_packet_size_is_its_real_encoded_size() {
    let gw = setup("");
    let o = Opts {
        max_packet_size: Some(64),
        ..CLEAN
    };
    let (mut svc, _) = Client::service(&gw, "alpha", o);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    // Topic 26 bytes: a QoS 1 PUBLISH is 2 + 2 + 26 + 2 + 1 + payload bytes.
    d.publish(
        "devices/sensor-1/telemetry",
        &"a".repeat(31),
        Q5::AtLeastOnce,
        false,
    );
    d.publish(
        "devices/sensor-1/telemetry",
        &"b".repeat(32),
        Q5::AtLeastOnce,
        false,
    );
    let got = svc.received(true);
    assert_eq!(
        payloads(&got),
        vec!["a".repeat(31)],
        "64 bytes fit, 65 do not"
    );
    assert_eq!(gw.refusals("deliver", "over_client_maximum_packet_size"), 1);
}

#[test]
fn a_shared_subscription_spreads_messages_over_its_members() {
    let gw = setup("");
    let (mut a, _) = Client::service(&gw, "alpha", CLEAN);
    let (mut b, _) = Client::service(&gw, "beta", CLEAN);
    a.sub("$share/workers/devices/+/telemetry/#", Q5::AtLeastOnce);
    b.sub("$share/workers/devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    for n in 0..6 {
        d.publish(
            "devices/sensor-1/telemetry",
            &format!("m{n}"),
            Q5::AtLeastOnce,
            false,
        );
    }
    let (ga, gb) = (payloads(&a.received(true)), payloads(&b.received(true)));
    assert_eq!(ga.len() + gb.len(), 6, "each message once: {ga:?} {gb:?}");
    assert!(
        !ga.is_empty() && !gb.is_empty(),
        "both members get some: {ga:?} {gb:?}"
    );
    // The share's filter is authorized like any other.
    let codes = a.subscribe(
        vec![v5::Filter::new("$share/workers/secrets/#", Q5::AtLeastOnce)],
        None,
    );
    assert_eq!(codes, vec![v5::SubscribeReasonCode::NotAuthorized]);
}

#[test]
fn a_device_cannot_use_a_shared_subscription() {
    let gw = setup("");
    let mut d = Client::device(&gw);
    let codes = d.subscribe(
        vec![v5::Filter::new(
            "$share/g/devices/sensor-1/commands/#",
            Q5::AtLeastOnce,
        )],
        None,
    );
    assert_eq!(
        codes,
        vec![v5::SubscribeReasonCode::SharedSubscriptionsNotSupported]
    );
}

#[test]
fn unsubscribing_a_service_stops_its_messages_and_says_which_existed() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    svc.raw.send_v5(v5::Packet::Unsubscribe(v5::Unsubscribe {
        pkid: 77,
        filters: vec![s("devices/+/telemetry/#"), s("never/subscribed")],
        properties: None,
    }));
    match svc.raw.recv_v5(T) {
        Some(v5::Packet::UnsubAck(u)) => assert_eq!(
            u.reasons,
            vec![
                v5::UnsubAckReason::Success,
                v5::UnsubAckReason::NoSubscriptionExisted
            ]
        ),
        other => panic!("no UNSUBACK: {other:?}"),
    }
    let mut d = Client::device(&gw);
    d.publish("devices/sensor-1/telemetry", "x", Q5::AtLeastOnce, false);
    assert!(svc.received(true).is_empty());
}

#[test]
fn repeated_topics_go_out_as_topic_aliases_when_the_client_allows_them() {
    let gw = setup("");
    let o = Opts {
        topic_alias_max: Some(1),
        ..CLEAN
    };
    let (mut svc, _) = Client::service(&gw, "alpha", o);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    for t in [
        "devices/sensor-1/telemetry",
        "devices/sensor-1/telemetry",
        "devices/sensor-1/telemetry/b",
    ] {
        d.publish(t, "x", Q5::AtLeastOnce, false);
    }
    let got = svc.received(true);
    let seen: Vec<_> = got
        .iter()
        .map(|p| {
            let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
            (String::from_utf8_lossy(&p.topic).into_owned(), alias)
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (s("devices/sensor-1/telemetry"), Some(1)),
            (s(""), Some(1)),
            (s("devices/sensor-1/telemetry/b"), None),
        ],
        "the first defines alias 1, the second uses it, a third topic has none left"
    );
    // Without a Topic Alias Maximum, no alias at all.
    let (mut plain, _) = Client::service(&gw, "beta", CLEAN);
    plain.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    d.publish("devices/sensor-1/telemetry", "x", Q5::AtLeastOnce, false);
    d.publish("devices/sensor-1/telemetry", "x", Q5::AtLeastOnce, false);
    assert!(plain.received(true).iter().all(|p| {
        p.properties.as_ref().and_then(|p| p.topic_alias).is_none() && !p.topic.is_empty()
    }));
}

#[test]
fn a_message_resent_on_reconnect_respects_the_new_maximum_packet_size() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", persistent(300));
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    d.publish(
        "devices/sensor-1/telemetry",
        &"x".repeat(100),
        Q5::AtLeastOnce,
        false,
    );
    // Received, never acknowledged: it is resent on the next connection.
    assert_eq!(svc.received(false).len(), 1);
    drop(svc);
    let small = Opts {
        max_packet_size: Some(64),
        ..persistent(300)
    };
    let (mut svc, ack) = Client::service(&gw, "alpha", small);
    assert!(ack.session_present);
    assert!(
        svc.received(true).is_empty(),
        "too large for this connection"
    );
    assert_eq!(gw.refusals("deliver", "over_client_maximum_packet_size"), 1);
    // And it is gone, not resent for ever.
    svc.disconnect();
    let (mut svc, _) = Client::service(&gw, "alpha", persistent(300));
    assert!(svc.received(true).is_empty());
    // The session still works.
    d.publish("devices/sensor-1/telemetry", "next", Q5::AtLeastOnce, false);
    assert_eq!(payloads(&svc.received(true)), vec!["next"]);
}

/// The gateway's resident memory, in KiB.
fn rss_kib(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn unsubscribe(c: &mut Client, filter: &str) {
    let pkid = c.pkid();
    c.raw.send_v5(v5::Packet::Unsubscribe(v5::Unsubscribe {
        pkid,
        filters: vec![s(filter)],
        properties: None,
    }));
    match c.raw.recv_v5(T) {
        Some(v5::Packet::UnsubAck(u)) => {
            assert_eq!(u.reasons, vec![v5::UnsubAckReason::Success], "{filter}")
        }
        other => panic!("no UNSUBACK for {filter}: {other:?}"),
    }
}

#[test]
fn subscribing_and_unsubscribing_unique_filters_holds_no_memory() {
    // The attack: a service subscribes and unsubscribes unique filters as fast as it
    // can. Each one used to leave ~6 KB in the embedded broker for good.
    let gw = setup_limits(
        "",
        "subscribe_rate = 1000000.0\nsubscribe_burst = 1000000.0",
    );
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    // Warm up (allocator arenas, the session's buffers) before the baseline.
    for i in 0..500 {
        let f = format!("jobs/warm/{i}");
        svc.sub(&f, Q5::AtMostOnce);
        unsubscribe(&mut svc, &f);
    }
    let before = rss_kib(&gw);
    for i in 0..10_000 {
        let f = format!("jobs/churn/{i}/x");
        svc.sub(&f, Q5::AtLeastOnce);
        unsubscribe(&mut svc, &f);
    }
    assert_eq!(gw.metric("portcullis_service_subscriptions"), 0);
    let after = rss_kib(&gw);
    // 10 000 filters at the old ~6 KB each would be ~60 MiB.
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 10 000 unique filters"
    );
    svc.disconnect();
}

#[test]
fn new_filters_over_the_subscribe_rate_are_refused_with_quota_exceeded() {
    let gw = setup_limits("", "subscribe_rate = 0.01\nsubscribe_burst = 5");
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    let filters: Vec<v5::Filter> = (0..8)
        .map(|i| v5::Filter::new(format!("jobs/{i}"), Q5::AtMostOnce))
        .collect();
    let codes = svc.subscribe(filters, None);
    assert_eq!(
        codes[..5],
        vec![v5::SubscribeReasonCode::Success(Q5::AtMostOnce); 5][..]
    );
    assert_eq!(
        codes[5..],
        vec![v5::SubscribeReasonCode::QuotaExceeded; 3][..]
    );
    // Changing a subscription it holds adds nothing: still allowed.
    assert_eq!(
        svc.subscribe(vec![v5::Filter::new("jobs/0", Q5::AtLeastOnce)], None),
        vec![v5::SubscribeReasonCode::Success(Q5::AtLeastOnce)]
    );
    assert_eq!(gw.refusals("subscribe", "subscribe_rate"), 3);
    assert_eq!(gw.metric("portcullis_service_subscriptions"), 5);
    gw.wait_audit(&["subscribe", "limits.subscribe_rate"]);
}

#[test]
fn service_subscriptions_are_bounded_over_all_sessions_and_freed_ones_count_again() {
    let gw = setup("[broker]\nmax_subscriptions = 3\n");
    let (mut a, _) = Client::service(&gw, "alpha", CLEAN);
    let (mut b, _) = Client::service(&gw, "beta", CLEAN);
    a.sub("jobs/a/1", Q5::AtMostOnce);
    a.sub("jobs/a/2", Q5::AtMostOnce);
    b.sub("jobs/b/1", Q5::AtMostOnce);
    assert_eq!(
        b.subscribe(vec![v5::Filter::new("jobs/b/2", Q5::AtMostOnce)], None),
        vec![v5::SubscribeReasonCode::QuotaExceeded]
    );
    assert_eq!(gw.refusals("subscribe", "subscriptions_full"), 1);
    a.disconnect();
    let freed = wait_for(T, || {
        (gw.metric("portcullis_service_subscriptions") == 1).then_some(())
    });
    assert!(
        freed.is_some(),
        "alpha's clean session left its subscriptions"
    );
    b.sub("jobs/b/2", Q5::AtLeastOnce);
    b.publish("jobs/b/2", "hello", Q5::AtLeastOnce, false);
    let got = b.received(true);
    assert_eq!(got.len(), 1, "{got:?}");
}

#[test]
fn a_service_that_reads_nothing_pins_bounded_memory_audited_once_and_returned() {
    let gw = Gateway::start_all(
        r#"
[service_groups.cluster]
trust = []
publish = ["jobs/#"]
subscribe = ["devices/+/telemetry/#"]
"#,
        "",
        "messages_per_second = 100000.0\nmessage_burst = 100000.0\nbytes_per_second = 1e12\nbyte_burst = 1e12",
    );
    gw.add_device_secret("sensor-1", SECRET);
    let out = gw.cli_stdin(
        &[
            "service",
            "add",
            "alpha",
            "--group",
            "cluster",
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    // From here on the service reads nothing.
    let mut d = Client::device(&gw);
    let payload = "x".repeat(200 * 1024);
    let before = rss_kib(&gw);
    let mut peak = before;
    for _ in 0..600 {
        d.publish(
            "devices/sensor-1/telemetry",
            &payload,
            Q5::AtLeastOnce,
            false,
        );
        peak = peak.max(rss_kib(&gw));
    }
    // 117 MiB went by. What stays is the service's queue (16 MiB by default), its
    // delivery window, and the broker's bounded logs, not everything sent.
    assert!(
        peak < before + 80 * 1024,
        "RSS rose from {before} KiB to {peak} KiB behind a consumer that reads nothing"
    );
    // The fan-out may still be routing the last ones when the publisher is done.
    let overflowed = wait_for(Duration::from_secs(10), || {
        let n = gw.metric("portcullis_queue_overflow_total ");
        (n > 400).then_some(n)
    });
    assert!(
        overflowed.is_some(),
        "{} refused",
        gw.metric("portcullis_queue_overflow_total ")
    );
    let audit = gw.audit();
    let lines = audit
        .lines()
        .filter(|l| l.contains("\"queue\"") && l.contains("\"alpha\""))
        .count();
    assert_eq!(lines, 1, "one audit line for one run of refusals:\n{audit}");
    // Its clean session ends with the connection: the queue's memory goes back.
    drop(svc);
    let back = wait_for(Duration::from_secs(10), || {
        let now = rss_kib(&gw);
        (now + 8 * 1024 < peak).then_some(now)
    });
    assert!(
        back.is_some(),
        "RSS stayed near {peak} KiB after the consumer left"
    );
}

#[test]
fn sixty_four_overlapping_filters_deliver_each_message_once() {
    let gw = setup("");
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    let levels = ["a", "b", "c", "d", "e", "f"];
    // Every choice of a literal or `+` per level: 64 filters matching one topic.
    let filters: Vec<String> = (0..64u32)
        .map(|mask| {
            let parts: Vec<&str> = levels
                .iter()
                .enumerate()
                .map(|(i, l)| if mask & (1 << i) != 0 { "+" } else { *l })
                .collect();
            format!("jobs/{}", parts.join("/"))
        })
        .collect();
    for chunk in filters.chunks(16) {
        let codes = svc.subscribe(
            chunk
                .iter()
                .map(|f| v5::Filter::new(f.clone(), Q5::AtLeastOnce))
                .collect(),
            None,
        );
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, v5::SubscribeReasonCode::Success(_))),
            "{codes:?}"
        );
    }
    let (mut publisher, _) = Client::service(&gw, "beta", CLEAN);
    publisher.publish("jobs/a/b/c/d/e/f", "once", Q5::AtLeastOnce, false);
    assert_eq!(payloads(&svc.received(true)), vec!["once"]);
}

#[test]
fn service_sessions_coming_and_going_leave_no_broker_errors() {
    let gw = setup("");
    for _ in 0..20 {
        let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
        svc.sub("jobs/#", Q5::AtLeastOnce);
        svc.disconnect();
    }
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("jobs/#", Q5::AtLeastOnce);
    drop(svc);
    let (mut last, _) = Client::service(&gw, "beta", CLEAN);
    last.publish("jobs/x", "y", Q5::AtLeastOnce, false);
    let log = gw.stderr();
    assert!(
        !log.contains("ERROR") && !log.contains("already gone"),
        "the gateway logged errors for ordinary sessions:\n{log}"
    );
}

#[test]
fn the_gateway_keeps_no_more_topic_aliases_for_a_client_than_its_own_maximum() {
    // A client may allow 65 535 aliases; the gateway keeps at most
    // sessions.topic_alias_maximum of them (here 2) per connection.
    let gw = setup("[sessions]\ntopic_alias_maximum = 2\n");
    let o = Opts {
        topic_alias_max: Some(u16::MAX),
        ..CLEAN
    };
    let (mut svc, _) = Client::service(&gw, "alpha", o);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut d = Client::device(&gw);
    for n in 0..5 {
        d.publish(
            &format!("devices/sensor-1/telemetry/{n}"),
            "x",
            Q5::AtLeastOnce,
            false,
        );
    }
    let aliases: Vec<_> = svc
        .received(true)
        .iter()
        .map(|p| p.properties.as_ref().and_then(|p| p.topic_alias))
        .collect();
    assert_eq!(aliases, vec![Some(1), Some(2), None, None, None]);
}

#[test]
fn one_device_cannot_fill_the_retained_store_with_its_telemetry() {
    let gw = setup("[sessions]\nmax_retained_telemetry_bytes_per_device = 524288\n");
    let mut d = Client::device(&gw);
    let payload = vec![b'r'; 200 * 1024];
    let mut codes = Vec::new();
    for n in 0..3 {
        let mut p = v5::Publish::new(
            format!("devices/sensor-1/telemetry/state{n}"),
            Q5::AtLeastOnce,
            payload.clone(),
            None,
        );
        p.retain = true;
        p.pkid = d.pkid();
        d.raw.send_v5(v5::Packet::Publish(p));
        match d.raw.recv_v5(T) {
            Some(v5::Packet::PubAck(a)) => codes.push(a.reason),
            other => panic!("no PUBACK: {other:?}"),
        }
    }
    assert_eq!(
        codes,
        vec![
            v5::PubAckReason::Success,
            v5::PubAckReason::Success,
            v5::PubAckReason::QuotaExceeded
        ]
    );
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("devices/+/telemetry/#", Q5::AtLeastOnce);
    let mut topics: Vec<String> = svc
        .received(true)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    topics.sort();
    assert_eq!(
        topics,
        vec![
            "devices/sensor-1/telemetry/state0",
            "devices/sensor-1/telemetry/state1"
        ]
    );
}

/// A gateway whose broker keeps a short log per topic (two 16 KiB segments, 8 of the
/// numbered messages each), with sensor-1 and the service alpha (in `group`) and rates
/// that hold nobody back. The gateway is left quiet for 1.5 s first: the limit must
/// hold from the first message of a burst.
fn small_log(group: &str) -> Gateway {
    let gw = Gateway::start_all(
        &format!(
            "[broker]\nmax_segment_size = 16384\nmax_segment_count = 2\n\
             [service_groups.cluster]\ntrust = []\n{group}\n"
        ),
        "",
        "messages_per_second = 100000.0\nmessage_burst = 100000.0\nbytes_per_second = 1e12\nbyte_burst = 1e12",
    );
    gw.add_device_secret("sensor-1", SECRET);
    let out = gw.cli_stdin(
        &[
            "service",
            "add",
            "alpha",
            "--group",
            "cluster",
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    gw
}

const BURST: usize = 400;

/// `BURST` numbered 2 KB messages on `topic`, QoS 0, as fast as they go.
fn burst(from: &mut Client, topic: &str) {
    std::thread::sleep(Duration::from_millis(1500));
    let pad = "x".repeat(2000);
    for n in 0..BURST {
        from.publish(topic, &format!("{n:04}{pad}"), Q5::AtMostOnce, false);
    }
}

/// The numbers of what `to` received.
fn numbers(to: &mut Client) -> Vec<usize> {
    to.received(false)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload[..4]).parse().unwrap())
        .collect()
}

/// A fan-out that fell further behind than the broker's log would lose messages from
/// the log's front without a trace. The uplinks wait for it instead, so a burst
/// arrives whole, in order.
#[test]
fn a_burst_larger_than_the_brokers_log_reaches_a_service_whole() {
    let gw = small_log("subscribe = [\"devices/+/telemetry/#\"]");
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    svc.sub("devices/+/telemetry/#", Q5::AtMostOnce);
    let mut d = Client::device(&gw);
    burst(&mut d, "devices/sensor-1/telemetry");
    assert_eq!(
        numbers(&mut svc),
        (0..BURST).collect::<Vec<_>>(),
        "lost or out of order"
    );
}

/// The same for commands: the downlink reads the broker's log of every device's
/// commands, and a burst larger than that log reaches the device whole, in order (it
/// lost dozens before the uplinks waited for the fan-out, which reads commands too).
#[test]
fn a_command_burst_larger_than_the_brokers_log_reaches_the_device_whole() {
    let gw = small_log("publish = [\"devices/+/commands/#\"]");
    let mut d = Client::device(&gw);
    d.sub("devices/sensor-1/commands/#", Q5::AtMostOnce);
    let (mut svc, _) = Client::service(&gw, "alpha", CLEAN);
    burst(&mut svc, "devices/sensor-1/commands/set");
    assert_eq!(
        numbers(&mut d),
        (0..BURST).collect::<Vec<_>>(),
        "lost or out of order"
    );
}
