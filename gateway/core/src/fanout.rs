//! The service side of the embedded broker: which service session subscribed to what,
//! the retained messages, and one copy of each message for each subscriber.
//!
//! The embedded broker carries every message once to one reader (the fan-out link);
//! this table decides who gets it, with MQTT 5's rules: one copy per session at the
//! highest QoS its matching subscriptions grant (capped by the message's own), with
//! every matching Subscription Identifier; No Local; Retain As Published; Retain
//! Handling at subscribe time; shared subscriptions (one member per message, connected
//! members first). A copy goes into the session's mailbox, which is bounded: what does
//! not fit is refused there and reported to the caller to count and audit.
//!
//! Pure state, no I/O and no lock: one thread owns it (the fan-out link), the clock is
//! passed in. The filters live in a tree by topic level, so a message costs the levels
//! of its topic, not the number of subscriptions; an unsubscribe or a detached session
//! frees its branch.

use crate::mailbox::{Delivery, Mailbox, Overflow};
use crate::message::{Message, QoS};
use crate::principal::PrincipalId;
use crate::subscription::{
    RetainHandling, ShareName, Subscription, SubscriptionKey, SubscriptionOptions,
};
use crate::topic::{TopicFilter, TopicName};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

/// Bounds of the retained-message store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutLimits {
    pub max_retained_messages: usize,
    /// Topic + payload bytes of all retained messages.
    pub max_retained_bytes: usize,
    /// Subscriptions of all sessions together.
    pub max_subscriptions: usize,
}

/// What happened to one message or subscription, for the caller to count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routed {
    /// Copies put into session mailboxes.
    pub delivered: usize,
    /// Copies a full mailbox refused: the session's principal, why, and whether it
    /// began a run of refusals for that mailbox (what is audited; all are counted).
    pub overflows: Vec<(PrincipalId, Overflow, bool)>,
    /// A retained message that did not fit in the store (delivered live all the same).
    pub retained_refused: bool,
}

/// What a SUBSCRIBE did to one filter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// The session already had this subscription (its options are replaced).
    pub existed: bool,
    /// Retained messages sent for it, and copies refused by a full mailbox.
    pub routed: Routed,
}

/// Why a subscription was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("no such session")]
    NotAttached,
    #[error("subscriptions of all sessions at their limit (broker.max_subscriptions)")]
    Full,
}

type Slot = u32;

#[derive(Debug)]
struct Subscriber {
    principal: PrincipalId,
    queue: Arc<Mailbox>,
    online: bool,
    subscriptions: HashMap<SubscriptionKey, SubscriptionOptions>,
}

/// The members of one shared subscription, taking turns.
#[derive(Debug, Default)]
struct Share {
    members: Vec<(Slot, SubscriptionOptions)>,
    next: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Direct(Slot, SubscriptionOptions),
    Shared(Slot),
}

