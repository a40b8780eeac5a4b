//! Admission: the pipeline every message passes, whatever protocol carried it.
//!
//! One `Admission` per peer session holds the state the stages keep for that peer
//! (its rate limiter, the quarantine pace, the forensic budget, its behaviour model,
//! its ACL and validation policy) and turns each message into a `Verdict`. It is
//! sans-IO: time is passed in, nothing here sleeps, reads or writes. When a stage
//! wants the peer held back, the verdict says until when, and the adapter stops
//! reading its peer until then and offers the same message again.
//!
//! Uplink, in order (`uplink`):
//! 1. quarantine — the behaviour model hears what was offered, before any limit; a
//!    quarantined device's message is paced, then diverted to its forensic topic or
//!    dropped (the peer is told it was taken, so it does not retry);
//! 2. authorize — the ACL, the response topic, a command's target device;
//! 3. rate limit — the principal's buckets, then the gateway-wide cap;
//! 4. validate — size and payload rules;
//! 5. retained bounds, then forward.
//!
//! Downlink, in order: the quarantine hold (`holds_commands`), the device's command
//! rate (`downlink_budget`), then the receive ACL (`may_receive`).
//!
//! Every refusal is counted (one atomic add), audited with the peer's identity and
//! source, and told to the behaviour model as what it is (`Refusal::observation`)
//! before the verdict is returned; adapters only translate it into their protocol.

use crate::acl::Acl;
use crate::audit::{Audit, AuditEntry};
use crate::auth::Authenticator;
use crate::behaviour::{Observation, State as Behaviour};
use crate::content::{self, Carried};
use crate::limit::{
    GlobalBucket, LimitDecision, OverLimitAction, PrincipalLimiter, PrincipalRates, Rate,
    TokenBucket,
};
use crate::mailbox::{Delivery, Mailbox};
use crate::message::{Message, QoS};
use crate::metrics::Metrics;
use crate::peer::Protocol;
use crate::principal::{PrincipalId, PrincipalKind, PrincipalRef};
use crate::quarantine::{self, Behaviours, Policy as BehaviourPolicy, Tracked};
use crate::refusal::Refusal;
use crate::retained::RetainedCommands;
use crate::topic::{TopicFilter, TopicLimits, TopicName};
use crate::validate::Validator;
use portcullis_config::{QuarantineCommands, QuarantineTraffic};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What the stages need to know of the registry.
pub trait Directory: Send + Sync {
    /// Is `id` a registered device (a command for anything else goes nowhere)?
    fn is_device(&self, id: &PrincipalId) -> bool;
}

impl Directory for Authenticator {
    fn is_device(&self, id: &PrincipalId) -> bool {
        self.group_of(PrincipalKind::Device, id).is_some()
    }
}

/// What every peer's admission shares: the gateway-wide state some stages consult.
#[derive(Clone)]
pub struct Shared {
    pub global: Arc<GlobalBucket>,
    pub retained: Arc<RetainedCommands>,
    pub behaviours: Arc<Behaviours>,
    pub directory: Arc<dyn Directory>,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
}

/// Who the admission is for: named on every audit line.
#[derive(Debug, Clone)]
pub struct Peer {
    pub principal: PrincipalRef,
    pub source: SocketAddr,
    pub protocol: Protocol,
}

/// The policy a peer is admitted under; a reload replaces it.
#[derive(Clone)]
pub struct Rules {
    pub acl: Arc<Acl>,
    pub validator: Arc<Validator>,
    pub rates: PrincipalRates,
    pub behaviour: Arc<BehaviourPolicy>,
}

/// What a configuration reload replaces for live sessions, whatever their protocol
/// (ACLs and CAs come from the authenticator's policies, swapped at the same time).
#[derive(Debug)]
pub struct Live {
    pub config: Arc<portcullis_config::Config>,
    pub validator: Arc<Validator>,
}

impl Live {
    /// The rules `principal` is admitted under, from the settings in force.
    pub fn rules(&self, principal: &PrincipalRef, acl: Arc<Acl>, behaviours: &Behaviours) -> Rules {
        let rates = self.config.rates_for(
            principal.kind.as_str(),
            principal.group.as_str(),
            principal.id.as_str(),
        );
        Rules {
            acl,
            validator: self.validator.clone(),
            rates: PrincipalRates::from_config(&rates),
            behaviour: behaviours.policy(&principal.group),
        }
    }
}

impl Peer {
    /// An audit line about this peer: who, from where, over what.
    pub fn entry(&self, event: &'static str, decision: &'static str) -> AuditEntry {
        AuditEntry::new(event, decision)
            .principal(self.principal.kind.as_str(), self.principal.id.to_string())
            .source(self.source)
            .protocol(self.protocol.as_str())
    }
}

/// A message offered by the peer, with how far the stages have taken it.
#[derive(Debug)]
pub struct Offer {
    message: Message,
    arrived: Instant,
    /// How far the stages took it (`None`: not yet looked at).
    progress: Option<Progress>,
}

#[derive(Debug, Clone, Copy)]
enum Progress {
    /// Quarantined: held to the device's tightened rate, since then.
    Pacing { since: Instant },
    /// Held back by the rate limits since then; `hit` once the model heard of it.
    Limiting { since: Instant, hit: bool },
}

impl Offer {
    pub fn new(message: Message, arrived: Instant) -> Offer {
        Offer {
            message,
            arrived,
            progress: None,
        }
    }

    pub fn message(&self) -> &Message {
        &self.message
    }

    /// When the peer's message arrived (for the forward latency).
    pub fn arrived(&self) -> Instant {
        self.arrived
    }
}

/// What to do with an offered message.
#[derive(Debug)]
pub enum Verdict {
    /// Hand it to the forwarder.
    Forward(Message),
    /// Quarantined: hand this (on the forensic topic, QoS 0) to the forwarder, and tell
    /// the peer its message was taken.
    Divert(Message),
    /// Held back: stop reading the peer, and offer this again at that instant.
    Wait(Offer, Instant),
    /// Dropped, and counted: tell the peer it was taken (so it does not retry).
    Discard(Refusal),
    /// Refused: tell the peer why, in its protocol's words.
    Refuse(Refusal),
    /// End the session.
    Disconnect(Refusal),
}

