//! CONNECT: MQTT's own login rules, the credentials it carries, the Last Will checked
//! at CONNECT, and the session built around the core's admission.

use super::*;

pub(super) fn refuse_connect(
    ctx: &Context,
    peer: SocketAddr,
    client_id: Option<&str>,
    refusal: Refusal,
    detail: &str,
) {
    ctx.metrics.refused(refusal);
    let mut entry = AuditEntry::new("connect", "refuse")
        .source(peer)
        .reason(format!("{}: {detail}", refusal.label()));
    if let Some(id) = client_id {
        // The claimed id is the peer's words, kept for the operator; it is not a secret.
        entry = entry.principal(ctx.kind.as_str(), truncate(id, 128));
    }
    ctx.audit.record(entry);
}

/// Failed logins naming a device never change how the device is treated (they are
/// the sources' doing, and the back-off answers them): enough of them in a window
/// raise one alert, audited, counted and published on
/// `portcullis/events/auth_failures/{id}` with the sources named.
pub(super) fn note_auth_failure(
    ctx: &Context,
    client_id: &str,
    refusal: AuthRefusal,
    peer: SocketAddr,
) {
    if ctx.kind != PrincipalKind::Device {
        return;
    }
    auth_alert::note_device_failure(
        &ctx.auth,
        &ctx.metrics,
        &ctx.audit,
        ctx.forwarder.as_ref(),
        client_id,
        refusal,
        peer,
    );
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// What a publish (or Will) carries, for `content::check`.
pub(super) fn carried<'a>(raw: &'a RawProps, payload: &'a [u8]) -> content::Carried<'a> {
    content::Carried {
        response_topic: raw.response_topic.as_deref(),
        content_type: raw.content_type.as_deref(),
        user_properties: &raw.user_properties,
        payload_utf8: raw.payload_format == Some(1),
        payload,
    }
}

/// Validated MQTT 5 properties of a publish (or will): the response topic must be a
/// valid topic name, user properties are capped.
pub(super) fn properties(
    raw: &RawProps,
    limits: &SessionLimits,
) -> Result<Option<Arc<Properties>>, Refusal> {
    if raw.user_properties.len() > limits.max_user_properties {
        return Err(Refusal::TooManyUserProperties);
    }
    let response_topic = match &raw.response_topic {
        Some(t) => {
            Some(TopicName::parse(t, limits.topic).map_err(|_| Refusal::ResponseTopicInvalid)?)
        }
        None => None,
    };
    let p = Properties {
        payload_format_utf8: raw.payload_format.map(|v| v == 1),
        message_expiry_secs: raw.message_expiry,
        content_type: raw.content_type.clone(),
        response_topic,
        correlation_data: raw.correlation_data.clone(),
        // Names under `$portcullis` are the gateway's own marks: a peer cannot set them.
        user_properties: raw
            .user_properties
            .iter()
            .filter(|(k, _)| !k.starts_with("$portcullis"))
            .cloned()
            .collect(),
    };
    Ok((p != Properties::default()).then(|| Arc::new(p)))
}

/// A Last Will, authorized at CONNECT, waiting for an unexpected disconnect.
pub(super) struct Will {
    pub(super) message: Message,
    pub(super) delay_secs: u32,
}

pub(super) fn authenticate(
    ctx: &Context,
    connect: &ConnectInfo,
    version: ProtocolVersion,
    peer: SocketAddr,
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<Session, Refusal> {
    let now = Instant::now();
    let refused = |refusal: AuthRefusal| {
        note_auth_failure(ctx, &connect.client_id, refusal, peer);
        Refusal::from(refusal)
    };
    // MQTT's rule: a secret is the password of the user name that is the client id
    // (MQTT 5 allows a password alone; the registry does not).
    let username = connect.username.as_deref();
    let password = connect.password.as_deref();
    if username.is_some_and(|u| u != connect.client_id)
        || (password.is_some() && username.is_none())
    {
        let refusal = ctx.auth.refuse_early(
            &connect.client_id,
            AuthRefusal::UsernameMismatch,
            peer.ip(),
            now,
        );
        return Err(refused(refusal));
    }
    let mut presented = Vec::with_capacity(2);
    if let Some(secret) = password {
        presented.push(Credential::Secret(secret));
    }
    if let Some(chain) = certs {
        presented.push(Credential::Certificate(chain));
    }
    let creds = Credentials {
        id: &connect.client_id,
        presented,
    };
    let authed = ctx
        .auth
        .authenticate(ctx.kind, &creds, peer.ip(), now)
        .map_err(refused)?;
    let live = ctx.live.borrow().clone();
    let principal = authed.principal.clone();
    let admission = Admission::new(
        Peer {
            principal: principal.clone(),
            source: peer,
            protocol: protocol(version),
        },
        rules(ctx, &live, &principal, authed.acl.clone()),
        ctx.shared.clone(),
        now,
    );
    // A Last Will is authorized like a publish, at CONNECT (and again when it fires).
    let will = match &connect.will {
        None => None,
        Some(w) => {
            let topic = TopicName::parse(&w.topic, ctx.limits.topic)
                .map_err(|_| Refusal::WillTopicInvalid)?;
            if content::check(&w.topic, &carried(&w.props, &w.payload)).is_err() {
                return Err(Refusal::WillContentInvalid);
            }
            let message = Message {
                topic,
                payload: w.payload.clone(),
                qos: QoS::from_u8(w.qos).unwrap_or(QoS::AtMostOnce),
                retain: w.retain,
                properties: properties(&w.props, &ctx.limits).map_err(|r| match r {
                    Refusal::ResponseTopicInvalid => Refusal::WillResponseTopicInvalid,
                    _ => Refusal::WillTooManyUserProperties,
                })?,
            };
            admission.check_will(&message)?;
            Some(Will {
                message,
                delay_secs: w.delay,
            })
        }
    };
    let expiry = connect.session_expiry.min(ctx.limits.max_session_expiry);
    let keep_alive = KeepAlive::effective(connect.keep_alive, ctx.limits.max_keep_alive);
    let window = connect
        .receive_maximum
        .unwrap_or(u16::MAX)
        .min(ctx.limits.max_inflight)
        .max(1);
    Ok(Session {
        version,
        peer,
        keep_alive,
        expiry,
        window: usize::from(window),
        peer_max_packet: connect.max_packet_size.map_or(usize::MAX, |m| m as usize),
        will,
        generation: authed.generation,
        method: authed.method,
        disconnect_on_refusal: authed.policy.disconnect_on_refusal,
        refused_full: false,
        link: None,
        state: SessionState::new(ctx.new_mailbox()),
        staged: VecDeque::new(),
        pending_acks: VecDeque::new(),
        aliases: HashMap::new(),
        out_aliases: HashMap::new(),
        // The peer may allow up to 65 535; the gateway keeps no more than its own cap.
        out_alias_max: connect
            .topic_alias_maximum
            .min(ctx.limits.topic_alias_maximum),
        admission,
        certs: certs.map(<[_]>::to_vec),
        stats: Arc::new(SessionStats::default()),
        subscribes: TokenBucket::new(ctx.limits.subscribe_rate, now),
        subscribe_rate_audited: None,
        next_pump: None,
        pump_more: false,
    })
}

/// The rules a principal is admitted under, from the settings in force.
pub(super) fn rules(
    ctx: &Context,
    live: &Live,
    principal: &PrincipalRef,
    acl: Arc<portcullis_core::acl::Acl>,
) -> Rules {
    live.rules(principal, acl, &ctx.behaviours)
}