/// One topic level of the filter tree.
#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Filters ending at this level.
    here: Vec<Entry>,
    /// Filters ending with `#` right below this level (they match this level too).
    hash: Vec<Entry>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }

    fn insert(&mut self, filter: &TopicFilter, entry: Entry) {
        let mut node = self;
        let mut levels = filter.as_str().split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                node.hash.push(entry);
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                node.here.push(entry);
            }
        }
    }

    /// Remove the entries `gone` picks on this filter's path, and the branches left
    /// empty.
    fn remove(&mut self, levels: &[&str], gone: &impl Fn(&Entry) -> bool) {
        match levels {
            [] => self.here.retain(|e| !gone(e)),
            ["#"] => self.hash.retain(|e| !gone(e)),
            ["+", rest @ ..] => {
                if let Some(p) = &mut self.plus {
                    p.remove(rest, gone);
                    if p.is_empty() {
                        self.plus = None;
                    }
                }
            }
            [level, rest @ ..] => {
                if let Some(c) = self.children.get_mut(*level) {
                    c.remove(rest, gone);
                    if c.is_empty() {
                        self.children.remove(*level);
                    }
                }
            }
        }
    }

    /// Every entry whose filter matches the rest of the topic. Wildcards at the first
    /// level never match a topic starting with `$`.
    fn matches(
        &self,
        mut levels: std::str::Split<'_, char>,
        first: bool,
        dollar: bool,
        out: &mut Vec<Entry>,
    ) {
        let wild = !(first && dollar);
        if wild {
            out.extend_from_slice(&self.hash);
        }
        match levels.next() {
            None => out.extend_from_slice(&self.here),
            Some(level) => {
                if let Some(c) = self.children.get(level) {
                    c.matches(levels.clone(), false, dollar, out);
                }
                if let (Some(p), true) = (&self.plus, wild) {
                    p.matches(levels, false, dollar, out);
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct Fanout {
    limits: FanoutLimits,
    slots: Vec<Option<Subscriber>>,
    free: Vec<Slot>,
    by_principal: HashMap<PrincipalId, Slot>,
    shares: Vec<Option<Share>>,
    free_shares: Vec<Slot>,
    share_ids: HashMap<(ShareName, TopicFilter), Slot>,
    root: Node,
    /// Subscriptions of all attached sessions.
    subscriptions: usize,
    retained: BTreeMap<TopicName, (Message, Instant)>,
    retained_bytes: usize,
    /// Reused per message, so routing allocates nothing of its own.
    matched: Vec<Entry>,
}

fn retained_size(m: &Message) -> usize {
    m.size()
}

impl Fanout {
    pub fn new(limits: FanoutLimits) -> Fanout {
        Fanout {
            limits,
            slots: Vec::new(),
            free: Vec::new(),
            by_principal: HashMap::new(),
            shares: Vec::new(),
            free_shares: Vec::new(),
            share_ids: HashMap::new(),
            root: Node::default(),
            subscriptions: 0,
            retained: BTreeMap::new(),
            retained_bytes: 0,
            matched: Vec::new(),
        }
    }

    /// A session with this mailbox receives from now on (it starts with no
    /// subscription), and has a connection. Attaching the mailbox already attached (a
    /// resumed session) keeps its subscriptions; another mailbox replaces the old
    /// session and its subscriptions.
    pub fn attach(&mut self, who: &PrincipalId, queue: Arc<Mailbox>) {
        if let Some(&slot) = self.by_principal.get(who) {
            if let Some(s) = self.slots[slot as usize].as_mut()
                && Arc::ptr_eq(&s.queue, &queue)
            {
                s.online = true;
                return;
            }
            self.remove_slot(slot);
        }
        let subscriber = Subscriber {
            principal: who.clone(),
            queue,
            online: true,
            subscriptions: HashMap::new(),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(subscriber);
                slot
            }
            None => {
                self.slots.push(Some(subscriber));
                (self.slots.len() - 1) as Slot
            }
        };
        self.by_principal.insert(who.clone(), slot);
    }

    /// The session ended for good (clean, expired, discarded): its subscriptions go.
    /// Only if `queue` is still the attached one (a newer session may have replaced
    /// it meanwhile).
    pub fn detach(&mut self, who: &PrincipalId, queue: &Arc<Mailbox>) -> bool {
        let Some(&slot) = self.by_principal.get(who) else {
            return false;
        };
        let same = self.slots[slot as usize]
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(&s.queue, queue));
        if same {
            self.remove_slot(slot);
        }
        same
    }

    /// Whether the session has a connection (shared subscriptions prefer those).
    pub fn set_online(&mut self, who: &PrincipalId, online: bool) {
        if let Some(s) = self.subscriber_mut(who) {
            s.online = online;
        }
    }

    /// Subscriptions of sessions attached now (for a look from outside).
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    fn subscriber_mut(&mut self, who: &PrincipalId) -> Option<&mut Subscriber> {
        let slot = *self.by_principal.get(who)?;
        self.slots[slot as usize].as_mut()
    }

    fn remove_slot(&mut self, slot: Slot) {
        let Some(subscriber) = self.slots[slot as usize].take() else {
            return;
        };
        self.subscriptions -= subscriber.subscriptions.len();
        for key in subscriber.subscriptions.keys() {
            self.remove_entry(slot, key);
        }
        self.by_principal.remove(&subscriber.principal);
        self.free.push(slot);
    }

    /// Take `slot`'s subscription `key` out of the tree (or out of its share).
    fn remove_entry(&mut self, slot: Slot, key: &SubscriptionKey) {
        let levels: Vec<&str> = key.filter.as_str().split('/').collect();
        match &key.share {
            None => self
                .root
                .remove(&levels, &|e| matches!(e, Entry::Direct(s, _) if *s == slot)),
            Some(name) => {
                let id_key = (name.clone(), key.filter.clone());
                let Some(&id) = self.share_ids.get(&id_key) else {
                    return;
                };
                let Some(share) = self.shares[id as usize].as_mut() else {
                    return;
                };
                share.members.retain(|(s, _)| *s != slot);
                if share.members.is_empty() {
                    self.shares[id as usize] = None;
                    self.free_shares.push(id);
                    self.share_ids.remove(&id_key);
                    self.root
                        .remove(&levels, &|e| matches!(e, Entry::Shared(s) if *s == id));
                }
            }
        }
    }

    /// Add or replace one subscription of an attached session; the retained messages
    /// it matches go to the session's mailbox as its Retain Handling asks (never for a
    /// shared subscription).
    pub fn subscribe(
        &mut self,
        who: &PrincipalId,
        sub: Subscription,
        now: Instant,
    ) -> Result<Subscribed, SubscribeError> {
        let slot = *self
            .by_principal
            .get(who)
            .ok_or(SubscribeError::NotAttached)?;
        let subscriber = self.slots[slot as usize]
            .as_mut()
            .ok_or(SubscribeError::NotAttached)?;
        let existed = subscriber.subscriptions.contains_key(&sub.key);
        if !existed && self.subscriptions >= self.limits.max_subscriptions {
            return Err(SubscribeError::Full);
        }
        subscriber
            .subscriptions
            .insert(sub.key.clone(), sub.options);
        if existed {
            self.remove_entry(slot, &sub.key);
        } else {
            self.subscriptions += 1;
        }
        match &sub.key.share {
            None => self
                .root
                .insert(&sub.key.filter, Entry::Direct(slot, sub.options)),
            Some(name) => {
                let id_key = (name.clone(), sub.key.filter.clone());
                let id = match self.share_ids.get(&id_key) {
                    Some(&id) => id,
                    None => {
                        let id = match self.free_shares.pop() {
                            Some(id) => {
                                self.shares[id as usize] = Some(Share::default());
                                id
                            }
                            None => {
                                self.shares.push(Some(Share::default()));
                                (self.shares.len() - 1) as Slot
                            }
                        };
                        self.share_ids.insert(id_key, id);
                        self.root.insert(&sub.key.filter, Entry::Shared(id));
                        id
                    }
                };
                if let Some(share) = self.shares[id as usize].as_mut() {
                    share.members.push((slot, sub.options));
                }
            }
        }
        let mut out = Subscribed {
            existed,
            routed: Routed::default(),
        };
        let send = match sub.options.retain_handling {
            RetainHandling::OnSubscribe => true,
            RetainHandling::OnNewSubscription => !existed,
            RetainHandling::Never => false,
        };
        if sub.key.share.is_none() && send {
            self.send_retained(slot, &sub.key.filter, sub.options, now, &mut out.routed);
        }
        Ok(out)
    }

    /// Remove one subscription; false if the session had no such subscription.
    pub fn unsubscribe(&mut self, who: &PrincipalId, key: &SubscriptionKey) -> bool {
        let Some(&slot) = self.by_principal.get(who) else {
            return false;
        };
        let existed = self.slots[slot as usize]
            .as_mut()
            .is_some_and(|s| s.subscriptions.remove(key).is_some());
        if existed {
            self.subscriptions -= 1;
            self.remove_entry(slot, key);
        }
        existed
    }

    fn send_retained(
        &mut self,
        slot: Slot,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        now: Instant,
        routed: &mut Routed,
    ) {
        let Some(subscriber) = self.slots[slot as usize].as_ref() else {
            return;
        };
        let mut expired = Vec::new();
        // Only the topics that start with the filter's literal part can match (less
        // its last '/': `a/#` matches `a`).
        let literal = filter.as_str().split(['+', '#']).next().unwrap_or_default();
        let literal = literal.strip_suffix('/').unwrap_or(literal);
        let candidates = self
            .retained
            .range::<str, _>((Bound::Included(literal), Bound::Unbounded))
            .take_while(|(topic, _)| topic.as_str().starts_with(literal));
        for (topic, (message, at)) in candidates {
            if !filter.matches(topic) {
                continue;
            }
            let delivery = Delivery {
                message: Message {
                    qos: message.qos.min(options.qos),
                    retain: true,
                    ..message.clone()
                },
                subscription_ids: options.identifier.into_iter().collect(),
            };
            let Some(delivery) = delivery.aged(now.saturating_duration_since(*at)) else {
                expired.push(topic.clone());
                continue;
            };
            // A full queue takes none of the rest either: refused once, not once per
            // retained message.
            if !push(subscriber, delivery, now, routed) {
                break;
            }
        }
        for topic in expired {
            self.forget_retained(&topic);
        }
    }

    fn forget_retained(&mut self, topic: &TopicName) {
        if let Some((old, _)) = self.retained.remove(topic) {
            self.retained_bytes -= retained_size(&old);
        }
    }

    fn retained_fits(&self, message: &Message) -> bool {
        let old = self
            .retained
            .get(&message.topic)
            .map_or(0, |(m, _)| retained_size(m));
        let count = self.retained.len() + usize::from(old == 0);
        count <= self.limits.max_retained_messages
            && self.retained_bytes - old + retained_size(message) <= self.limits.max_retained_bytes
    }

    /// Keep (or, with an empty payload, clear) the retained message of its topic. When
    /// the store is full, expired messages make room first; a message that still does
    /// not fit is not kept, and neither is the older one it replaces (a subscriber
    /// gets no retained message rather than a stale one).
    fn retain(&mut self, message: &Message, now: Instant) -> bool {
        if message.payload.is_empty() {
            self.forget_retained(&message.topic);
            return true;
        }
        if !self.retained_fits(message) {
            let expired: Vec<TopicName> = self
                .retained
                .iter()
                .filter(|(_, (m, at))| {
                    Delivery::from(m.clone())
                        .aged(now.saturating_duration_since(*at))
                        .is_none()
                })
                .map(|(t, _)| t.clone())
                .collect();
            for topic in expired {
                self.forget_retained(&topic);
            }
        }
        if !self.retained_fits(message) {
            self.forget_retained(&message.topic);
            return false;
        }
        let old = self
            .retained
            .get(&message.topic)
            .map_or(0, |(m, _)| retained_size(m));
        let new = retained_size(message);
        self.retained_bytes = self.retained_bytes - old + new;
        let stored = Message {
            retain: true,
            ..message.clone()
        };
        self.retained.insert(message.topic.clone(), (stored, now));
        true
    }

    /// Route one message published by `origin` (a service, for No Local; `None` for a
    /// device or the gateway) to every session whose subscriptions match.
    pub fn publish(
        &mut self,
        message: &Message,
        origin: Option<&PrincipalId>,
        now: Instant,
    ) -> Routed {
        let mut routed = Routed::default();
        if message.retain && !self.retain(message, now) {
            routed.retained_refused = true;
        }
        let mut matched = std::mem::take(&mut self.matched);
        matched.clear();
        let topic = message.topic.as_str();
        self.root
            .matches(topic.split('/'), true, topic.starts_with('$'), &mut matched);
        // One copy per session: its direct entries side by side.
        matched.sort_unstable_by_key(|e| match e {
            Entry::Direct(slot, _) => (0, *slot),
            Entry::Shared(id) => (1, *id),
        });
        let mut i = 0;
        while i < matched.len() {
            match matched[i] {
                Entry::Direct(slot, _) => {
                    let mut j = i;
                    while j < matched.len()
                        && matches!(matched[j], Entry::Direct(s, _) if s == slot)
                    {
                        j += 1;
                    }
                    self.deliver_direct(slot, &matched[i..j], message, origin, now, &mut routed);
                    i = j;
                }
                Entry::Shared(id) => {
                    self.deliver_shared(id, message, now, &mut routed);
                    i += 1;
                }
            }
        }
        self.matched = matched;
        routed
    }

    fn deliver_direct(
        &self,
        slot: Slot,
        entries: &[Entry],
        message: &Message,
        origin: Option<&PrincipalId>,
        now: Instant,
        routed: &mut Routed,
    ) {
        let Some(subscriber) = self.slots[slot as usize].as_ref() else {
            return;
        };
        let own = origin.is_some_and(|o| *o == subscriber.principal);
        let mut qos: Option<QoS> = None;
        let mut retain = false;
        let mut ids = Vec::new();
        for entry in entries {
            let Entry::Direct(_, options) = entry else {
                continue;
            };
            if own && options.no_local {
                continue;
            }
            qos = qos.max(Some(options.qos.min(message.qos)));
            retain |= options.retain_as_published && message.retain;
            ids.extend(options.identifier);
        }
        let Some(qos) = qos else {
            return;
        };
        let delivery = Delivery {
            message: Message {
                qos,
                retain,
                ..message.clone()
            },
            subscription_ids: ids,
        };
        push(subscriber, delivery, now, routed);
    }

    fn deliver_shared(&mut self, id: Slot, message: &Message, now: Instant, routed: &mut Routed) {
        let Some(share) = self.shares[id as usize].as_mut() else {
            return;
        };
        let n = share.members.len();
        if n == 0 {
            return;
        }
        // Members with a connection in turn, then (if none took it) the others: a
        // parked persistent session queues the message. A member whose queue is full
        // passes it on; only when none can take it is it refused, once.
        let start = share.next % n;
        let online = |k: &usize| {
            self.slots[share.members[*k].0 as usize]
                .as_ref()
                .is_some_and(|s| s.online)
        };
        let order = (0..n).map(|k| (start + k) % n);
        let candidates: Vec<usize> = order
            .clone()
            .filter(online)
            .chain(order.filter(|k| !online(k)))
            .collect();
        let mut refused = None;
        for k in candidates {
            let (slot, options) = share.members[k];
            let Some(subscriber) = self.slots[slot as usize].as_ref() else {
                continue;
            };
            let delivery = Delivery {
                message: Message {
                    qos: options.qos.min(message.qos),
                    retain: options.retain_as_published && message.retain,
                    ..message.clone()
                },
                subscription_ids: options.identifier.into_iter().collect(),
            };
            match subscriber.queue.push(delivery, now) {
                Ok(()) => {
                    share.next = k + 1;
                    routed.delivered += 1;
                    return;
                }
                Err(overflow) => {
                    let first = subscriber.queue.first_refusal();
                    refused.get_or_insert((subscriber.principal.clone(), overflow, first));
                }
            }
        }
        share.next = start + 1;
        routed.overflows.extend(refused);
    }
}

/// Into the subscriber's queue; false (and reported) when it is full.
fn push(subscriber: &Subscriber, delivery: Delivery, now: Instant, routed: &mut Routed) -> bool {
    match subscriber.queue.push(delivery, now) {
        Ok(()) => {
            routed.delivered += 1;
            true
        }
        Err(overflow) => {
            let first = subscriber.queue.first_refusal();
            routed
                .overflows
                .push((subscriber.principal.clone(), overflow, first));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::MailboxLimits;
    use crate::message::Properties;
    use crate::topic::TopicLimits;
    use bytes::Bytes;
    use std::time::Duration;

    const L: TopicLimits = TopicLimits {
        max_length: 128,
        max_depth: 8,
    };

    fn fanout() -> Fanout {
        Fanout::new(FanoutLimits {
            max_retained_messages: 4,
            max_retained_bytes: 1000,
            max_subscriptions: 1000,
        })
    }

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    fn queue() -> Arc<Mailbox> {
        Arc::new(Mailbox::new(MailboxLimits {
            max_messages: 8,
            max_bytes: 10_000,
            max_age: Duration::from_secs(60),
        }))
    }

    fn msg(topic: &str, qos: QoS, retain: bool, payload: &'static str) -> Message {
        Message {
            topic: TopicName::parse(topic, L).unwrap(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos,
            retain,
            properties: None,
        }
    }

    fn sub(raw: &str, options: SubscriptionOptions) -> Subscription {
        Subscription {
            key: SubscriptionKey::parse(raw, L, true).unwrap(),
            options,
        }
    }

    fn plain(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions::qos(qos)
    }

    fn drain(q: &Mailbox, now: Instant) -> Vec<Delivery> {
        std::iter::from_fn(|| q.pop(now)).collect()
    }

    fn attached(f: &mut Fanout, who: &str) -> Arc<Mailbox> {
        let q = queue();
        f.attach(&id(who), q.clone());
        q
    }

    #[test]
    fn a_message_is_delivered_at_the_lower_of_its_qos_and_the_subscriptions() {
        let mut f = fanout();
        let t = Instant::now();
        let q = attached(&mut f, "a");
        f.subscribe(&id("a"), sub("t/#", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        f.publish(&msg("t/x", QoS::AtMostOnce, false, "0"), None, t);
        f.publish(&msg("t/x", QoS::ExactlyOnce, false, "2"), None, t);
        let got: Vec<_> = drain(&q, t).iter().map(|d| d.message.qos).collect();
        assert_eq!(got, vec![QoS::AtMostOnce, QoS::AtLeastOnce]);
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_at_the_highest_qos_with_every_identifier() {
        let mut f = fanout();
        let t = Instant::now();
        let q = attached(&mut f, "a");
        let with_id = |qos, n| SubscriptionOptions {
            identifier: Some(n),
            ..plain(qos)
        };
        f.subscribe(&id("a"), sub("t/#", with_id(QoS::ExactlyOnce, 7)), t)
            .unwrap();
        f.subscribe(&id("a"), sub("t/+", with_id(QoS::AtLeastOnce, 9)), t)
            .unwrap();
        f.subscribe(&id("a"), sub("t/x", plain(QoS::AtMostOnce)), t)
            .unwrap();
        let routed = f.publish(&msg("t/x", QoS::ExactlyOnce, false, "p"), None, t);
        assert_eq!(routed.delivered, 1);
        let got = drain(&q, t);
        assert_eq!(got.len(), 1, "one copy, not one per filter");
        assert_eq!(got[0].message.qos, QoS::ExactlyOnce);
        let mut ids = got[0].subscription_ids.clone();
        ids.sort();
        assert_eq!(ids, vec![7, 9]);
    }

    #[test]
    fn no_local_keeps_a_sessions_own_messages_from_it() {
        let mut f = fanout();
        let t = Instant::now();
        let qa = attached(&mut f, "a");
        let qb = attached(&mut f, "b");
        let nl = SubscriptionOptions {
            no_local: true,
            ..plain(QoS::AtLeastOnce)
        };
        f.subscribe(&id("a"), sub("t", nl), t).unwrap();
        f.subscribe(&id("b"), sub("t", nl), t).unwrap();
        f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), Some(&id("a")), t);
        assert!(drain(&qa, t).is_empty());
        assert_eq!(drain(&qb, t).len(), 1);
        // A device with the same id as a service is not that service.
        f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), None, t);
        assert_eq!(drain(&qa, t).len(), 1);
    }

    #[test]
    fn live_messages_lose_their_retain_flag_unless_retain_as_published() {
        let mut f = fanout();
        let t = Instant::now();
        let qa = attached(&mut f, "a");
        let qb = attached(&mut f, "b");
        f.subscribe(&id("a"), sub("t", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        let rap = SubscriptionOptions {
            retain_as_published: true,
            ..plain(QoS::AtLeastOnce)
        };
        f.subscribe(&id("b"), sub("t", rap), t).unwrap();
        f.publish(&msg("t", QoS::AtLeastOnce, true, "r"), None, t);
        f.publish(&msg("t", QoS::AtLeastOnce, false, "n"), None, t);
        let a: Vec<_> = drain(&qa, t).iter().map(|d| d.message.retain).collect();
        let b: Vec<_> = drain(&qb, t).iter().map(|d| d.message.retain).collect();
        assert_eq!(a, vec![false, false]);
        assert_eq!(b, vec![true, false]);
    }

    #[test]
    fn retained_messages_follow_retain_handling_and_keep_their_own_qos() {
        let mut f = fanout();
        let t = Instant::now();
        for (topic, qos) in [
            ("r/0", QoS::AtMostOnce),
            ("r/1", QoS::AtLeastOnce),
            ("r/2", QoS::ExactlyOnce),
        ] {
            f.publish(&msg(topic, qos, true, "v"), None, t);
        }
        let q = attached(&mut f, "a");
        let rh = |h| SubscriptionOptions {
            retain_handling: h,
            ..plain(QoS::ExactlyOnce)
        };
        let s = f
            .subscribe(
                &id("a"),
                sub("r/+", rh(RetainHandling::OnNewSubscription)),
                t,
            )
            .unwrap();
        assert!(!s.existed);
        let got = drain(&q, t);
        let qos: Vec<_> = got.iter().map(|d| d.message.qos).collect();
        assert_eq!(
            qos,
            vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        );
        assert!(
            got.iter().all(|d| d.message.retain),
            "sent at subscribe time: retained"
        );
        let s = f
            .subscribe(
                &id("a"),
                sub("r/+", rh(RetainHandling::OnNewSubscription)),
                t,
            )
            .unwrap();
        assert!(s.existed);
        assert!(
            drain(&q, t).is_empty(),
            "1: not again for an existing subscription"
        );
        f.subscribe(&id("a"), sub("r/+", rh(RetainHandling::OnSubscribe)), t)
            .unwrap();
        assert_eq!(drain(&q, t).len(), 3, "0: at every subscribe");
        f.subscribe(&id("a"), sub("r/#", rh(RetainHandling::Never)), t)
            .unwrap();
        assert!(drain(&q, t).is_empty(), "2: never");
    }

    #[test]
    fn retained_messages_are_found_by_the_filters_literal_prefix_and_wildcards() {
        let mut f = Fanout::new(FanoutLimits {
            max_retained_messages: 100,
            max_retained_bytes: 100_000,
            max_subscriptions: 1000,
        });
        let t = Instant::now();
        for topic in ["a", "a/b", "a/b/c", "ab/c", "b/b/c", "a/x/c"] {
            f.publish(&msg(topic, QoS::AtMostOnce, true, "v"), None, t);
        }
        let q = attached(&mut f, "s");
        for (filter, want) in [
            ("a/#", vec!["a", "a/b", "a/b/c", "a/x/c"]),
            ("a/+/c", vec!["a/b/c", "a/x/c"]),
            ("+/b/c", vec!["a/b/c", "b/b/c"]),
            ("a/b", vec!["a/b"]),
            ("ab/c", vec!["ab/c"]),
            ("#", vec!["a", "a/b", "a/b/c", "a/x/c", "ab/c", "b/b/c"]),
        ] {
            f.subscribe(&id("s"), sub(filter, plain(QoS::AtMostOnce)), t)
                .unwrap();
            let got: Vec<String> = drain(&q, t)
                .iter()
                .map(|d| d.message.topic.to_string())
                .collect();
            assert_eq!(got, want, "{filter}");
        }
    }

    #[test]
    fn an_empty_retained_message_clears_the_topic() {
        let mut f = fanout();
        let t = Instant::now();
        f.publish(&msg("r/a", QoS::AtLeastOnce, true, "v"), None, t);
        assert_eq!(f.retained_count(), 1);
        f.publish(&msg("r/a", QoS::AtLeastOnce, true, ""), None, t);
        assert_eq!(f.retained_count(), 0);
    }

    #[test]
    fn the_retained_store_is_bounded_and_says_so() {
        let mut f = fanout();
        let t = Instant::now();
        for n in 0..4 {
            let topic = format!("r/{n}");
            let m = Message {
                topic: TopicName::parse(&topic, L).unwrap(),
                ..msg("x", QoS::AtMostOnce, true, "v")
            };
            assert!(!f.publish(&m, None, t).retained_refused);
        }
        let routed = f.publish(&msg("r/new", QoS::AtMostOnce, true, "v"), None, t);
        assert!(routed.retained_refused);
        assert!(
            !f.publish(&msg("r/0", QoS::AtMostOnce, true, "w"), None, t)
                .retained_refused,
            "replacing a topic already held is always fine"
        );
        let big = Message {
            payload: Bytes::from(vec![b'x'; 2000]),
            ..msg("r/1", QoS::AtMostOnce, true, "")
        };
        assert!(
            f.publish(&big, None, t).retained_refused,
            "over the byte bound"
        );
    }

    #[test]
    fn an_expired_retained_message_is_not_sent() {
        let mut f = fanout();
        let t = Instant::now();
        let m = Message {
            properties: Some(Arc::new(Properties {
                message_expiry_secs: Some(2),
                ..Properties::default()
            })),
            ..msg("r/a", QoS::AtLeastOnce, true, "v")
        };
        f.publish(&m, None, t);
        let q = attached(&mut f, "a");
        f.subscribe(
            &id("a"),
            sub("r/#", plain(QoS::AtLeastOnce)),
            t + Duration::from_secs(3),
        )
        .unwrap();
        assert!(drain(&q, t + Duration::from_secs(3)).is_empty());
        assert_eq!(f.retained_count(), 0);
    }

    #[test]
    fn a_shared_subscription_gives_each_message_to_one_member_in_turn() {
        let mut f = fanout();
        let t = Instant::now();
        let qa = attached(&mut f, "a");
        let qb = attached(&mut f, "b");
        for who in ["a", "b"] {
            f.subscribe(&id(who), sub("$share/g/t/+", plain(QoS::AtLeastOnce)), t)
                .unwrap();
        }
        for _ in 0..4 {
            f.publish(&msg("t/x", QoS::AtLeastOnce, false, "p"), None, t);
        }
        assert_eq!(drain(&qa, t).len(), 2);
        assert_eq!(drain(&qb, t).len(), 2);
        // A member without a connection is passed over while another has one.
        f.set_online(&id("b"), false);
        for _ in 0..3 {
            f.publish(&msg("t/x", QoS::AtLeastOnce, false, "p"), None, t);
        }
        assert_eq!(drain(&qa, t).len(), 3);
        assert!(drain(&qb, t).is_empty());
    }

    #[test]
    fn a_shared_and_a_plain_subscription_each_get_their_copy_and_shares_get_no_retained() {
        let mut f = fanout();
        let t = Instant::now();
        f.publish(&msg("t/x", QoS::AtLeastOnce, true, "old"), None, t);
        let q = attached(&mut f, "a");
        f.subscribe(&id("a"), sub("$share/g/t/x", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        assert!(drain(&q, t).is_empty(), "no retained messages for a share");
        f.subscribe(&id("a"), sub("t/x", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        assert_eq!(
            drain(&q, t).len(),
            1,
            "the retained one, for the plain filter"
        );
        f.publish(&msg("t/x", QoS::AtLeastOnce, false, "new"), None, t);
        assert_eq!(drain(&q, t).len(), 2);
    }

    #[test]
    fn a_share_member_with_a_full_queue_passes_the_message_on() {
        let mut f = fanout();
        let t = Instant::now();
        let qa = attached(&mut f, "a");
        let qb = attached(&mut f, "b");
        for who in ["a", "b"] {
            f.subscribe(&id(who), sub("$share/g/t", plain(QoS::AtLeastOnce)), t)
                .unwrap();
        }
        for _ in 0..8 {
            qa.push(Delivery::from(msg("x", QoS::AtMostOnce, false, "f")), t)
                .unwrap();
        }
        for _ in 0..4 {
            let routed = f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), None, t);
            assert!(routed.overflows.is_empty());
        }
        assert_eq!(qb.len(), 4, "b took what a had no room for");
        for _ in 0..8 {
            let _ = qb.push(Delivery::from(msg("x", QoS::AtMostOnce, false, "f")), t);
        }
        let routed = f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), None, t);
        assert_eq!(
            routed.overflows.len(),
            1,
            "refused once when no member has room"
        );
    }

    #[test]
    fn a_full_queue_stops_the_retained_messages_of_a_subscribe_after_one_refusal() {
        let mut f = Fanout::new(FanoutLimits {
            max_retained_messages: 100,
            max_retained_bytes: 100_000,
            max_subscriptions: 1000,
        });
        let t = Instant::now();
        for n in 0..20 {
            let m = Message {
                topic: TopicName::parse(&format!("r/{n}"), L).unwrap(),
                ..msg("x", QoS::AtMostOnce, true, "v")
            };
            f.publish(&m, None, t);
        }
        let q = attached(&mut f, "a");
        let s = f
            .subscribe(&id("a"), sub("r/#", plain(QoS::AtMostOnce)), t)
            .unwrap();
        assert_eq!(q.len(), 8);
        assert_eq!(s.routed.overflows.len(), 1);
    }

    #[test]
    fn a_full_retained_store_makes_room_from_expired_messages_and_never_keeps_a_stale_one() {
        let mut f = fanout();
        let t = Instant::now();
        let short = |topic: &str| Message {
            topic: TopicName::parse(topic, L).unwrap(),
            properties: Some(Arc::new(Properties {
                message_expiry_secs: Some(1),
                ..Properties::default()
            })),
            ..msg("x", QoS::AtMostOnce, true, "v")
        };
        for n in 0..4 {
            f.publish(&short(&format!("r/{n}")), None, t);
        }
        let later = t + Duration::from_secs(2);
        let routed = f.publish(&msg("r/new", QoS::AtMostOnce, true, "v"), None, later);
        assert!(!routed.retained_refused, "the expired ones made room");
        assert_eq!(f.retained_count(), 1);
        // A replacement that does not fit takes the old value with it.
        let big = Message {
            payload: Bytes::from(vec![b'x'; 2000]),
            ..msg("r/new", QoS::AtMostOnce, true, "")
        };
        assert!(f.publish(&big, None, later).retained_refused);
        assert_eq!(f.retained_count(), 0);
    }

    #[test]
    fn unsubscribe_and_detach_free_their_branches() {
        let mut f = fanout();
        let t = Instant::now();
        let q = attached(&mut f, "a");
        f.subscribe(&id("a"), sub("a/b/c/#", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        f.subscribe(&id("a"), sub("$share/g/x/+/y", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        assert!(f.unsubscribe(
            &id("a"),
            &SubscriptionKey::parse("a/b/c/#", L, true).unwrap()
        ));
        assert!(!f.unsubscribe(
            &id("a"),
            &SubscriptionKey::parse("a/b/c/#", L, true).unwrap()
        ));
        assert!(f.detach(&id("a"), &q));
        assert!(
            f.root.is_empty(),
            "nothing left of either filter: {:?}",
            f.root
        );
        assert!(f.share_ids.is_empty());
        assert_eq!(f.subscription_count(), 0);
        f.publish(&msg("x/1/y", QoS::AtLeastOnce, false, "p"), None, t);
        assert!(drain(&q, t).is_empty());
    }

    #[test]
    fn subscriptions_of_all_sessions_are_bounded_and_freed_ones_count_again() {
        let mut f = Fanout::new(FanoutLimits {
            max_retained_messages: 10,
            max_retained_bytes: 1000,
            max_subscriptions: 3,
        });
        let t = Instant::now();
        let a = attached(&mut f, "a");
        attached(&mut f, "b");
        for filter in ["a/1", "a/2"] {
            f.subscribe(&id("a"), sub(filter, plain(QoS::AtMostOnce)), t)
                .unwrap();
        }
        f.subscribe(&id("b"), sub("b/1", plain(QoS::AtMostOnce)), t)
            .unwrap();
        assert_eq!(
            f.subscribe(&id("b"), sub("b/2", plain(QoS::AtMostOnce)), t),
            Err(SubscribeError::Full)
        );
        // Replacing a subscription's options adds none.
        assert!(
            f.subscribe(&id("b"), sub("b/1", plain(QoS::AtLeastOnce)), t)
                .unwrap()
                .existed
        );
        assert!(f.unsubscribe(&id("b"), &SubscriptionKey::parse("b/1", L, true).unwrap()));
        f.subscribe(&id("b"), sub("b/2", plain(QoS::AtMostOnce)), t)
            .unwrap();
        assert!(f.detach(&id("a"), &a));
        assert_eq!(f.subscription_count(), 1);
        for filter in ["b/3", "b/4"] {
            f.subscribe(&id("b"), sub(filter, plain(QoS::AtMostOnce)), t)
                .unwrap();
        }
        assert_eq!(
            f.subscribe(&id("b"), sub("b/5", plain(QoS::AtMostOnce)), t),
            Err(SubscribeError::Full)
        );
    }

    #[test]
    fn a_stale_detach_leaves_the_newer_session_alone() {
        let mut f = fanout();
        let t = Instant::now();
        let old = attached(&mut f, "a");
        let new = attached(&mut f, "a");
        f.subscribe(&id("a"), sub("t", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        assert!(!f.detach(&id("a"), &old));
        f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), None, t);
        assert_eq!(drain(&new, t).len(), 1);
    }

    #[test]
    fn a_full_mailbox_refuses_and_names_the_session() {
        let mut f = fanout();
        let t = Instant::now();
        let q = attached(&mut f, "a");
        f.subscribe(&id("a"), sub("t", plain(QoS::AtLeastOnce)), t)
            .unwrap();
        for _ in 0..8 {
            f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), None, t);
        }
        let routed = f.publish(&msg("t", QoS::AtLeastOnce, false, "p"), None, t);
        assert_eq!(routed.overflows, vec![(id("a"), Overflow::Messages, true)]);
        assert_eq!(q.len(), 8);
    }

    #[test]
    fn wildcards_match_by_level_and_hash_matches_its_parent() {
        let mut f = fanout();
        let t = Instant::now();
        let q = attached(&mut f, "a");
        f.subscribe(&id("a"), sub("s/#", plain(QoS::AtMostOnce)), t)
            .unwrap();
        f.subscribe(&id("a"), sub("+/+/c", plain(QoS::AtMostOnce)), t)
            .unwrap();
        for (topic, hits) in [
            ("s", 1),
            ("s/a/b", 1),
            ("x/b/c", 1),
            ("x/c", 0),
            ("s/b/c", 1),
        ] {
            f.publish(&msg(topic, QoS::AtMostOnce, false, "p"), None, t);
            assert_eq!(drain(&q, t).len(), hits, "{topic}");
        }
    }
}
