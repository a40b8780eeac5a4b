//! Towards the peer: the mailbox pumped through the core's downlink gates, within the
//! MQTT window, the peer's Maximum Packet Size and topic aliases.

use super::*;

/// Messages a session takes from its mailbox at a time.
pub(super) const PUMP_BATCH: usize = 64;

/// Bytes of output gathered before they are written even though more work is ready.
pub(super) const FLUSH_AT: usize = 32 * 1024;

impl Session {
    /// Move queued messages to the peer while the inflight window allows (and, past
    /// a burst's worth of output, again once that is written). Commands to a device
    /// pass its rate too (denial-of-thing): over it, they wait in the mailbox, whose
    /// bounds then apply.
    pub(super) fn pump_mailbox(&mut self, ctx: &Context, out: &mut BytesMut) {
        let now = Instant::now();
        // A quarantined device's commands wait (within the mailbox's bounds) until it
        // is released, if its group's policy holds them; looked at again each second.
        if self.admission.holds_commands(now) {
            if !self.state.mailbox.is_empty() || !self.staged.is_empty() {
                self.next_pump = Some(now + Duration::from_secs(1));
            }
            return;
        }
        while self.state.window_open(self.window)
            && !(self.staged.is_empty() && self.state.mailbox.is_empty())
        {
            if out.len() >= FLUSH_AT {
                // The session writes what gathered, then comes straight back here
                // (not through a timer: its resolution would stall every burst).
                self.pump_more = true;
                break;
            }
            if let Err(wait) = self.admission.downlink_budget(now) {
                self.next_pump = Some(now + wait);
                break;
            }
            if self.staged.is_empty() {
                self.state
                    .mailbox
                    .pop_many(now, PUMP_BATCH, &mut self.staged);
            }
            let Some(d) = self.staged.pop_front() else {
                self.admission.return_budget();
                break;
            };
            self.deliver(ctx, d, out);
        }
        let expired = self.state.mailbox.take_expired();
        if expired > 0 {
            ctx.metrics
                .queue_expired
                .fetch_add(expired, Ordering::Relaxed);
        }
    }

    /// What the last connection left unacknowledged, again (DUP), within this
    /// connection's Maximum Packet Size: one that no longer fits is dropped as if
    /// delivered, like any delivery too large for the peer.
    pub(super) fn resend(&mut self, ctx: &Context, out: &mut BytesMut) {
        for send in self.state.resume() {
            let before = out.len();
            let defined = self.encode_send(&send, out);
            if out.len() - before > self.peer_max_packet {
                out.truncate(before);
                if let Some(topic) = defined {
                    self.out_aliases.remove(&topic);
                }
                if let Outbound::Publish { pkid, .. } = send {
                    self.state.abandon(pkid);
                }
                ctx.metrics.refused(Refusal::OverClientMaximumPacketSize);
            }
        }
    }

    /// Encode a packet for the peer. A PUBLISH uses a topic alias where the peer
    /// allows them: the first one to a topic defines it, later ones send the alias
    /// alone. Returns the topic whose alias this packet defined, if it did.
    pub(super) fn encode_send(&mut self, send: &Outbound, out: &mut BytesMut) -> Option<TopicName> {
        match send {
            Outbound::Publish {
                pkid,
                delivery,
                qos,
                dup,
            } => {
                let m = &delivery.message;
                let known = match self.out_alias_max {
                    0 => None,
                    _ => self.out_aliases.get(&m.topic).copied(),
                };
                let (topic, topic_alias, defined) = match known {
                    Some(a) => ("", Some(a), None),
                    None if self.out_aliases.len() < usize::from(self.out_alias_max) => {
                        let a = self.out_aliases.len() as u16 + 1;
                        self.out_aliases.insert(m.topic.clone(), a);
                        (m.topic.as_str(), Some(a), Some(m.topic.clone()))
                    }
                    None => (m.topic.as_str(), None, None),
                };
                codec::encode(
                    &Outgoing::Publish {
                        topic,
                        payload: m.payload.clone(),
                        qos: *qos as u8,
                        retain: m.retain,
                        pkid: *pkid,
                        dup: *dup,
                        props: m.properties.as_deref(),
                        subscription_ids: &delivery.subscription_ids,
                        topic_alias,
                    },
                    self.version,
                    out,
                );
                defined
            }
            Outbound::PubRel { pkid } => {
                codec::encode(&Outgoing::PubRel { pkid: *pkid }, self.version, out);
                None
            }
        }
    }

    /// A message for this peer: through the pipeline, then out (or into the inflight
    /// window's wait).
    pub(super) fn deliver(&mut self, ctx: &Context, d: Delivery, out: &mut BytesMut) {
        if self.admission.may_receive(&d.message).is_err() {
            return;
        }
        // A service's fan-out already applied its subscriptions; a device's commands
        // are matched here.
        let qos = match ctx.kind {
            PrincipalKind::Service => d.message.qos,
            PrincipalKind::Device => match self.state.delivery_qos(&d) {
                Some(q) => q,
                None => return,
            },
        };
        let before = out.len();
        let size = d.message.payload.len();
        let send = self.state.start(d, qos);
        let defined = self.encode_send(&send, out);
        // MQTT 5: never send a packet larger than the client said it accepts; such a
        // message is dropped as if delivered (and an alias it would have defined is
        // not).
        if out.len() - before > self.peer_max_packet {
            out.truncate(before);
            if let Some(topic) = defined {
                self.out_aliases.remove(&topic);
            }
            if let Outbound::Publish { pkid, .. } = send
                && qos != QoS::AtMostOnce
            {
                self.state.abandon(pkid);
            }
            ctx.metrics.refused(Refusal::OverClientMaximumPacketSize);
            return;
        }
        ctx.metrics.delivered(size);
        self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
    }
}