/// What the rate-limit stage made of a message.
enum Limited {
    Pass,
    /// Held back until then; whether the model has heard of it.
    Wait(Instant, bool),
    Over(Verdict),
}

/// The gateway-wide cap gives no finer turn than this.
const GLOBAL_RETRY: Duration = Duration::from_millis(5);

pub struct Admission {
    peer: Peer,
    shared: Arc<Shared>,
    rules: Rules,
    limiter: PrincipalLimiter,
    /// The pace a quarantined device is read at (its tightened message rate).
    pace: TokenBucket,
    /// The rate at which a quarantined device's messages are diverted.
    forensic: TokenBucket,
    /// The device's rate for the commands it receives.
    downlink: TokenBucket,
    /// Its behaviour model (devices of a group with the model on).
    tracked: Option<Arc<Tracked>>,
    /// The behaviour state the limits were last set for.
    limits_for: Behaviour,
}

/// A peer's rate-limit state, carried from one session of a device to its next: a
/// device that opens a new session for every message (CoAP and serial devices often
/// do) must not get a fresh burst each time.
#[derive(Debug, Clone)]
pub struct Buckets {
    rates: PrincipalRates,
    limits_for: Behaviour,
    limiter: PrincipalLimiter,
    pace: TokenBucket,
    forensic: TokenBucket,
    downlink: TokenBucket,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("peer", &self.peer)
            .field("limits_for", &self.limits_for)
            .finish_non_exhaustive()
    }
}

/// Probation and quarantine tighten a device's rate limits.
fn tightened(state: Behaviour) -> bool {
    matches!(state, Behaviour::Probation | Behaviour::Quarantined)
}

fn forensic_bucket(policy: &BehaviourPolicy, now: Instant) -> TokenBucket {
    let rate = Rate {
        per_second: policy.forensic_per_second,
        burst: policy.forensic_per_second.max(1.0),
    };
    TokenBucket::new(rate, now)
}

impl Admission {
    pub fn new(peer: Peer, rules: Rules, shared: Arc<Shared>, now: Instant) -> Admission {
        let p = &peer.principal;
        let tracked = (p.kind == PrincipalKind::Device && rules.behaviour.enabled)
            .then(|| shared.behaviours.track(&p.id, &p.group));
        let mut admission = Admission {
            limiter: PrincipalLimiter::new(rules.rates, now),
            pace: TokenBucket::new(rules.rates.messages, now),
            forensic: forensic_bucket(&rules.behaviour, now),
            downlink: TokenBucket::new(rules.rates.messages, now),
            tracked,
            limits_for: Behaviour::Normal,
            peer,
            shared,
            rules,
        };
        admission.sync_behaviour(now);
        admission
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The rates the peer is admitted under now.
    pub fn rates(&self) -> &PrincipalRates {
        &self.rules.rates
    }

    /// How long until this peer may send a message of `len` bytes again, by its rate
    /// limits (what a protocol that can say so tells a peer it refused for its rate).
    pub fn retry_after(&self, len: usize, now: Instant) -> Duration {
        self.limiter.retry_after(len, now)
    }

    /// The rate-limit state, for the device's next session.
    pub fn buckets(&self) -> Buckets {
        Buckets {
            rates: self.rules.rates,
            limits_for: self.limits_for,
            limiter: self.limiter.clone(),
            pace: self.pace,
            forensic: self.forensic,
            downlink: self.downlink,
        }
    }

    /// Go on from an earlier session's rate-limit state, if it was kept under the same
    /// rates (else the new rates start afresh, as on a reload).
    pub fn resume_buckets(&mut self, b: Buckets, now: Instant) {
        if b.rates != self.rules.rates {
            return;
        }
        self.limiter = b.limiter;
        self.pace = b.pace;
        self.forensic = b.forensic;
        self.downlink = b.downlink;
        self.limits_for = b.limits_for;
        self.sync_behaviour(now);
    }

    /// Its behaviour model, if it has one.
    pub fn tracked(&self) -> Option<&Arc<Tracked>> {
        self.tracked.as_ref()
    }

    /// The behaviour state as the stages see it (a group with the model off acts as
    /// normal).
    pub fn behaviour(&self) -> Behaviour {
        match &self.tracked {
            Some(t) if self.rules.behaviour.enabled => t.state(),
            _ => Behaviour::Normal,
        }
    }

    pub fn behaviour_policy(&self) -> &Arc<BehaviourPolicy> {
        &self.rules.behaviour
    }

    /// Tell the behaviour model (devices only).
    pub fn observe(&self, obs: Observation, now: Instant) {
        if let Some(tracked) = &self.tracked {
            tracked.observe(obs, now, &self.rules.behaviour);
        }
    }

    /// Follow the behaviour state: probation tightens the rate limits (and they stay
    /// tight in quarantine); they are restored when it is normal or released.
    fn sync_behaviour(&mut self, now: Instant) -> Behaviour {
        let state = self.behaviour();
        if tightened(state) != tightened(self.limits_for) {
            let rates = if tightened(state) {
                self.rules
                    .rates
                    .tightened(self.rules.behaviour.probation_rate_factor)
            } else {
                self.rules.rates
            };
            self.limiter = PrincipalLimiter::new(rates, now);
            self.pace = TokenBucket::new(rates.messages, now);
        }
        self.limits_for = state;
        state
    }

    /// A configuration reload: the new rules apply from the next message on. Limits
    /// whose settings changed start afresh (for the current behaviour state).
    pub fn reload(&mut self, rules: Rules, now: Instant) {
        let behaviour_changed = rules.behaviour != self.rules.behaviour;
        let rates_changed = rules.rates != self.rules.rates;
        if behaviour_changed {
            self.forensic = forensic_bucket(&rules.behaviour, now);
        }
        if rates_changed {
            self.downlink = TokenBucket::new(rules.rates.messages, now);
        }
        if behaviour_changed || rates_changed {
            self.limiter = PrincipalLimiter::new(rules.rates, now);
            self.pace = TokenBucket::new(rules.rates.messages, now);
            self.limits_for = Behaviour::Normal;
        }
        if self.tracked.is_none() && rules.behaviour.enabled {
            let p = &self.peer.principal;
            if p.kind == PrincipalKind::Device {
                self.tracked = Some(self.shared.behaviours.track(&p.id, &p.group));
            }
        }
        self.rules = rules;
        self.sync_behaviour(now);
    }

    /// Count, audit and observe a refusal of something the peer sent (`event`:
    /// `publish`, `subscribe`, ...); `words` replace the reason's own for the audit.
    pub fn refused(
        &self,
        refusal: Refusal,
        event: &'static str,
        topic: Option<&str>,
        words: Option<&str>,
        now: Instant,
    ) {
        self.shared.metrics.refused(refusal);
        let reason = match words {
            Some(w) => format!("{}: {w}", refusal.stage()),
            None => refusal.to_string(),
        };
        self.audit(event, topic, reason);
        if let Some(obs) = refusal.observation() {
            self.observe(obs, now);
        }
    }

    /// Count a refusal only (the first of its run was `refused`: audited and observed).
    pub fn count(&self, refusal: Refusal) {
        self.shared.metrics.refused(refusal);
    }

    /// Audit a refusal of something this peer sent (`topic` kept to 256 characters).
    pub fn audit(&self, event: &'static str, topic: Option<&str>, reason: String) {
        let mut entry = self.peer.entry(event, "refuse").reason(reason);
        if let Some(t) = topic {
            entry = entry.topic(t.chars().take(256).collect::<String>());
        }
        self.shared.audit.record(entry);
    }

    /// Before the topic is even parsed: content that standard consumers refuse, from
    /// anyone (forbidden characters, a payload declared UTF-8 that is not). Refused as
    /// a failed validation.
    pub fn screen(
        &self,
        raw_topic: &str,
        carried: &Carried<'_>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let Err(poison) = content::check(raw_topic, carried) else {
            return Ok(());
        };
        let refusal = Refusal::from(poison);
        let topic = content::escaped(raw_topic);
        self.refused(
            refusal,
            "publish",
            Some(&topic),
            Some(&poison.to_string()),
            now,
        );
        Err(refusal)
    }

