//! A session's mailbox: messages on their way to one peer, held while it is offline
//! (persistent session) or busy, bounded in count, bytes and age.
//!
//! The broker side pushes (the downlink for a device's commands, the fan-out for a
//! service's subscriptions), the peer's session pops. The lock is per session and held
//! for a push or a pop only; the clock is passed in, so the bounds are tested without
//! waiting.

use crate::message::{Message, Properties};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A message on its way to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// For a service, `qos` and `retain` are already what its subscriptions make of
    /// them; for a device, the message as published (its session applies its own).
    pub message: Message,
    /// MQTT 5 Subscription Identifiers of the subscriptions that matched, if any.
    pub subscription_ids: Vec<u32>,
}

impl From<Message> for Delivery {
    fn from(message: Message) -> Self {
        Delivery {
            message,
            subscription_ids: Vec::new(),
        }
    }
}

impl Delivery {
    /// What the message has left of its MQTT 5 Message Expiry Interval after waiting
    /// `waited`: `None` once it has expired (it must not be delivered), otherwise the
    /// message with the interval counted down, as the peer must receive it.
    pub fn aged(mut self, waited: Duration) -> Option<Delivery> {
        let Some(expiry) = self
            .message
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_secs)
        else {
            return Some(self);
        };
        let waited = waited.as_secs();
        if waited >= u64::from(expiry) {
            return None;
        }
        if waited > 0 {
            let mut props: Properties = self.message.properties.as_deref().cloned()?;
            props.message_expiry_secs = Some(expiry - waited as u32);
            self.message.properties = Some(Arc::new(props));
        }
        Some(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// Why a message did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Messages,
    Bytes,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Messages => "queue full (messages)",
            Overflow::Bytes => "queue full (bytes)",
        }
    }
}

#[derive(Debug)]
struct State {
    queue: VecDeque<(Delivery, Instant)>,
    bytes: usize,
}

#[derive(Debug)]
pub struct Mailbox {
    limits: MailboxLimits,
    state: Mutex<State>,
    /// The queue's length and the messages dropped for age, readable without the lock
    /// (the session looks at both on every turn).
    len: AtomicUsize,
    expired: AtomicU64,
    /// Messages refused since the last one that fit: callers audit the first of each
    /// such run (and count them all), so a consumer that falls behind costs one audit
    /// line per episode, not one per message.
    refused_in_a_row: AtomicU64,
    /// Wakes the device's session when something arrives.
    pub notify: Notify,
    /// Told after each message queued (a kept session marks itself changed).
    on_push: OnceLock<Hook>,
}

/// A function told of every message queued.
struct Hook(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook(..)")
    }
}

fn size(d: &Delivery) -> usize {
    d.message.size()
}

