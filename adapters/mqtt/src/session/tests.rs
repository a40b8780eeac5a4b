//! The session's handlers driven directly, without a socket, a forwarder or a sleep:
//! frames (encoded by rumqttc, an independent encoder) go in with an explicit `now`;
//! what the peer would read comes out of the output buffer, what the driver would do
//! comes back as a `Step`.

use super::*;
use portcullis_core::auth::Policies;
use portcullis_core::backoff::BackoffPolicy;
use portcullis_core::forward::{ForwardError, ForwardFuture};
use portcullis_core::principal::{GroupName, PrincipalId};
use portcullis_core::record::RecordSealer;
use portcullis_core::registry::{PrincipalRecord, Registry};
use portcullis_core::secret::SecretHasher;
use portcullis_core::validate::Validator;
use rumqttc::v5::mqttbytes::v5 as v5c;
use tokio::sync::mpsc;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// What the handlers never reach (the driver does): anything sent to it is kept, so
/// a test can say nothing was.
struct Untouched {
    uplink: mpsc::Sender<portcullis_core::forward::UplinkItem>,
}

impl Forwarder for Untouched {
    fn uplink_for(&self, _: &PrincipalId) -> Uplink {
        Uplink::new(self.uplink.clone(), None)
    }
    fn service_uplink(&self, id: &PrincipalId) -> Uplink {
        Uplink::new(self.uplink.clone(), Some(id.clone()))
    }
    fn events(&self) -> Uplink {
        Uplink::new(self.uplink.clone(), None)
    }
    fn register_device(
        &self,
        _: PrincipalId,
        _: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>> {
        Box::pin(async { Err(ForwardError::Stopped) })
    }
    fn unregister_device(&self, _: PrincipalId, _: Arc<Mailbox>) -> ForwardFuture<'_, ()> {
        Box::pin(async {})
    }
    fn attach_service(
        &self,
        _: PrincipalId,
        _: Arc<Mailbox>,
    ) -> ForwardFuture<'_, Result<(), ForwardError>> {
        Box::pin(async { Err(ForwardError::Stopped) })
    }
    fn detach_service(&self, _: PrincipalId, _: Arc<Mailbox>) -> ForwardFuture<'_, ()> {
        Box::pin(async {})
    }
    fn service_online(&self, _: PrincipalId, _: bool) -> ForwardFuture<'_, ()> {
        Box::pin(async {})
    }
    fn subscribe(
        &self,
        _: PrincipalId,
        _: Vec<Subscription>,
    ) -> ForwardFuture<'_, Result<Vec<Result<bool, SubscribeError>>, ForwardError>> {
        Box::pin(async { Err(ForwardError::Stopped) })
    }
    fn unsubscribe(
        &self,
        _: PrincipalId,
        _: Vec<SubscriptionKey>,
    ) -> ForwardFuture<'_, Result<Vec<bool>, ForwardError>> {
        Box::pin(async { Err(ForwardError::Stopped) })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    ctx: Context,
    session: Session,
    uplink: mpsc::Receiver<portcullis_core::forward::UplinkItem>,
    t0: Instant,
}

fn limits() -> SessionLimits {
    let mailbox = MailboxLimits {
        max_messages: 100,
        max_bytes: 1 << 20,
        max_age: Duration::from_secs(60),
    };
    SessionLimits {
        max_packet_size: 1 << 20,
        topic: TopicLimits {
            max_length: 256,
            max_depth: 16,
        },
        connect_timeout: Duration::from_secs(5),
        max_subscribe_filters: 8,
        write_timeout: Duration::from_secs(5),
        max_session_expiry: 3600,
        mailbox,
        service_mailbox: mailbox,
        max_inflight: 16,
        receive_maximum: 2,
        topic_alias_maximum: 4,
        max_keep_alive: 600,
        max_user_properties: 8,
        max_subscriptions: 16,
        subscribe_rate: Rate {
            per_second: 10.0,
            burst: 64.0,
        },
    }
}