    /// The authorize stage for a message from the peer: its topic, its response topic,
    /// and for a command, that it names a registered device.
    fn authorize(&self, msg: &Message) -> Result<(), Refusal> {
        if !self.rules.acl.may_publish(&msg.topic) {
            return Err(Refusal::TopicNotAllowed);
        }
        // A Response Topic is where the answer will be published: authorized the same way.
        if let Some(rt) = msg
            .properties
            .as_ref()
            .and_then(|p| p.response_topic.as_ref())
            && !self.rules.acl.may_publish(rt)
        {
            return Err(Refusal::ResponseTopicNotAllowed);
        }
        // A command names its device: one that is not registered gets nothing, live or
        // retained (nobody could ever receive it).
        if let Some(level) = command_level(&msg.topic)
            && !PrincipalId::parse(level).is_ok_and(|id| self.shared.directory.is_device(&id))
        {
            return Err(Refusal::UnknownDevice);
        }
        Ok(())
    }

    /// A device's message to `devices/{id}/{suffix}` carrying only `payload` (a
    /// protocol whose device names only the suffix, CoAP and serial): screened, and
    /// its topic read within
    /// `limits`. A topic that is not valid is refused, audited and told to the model as
    /// a failed validation; the words say what is wrong with it.
    pub fn device_topic(
        &mut self,
        suffix: &str,
        payload: &[u8],
        limits: TopicLimits,
        now: Instant,
    ) -> Result<TopicName, (Refusal, Option<String>)> {
        let raw = format!("devices/{}/{suffix}", self.peer.principal.id);
        self.screen(&raw, &Carried::payload(payload), now)
            .map_err(|r| (r, None))?;
        TopicName::parse(&raw, limits).map_err(|e| {
            let words = e.to_string();
            self.refused(
                Refusal::TopicInvalid,
                "publish",
                Some(&raw),
                Some(&words),
                now,
            );
            self.observe(Observation::Invalid, now);
            (Refusal::TopicInvalid, Some(words))
        })
    }

    /// A device's retained commands, queued in its mailbox (a new session's first
    /// step: as an MQTT device gets them after its SUBACK).
    pub fn queue_retained_commands(&self, mailbox: &Mailbox, now: Instant) {
        let id = &self.peer.principal.id;
        let Ok(filter) = TopicFilter::parse_unlimited(&format!("devices/{id}/commands/#")) else {
            return;
        };
        for m in self.shared.retained.matching(id, &filter) {
            if let Err(overflow) = mailbox.push(Delivery::from(m), now) {
                Metrics::inc(&self.shared.metrics.queue_overflow);
                self.audit("queue", None, overflow.as_str().to_string());
            }
        }
    }

    /// The uplink pipeline for a protocol without back-pressure (CoAP, serial): the
    /// waits it cannot pass on to the peer are waited out here (a quarantined device's
    /// pacing, and a wait of at most `short`: the gateway-wide cap's turn, not the
    /// device over its own rate); a longer wait is returned, for the peer to be told
    /// when to try again. With the verdict, when the message arrived.
    pub async fn uplink_paced(&mut self, mut offer: Offer, short: Duration) -> (Verdict, Instant) {
        loop {
            let now = Instant::now();
            let arrived = offer.arrived();
            match self.uplink(offer, now) {
                Verdict::Wait(held, until)
                    if self.behaviour() == Behaviour::Quarantined
                        || until.saturating_duration_since(now) <= short =>
                {
                    tokio::time::sleep_until(until.into()).await;
                    offer = held;
                }
                verdict => return (verdict, arrived),
            }
        }
    }

