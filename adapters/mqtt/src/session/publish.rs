//! PUBLISH from the peer: MQTT's own rules (topic aliases, Receive Maximum, QoS 2
//! duplicates, properties), the core's verdict, and the acknowledgement in arrival
//! order once the forwarder has the message.

use super::*;

/// The MQTT 5 reason code that tells a publisher why its message was refused.
pub(super) fn publish_code(refusal: Refusal) -> u8 {
    match refusal {
        Refusal::TopicForbiddenCharacter
        | Refusal::ResponseTopicInvalid
        | Refusal::UnknownDevice
        | Refusal::TopicInvalid => reason::TOPIC_NAME_INVALID,
        r if r.stage() == Stage::Validate => reason::PAYLOAD_FORMAT_INVALID,
        r if r.stage() == Stage::Limit => reason::QUOTA_EXCEEDED,
        Refusal::Quarantined => reason::SUCCESS,
        _ => reason::NOT_AUTHORIZED,
    }
}

/// An acknowledgement owed to the peer.
pub(super) struct PendingAck {
    pub(super) pkid: u16,
    pub(super) qos: u8,
    pub(super) code: u8,
    /// Fires when the broker has the message; `None` when nothing is awaited.
    pub(super) rx: Option<oneshot::Receiver<Taken>>,
}

/// Resolves when the oldest owed acknowledgement may go out.
pub(super) async fn front_ack(
    pending: &mut VecDeque<PendingAck>,
) -> Option<Result<Taken, oneshot::error::RecvError>> {
    match pending.front_mut() {
        Some(PendingAck { rx: Some(rx), .. }) => Some(rx.await),
        Some(PendingAck { rx: None, .. }) => Some(Ok(Taken::Yes)),
        None => std::future::pending().await,
    }
}

impl Session {
    /// Audit a refusal of something the peer sent.
    pub(super) fn audit_refusal(&self, event: &'static str, topic: Option<&str>, why: &str) {
        self.admission.audit(event, topic, why.to_string());
    }

    /// Acknowledge a publish from the peer, in the order publishes arrived: behind any
    /// earlier one still waiting for the broker.
    pub(super) fn answer_publish(&mut self, pkid: u16, qos: u8, code: u8, out: &mut BytesMut) {
        if self.pending_acks.is_empty() {
            self.ack_publish(pkid, qos, code, out);
        } else {
            self.pending_acks.push_back(PendingAck {
                pkid,
                qos,
                code,
                rx: None,
            });
        }
    }

    /// The forwarder had no room for a publish (a full outbox): counted and audited
    /// once per run of refusals; MQTT 5 hears quota exceeded, MQTT 3.1.1 is
    /// disconnected without the acknowledgement.
    pub(super) fn refuse_full(
        &mut self,
        ctx: &Context,
        p: PendingAck,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        Metrics::inc(&ctx.metrics.outbox.refused_full);
        if !self.refused_full {
            self.refused_full = true;
            self.audit_refusal(
                "outbox",
                None,
                "the outbox is full: a QoS 1/2 publish was refused (quota exceeded), not acknowledged",
            );
        }
        if self.version == ProtocolVersion::V5 {
            if p.qos == 2 {
                // A failure PUBREC ends the flow: no PUBREL will free the id.
                self.state.on_pubrel(p.pkid);
            }
            self.ack_publish(p.pkid, p.qos, reason::QUOTA_EXCEEDED, out);
            Ok(())
        } else {
            Err(End::OutboxFull)
        }
    }

    pub(super) fn ack_publish(&mut self, pkid: u16, qos: u8, code: u8, out: &mut BytesMut) {
        if code == reason::SUCCESS {
            self.refused_full = false;
        }
        let packet = if qos == 2 {
            Outgoing::PubRec { pkid, reason: code }
        } else {
            Outgoing::PubAck { pkid, reason: code }
        };
        codec::encode(&packet, self.version, out);
    }

    /// Answer a refused publish the MQTT way (the core has counted, audited and
    /// observed it): 3.1.1 acknowledges and drops (or disconnects, by policy); MQTT 5
    /// says why in the acknowledgement.
    pub(super) fn refuse_publish(
        &mut self,
        pkid: u16,
        qos: u8,
        refusal: Refusal,
        out: &mut BytesMut,
    ) -> Result<Step, End> {
        if self.version == ProtocolVersion::V311 && self.disconnect_on_refusal {
            return Err(End::Refused(refusal.to_string()));
        }
        if qos == 2 && self.version == ProtocolVersion::V5 {
            // An MQTT 5 failure PUBREC ends the flow: no PUBREL will free the id.
            // (3.1.1 completes it, PUBREL → PUBCOMP, though nothing was forwarded.)
            self.state.on_pubrel(pkid);
        }
        if qos > 0 {
            self.answer_publish(pkid, qos, publish_code(refusal), out);
        }
        Ok(Step::Done)
    }

