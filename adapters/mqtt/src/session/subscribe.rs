//! SUBSCRIBE: filters parsed, authorized by the core, bounded in number and rate; a
//! service's handed to the forwarder's fan-out, a device's retained commands queued.

use super::*;

impl Session {
    /// A SUBSCRIBE: every filter checked here; a service's accepted ones go to the
    /// fan-out (`Step::Subscribe`, then `subscribed`) before the SUBACK.
    pub(super) fn on_subscribe(
        &mut self,
        ctx: &Context,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        identifier: Option<u32>,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<Step, End> {
        if filters.len() > ctx.limits.max_subscribe_filters {
            ctx.metrics.refused(Refusal::TooManyFilters);
            let codes = vec![Err(reason::QUOTA_EXCEEDED); filters.len()];
            codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
            return Ok(Step::Done);
        }
        let service = ctx.kind == PrincipalKind::Service;
        let mut codes = Vec::with_capacity(filters.len());
        // Per accepted filter, its place in `codes`.
        let mut accepted: Vec<(usize, Subscription)> = Vec::new();
        let mut retained = Vec::new();
        for f in filters {
            let key = match SubscriptionKey::parse(&f.path, ctx.limits.topic, service) {
                Ok(k) => k,
                Err(e) => {
                    ctx.metrics.refused(Refusal::FilterInvalid);
                    self.audit_refusal("subscribe", Some(&f.path), &e.to_string());
                    // Devices are told shares do not exist for them (CONNACK said so).
                    let code = if !service && f.path.starts_with("$share/") {
                        reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
                    } else {
                        reason::TOPIC_FILTER_INVALID
                    };
                    codes.push(Err(code));
                    continue;
                }
            };
            // MQTT 5: No Local on a shared subscription is a protocol error.
            if key.share.is_some() && f.no_local {
                return Err(End::Protocol(
                    reason::PROTOCOL_ERROR,
                    "No Local set on a shared subscription".into(),
                ));
            }
            // A shared subscription is authorized by its filter, like any other.
            if self
                .admission
                .admit_subscription(&key.filter, &f.path, now)
                .is_err()
            {
                codes.push(Err(reason::NOT_AUTHORIZED));
                continue;
            }
            // A filter the session holds (or that this SUBSCRIBE already added) only
            // changes options: it costs neither room nor rate.
            let is_new =
                !self.state.has_subscription(&key) && !accepted.iter().any(|(_, s)| s.key == key);
            let held = self.state.subscriptions().len()
                + accepted
                    .iter()
                    .filter(|(_, s)| !self.state.has_subscription(&s.key))
                    .count();
            let over = if !is_new {
                None
            } else if held >= ctx.limits.max_subscriptions {
                Some((Refusal::TooManySubscriptions, true))
            } else if self.subscribes.take(1.0, now).is_err() {
                // Audited at most once a second: a churner is counted, not transcribed.
                let due = self
                    .subscribe_rate_audited
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
                if due {
                    self.subscribe_rate_audited = Some(now);
                }
                Some((Refusal::SubscribeRate, due))
            } else {
                None
            };
            if let Some((refusal, audit)) = over {
                ctx.metrics.refused(refusal);
                if audit {
                    self.audit_refusal("subscribe", Some(&f.path), refusal.detail());
                }
                codes.push(Err(reason::QUOTA_EXCEEDED));
                continue;
            }
            let granted = QoS::from_u8(f.qos).unwrap_or(QoS::AtMostOnce);
            let options = SubscriptionOptions {
                qos: granted,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                retain_handling: RetainHandling::from_u8(f.retain_handling).unwrap_or_default(),
                identifier,
            };
            let sub = Subscription { key, options };
            if !service {
                let existed = self.state.has_subscription(&sub.key);
                let send = match options.retain_handling {
                    RetainHandling::OnSubscribe => true,
                    RetainHandling::OnNewSubscription => !existed,
                    RetainHandling::Never => false,
                };
                if send {
                    retained.extend(ctx.retained.matching(&self.principal().id, &sub.key.filter));
                }
            }
            codes.push(Ok(granted as u8));
            accepted.push((codes.len() - 1, sub));
        }
        if service && !accepted.is_empty() {
            // SUBACK once the fan-out has the subscriptions (and has queued the
            // retained messages they asked for, which follow the SUBACK): nothing
            // published after the SUBACK can miss them.
            return Ok(Step::Subscribe(Subscribing {
                pkid,
                codes,
                accepted,
            }));
        }
        for (_, sub) in accepted {
            self.state.subscribe(sub);
        }
        self.keep(ctx);
        codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
        // A device's retained commands follow the SUBACK, through the mailbox like any
        // command.
        for m in retained {
            if let Err(overflow) = self.state.mailbox.push(Delivery::from(m), now) {
                Metrics::inc(&ctx.metrics.queue_overflow);
                self.audit_refusal("queue", None, overflow.as_str());
            }
        }
        Ok(Step::Done)
    }

    /// The fan-out's answer to a service's SUBSCRIBE (per accepted filter, whether it
    /// was added), and the SUBACK.
    pub(super) fn subscribed(
        &mut self,
        ctx: &Context,
        s: Subscribing,
        added: Vec<Result<bool, SubscribeError>>,
        out: &mut BytesMut,
    ) {
        let Subscribing {
            pkid,
            mut codes,
            accepted,
        } = s;
        for ((at, sub), added) in accepted.into_iter().zip(added) {
            match added {
                Ok(_) => {
                    self.state.subscribe(sub);
                }
                Err(e) => {
                    ctx.metrics.refused(Refusal::SubscriptionsFull);
                    let filter = sub.key.to_string();
                    self.audit_refusal("subscribe", Some(&filter), &e.to_string());
                    codes[at] = Err(reason::QUOTA_EXCEEDED);
                }
            }
        }
        codec::encode(&Outgoing::SubAck { pkid, codes }, self.version, out);
    }
}