    /// The uplink pipeline for one message from the peer.
    pub fn uplink(&mut self, mut offer: Offer, now: Instant) -> Verdict {
        let progress = match offer.progress {
            Some(progress) => progress,
            None => match self.enter(&offer.message, offer.arrived, now) {
                Ok(progress) => progress,
                Err(verdict) => return verdict,
            },
        };
        match progress {
            Progress::Pacing { since } => self.quarantined(offer, since, now),
            Progress::Limiting { since, hit } => {
                match self.limit(&offer.message, since, hit, now) {
                    Limited::Pass => self.validate_and_forward(offer.message, now),
                    Limited::Wait(at, hit) => {
                        offer.progress = Some(Progress::Limiting { since, hit });
                        Verdict::Wait(offer, at)
                    }
                    Limited::Over(verdict) => verdict,
                }
            }
        }
    }

    /// A message's first look: stage 1, quarantine (the model hears what the device
    /// offered, before any limit; a quarantined device's message never reaches a
    /// service), then stage 2, authorize.
    fn enter(
        &mut self,
        msg: &Message,
        arrived: Instant,
        now: Instant,
    ) -> Result<Progress, Verdict> {
        if self.tracked.is_some() {
            let topic = self.shared.behaviours.hash(msg.topic.as_str());
            self.observe(Observation::message(msg.payload.len(), topic), arrived);
        }
        if self.sync_behaviour(now) == Behaviour::Quarantined {
            return Ok(Progress::Pacing { since: now });
        }
        if let Err(refusal) = self.authorize(msg) {
            self.refused(refusal, "publish", Some(msg.topic.as_str()), None, now);
            return Err(Verdict::Refuse(refusal));
        }
        Ok(Progress::Limiting {
            since: now,
            hit: false,
        })
    }

    /// A quarantined device's message: held to its tightened rate by back-pressure
    /// alone, however long it floods (what it sends goes nowhere, so it is never read
    /// faster); then diverted at the forensic rate, or dropped.
    fn quarantined(&mut self, offer: Offer, since: Instant, now: Instant) -> Verdict {
        let max_delay = self.limiter.rates().max_delay.max(Duration::from_secs(1));
        if let Err(wait) = self.pace.take(1.0, now) {
            let left = max_delay.saturating_sub(now.saturating_duration_since(since));
            if !left.is_zero() {
                Metrics::inc(&self.shared.metrics.rate_limit_waits);
                let mut offer = offer;
                offer.progress = Some(Progress::Pacing { since });
                return Verdict::Wait(offer, now + wait.min(left));
            }
        }
        let msg = offer.message;
        let divert = self.rules.behaviour.traffic == QuarantineTraffic::Divert
            && self.forensic.take(1.0, now).is_ok();
        if divert
            && let Some(topic) = quarantine::forensic_topic(&self.peer.principal.id, &msg.topic)
        {
            Metrics::inc(&self.shared.metrics.quarantine_diverted);
            return Verdict::Divert(Message {
                topic,
                qos: QoS::AtMostOnce,
                retain: false,
                ..msg
            });
        }
        Metrics::inc(&self.shared.metrics.quarantine_dropped);
        self.refused(
            Refusal::Quarantined,
            "publish",
            Some(msg.topic.as_str()),
            None,
            now,
        );
        Verdict::Discard(Refusal::Quarantined)
    }

    /// Stage 3, the rate limits: the principal's buckets, then the gateway-wide cap.
    fn limit(&mut self, msg: &Message, since: Instant, hit: bool, now: Instant) -> Limited {
        let len = msg.payload.len();
        let decision = self.limiter.admit(len, now);
        // The model hears of each message the limit held back, once, and only against
        // the configured rates: probation's tighter ones would otherwise turn its own
        // tightening into hits.
        let mut hit = hit;
        if !hit && decision != LimitDecision::Pass {
            hit = true;
            if !tightened(self.limits_for) {
                self.observe(Observation::LimitHit, now);
            }
        }
        let max_delay = self.limiter.rates().max_delay;
        let action = match decision {
            LimitDecision::Pass => {
                if self.shared.global.take(now) {
                    return Limited::Pass;
                }
                // Not this principal's fault: its tokens go back while it waits its turn.
                self.limiter.refund(len);
                if now.saturating_duration_since(since) < max_delay {
                    Metrics::inc(&self.shared.metrics.rate_limit_waits);
                    return Limited::Wait(now + GLOBAL_RETRY, hit);
                }
                self.limiter.rates().action
            }
            LimitDecision::Wait(d) => {
                Metrics::inc(&self.shared.metrics.rate_limit_waits);
                return Limited::Wait(now + d, hit);
            }
            LimitDecision::Refuse(action) => action,
            LimitDecision::Disconnect => OverLimitAction::Disconnect,
        };
        self.refused(
            Refusal::RateLimited,
            "publish",
            Some(msg.topic.as_str()),
            None,
            now,
        );
        Limited::Over(match action {
            OverLimitAction::QuotaExceeded => Verdict::Refuse(Refusal::RateLimited),
            OverLimitAction::Drop => Verdict::Discard(Refusal::RateLimited),
            OverLimitAction::Disconnect => Verdict::Disconnect(Refusal::RateLimited),
        })
    }

    /// Stages 4 and 5: validation, the retained bounds, then forward.
    fn validate_and_forward(&mut self, msg: Message, now: Instant) -> Verdict {
        let p = &self.peer.principal;
        if let Err(invalid) = self
            .rules
            .validator
            .check(&p.group, &p.id, &msg.topic, &msg.payload)
        {
            let refusal = Refusal::from(invalid.kind);
            let words = invalid.to_string();
            self.refused(
                refusal,
                "publish",
                Some(msg.topic.as_str()),
                Some(&words),
                now,
            );
            return Verdict::Refuse(refusal);
        }
        if msg.retain
            && let Err(refusal) = self.keep_retained(&msg)
        {
            self.refused(
                refusal.0,
                "publish",
                Some(msg.topic.as_str()),
                refusal.1.as_deref(),
                now,
            );
            return Verdict::Refuse(refusal.0);
        }
        let m = &self.shared.metrics;
        Metrics::inc(&m.messages_accepted);
        m.bytes_accepted
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        Verdict::Forward(msg)
    }

