//! The MQTT session state machine, without I/O.
//!
//! What a session must remember across packets and, when persistent, across
//! connections: its subscriptions, the QoS 1/2 messages sent to it and not yet
//! acknowledged (with where each stands in its handshake), the packet ids of QoS 2
//! messages it sent us that await PUBREL, and its mailbox. Every method is a pure
//! state transition; the caller does the reading, writing and waiting. (A service's
//! subscriptions are matched by the broker's fan-out; the list here is what the
//! session holds, for its limits and for reloads.)

use portcullis_core::mailbox::{Delivery, Mailbox};
use portcullis_core::message::QoS;
use portcullis_core::parking::{delivery, put_delivery};
use portcullis_core::subscription::{
    RetainHandling, Subscription, SubscriptionKey, SubscriptionOptions,
};
use portcullis_core::topic::TopicLimits;
use portcullis_core::wire::{self, Reader, WireError};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keep-alive and Last Will timing, as pure functions of the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    window: Duration,
    last_heard: Instant,
}

impl KeepAlive {
    /// The keep-alive actually used: the client's, unless it asked for none (0) or
    /// more than the cap, in which case the cap.
    pub fn effective(requested: u16, cap: u16) -> u16 {
        if requested == 0 || requested > cap {
            cap
        } else {
            requested
        }
    }

    /// A silent client is dropped at 1.5 times its keep-alive.
    pub fn new(keep_alive_secs: u16, now: Instant) -> Self {
        KeepAlive {
            window: Duration::from_millis(u64::from(keep_alive_secs) * 1500),
            last_heard: now,
        }
    }

    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    pub fn deadline(&self) -> Instant {
        self.last_heard + self.window
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline()
    }
}