impl Mailbox {
    pub fn new(limits: MailboxLimits) -> Mailbox {
        Mailbox {
            limits,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
            }),
            len: AtomicUsize::new(0),
            expired: AtomicU64::new(0),
            refused_in_a_row: AtomicU64::new(0),
            notify: Notify::new(),
            on_push: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a message; a full mailbox refuses the newcomer (what is queued is kept,
    /// in order).
    pub fn push(&self, d: Delivery, now: Instant) -> Result<(), Overflow> {
        let mut s = self.lock();
        self.expire(&mut s, now);
        if s.queue.len() >= self.limits.max_messages {
            self.refused_in_a_row.fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Messages);
        }
        let n = size(&d);
        if s.bytes + n > self.limits.max_bytes {
            self.refused_in_a_row.fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Bytes);
        }
        if self.refused_in_a_row.load(Ordering::Relaxed) != 0 {
            self.refused_in_a_row.store(0, Ordering::Relaxed);
        }
        s.bytes += n;
        s.queue.push_back((d, now));
        let was_empty = s.queue.len() == 1;
        self.len.store(s.queue.len(), Ordering::Release);
        drop(s);
        // The session is woken when its mailbox stops being empty; until it has taken
        // everything (and looks at the length again before it waits), it needs no
        // other wake-up.
        if was_empty {
            self.notify.notify_one();
        }
        if let Some(hook) = self.on_push.get() {
            (hook.0)();
        }
        Ok(())
    }

    /// Call `f` after every message queued from now on (once set, it stays).
    pub fn watch(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_push.set(Hook(Box::new(f)));
    }

    /// What it holds, oldest first, with when each message was queued.
    pub fn snapshot(&self) -> Vec<(Delivery, Instant)> {
        self.lock().queue.iter().cloned().collect()
    }

    /// Whether the refusal just returned by `push` began a run of refusals (the one to
    /// audit).
    pub fn first_refusal(&self) -> bool {
        self.refused_in_a_row.load(Ordering::Relaxed) == 1
    }

    /// The oldest message still within its age and its own Message Expiry Interval
    /// (counted down by the time it waited).
    pub fn pop(&self, now: Instant) -> Option<Delivery> {
        let mut s = self.lock();
        self.expire(&mut s, now);
        let mut found = None;
        while let Some((d, at)) = s.queue.pop_front() {
            s.bytes -= size(&d);
            match d.aged(now.saturating_duration_since(at)) {
                Some(d) => {
                    found = Some(d);
                    break;
                }
                None => {
                    self.expired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.len.store(s.queue.len(), Ordering::Release);
        found
    }

    /// Up to `max` messages, as `pop` would give them one by one, taken under one
    /// lock (a busy session holds the lock far less often).
    pub fn pop_many(&self, now: Instant, max: usize, into: &mut VecDeque<Delivery>) {
        let mut s = self.lock();
        self.expire(&mut s, now);
        let mut taken = 0;
        while taken < max {
            let Some((d, at)) = s.queue.pop_front() else {
                break;
            };
            s.bytes -= size(&d);
            match d.aged(now.saturating_duration_since(at)) {
                Some(d) => {
                    into.push_back(d);
                    taken += 1;
                }
                None => {
                    self.expired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.len.store(s.queue.len(), Ordering::Release);
    }

    /// Messages taken but not delivered go back to the front, in their order (their
    /// age counts from now; the bounds held them already).
    pub fn put_back(&self, taken: VecDeque<Delivery>, now: Instant) {
        if taken.is_empty() {
            return;
        }
        let mut s = self.lock();
        for d in taken.into_iter().rev() {
            s.bytes += size(&d);
            s.queue.push_front((d, now));
        }
        self.len.store(s.queue.len(), Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages dropped for age so far (taken: the counter restarts at zero).
    pub fn take_expired(&self) -> u64 {
        if self.expired.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.expired.swap(0, Ordering::Relaxed)
    }

    /// Empty the mailbox; returns how many messages it held.
    pub fn clear(&self) -> usize {
        let mut s = self.lock();
        let n = s.queue.len();
        s.queue.clear();
        s.bytes = 0;
        self.len.store(0, Ordering::Release);
        n
    }

    fn expire(&self, s: &mut State, now: Instant) {
        while let Some((d, at)) = s.queue.front() {
            if now.saturating_duration_since(*at) <= self.limits.max_age {
                break;
            }
            s.bytes -= size(d);
            s.queue.pop_front();
            self.expired.fetch_add(1, Ordering::Relaxed);
        }
        self.len.store(s.queue.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;
    use crate::topic::{TopicLimits, TopicName};
    use bytes::Bytes;

    fn d(payload: &str) -> Delivery {
        Delivery::from(Message {
            topic: TopicName::parse(
                "devices/a/commands/x",
                TopicLimits {
                    max_length: 64,
                    max_depth: 8,
                },
            )
            .unwrap(),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        })
    }

    fn limits() -> MailboxLimits {
        MailboxLimits {
            max_messages: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(60),
        }
    }

    #[test]
    fn messages_come_out_in_order() {
        let m = Mailbox::new(limits());
        let t = Instant::now();
        for p in ["1", "2", "3"] {
            m.push(d(p), t).unwrap();
        }
        let out: Vec<_> = std::iter::from_fn(|| m.pop(t))
            .map(|d| d.message.payload)
            .collect();
        assert_eq!(out, vec!["1", "2", "3"]);
    }

    #[test]
    fn messages_taken_in_a_batch_and_put_back_keep_their_order() {
        let m = Mailbox::new(limits());
        let t = Instant::now();
        for p in ["1", "2", "3"] {
            m.push(d(p), t).unwrap();
        }
        let mut taken = VecDeque::new();
        m.pop_many(t, 2, &mut taken);
        assert_eq!(m.len(), 1);
        let first = taken.pop_front().unwrap();
        assert_eq!(first.message.payload, "1");
        m.put_back(taken, t);
        let out: Vec<_> = std::iter::from_fn(|| m.pop(t))
            .map(|d| d.message.payload)
            .collect();
        assert_eq!(out, vec!["2", "3"]);
    }

    #[test]
    fn a_full_mailbox_refuses_the_newcomer_and_keeps_the_rest() {
        let m = Mailbox::new(limits());
        let t = Instant::now();
        for p in ["1", "2", "3"] {
            m.push(d(p), t).unwrap();
        }
        assert_eq!(m.push(d("4"), t), Err(Overflow::Messages));
        assert_eq!(m.len(), 3);
        assert_eq!(m.pop(t).unwrap().message.payload, "1");
    }

    #[test]
    fn only_the_first_refusal_of_a_run_is_flagged_for_the_audit() {
        let m = Mailbox::new(limits());
        let t = Instant::now();
        for p in ["1", "2", "3"] {
            m.push(d(p), t).unwrap();
            assert!(!m.first_refusal());
        }
        let flags: Vec<bool> = (0..3)
            .map(|_| {
                assert!(m.push(d("x"), t).is_err());
                m.first_refusal()
            })
            .collect();
        assert_eq!(flags, [true, false, false]);
        // Room again: the next refusal starts a new run.
        m.pop(t).unwrap();
        m.push(d("4"), t).unwrap();
        assert!(m.push(d("5"), t).is_err());
        assert!(m.first_refusal());
    }

    #[test]
    fn the_byte_bound_counts_properties_too() {
        let m = Mailbox::new(limits());
        let t = Instant::now();
        let mut heavy = d("x");
        heavy.message.properties = Some(Arc::new(Properties {
            user_properties: vec![("k".into(), "v".repeat(90))],
            ..Properties::default()
        }));
        assert_eq!(m.push(heavy, t), Err(Overflow::Bytes), "20 + 1 + 91 > 100");
    }

    #[test]
    fn the_byte_bound_counts_topic_and_payload() {
        let m = Mailbox::new(limits());
        let t = Instant::now();
        // 20-byte topic + 70-byte payload = 90 bytes.
        m.push(d(&"x".repeat(70)), t).unwrap();
        assert_eq!(m.push(d("y"), t), Err(Overflow::Bytes));
        m.pop(t).unwrap();
        m.push(d("y"), t).unwrap();
    }

    #[test]
    fn messages_older_than_the_limit_are_dropped_and_counted() {
        let m = Mailbox::new(limits());
        let t0 = Instant::now();
        m.push(d("old"), t0).unwrap();
        m.push(d("new"), t0 + Duration::from_secs(30)).unwrap();
        let later = t0 + Duration::from_secs(61);
        assert_eq!(m.pop(later).unwrap().message.payload, "new");
        assert_eq!(m.take_expired(), 1);
        assert_eq!(m.take_expired(), 0);
    }

    fn expiring(payload: &str, secs: u32) -> Delivery {
        let mut d = d(payload);
        d.message.properties = Some(Arc::new(Properties {
            message_expiry_secs: Some(secs),
            ..Properties::default()
        }));
        d
    }

    #[test]
    fn a_message_past_its_own_expiry_interval_is_not_delivered() {
        let m = Mailbox::new(limits());
        let t0 = Instant::now();
        m.push(expiring("short", 1), t0).unwrap();
        m.push(expiring("long", 6), t0).unwrap();
        let later = t0 + Duration::from_secs(3);
        let got = m.pop(later).unwrap();
        assert_eq!(got.message.payload, "long");
        let left = got.message.properties.unwrap().message_expiry_secs;
        assert_eq!(left, Some(3), "the interval is counted down by the wait");
        assert_eq!(m.take_expired(), 1);
        assert!(m.pop(later).is_none());
    }

    #[test]
    fn a_message_delivered_at_once_keeps_its_expiry_interval() {
        let m = Mailbox::new(limits());
        let t0 = Instant::now();
        m.push(expiring("x", 6), t0).unwrap();
        let got = m.pop(t0 + Duration::from_millis(900)).unwrap();
        assert_eq!(got.message.properties.unwrap().message_expiry_secs, Some(6));
    }
}