    /// A retained message is kept by the gateway: a device's retained telemetry is
    /// capped (each lives in the broker until cleared), and a retained command is the
    /// device's desired state, handed over when it subscribes.
    fn keep_retained(&self, msg: &Message) -> Result<(), (Refusal, Option<String>)> {
        let retained = &self.shared.retained;
        if self.peer.principal.kind == PrincipalKind::Device
            && let Err(full) = retained.note_device_retained(&self.peer.principal.id, msg)
        {
            return Err((Refusal::from(full), None));
        }
        if let Some(device) = command_target(&msg.topic)
            && let Err(full) = retained.set(&device, msg.clone())
        {
            return Err((
                Refusal::from(full),
                Some(format!("retained command not kept: {full}")),
            ));
        }
        Ok(())
    }

    /// A Last Will, at CONNECT: authorized and validated like a publish.
    pub fn check_will(&self, will: &Message) -> Result<(), Refusal> {
        match self.authorize(will) {
            Err(Refusal::UnknownDevice) | Ok(()) => {}
            Err(_) => return Err(Refusal::WillNotAuthorized),
        }
        let p = &self.peer.principal;
        if self
            .rules
            .validator
            .check(&p.group, &p.id, &will.topic, &will.payload)
            .is_err()
        {
            return Err(Refusal::WillPayloadInvalid);
        }
        Ok(())
    }

    /// What decides, when the session has ended, whether its Will may still go out.
    pub fn will_gate(&self) -> WillGate {
        WillGate {
            acl: self.rules.acl.clone(),
            tracked: self.tracked.clone(),
            retained: self.shared.retained.clone(),
            principal: self.peer.principal.clone(),
        }
    }

    /// A subscription filter: allowed by the ACL? A refusal is counted, audited and
    /// observed.
    pub fn admit_subscription(
        &self,
        filter: &TopicFilter,
        shown: &str,
        now: Instant,
    ) -> Result<(), Refusal> {
        if self.rules.acl.may_subscribe(filter) {
            return Ok(());
        }
        self.refused(
            Refusal::FilterNotAllowed,
            "subscribe",
            Some(shown),
            None,
            now,
        );
        Err(Refusal::FilterNotAllowed)
    }

    /// Whether the current rules still allow a filter (a reload re-checks every
    /// subscription the session holds).
    pub fn may_subscribe(&self, filter: &TopicFilter) -> bool {
        self.rules.acl.may_subscribe(filter)
    }

    /// Downlink, first: a quarantined device's commands wait (within the mailbox's
    /// bounds) until it is released, if its group's policy holds them.
    pub fn holds_commands(&mut self, now: Instant) -> bool {
        self.sync_behaviour(now) == Behaviour::Quarantined
            && self.rules.behaviour.commands == QuarantineCommands::Hold
    }

    /// Downlink, next: a device receives commands at its own message rate
    /// (denial-of-thing); over it, they wait. `Err`: how long.
    pub fn downlink_budget(&mut self, now: Instant) -> Result<(), Duration> {
        if self.peer.principal.kind != PrincipalKind::Device {
            return Ok(());
        }
        self.downlink.take(1.0, now).inspect_err(|_| {
            Metrics::inc(&self.shared.metrics.rate_limit_waits);
        })
    }

    /// Give back a budget taken for a message that was not there after all.
    pub fn return_budget(&mut self) {
        if self.peer.principal.kind == PrincipalKind::Device {
            self.downlink.give(1.0);
        }
    }

    /// Downlink, last: may the peer receive this message (its ACL, as of now)?
    pub fn may_receive(&self, msg: &Message) -> Result<(), Refusal> {
        if self.rules.acl.may_receive(&msg.topic) {
            return Ok(());
        }
        self.shared.metrics.refused(Refusal::ReceiveNotAllowed);
        Err(Refusal::ReceiveNotAllowed)
    }

    /// A device's next command from its mailbox, one at a time, through the downlink
    /// gates in their order: the quarantine hold, its command rate, its receive ACL.
    /// `unfit` says why a command cannot be carried by the protocol at all (larger than
    /// one of its messages): such a command is dropped, counted and audited, as an MQTT
    /// client's Maximum Packet Size drops one, and the next is tried. Commands that
    /// expired in the mailbox meanwhile are counted.
    pub fn next_command(
        &mut self,
        mailbox: &Mailbox,
        now: Instant,
        unfit: impl Fn(&Delivery) -> Option<String>,
    ) -> NextCommand {
        if self.holds_commands(now) {
            return NextCommand::NotBefore(now + HOLD_RECHECK);
        }
        if mailbox.is_empty() {
            return NextCommand::Empty;
        }
        if let Err(wait) = self.downlink_budget(now) {
            return NextCommand::NotBefore(now + wait);
        }
        let found = loop {
            let Some(d) = mailbox.pop(now) else {
                break None;
            };
            if self.may_receive(&d.message).is_err() {
                continue;
            }
            if let Some(why) = unfit(&d) {
                self.shared
                    .metrics
                    .refused(Refusal::OverClientMaximumPacketSize);
                self.audit("deliver", Some(d.message.topic.as_str()), why);
                continue;
            }
            break Some(d);
        };
        if found.is_none() {
            self.return_budget();
        }
        let expired = mailbox.take_expired();
        if expired > 0 {
            self.shared
                .metrics
                .queue_expired
                .fetch_add(expired, Ordering::Relaxed);
        }
        match found {
            Some(d) => NextCommand::Send(d),
            None => NextCommand::Empty,
        }
    }
}

/// How often a quarantine hold on commands is looked at again.
const HOLD_RECHECK: Duration = Duration::from_secs(1);