/// When a Last Will goes out after the connection is lost: after its delay, but never
/// after the session itself has ended.
pub fn will_delay(will_delay_secs: u32, session_expiry_secs: u32) -> Duration {
    Duration::from_secs(u64::from(will_delay_secs.min(session_expiry_secs)))
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

#[derive(Debug, Clone)]
struct InFlight {
    pkid: u16,
    delivery: Delivery,
    qos: QoS,
    stage: Stage,
}

/// What the caller must send.
#[derive(Debug, Clone, PartialEq)]
pub enum Send {
    Publish {
        pkid: u16,
        delivery: Delivery,
        qos: QoS,
        dup: bool,
    },
    PubRel {
        pkid: u16,
    },
}

#[derive(Debug)]
pub struct SessionState {
    subscriptions: Vec<Subscription>,
    inflight: VecDeque<InFlight>,
    next_pkid: u16,
    incoming_qos2: HashSet<u16>,
    pub mailbox: Arc<Mailbox>,
    /// When the device was registered: a session survives only for the registration
    /// it was made under (not across a remove and re-add).
    pub registered: u64,
}

impl SessionState {
    pub fn new(mailbox: Arc<Mailbox>) -> Self {
        SessionState {
            subscriptions: Vec::new(),
            inflight: VecDeque::new(),
            next_pkid: 0,
            incoming_qos2: HashSet::new(),
            mailbox,
            registered: 0,
        }
    }

    /// Add a subscription, or replace the options of one with the same filter; true
    /// if it existed.
    pub fn subscribe(&mut self, sub: Subscription) -> bool {
        let existed = self.unsubscribe(&sub.key);
        self.subscriptions.push(sub);
        existed
    }

    /// True if there was such a subscription.
    pub fn unsubscribe(&mut self, key: &SubscriptionKey) -> bool {
        let before = self.subscriptions.len();
        self.subscriptions.retain(|s| &s.key != key);
        self.subscriptions.len() != before
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    pub fn has_subscription(&self, key: &SubscriptionKey) -> bool {
        self.subscriptions.iter().any(|s| &s.key == key)
    }

    /// The QoS to deliver a device's command at: the highest of the matching
    /// subscriptions, capped by the message's own. `None` when nothing matches.
    pub fn delivery_qos(&self, d: &Delivery) -> Option<QoS> {
        self.subscriptions
            .iter()
            .filter(|s| s.key.share.is_none() && s.key.filter.matches(&d.message.topic))
            .map(|s| s.options.qos)
            .max()
            .map(|q| q.min(d.message.qos))
    }

    /// May another QoS 1/2 message go out under this window?
    pub fn window_open(&self, window: usize) -> bool {
        self.inflight.len() < window
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    fn allocate_pkid(&mut self) -> u16 {
        // Callers keep the window (at most u16::MAX - 1 in flight), so a free id exists.
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let candidate = self.next_pkid;
            if !self.inflight.iter().any(|m| m.pkid == candidate) {
                return candidate;
            }
        }
    }

    /// Start delivering a message at `qos`.
    pub fn start(&mut self, delivery: Delivery, qos: QoS) -> Send {
        if qos == QoS::AtMostOnce {
            return Send::Publish {
                pkid: 0,
                delivery,
                qos,
                dup: false,
            };
        }
        let pkid = self.allocate_pkid();
        let stage = if qos == QoS::ExactlyOnce {
            Stage::AwaitRec
        } else {
            Stage::AwaitAck
        };
        self.inflight.push_back(InFlight {
            pkid,
            delivery: delivery.clone(),
            qos,
            stage,
        });
        Send::Publish {
            pkid,
            delivery,
            qos,
            dup: false,
        }
    }

    /// Forget a delivery just started that could not be sent after all (too large
    /// for the peer): as if it had completed.
    pub fn abandon(&mut self, pkid: u16) {
        self.inflight.retain(|m| m.pkid != pkid);
    }

    fn position(&self, pkid: u16, stage: Stage) -> Option<usize> {
        self.inflight
            .iter()
            .position(|m| m.pkid == pkid && m.stage == stage)
    }

    /// PUBACK from the peer: true if it acknowledged something we sent.
    pub fn on_puback(&mut self, pkid: u16) -> bool {
        self.position(pkid, Stage::AwaitAck)
            .map(|i| self.inflight.remove(i))
            .is_some()
    }

    /// PUBREC from the peer: answer PUBREL (also for a repeated PUBREC).
    pub fn on_pubrec(&mut self, pkid: u16) -> Option<Send> {
        if let Some(i) = self.position(pkid, Stage::AwaitRec) {
            self.inflight[i].stage = Stage::AwaitComp;
        } else {
            self.position(pkid, Stage::AwaitComp)?;
        }
        Some(Send::PubRel { pkid })
    }

    /// PUBCOMP from the peer ends a QoS 2 delivery.
    pub fn on_pubcomp(&mut self, pkid: u16) -> bool {
        self.position(pkid, Stage::AwaitComp)
            .map(|i| self.inflight.remove(i))
            .is_some()
    }

    /// On reconnect of a persistent session: everything unacknowledged goes out again,
    /// in the original order, PUBLISH with DUP set or PUBREL where that was reached.
    pub fn resume(&self) -> Vec<Send> {
        self.inflight
            .iter()
            .map(|m| match m.stage {
                Stage::AwaitComp => Send::PubRel { pkid: m.pkid },
                _ => Send::Publish {
                    pkid: m.pkid,
                    delivery: m.delivery.clone(),
                    qos: m.qos,
                    dup: true,
                },
            })
            .collect()
    }

    /// A QoS 2 PUBLISH from the peer: true the first time (forward it), false for a
    /// retransmission of one already forwarded (answer PUBREC only).
    pub fn incoming_qos2(&mut self, pkid: u16) -> bool {
        self.incoming_qos2.insert(pkid)
    }

    /// A QoS 2 packet id already accepted and not yet released (a retransmission).
    pub fn has_incoming_qos2(&self, pkid: u16) -> bool {
        self.incoming_qos2.contains(&pkid)
    }

    /// PUBREL from the peer releases the packet id.
    pub fn on_pubrel(&mut self, pkid: u16) {
        self.incoming_qos2.remove(&pkid);
    }

    /// QoS 2 packet ids from the peer still waiting for PUBREL.
    pub fn incoming_qos2_len(&self) -> usize {
        self.incoming_qos2.len()
    }
}

impl portcullis_core::parking::Parked for SessionState {
    fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }
}

/// Stored forms of a stage.
fn stage_byte(s: Stage) -> u8 {
    match s {
        Stage::AwaitAck => 0,
        Stage::AwaitRec => 1,
        Stage::AwaitComp => 2,
    }
}

const NO_LOCAL: u8 = 1;
const RETAIN_AS_PUBLISHED: u8 = 2;
const HAS_IDENTIFIER: u8 = 4;
/// Version of the stored form of an MQTT session.
const STATE_V1: u8 = 1;

impl portcullis_core::parking::Persist for SessionState {
    fn encode(&self, out: &mut Vec<u8>, in_flight: bool) {
        out.push(STATE_V1);
        out.extend_from_slice(&self.registered.to_be_bytes());
        out.extend_from_slice(&self.next_pkid.to_be_bytes());
        // Bounded by `sessions.max_subscriptions` and the in-flight window, far below
        // 64 Ki each.
        let subs = &self.subscriptions[..self.subscriptions.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(subs.len() as u16).to_be_bytes());
        for sub in subs {
            wire::put_str(out, sub.key.to_string().as_bytes());
            let o = &sub.options;
            out.push(o.qos as u8);
            out.push(o.retain_handling as u8);
            let mut flags = 0;
            if o.no_local {
                flags |= NO_LOCAL;
            }
            if o.retain_as_published {
                flags |= RETAIN_AS_PUBLISHED;
            }
            if o.identifier.is_some() {
                flags |= HAS_IDENTIFIER;
            }
            out.push(flags);
            out.extend_from_slice(&o.identifier.unwrap_or(0).to_be_bytes());
        }
        let (inflight, incoming): (Vec<&InFlight>, Vec<u16>) = if in_flight {
            (
                self.inflight.iter().take(usize::from(u16::MAX)).collect(),
                self.incoming_qos2
                    .iter()
                    .take(usize::from(u16::MAX))
                    .copied()
                    .collect(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        out.extend_from_slice(&(inflight.len() as u16).to_be_bytes());
        for m in inflight {
            out.extend_from_slice(&m.pkid.to_be_bytes());
            out.push(m.qos as u8);
            out.push(stage_byte(m.stage));
            put_delivery(&m.delivery, out);
        }
        out.extend_from_slice(&(incoming.len() as u16).to_be_bytes());
        for pkid in incoming {
            out.extend_from_slice(&pkid.to_be_bytes());
        }
    }

    fn decode(bytes: &[u8], mailbox: Arc<Mailbox>) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        let version = r.u8("MQTT session version")?;
        if version != STATE_V1 {
            return Err(WireError::Version(version));
        }
        let mut state = SessionState::new(mailbox);
        state.registered = r.u64("registered")?;
        state.next_pkid = r.u16("next packet id")?;
        let unlimited = TopicLimits {
            max_length: usize::MAX,
            max_depth: usize::MAX,
        };
        for _ in 0..r.u16("subscriptions")? {
            let key = SubscriptionKey::parse(r.string("filter")?, unlimited, true)
                .map_err(|e| WireError::Topic(e.to_string()))?;
            let qos = QoS::from_u8(r.u8("subscription QoS")?)
                .ok_or(WireError::Invalid("subscription QoS"))?;
            let retain_handling = RetainHandling::from_u8(r.u8("retain handling")?)
                .ok_or(WireError::Invalid("retain handling"))?;
            let flags = r.u8("subscription flags")?;
            let identifier = r.u32("subscription identifier")?;
            state.subscriptions.push(Subscription {
                key,
                options: SubscriptionOptions {
                    qos,
                    no_local: flags & NO_LOCAL != 0,
                    retain_as_published: flags & RETAIN_AS_PUBLISHED != 0,
                    retain_handling,
                    identifier: (flags & HAS_IDENTIFIER != 0).then_some(identifier),
                },
            });
        }
        for _ in 0..r.u16("in flight")? {
            let pkid = r.u16("packet id")?;
            let qos = QoS::from_u8(r.u8("QoS")?).ok_or(WireError::Invalid("QoS"))?;
            let stage = match (r.u8("stage")?, qos) {
                (0, QoS::AtLeastOnce) => Stage::AwaitAck,
                (1, QoS::ExactlyOnce) => Stage::AwaitRec,
                (2, QoS::ExactlyOnce) => Stage::AwaitComp,
                _ => return Err(WireError::Invalid("delivery stage")),
            };
            if pkid == 0 || state.inflight.iter().any(|m| m.pkid == pkid) {
                return Err(WireError::Invalid("packet id"));
            }
            let delivery = delivery(&mut r)?;
            state.inflight.push_back(InFlight {
                pkid,
                delivery,
                qos,
                stage,
            });
        }
        for _ in 0..r.u16("incoming QoS 2")? {
            state.incoming_qos2.insert(r.u16("packet id")?);
        }
        if !r.is_empty() {
            return Err(WireError::Invalid("MQTT session: bytes after the end"));
        }
        Ok(state)
    }

    fn registered(&self) -> u64 {
        self.registered
    }
}

/// MQTT sessions parked between connections.
pub type SessionStore = portcullis_core::parking::ParkedSessions<SessionState>;
pub type Slot = portcullis_core::parking::Slot<SessionState>;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use portcullis_core::mailbox::MailboxLimits;
    use portcullis_core::message::Message;
    use portcullis_core::subscription::SubscriptionOptions;
    use portcullis_core::topic::{TopicLimits, TopicName};

    const L: TopicLimits = TopicLimits {
        max_length: 128,
        max_depth: 8,
    };

    fn state() -> SessionState {
        SessionState::new(Arc::new(Mailbox::new(MailboxLimits {
            max_messages: 10,
            max_bytes: 1000,
            max_age: Duration::from_secs(60),
        })))
    }

    fn d(topic: &str, qos: QoS) -> Delivery {
        Delivery::from(Message {
            topic: TopicName::parse(topic, L).unwrap(),
            payload: Bytes::from_static(b"p"),
            qos,
            retain: false,
            properties: None,
        })
    }

    fn key(s: &str) -> SubscriptionKey {
        SubscriptionKey::parse(s, L, false).unwrap()
    }

    fn sub(s: &str, qos: QoS) -> Subscription {
        Subscription {
            key: key(s),
            options: SubscriptionOptions::qos(qos),
        }
    }

    fn pkid(s: &Send) -> u16 {
        match s {
            Send::Publish { pkid, .. } | Send::PubRel { pkid } => *pkid,
        }
    }

    #[test]
    fn a_silent_client_expires_at_one_and_a_half_keep_alives() {
        let t0 = Instant::now();
        let mut k = KeepAlive::new(10, t0);
        assert!(!k.expired(t0 + Duration::from_millis(14_999)));
        assert!(k.expired(t0 + Duration::from_secs(15)));
        k.heard(t0 + Duration::from_secs(10));
        assert!(!k.expired(t0 + Duration::from_secs(24)));
        assert!(k.expired(t0 + Duration::from_secs(25)));
    }

    #[test]
    fn keep_alive_of_zero_or_over_the_cap_becomes_the_cap() {
        assert_eq!(KeepAlive::effective(0, 600), 600);
        assert_eq!(KeepAlive::effective(601, 600), 600);
        assert_eq!(KeepAlive::effective(30, 600), 30);
    }

    #[test]
    fn a_will_never_waits_beyond_the_session() {
        assert_eq!(will_delay(30, 10), Duration::from_secs(10));
        assert_eq!(will_delay(5, 10), Duration::from_secs(5));
        assert_eq!(will_delay(30, 0), Duration::ZERO, "clean session: at once");
    }

    #[test]
    fn delivered_qos_is_the_lower_of_subscription_and_message() {
        let mut s = state();
        assert!(!s.subscribe(sub("devices/a/commands/#", QoS::AtLeastOnce)));
        assert_eq!(
            s.delivery_qos(&d("devices/a/commands/x", QoS::ExactlyOnce)),
            Some(QoS::AtLeastOnce)
        );
        assert_eq!(
            s.delivery_qos(&d("devices/a/commands/x", QoS::AtMostOnce)),
            Some(QoS::AtMostOnce)
        );
        s.subscribe(sub("devices/a/commands/x", QoS::ExactlyOnce));
        assert_eq!(
            s.delivery_qos(&d("devices/a/commands/x", QoS::ExactlyOnce)),
            Some(QoS::ExactlyOnce)
        );
        assert_eq!(
            s.delivery_qos(&d("devices/a/other", QoS::AtLeastOnce)),
            None
        );
        assert!(
            s.subscribe(sub("devices/a/commands/x", QoS::ExactlyOnce)),
            "the same filter again replaces it"
        );
        assert_eq!(s.subscriptions().len(), 2);
        assert!(s.unsubscribe(&key("devices/a/commands/x")));
        assert!(s.unsubscribe(&key("devices/a/commands/#")));
        assert!(!s.unsubscribe(&key("devices/a/commands/#")));
        assert_eq!(
            s.delivery_qos(&d("devices/a/commands/x", QoS::AtLeastOnce)),
            None
        );
    }

    #[test]
    fn qos2_delivery_walks_pubrec_pubrel_pubcomp() {
        let mut s = state();
        let sent = s.start(
            d("devices/a/commands/x", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
        );
        let id = pkid(&sent);
        assert!(
            !s.on_puback(id),
            "a PUBACK does not finish a QoS 2 delivery"
        );
        assert_eq!(s.on_pubrec(id), Some(Send::PubRel { pkid: id }));
        // A repeated PUBREC is answered again, without changing state.
        assert_eq!(s.on_pubrec(id), Some(Send::PubRel { pkid: id }));
        assert_eq!(s.inflight_len(), 1);
        assert!(s.on_pubcomp(id));
        assert_eq!(s.inflight_len(), 0);
        assert!(!s.on_pubcomp(id));
    }

    #[test]
    fn unknown_acks_change_nothing() {
        let mut s = state();
        s.start(
            d("devices/a/commands/x", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        );
        assert!(!s.on_puback(999));
        assert_eq!(s.on_pubrec(999), None);
        assert!(!s.on_pubcomp(999));
        assert_eq!(s.inflight_len(), 1);
    }

    #[test]
    fn resume_resends_unacknowledged_in_order_with_dup() {
        let mut s = state();
        let a = s.start(
            d("devices/a/commands/1", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        );
        let b = s.start(
            d("devices/a/commands/2", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
        );
        let c = s.start(
            d("devices/a/commands/3", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
        );
        s.on_pubrec(pkid(&c));
        let resent = s.resume();
        assert_eq!(resent.len(), 3);
        match &resent[0] {
            Send::Publish {
                pkid: p,
                dup,
                delivery,
                ..
            } => {
                assert_eq!(*p, pkid(&a));
                assert!(*dup);
                assert_eq!(delivery.message.topic.as_str(), "devices/a/commands/1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&resent[1], Send::Publish { pkid: p, dup: true, .. } if *p == pkid(&b)));
        assert_eq!(resent[2], Send::PubRel { pkid: pkid(&c) });
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_never_zero() {
        let mut s = state();
        let first = pkid(&s.start(
            d("devices/a/commands/1", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        ));
        // Wrap the counter around to just before `first`.
        s.next_pkid = first.wrapping_sub(1);
        let next = pkid(&s.start(
            d("devices/a/commands/2", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        ));
        assert_ne!(next, first);
        assert_ne!(next, 0);
        s.next_pkid = u16::MAX;
        let wrapped = pkid(&s.start(
            d("devices/a/commands/3", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        ));
        assert_ne!(wrapped, 0);
    }

    #[test]
    fn qos0_needs_no_packet_id_and_is_not_tracked() {
        let mut s = state();
        let sent = s.start(d("devices/a/commands/x", QoS::AtMostOnce), QoS::AtMostOnce);
        assert_eq!(pkid(&sent), 0);
        assert_eq!(s.inflight_len(), 0);
        assert!(s.window_open(1));
    }

    #[test]
    fn window_closes_at_the_inflight_limit() {
        let mut s = state();
        s.start(
            d("devices/a/commands/1", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        );
        assert!(s.window_open(2));
        s.start(
            d("devices/a/commands/2", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        );
        assert!(!s.window_open(2));
    }

    #[test]
    fn a_retransmitted_qos2_publish_is_forwarded_once() {
        let mut s = state();
        assert!(s.incoming_qos2(7));
        assert!(
            !s.incoming_qos2(7),
            "the DUP retransmission is not forwarded again"
        );
        s.on_pubrel(7);
        assert!(
            s.incoming_qos2(7),
            "after PUBREL the id is free for a new message"
        );
    }

    #[test]
    fn a_parked_session_comes_back_from_its_stored_form_as_it_was() {
        use portcullis_core::parking::Persist;
        let mut s = state();
        s.registered = 1_700_000_000;
        s.subscribe(sub("devices/a/commands/#", QoS::AtLeastOnce));
        s.subscribe(Subscription {
            key: key("devices/a/commands/x"),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::Never,
                identifier: Some(7),
            },
        });
        s.start(
            d("devices/a/commands/1", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
        );
        let c = s.start(
            d("devices/a/commands/2", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
        );
        s.on_pubrec(pkid(&c));
        s.incoming_qos2(9);
        let mut bytes = Vec::new();
        s.encode(&mut bytes, true);
        let back = SessionState::decode(&bytes, s.mailbox.clone()).unwrap();
        assert_eq!(back.registered, s.registered);
        assert_eq!(back.subscriptions(), s.subscriptions());
        assert_eq!(back.resume(), s.resume(), "the same resends, in order");
        assert!(back.has_incoming_qos2(9));
        assert_eq!(back.next_pkid, s.next_pkid);
        // Live: subscriptions only.
        let mut live = Vec::new();
        s.encode(&mut live, false);
        let back = SessionState::decode(&live, s.mailbox.clone()).unwrap();
        assert_eq!(back.subscriptions(), s.subscriptions());
        assert_eq!(back.inflight_len(), 0);
        assert_eq!(back.incoming_qos2_len(), 0);
        // Damaged: an error, never a panic.
        for n in 0..bytes.len() {
            assert!(SessionState::decode(&bytes[..n], s.mailbox.clone()).is_err());
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = SessionState::decode(&b, s.mailbox.clone());
        }
    }
}