    /// Resolve a topic alias (MQTT 5) before anything else looks at the topic.
    pub(super) fn resolve_topic(&mut self, ctx: &Context, p: &PublishIn) -> Result<TopicName, End> {
        let alias = p.props.topic_alias;
        if let Some(a) = alias
            && (a == 0 || a > ctx.limits.topic_alias_maximum)
        {
            return Err(End::Protocol(
                reason::TOPIC_ALIAS_INVALID,
                format!(
                    "topic alias {a} outside 1..={}",
                    ctx.limits.topic_alias_maximum
                ),
            ));
        }
        if p.topic.is_empty() {
            return match alias.and_then(|a| self.aliases.get(&a)) {
                Some(t) => Ok(t.clone()),
                None => Err(End::Protocol(
                    reason::PROTOCOL_ERROR,
                    "empty topic with an unknown topic alias".into(),
                )),
            };
        }
        let topic = TopicName::parse(&p.topic, ctx.limits.topic).map_err(|e| {
            ctx.metrics.refused(Refusal::TopicInvalid);
            self.audit_refusal("publish", Some(&p.topic), &e.to_string());
            End::Protocol(reason::TOPIC_NAME_INVALID, e.to_string())
        })?;
        if let Some(a) = alias {
            self.aliases.insert(a, topic.clone());
        }
        Ok(topic)
    }

    /// A PUBLISH from the peer, up to the core's first verdict.
    pub(super) fn on_publish(
        &mut self,
        ctx: &Context,
        p: PublishIn,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<Step, End> {
        let arrived = now;
        // Content standard consumers refuse, from anyone: refused as a payload is (a
        // validation failure), before the topic is parsed or an alias is recorded.
        if let Err(refusal) =
            self.admission
                .screen(&p.topic, &carried(&p.props, &p.payload), arrived)
        {
            return self.refuse_publish(p.pkid, p.qos, refusal, out);
        }
        let topic = self.resolve_topic(ctx, &p)?;
        // More unacknowledged QoS 1/2 publishes than the Receive Maximum announced. A
        // QoS 2 retransmission (a resumed session's DUP) is not a new one.
        if p.qos > 0 && !(p.qos == 2 && self.state.has_incoming_qos2(p.pkid)) {
            // QoS 2 ones count from arrival until PUBREL (incoming_qos2); QoS 1 ones
            // until the broker has them.
            let unacked = self.pending_acks.iter().filter(|a| a.qos == 1).count()
                + self.state.incoming_qos2_len();
            if unacked >= usize::from(ctx.limits.receive_maximum) {
                ctx.metrics.refused(Refusal::ReceiveMaximumExceeded);
                return Err(End::Protocol(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive maximum exceeded".into(),
                ));
            }
        }
        // QoS 2 retransmission: already accepted, answer again without forwarding twice.
        if p.qos == 2 && !self.state.incoming_qos2(p.pkid) {
            if !self.pending_acks.iter().any(|a| a.pkid == p.pkid) {
                self.answer_publish(p.pkid, 2, reason::SUCCESS, out);
            }
            return Ok(Step::Done);
        }
        let props = match properties(&p.props, &ctx.limits) {
            Ok(props) => props,
            Err(refusal) => {
                self.admission
                    .refused(refusal, "publish", Some(topic.as_str()), None, arrived);
                return self.refuse_publish(p.pkid, p.qos, refusal, out);
            }
        };
        let msg = Message {
            topic,
            payload: p.payload,
            qos: QoS::from_u8(p.qos).unwrap_or(QoS::AtMostOnce),
            retain: p.retain,
            properties: props,
        };
        self.offer(Offer::new(msg, arrived), p.pkid, p.qos, now, out)
    }

    /// Offer a message to the core (again, after a wait) and act on its verdict.
    pub(super) fn offer(
        &mut self,
        offer: Offer,
        pkid: u16,
        qos: u8,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<Step, End> {
        let arrived = offer.arrived();
        let forward = |message, why| {
            Step::Forward(Forward {
                message,
                pkid,
                qos,
                why,
            })
        };
        match self.admission.uplink(offer, now) {
            Verdict::Forward(msg) => {
                self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                Ok(forward(msg, Why::Clean { arrived }))
            }
            // While the pipeline holds the peer back, nothing more is read.
            Verdict::Wait(offer, until) => Ok(Step::Wait(Held {
                offer,
                until,
                pkid,
                qos,
            })),
            Verdict::Divert(forensic) => Ok(forward(forensic, Why::Diverted)),
            // Dropped (quarantine, or the rate limit's "drop"): acknowledged as if
            // delivered, so the device does not retry.
            Verdict::Discard(_) => {
                if qos > 0 {
                    self.answer_publish(pkid, qos, reason::SUCCESS, out);
                }
                Ok(Step::Done)
            }
            Verdict::Refuse(refusal) => self.refuse_publish(pkid, qos, refusal, out),
            Verdict::Disconnect(_) => Err(End::Protocol(
                reason::MESSAGE_RATE_TOO_HIGH,
                "message rate too high for too long".into(),
            )),
        }
    }
}