/// What the downlink gates let through next (`Admission::next_command`).
#[derive(Debug)]
pub enum NextCommand {
    /// The command to send now.
    Send(Delivery),
    /// Nothing to send now.
    Empty,
    /// A gate holds commands back (the quarantine hold, the command rate): look again
    /// then.
    NotBefore(Instant),
}

/// Decides, as a Will fires (after its delay), whether it still may: rights may have
/// changed since CONNECT, and the device may have been quarantined since.
pub struct WillGate {
    acl: Arc<Acl>,
    tracked: Option<Arc<Tracked>>,
    retained: Arc<RetainedCommands>,
    principal: PrincipalRef,
}

impl WillGate {
    pub fn quarantined(&self) -> bool {
        self.tracked
            .as_ref()
            .is_some_and(|t| t.state() == Behaviour::Quarantined)
    }

    pub fn admit(&self, will: &Message) -> bool {
        if self.quarantined() || !self.acl.may_publish(&will.topic) {
            return false;
        }
        // A retained Will counts against the same per-device retained cap.
        !(will.retain
            && self.principal.kind == PrincipalKind::Device
            && self
                .retained
                .note_device_retained(&self.principal.id, will)
                .is_err())
    }
}

/// `devices/{id}/commands/...` names the device a command is for.
pub fn command_target(topic: &TopicName) -> Option<PrincipalId> {
    command_level(topic).and_then(|id| PrincipalId::parse(id).ok())
}