/// A session of `id` (a device, or a service), connected with `version`, under the
/// default configuration edited by `edit`.
fn fixture(
    kind: PrincipalKind,
    version: ProtocolVersion,
    edit: impl FnOnce(&mut portcullis_config::Config),
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = portcullis_config::Config::default();
    for g in config.device_groups.values_mut() {
        g.trust.clear();
    }
    for g in config.service_groups.values_mut() {
        g.trust.clear();
    }
    config.rate_limits.global_messages_per_second = 1_000_000;
    edit(&mut config);
    let t0 = Instant::now();
    let registry = Arc::new(
        Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap(),
    );
    let hasher = SecretHasher::from_key([9; 32]);
    let id = match kind {
        PrincipalKind::Device => "meter-1",
        PrincipalKind::Service => "billing",
    };
    for (kind, id) in [(kind, id), (PrincipalKind::Device, "meter-2")] {
        registry
            .add(PrincipalRecord {
                kind,
                id: PrincipalId::parse(id).unwrap(),
                group: GroupName::parse("default").unwrap(),
                enabled: true,
                cert: None,
                secret_hash: Some(hex::encode(hasher.hash(SECRET))),
                psk: None,
                frame_key: None,
                generation: 1,
                created_unix: 0,
                updated_unix: 0,
            })
            .unwrap();
    }
    let auth = Arc::new(Authenticator::new(
        registry,
        hasher,
        Arc::new(Policies::from_config(&config).unwrap()),
        BackoffPolicy::from_config(&config.auth),
    ));
    let metrics = Arc::new(Metrics::default());
    let (audit, _) = Audit::detached(1024, metrics.clone());
    let (behaviours, _) =
        Behaviours::new(portcullis_core::quarantine::Policies::from_config(&config));
    let validator = Arc::new(Validator::new(&config.validation, |p| p.to_path_buf()).unwrap());
    let (_, live) = watch::channel(Arc::new(Live {
        config: Arc::new(config.clone()),
        validator,
    }));
    let (_, shutdown) = watch::channel(false);
    let (tx, uplink) = mpsc::channel(16);
    let global = Arc::new(GlobalBucket::new(
        config.rate_limits.global_messages_per_second,
        t0,
    ));
    let retained = Arc::new(RetainedCommands::new(1 << 20));
    let shared = Arc::new(portcullis_core::admission::Shared {
        global: global.clone(),
        retained: retained.clone(),
        behaviours: behaviours.clone(),
        directory: auth.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
    });
    let ctx = Context {
        kind,
        live,
        global,
        auth,
        forwarder: Arc::new(Untouched { uplink: tx }),
        sessions: Sessions::new(),
        store: SessionStore::new(),
        retained,
        behaviours,
        shared,
        audit,
        metrics,
        limits: limits(),
        shutdown,
    };
    let connect = ConnectInfo {
        client_id: id.into(),
        username: Some(id.into()),
        password: Some(SECRET.to_vec()),
        keep_alive: 60,
        clean_start: true,
        session_expiry: 0,
        will: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_maximum: 0,
        auth_method: false,
    };
    let peer = "127.0.0.1:40000".parse().unwrap();
    let session = authenticate(&ctx, &connect, version, peer, None)
        .unwrap_or_else(|r| panic!("{id} refused: {r}"));
    Fixture {
        _dir: dir,
        ctx,
        session,
        uplink,
        t0,
    }
}

fn device(version: ProtocolVersion) -> Fixture {
    fixture(PrincipalKind::Device, version, |_| {})
}

fn v5_publish(topic: &str, qos: u8, pkid: u16, alias: Option<u16>) -> BytesMut {
    let qos = match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    };
    let props = alias.map(|a| v5c::PublishProperties {
        topic_alias: Some(a),
        ..Default::default()
    });
    let mut p = v5c::Publish::new(topic, qos, &b"21.5"[..], props);
    p.pkid = pkid;
    let mut out = BytesMut::new();
    p.write(&mut out).unwrap();
    out
}

fn v4_publish(topic: &str, qos: u8, pkid: u16) -> BytesMut {
    let qos = match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    };
    let mut p = rumqttc::Publish::new(topic, qos, &b"21.5"[..]);
    p.pkid = pkid;
    let mut out = BytesMut::new();
    p.write(&mut out).unwrap();
    out
}