/// The `{id}` level of `devices/{id}/commands/...`, as written.
fn command_level(topic: &TopicName) -> Option<&str> {
    let mut levels = topic.levels();
    let (Some("devices"), Some(id), Some("commands")) =
        (levels.next(), levels.next(), levels.next())
    else {
        return None;
    };
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::AclTemplate;
    use crate::message::Properties;
    use crate::principal::GroupName;
    use crate::quarantine::Policies;
    use crate::topic::TopicLimits;
    use bytes::Bytes;
    use portcullis_config::duration::Millis;
    use portcullis_config::{Config, RateAction};
    use std::collections::HashSet;
    use tokio::sync::mpsc;

    const L: TopicLimits = TopicLimits {
        max_length: 256,
        max_depth: 16,
    };

    struct Devices(HashSet<String>);

    impl Directory for Devices {
        fn is_device(&self, id: &PrincipalId) -> bool {
            self.0.contains(id.as_str())
        }
    }

    struct Fixture {
        admission: Admission,
        audit: mpsc::Receiver<AuditEntry>,
        metrics: Arc<Metrics>,
        behaviours: Arc<Behaviours>,
        t0: Instant,
    }

    fn config(edit: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::default();
        c.rate_limits.messages_per_second = 10.0;
        c.rate_limits.message_burst = 2.0;
        c.rate_limits.max_delay = Millis::from_millis(500);
        c.rate_limits.global_messages_per_second = 1_000_000;
        edit(&mut c);
        c
    }

    fn rules(c: &Config, acl: &Arc<Acl>, validator: Arc<Validator>) -> Rules {
        let group = GroupName::parse("default").unwrap();
        Rules {
            acl: acl.clone(),
            validator,
            rates: PrincipalRates::from_config(&c.rates_for("device", "default", "sensor-1")),
            behaviour: Policies::from_config(c).for_group(&group),
        }
    }

    fn fixture(edit: impl FnOnce(&mut Config)) -> Fixture {
        fixture_in(edit, Behaviour::Normal)
    }

    /// With the device in `state` from the start.
    fn fixture_in(edit: impl FnOnce(&mut Config), state: Behaviour) -> Fixture {
        let c = config(edit);
        let t0 = Instant::now();
        let id = PrincipalId::parse("sensor-1").unwrap();
        let group = GroupName::parse("default").unwrap();
        let acl = AclTemplate::new(
            PrincipalKind::Device,
            &["devices/{id}/#".into(), "devices/+/commands/#".into()],
            &["devices/{id}/commands/#".into()],
        )
        .expand(&id, &group)
        .unwrap();
        let metrics = Arc::new(Metrics::default());
        let (audit, rx) = Audit::detached(1024, metrics.clone());
        let (behaviours, _changes) = Behaviours::new(Policies::from_config(&c));
        if state != Behaviour::Normal {
            behaviours.restore(&id, &group, state, t0, t0);
        }
        let validator = Arc::new(Validator::new(&c.validation, |p| p.to_path_buf()).unwrap());
        let shared = Arc::new(Shared {
            global: Arc::new(GlobalBucket::new(
                c.rate_limits.global_messages_per_second,
                t0,
            )),
            retained: Arc::new(RetainedCommands::new(4)),
            behaviours: behaviours.clone(),
            directory: Arc::new(Devices(["sensor-1", "sensor-2"].map(String::from).into())),
            metrics: metrics.clone(),
            audit,
        });
        let peer = Peer {
            principal: PrincipalRef {
                kind: PrincipalKind::Device,
                id,
                group,
            },
            source: "127.0.0.1:40000".parse().unwrap(),
            protocol: Protocol::Mqtt5,
        };
        let admission = Admission::new(peer, rules(&c, &Arc::new(acl), validator), shared, t0);
        Fixture {
            admission,
            audit: rx,
            metrics,
            behaviours,
            t0,
        }
    }

    fn msg(topic: &str, payload: &'static [u8]) -> Message {
        Message {
            topic: TopicName::parse(topic, L).unwrap(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        }
    }

    impl Fixture {
        fn offer(&mut self, m: Message, at: Duration) -> Verdict {
            let now = self.t0 + at;
            self.admission.uplink(Offer::new(m, now), now)
        }

        fn quarantine(&self) {
            let p = &self.admission.peer().principal;
            self.behaviours.quarantine(&p.id, &p.group, "test".into());
        }

        fn last_audit(&mut self) -> AuditEntry {
            let mut last = None;
            while let Ok(e) = self.audit.try_recv() {
                last = Some(e);
            }
            last.expect("an audit line")
        }
    }

    #[test]
    fn own_telemetry_is_forwarded_and_counted() {
        let mut f = fixture(|_| {});
        let v = f.offer(msg("devices/sensor-1/telemetry", b"{}"), Duration::ZERO);
        assert!(
            matches!(v, Verdict::Forward(m) if m.topic.as_str() == "devices/sensor-1/telemetry")
        );
        assert_eq!(f.metrics.messages_accepted.load(Ordering::Relaxed), 1);
        assert_eq!(f.metrics.bytes_accepted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn another_devices_topic_is_refused_by_authorize_audited_and_observed_as_a_denial() {
        let mut f = fixture(|_| {});
        let v = f.offer(msg("devices/sensor-2/telemetry", b"{}"), Duration::ZERO);
        assert!(matches!(v, Verdict::Refuse(Refusal::TopicNotAllowed)));
        assert_eq!(f.metrics.refusal_count(Refusal::TopicNotAllowed), 1);
        let line = f.last_audit();
        assert_eq!((line.event, line.decision), ("publish", "refuse"));
        assert_eq!(line.topic.as_deref(), Some("devices/sensor-2/telemetry"));
        assert_eq!(
            line.reason.as_deref(),
            Some("authorize: topic not allowed by ACL")
        );
        assert_eq!(line.protocol, Some("mqtt5"));
    }

    #[test]
    fn a_response_topic_outside_the_acl_is_refused() {
        let mut f = fixture(|_| {});
        let mut m = msg("devices/sensor-1/req", b"{}");
        m.properties = Some(Arc::new(Properties {
            response_topic: Some(TopicName::parse("devices/sensor-2/resp", L).unwrap()),
            ..Properties::default()
        }));
        let v = f.offer(m, Duration::ZERO);
        assert!(matches!(
            v,
            Verdict::Refuse(Refusal::ResponseTopicNotAllowed)
        ));
    }

    #[test]
    fn a_command_for_an_unregistered_device_is_refused() {
        let mut f = fixture(|_| {});
        let v = f.offer(msg("devices/ghost/commands/reboot", b"{}"), Duration::ZERO);
        assert!(matches!(v, Verdict::Refuse(Refusal::UnknownDevice)));
        let v = f.offer(
            msg("devices/sensor-2/commands/reboot", b"{}"),
            Duration::ZERO,
        );
        assert!(matches!(v, Verdict::Forward(_)));
    }

    #[test]
    fn authorize_runs_before_the_rate_limit_so_a_refused_message_costs_no_tokens() {
        let mut f = fixture(|_| {});
        for _ in 0..10 {
            let v = f.offer(msg("devices/sensor-2/telemetry", b"{}"), Duration::ZERO);
            assert!(matches!(v, Verdict::Refuse(Refusal::TopicNotAllowed)));
        }
        // The burst of 2 is still there.
        for _ in 0..2 {
            let v = f.offer(msg("devices/sensor-1/t", b"{}"), Duration::ZERO);
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        }
    }

    #[test]
    fn over_its_rate_a_message_waits_and_passes_when_offered_again_in_time() {
        let mut f = fixture(|_| {});
        for _ in 0..2 {
            assert!(matches!(
                f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO),
                Verdict::Forward(_)
            ));
        }
        let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO);
        let Verdict::Wait(offer, at) = v else {
            panic!("expected a wait, got {v:?}");
        };
        // 10/s: the next token in 100 ms.
        assert_eq!(at, f.t0 + Duration::from_millis(100));
        let v = f.admission.uplink(offer, at);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(f.metrics.rate_limit_waits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn held_back_past_max_delay_the_configured_action_applies() {
        for (action, expect) in [
            (RateAction::QuotaExceeded, "refuse"),
            (RateAction::Drop, "discard"),
        ] {
            let mut f = fixture(|c| {
                c.rate_limits.action = action;
                c.rate_limits.messages_per_second = 0.5;
                c.rate_limits.message_burst = 1.0;
            });
            assert!(matches!(
                f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO),
                Verdict::Forward(_)
            ));
            // The next token is 2 s away, past the 500 ms max delay.
            let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO);
            match (expect, &v) {
                ("refuse", Verdict::Refuse(Refusal::RateLimited))
                | ("discard", Verdict::Discard(Refusal::RateLimited)) => {}
                _ => panic!("{action:?}: {v:?}"),
            }
            assert_eq!(f.metrics.refusal_count(Refusal::RateLimited), 1);
        }
    }

    #[test]
    fn validation_runs_after_the_rate_limit() {
        let mut f = fixture(|c| {
            c.validation.max_payload_bytes = 4;
        });
        let v = f.offer(msg("devices/sensor-1/t", b"too long"), Duration::ZERO);
        assert!(matches!(v, Verdict::Refuse(Refusal::TooLarge)), "{v:?}");
        let line = f.last_audit();
        assert!(line.reason.unwrap().starts_with("validate: size limit"));
        // It took a token: one left of the burst of 2.
        assert!(matches!(
            f.offer(msg("devices/sensor-1/t", b"ok"), Duration::ZERO),
            Verdict::Forward(_)
        ));
        assert!(matches!(
            f.offer(msg("devices/sensor-1/t", b"ok"), Duration::ZERO),
            Verdict::Wait(..)
        ));
    }

    #[test]
    fn retained_caps_are_quotas_not_acl_denials() {
        let mut f = fixture(|c| {
            c.sessions.max_retained_per_device = 1;
        });
        Arc::get_mut(&mut f.admission.shared)
            .expect("the fixture's admission alone holds its shared state")
            .retained = Arc::new(RetainedCommands::new(1).with_telemetry_bytes_per_device(1 << 20));
        let mut m = msg("devices/sensor-1/a", b"1");
        m.retain = true;
        assert!(matches!(
            f.offer(m.clone(), Duration::ZERO),
            Verdict::Forward(_)
        ));
        m.topic = TopicName::parse("devices/sensor-1/b", L).unwrap();
        let v = f.offer(m, Duration::from_secs(1));
        assert!(
            matches!(v, Verdict::Refuse(Refusal::RetainedLimit)),
            "{v:?}"
        );
        assert_eq!(Refusal::RetainedLimit.observation(), None);
        let line = f.last_audit();
        assert!(line.reason.unwrap().starts_with("limits: "));
    }

    #[test]
    fn a_quarantined_device_is_paced_then_its_message_is_dropped_and_acknowledged() {
        let mut f = fixture(|c| {
            c.behaviour.quarantine_traffic = portcullis_config::QuarantineTraffic::Drop;
        });
        f.quarantine();
        // Even a topic it may not publish to is not refused: nothing it sends is looked at.
        let v = f.offer(msg("devices/sensor-2/t", b"x"), Duration::ZERO);
        assert!(matches!(v, Verdict::Discard(Refusal::Quarantined)), "{v:?}");
        assert_eq!(f.metrics.quarantine_dropped.load(Ordering::Relaxed), 1);
        // Its tightened pace (burst of 1 at probation's factor): the next one waits,
        // and is dropped when offered again in its turn.
        let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO);
        let Verdict::Wait(offer, at) = v else {
            panic!("{v:?}")
        };
        assert!(at > f.t0);
        let v = f.admission.uplink(offer, at);
        assert!(matches!(v, Verdict::Discard(Refusal::Quarantined)), "{v:?}");
        assert_eq!(f.metrics.quarantine_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_quarantined_device_is_diverted_to_its_forensic_topic_at_the_forensic_rate() {
        let mut f = fixture(|c| {
            c.behaviour.quarantine_traffic = portcullis_config::QuarantineTraffic::Divert;
            c.behaviour.forensic_messages_per_second = 1.0;
            c.rate_limits.messages_per_second = 1000.0;
            c.rate_limits.message_burst = 1000.0;
        });
        f.quarantine();
        let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO);
        let Verdict::Divert(m) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            m.topic.as_str(),
            "portcullis/forensic/sensor-1/devices/sensor-1/t"
        );
        assert_eq!(m.qos, QoS::AtMostOnce);
        // Over the forensic rate: dropped.
        let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO);
        assert!(matches!(v, Verdict::Discard(Refusal::Quarantined)), "{v:?}");
    }

    #[test]
    fn probation_tightens_the_rate_and_release_restores_it() {
        let mut f = fixture_in(
            |c| {
                c.rate_limits.messages_per_second = 10.0;
                c.rate_limits.message_burst = 10.0;
                c.behaviour.probation_rate_factor = 0.1;
                c.rate_limits.max_delay = Millis::from_millis(2000);
            },
            Behaviour::Probation,
        );
        let p = f.admission.peer().principal.clone();
        assert_eq!(f.admission.behaviour(), Behaviour::Probation);
        // A burst of 10 × 0.1 = 1.
        assert!(matches!(
            f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO),
            Verdict::Forward(_)
        ));
        assert!(matches!(
            f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO),
            Verdict::Wait(..)
        ));
        f.behaviours.release(&p.id, &p.group, "test");
        for _ in 0..10 {
            let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::from_secs(5));
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        }
    }

    #[test]
    fn a_reload_applies_the_new_acl_from_the_next_message() {
        let mut f = fixture(|_| {});
        assert!(matches!(
            f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO),
            Verdict::Forward(_)
        ));
        let p = f.admission.peer().principal.clone();
        let narrower =
            AclTemplate::new(PrincipalKind::Device, &["devices/{id}/status".into()], &[])
                .expand(&p.id, &p.group)
                .unwrap();
        let c = config(|_| {});
        let validator = f.admission.rules.validator.clone();
        f.admission
            .reload(rules(&c, &Arc::new(narrower), validator), f.t0);
        let v = f.offer(msg("devices/sensor-1/t", b"x"), Duration::ZERO);
        assert!(
            matches!(v, Verdict::Refuse(Refusal::TopicNotAllowed)),
            "{v:?}"
        );
        let filter = TopicFilter::parse("devices/sensor-1/commands/#", L).unwrap();
        assert!(!f.admission.may_subscribe(&filter));
    }

    #[test]
    fn a_will_is_checked_at_connect_and_again_when_it_fires() {
        let f = fixture(|_| {});
        assert_eq!(
            f.admission.check_will(&msg("devices/sensor-2/lwt", b"x")),
            Err(Refusal::WillNotAuthorized)
        );
        let will = msg("devices/sensor-1/lwt", b"gone");
        assert_eq!(f.admission.check_will(&will), Ok(()));
        let gate = f.admission.will_gate();
        assert!(gate.admit(&will));
        // Quarantined since: the Will stays unsent.
        f.quarantine();
        assert!(!gate.admit(&will));
    }

    #[test]
    fn commands_are_held_while_quarantined_and_paced_at_the_device_rate() {
        let mut f = fixture(|c| {
            c.behaviour.quarantine_commands = portcullis_config::QuarantineCommands::Hold;
        });
        assert!(!f.admission.holds_commands(f.t0));
        assert!(f.admission.downlink_budget(f.t0).is_ok());
        assert!(f.admission.downlink_budget(f.t0).is_ok());
        assert_eq!(
            f.admission.downlink_budget(f.t0),
            Err(Duration::from_millis(100))
        );
        f.quarantine();
        assert!(f.admission.holds_commands(f.t0));
        let other = msg("devices/sensor-2/commands/x", b"x");
        assert_eq!(
            f.admission.may_receive(&other),
            Err(Refusal::ReceiveNotAllowed)
        );
    }

    #[test]
    fn forbidden_content_is_screened_before_the_topic_is_parsed() {
        let f = fixture(|_| {});
        let carried = Carried {
            response_topic: None,
            content_type: None,
            user_properties: &[],
            payload_utf8: false,
            payload: b"x",
        };
        let r = f
            .admission
            .screen("devices/sensor-1/\u{1}t", &carried, f.t0);
        assert_eq!(r, Err(Refusal::TopicForbiddenCharacter));
        assert_eq!(f.metrics.refusal_count(Refusal::TopicForbiddenCharacter), 1);
    }
}