fn v5_subscribe(filter: &str, pkid: u16) -> BytesMut {
    let mut s = v5c::Subscribe::new(
        v5c::Filter::new(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    );
    s.pkid = pkid;
    let mut out = BytesMut::new();
    s.write(&mut out).unwrap();
    out
}

/// What the gateway would write for `packet`.
fn wire(packet: Outgoing, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    codec::encode(&packet, version, &mut out);
    out
}

impl Fixture {
    /// One frame at `t0 + at`: the step asked for, and what the peer reads.
    fn frame(&mut self, frame: BytesMut, at: Duration) -> (Result<Step, End>, BytesMut) {
        let mut out = BytesMut::new();
        let step = self
            .session
            .on_frame(&self.ctx, frame, self.t0 + at, &mut out);
        (step, out)
    }

    fn refused(&self, refusal: Refusal) -> u64 {
        self.ctx.metrics.refusal_count(refusal)
    }
}

fn forwarded(step: Result<Step, End>) -> Forward {
    match step {
        Ok(Step::Forward(f)) => f,
        other => panic!("expected a message for the forwarder, got {other:?}"),
    }
}

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;
const NOW: Duration = Duration::ZERO;

#[test]
fn a_qos1_publish_goes_to_the_forwarder_and_its_puback_waits_for_it() {
    let mut f = device(V5);
    let (step, out) = f.frame(v5_publish("devices/meter-1/telemetry", 1, 7, None), NOW);
    let fwd = forwarded(step);
    assert_eq!(fwd.message.topic.as_str(), "devices/meter-1/telemetry");
    assert_eq!(&fwd.message.payload[..], b"21.5");
    assert_eq!((fwd.pkid, fwd.qos), (7, 1));
    assert_eq!(fwd.why, Why::Clean { arrived: f.t0 });
    // No PUBACK before the forwarder has the message; nothing was sent by the handler.
    assert!(out.is_empty(), "acknowledged early: {out:?}");
    assert!(f.uplink.try_recv().is_err());
}

#[test]
fn a_publish_outside_the_acl_is_answered_not_authorized_and_forwarded_nowhere() {
    let mut f = device(V5);
    let (step, out) = f.frame(v5_publish("devices/meter-2/telemetry", 1, 3, None), NOW);
    assert!(matches!(step, Ok(Step::Done)), "{step:?}");
    let expected = wire(
        Outgoing::PubAck {
            pkid: 3,
            reason: reason::NOT_AUTHORIZED,
        },
        V5,
    );
    assert_eq!(out, expected);
    assert_eq!(f.refused(Refusal::TopicNotAllowed), 1);
}

#[test]
fn mqtt_311_acknowledges_a_refused_publish_or_disconnects_by_policy() {
    let mut f = device(V311);
    let (step, out) = f.frame(v4_publish("devices/meter-2/x", 1, 3), NOW);
    assert!(matches!(step, Ok(Step::Done)), "{step:?}");
    assert_eq!(
        out,
        wire(
            Outgoing::PubAck {
                pkid: 3,
                reason: reason::NOT_AUTHORIZED
            },
            V311
        )
    );

    let mut f = fixture(PrincipalKind::Device, V311, |c| {
        for g in c.device_groups.values_mut() {
            g.disconnect_on_refusal = true;
        }
    });
    let (step, out) = f.frame(v4_publish("devices/meter-2/x", 1, 3), NOW);
    assert!(matches!(step, Err(End::Refused(_))), "{step:?}");
    assert!(out.is_empty());
}

#[test]
fn over_its_rate_a_publish_is_held_and_passes_when_offered_again_at_the_time_given() {
    let mut f = fixture(PrincipalKind::Device, V5, |c| {
        c.rate_limits.messages_per_second = 10.0;
        c.rate_limits.message_burst = 1.0;
    });
    let first = f.frame(v5_publish("devices/meter-1/t", 1, 1, None), NOW).0;
    forwarded(first);
    let (step, out) = f.frame(v5_publish("devices/meter-1/t", 1, 2, None), NOW);
    let Ok(Step::Wait(held)) = step else {
        panic!("expected the message held back, got {step:?}");
    };
    assert!(out.is_empty());
    // One token at 10/s: back in 100 ms.
    let wait = held.until - f.t0;
    assert!(
        wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    let mut out = BytesMut::new();
    let again = f
        .session
        .offer(held.offer, held.pkid, held.qos, held.until, &mut out);
    let fwd = forwarded(again);
    assert_eq!(fwd.pkid, 2);
    assert!(out.is_empty());
}

#[test]
fn more_unacknowledged_qos2_publishes_than_the_receive_maximum_end_the_session() {
    // The fixture announces a Receive Maximum of 2.
    let mut f = device(V5);
    forwarded(f.frame(v5_publish("devices/meter-1/t", 2, 1, None), NOW).0);
    forwarded(f.frame(v5_publish("devices/meter-1/t", 2, 2, None), NOW).0);
    let (step, _) = f.frame(v5_publish("devices/meter-1/t", 2, 3, None), NOW);
    assert!(
        matches!(
            step,
            Err(End::Protocol(reason::RECEIVE_MAXIMUM_EXCEEDED, _))
        ),
        "{step:?}"
    );
    assert_eq!(f.refused(Refusal::ReceiveMaximumExceeded), 1);
}

#[test]
fn a_qos2_retransmission_is_answered_again_and_not_forwarded_twice() {
    let mut f = device(V5);
    forwarded(f.frame(v5_publish("devices/meter-1/t", 2, 9, None), NOW).0);
    let (step, out) = f.frame(v5_publish("devices/meter-1/t", 2, 9, None), NOW);
    assert!(matches!(step, Ok(Step::Done)), "{step:?}");
    assert_eq!(
        out,
        wire(
            Outgoing::PubRec {
                pkid: 9,
                reason: reason::SUCCESS
            },
            V5
        )
    );
    // After PUBREL (answered PUBCOMP) the id is free: the next one with it is new.
    let mut rel = BytesMut::new();
    v5c::PubRel::new(9, None).write(&mut rel).unwrap();
    let (step, out) = f.frame(rel, NOW);
    assert!(matches!(step, Ok(Step::Done)));
    assert_eq!(out, wire(Outgoing::PubComp { pkid: 9 }, V5));
    forwarded(f.frame(v5_publish("devices/meter-1/t", 2, 9, None), NOW).0);
}

#[test]
fn a_topic_alias_stands_for_its_topic_and_an_unknown_one_is_a_protocol_error() {
    let mut f = device(V5);
    let first = forwarded(
        f.frame(v5_publish("devices/meter-1/temp", 0, 0, Some(1)), NOW)
            .0,
    );
    assert_eq!(first.message.topic.as_str(), "devices/meter-1/temp");
    let aliased = forwarded(f.frame(v5_publish("", 0, 0, Some(1)), NOW).0);
    assert_eq!(aliased.message.topic.as_str(), "devices/meter-1/temp");
    let (step, _) = f.frame(v5_publish("", 0, 0, Some(2)), NOW);
    assert!(
        matches!(step, Err(End::Protocol(reason::PROTOCOL_ERROR, _))),
        "{step:?}"
    );
    // Above the Topic Alias Maximum the CONNACK announced (4).
    let (step, _) = f.frame(v5_publish("devices/meter-1/x", 0, 0, Some(5)), NOW);
    assert!(
        matches!(step, Err(End::Protocol(reason::TOPIC_ALIAS_INVALID, _))),
        "{step:?}"
    );
}

#[test]
fn a_device_subscription_is_acknowledged_at_once_and_one_outside_its_acl_is_not() {
    let mut f = device(V5);
    let (step, out) = f.frame(v5_subscribe("devices/meter-1/commands/#", 4), NOW);
    assert!(matches!(step, Ok(Step::Done)), "{step:?}");
    assert_eq!(
        out,
        wire(
            Outgoing::SubAck {
                pkid: 4,
                codes: vec![Ok(1)]
            },
            V5
        )
    );
    let (step, out) = f.frame(v5_subscribe("devices/meter-2/commands/#", 5), NOW);
    assert!(matches!(step, Ok(Step::Done)));
    assert_eq!(
        out,
        wire(
            Outgoing::SubAck {
                pkid: 5,
                codes: vec![Err(reason::NOT_AUTHORIZED)]
            },
            V5
        )
    );
}

#[test]
fn a_service_subscription_is_acknowledged_only_once_the_fan_out_has_it() {
    let mut f = fixture(PrincipalKind::Service, V5, |_| {});
    let (step, out) = f.frame(v5_subscribe("devices/+/telemetry/#", 6), NOW);
    assert!(out.is_empty(), "SUBACK before the fan-out had the filter");
    let Ok(Step::Subscribe(s)) = step else {
        panic!("expected the fan-out asked first, got {step:?}");
    };
    assert_eq!(s.accepted.len(), 1);
    assert_eq!(s.accepted[0].1.key.to_string(), "devices/+/telemetry/#");
    let mut out = BytesMut::new();
    f.session
        .subscribed(&f.ctx, s, vec![Err(SubscribeError::NotAttached)], &mut out);
    // The fan-out refused it: the SUBACK says so, and the session does not hold it.
    assert_eq!(
        out,
        wire(
            Outgoing::SubAck {
                pkid: 6,
                codes: vec![Err(reason::QUOTA_EXCEEDED)]
            },
            V5
        )
    );
    assert!(f.session.state.subscriptions().is_empty());
}

#[test]
fn session_expiry_on_the_disconnect_of_a_clean_session_is_a_protocol_error() {
    let mut f = device(V5);
    let mut d = BytesMut::new();
    v5c::Disconnect {
        reason_code: v5c::DisconnectReasonCode::NormalDisconnection,
        properties: Some(v5c::DisconnectProperties {
            session_expiry_interval: Some(60),
            reason_string: Some("x".repeat(300)),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }
    .write(&mut d)
    .unwrap();
    let (step, _) = f.frame(d, NOW);
    assert!(
        matches!(step, Err(End::Protocol(reason::PROTOCOL_ERROR, _))),
        "{step:?}"
    );
}
