//! Commands to the device: from its mailbox, through the core's downlink gates (the
//! quarantine hold, the device's command rate, its receive ACL), two ways:
//!
//! - **Observe** on `/c` (RFC 7641): each command is a confirmable 2.05 notification
//!   carrying the registration's token and the next sequence number, sent again with
//!   exponential back-off (ACK_TIMEOUT 2 s × up to 1.5, MAX_RETRANSMIT 4) until the
//!   device acknowledges it. A RST or no acknowledgement drops the relation, and the
//!   command goes back to the mailbox for the device's next request.
//! - **`?ttd=N`** on a telemetry POST (as Eclipse Hono does it): the answer waits up
//!   to N seconds for a command and carries it; a confirmable request is acknowledged
//!   at once (empty ACK) and answered by a separate, confirmable response.
//!
//! One confirmable message of ours is outstanding at a time (NSTART 1). A command is
//! carried as the payload, its name (the topic levels after `devices/{id}/commands/`)
//! as Location-Path, and when the sender asked for a response (an MQTT 5 Response
//! Topic) `r=N` as Location-Query: the device posts its result to `/r/N`.

use super::exchange::Session;
use super::*;
use crate::message::{Reliability, Request};
use crate::reply::{Exchange, Reply, empty_ack, uint};
use bytes::Bytes;
use coap_lite::{CoapOption, ResponseType};
use portcullis_core::admission::NextCommand;
use portcullis_core::mailbox::Delivery;
use portcullis_core::topic::TopicName;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

/// RFC 7252 §4.8: retransmissions after the first send (ACK_TIMEOUT is configured).
const MAX_RETRANSMIT: u32 = 4;
/// Commands awaiting a response the device may still post, at most (oldest forgotten).
const MAX_RESPONSES: usize = 16;
/// The largest CoAP message the gateway sends (RFC 7252 §4.6: fits an IPv6 minimum
/// MTU with DTLS's overhead).
const MAX_MESSAGE: usize = 1152;

/// The size of a command as a CoAP message, at most: header, token (8), Observe (4),
/// its name as Location-Path, `r=N` as Location-Query, the payload marker, payload.
fn command_size(d: &Delivery) -> usize {
    let name: usize = d.message.topic.levels().skip(3).map(|l| l.len() + 3).sum();
    4 + 8 + 4 + name + 16 + 1 + d.message.payload.len()
}

/// A confirmable message of ours waiting for the device's ACK.
struct Outstanding {
    id: u16,
    bytes: Vec<u8>,
    /// The command it carries (back to the mailbox if it is never acknowledged).
    delivery: Option<Delivery>,
    /// A notification (its relation is dropped if it fails).
    notification: bool,
    sends: u32,
    timeout: Duration,
    due: Instant,
}

/// A telemetry request whose answer waits for a command (`?ttd=N`).
struct Waiter {
    exchange: Exchange,
    deadline: Instant,
    /// The request was acknowledged already (empty ACK): the answer is separate.
    acked: bool,
}

/// Where a command's response goes: its Response Topic and Correlation Data.
#[derive(Debug)]
struct ResponseTo {
    n: u32,
    topic: TopicName,
    correlation: Option<Bytes>,
}

/// Commands awaiting a result the device may still post (`/r/{n}`). Kept with the
/// device's state across its DTLS sessions, numbered from a random start, so that a
/// result posted after a new handshake still finds its own command.
#[derive(Debug)]
pub struct Responses {
    waiting: VecDeque<ResponseTo>,
    next: u32,
}

impl Default for Responses {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        Responses {
            waiting: VecDeque::new(),
            next: seed % 1_000_000,
        }
    }
}

impl Responses {
    /// Remember where a command's result goes; the number the device posts it to.
    fn remember(&mut self, topic: TopicName, correlation: Option<Bytes>) -> u32 {
        if self.waiting.len() >= MAX_RESPONSES {
            self.waiting.pop_front();
        }
        self.next = self.next.wrapping_add(1);
        let n = self.next;
        self.waiting.push_back(ResponseTo {
            n,
            topic,
            correlation,
        });
        n
    }

    /// Where result `n` goes, once (a second post to it is refused).
    pub(super) fn take(&mut self, n: u32) -> Option<(TopicName, Option<Bytes>)> {
        let at = self.waiting.iter().position(|r| r.n == n)?;
        let r = self.waiting.remove(at)?;
        Some((r.topic, r.correlation))
    }

    /// A result refused (too large, over the rate, ...) may be posted again.
    pub(super) fn put_back(&mut self, n: u32, topic: TopicName, correlation: Option<Bytes>) {
        self.waiting.push_front(ResponseTo {
            n,
            topic,
            correlation,
        });
    }
}

#[derive(Default)]
pub(super) struct Downlink {
    /// Boxed, as the waiter: an idle session holds neither.
    outstanding: Option<Box<Outstanding>>,
    waiter: Option<Box<Waiter>>,
    /// Commands are not looked at before then (the hold, the device's command rate).
    next_pump: Option<Instant>,
}

impl Downlink {
    /// The device acknowledged message `id`: whether it was our outstanding one and
    /// carried a command (now delivered).
    /// The payload size of the command the device acknowledged, if it was one.
    pub(super) fn acknowledged(&mut self, id: u16) -> Option<usize> {
        if self.outstanding.as_ref().is_some_and(|o| o.id == id) {
            return self
                .outstanding
                .take()
                .and_then(|o| o.delivery)
                .map(|d| d.message.payload.len());
        }
        None
    }

    /// What the session was sending goes back to the mailbox (the session is ending).
    pub(super) fn give_back(&mut self, state: &CoapState, now: Instant) {
        if let Some(d) = self.outstanding.take().and_then(|o| o.delivery) {
            state.mailbox.put_back(VecDeque::from([d]), now);
        }
        self.waiter = None;
    }
}

/// The first retransmission timeout: ACK_TIMEOUT × a random factor in [1, 1.5).
fn initial_timeout(ack_timeout: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    ack_timeout.mul_f64(1.0 + f64::from(nanos % 1000) / 2000.0)
}

impl Session {
    /// Whether a command arriving now would be sent (the mailbox is worth watching).
    pub(super) fn wants_commands(&self) -> bool {
        self.down.outstanding.is_none()
            && (self.down.waiter.is_some() || self.state.observer.is_some())
    }

    /// When the session must look at its timers next.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        let pump = self.down.next_pump.filter(|_| self.wants_commands());
        [
            self.down.outstanding.as_ref().map(|o| o.due),
            self.down.waiter.as_ref().map(|w| w.deadline),
            pump,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// `GET /c`: Observe 0 registers (the answer is the relation's first 2.05, and
    /// queued commands follow as notifications), Observe 1 deregisters; without
    /// Observe it is a poll answered with the next command, if any.
    pub(super) fn commands(&mut self, ctx: &Context, r: &Request, now: Instant) {
        let exchange = Exchange::of(r);
        // Over plain CoAP a registration is answered as a poll (RFC 7641 §2: the
        // server may decline to observe): no relation outlives the request.
        if r.observe == Some(0) && !self.link().plain {
            // Retained commands go to the first relation of each DTLS session (a
            // device that rebooted has forgotten them; one that registers again within
            // its session has them already).
            if !self.retained_sent {
                self.retained_sent = true;
                self.admission
                    .queue_retained_commands(&self.state.mailbox, now);
            }
            let seq = self.state.observer.as_ref().map_or(1, |o| o.seq);
            self.state.observer = Some(Observer {
                token: r.token.clone(),
                seq: seq.wrapping_add(1),
            });
            Metrics::inc(&ctx.metrics.coap.observe_registered);
            let reply = Reply::new(ResponseType::Content)
                .option(CoapOption::Observe, uint(seq & 0xff_ffff));
            self.answer(&exchange, &reply);
            return;
        }
        if r.observe == Some(1)
            && self
                .state
                .observer
                .as_ref()
                .is_some_and(|o| o.token == r.token)
        {
            self.state.observer = None;
            Metrics::inc(&ctx.metrics.coap.observe_dropped);
        }
        let reply = match self.next_command(now) {
            Some(d) => {
                ctx.metrics.delivered(d.message.payload.len());
                self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                self.command_reply(&d, ResponseType::Content)
            }
            None => Reply::new(ResponseType::Content),
        };
        self.answer(&exchange, &reply);
    }

    /// `?ttd=N`: the answer to this request waits up to `wait` for a command.
    pub(super) fn wait_for_command(&mut self, ctx: &Context, exchange: Exchange, wait: Duration) {
        // A newer wait replaces an older one, which is answered without a command.
        self.answer_waiter(ctx, None);
        let now = Instant::now();
        self.down.waiter = Some(Box::new(Waiter {
            exchange,
            deadline: now + wait,
            acked: false,
        }));
        if self.down.outstanding.is_none()
            && let Some(d) = self.next_command(now)
        {
            self.answer_waiter(ctx, Some(d));
            return;
        }
        // Nothing yet: a confirmable request is acknowledged now, answered later.
        if let Some(w) = self.down.waiter.as_mut()
            && w.exchange.reliability == Reliability::Confirmable
        {
            w.acked = true;
            let id = w.exchange.message_id;
            let ack = empty_ack(id);
            self.answer_raw(id, ack);
        }
    }

    /// Send a datagram that answers request `id`, kept for its retransmissions.
    fn answer_raw(&mut self, id: u16, bytes: Vec<u8>) {
        self.remember_answer(id, &bytes);
        self.send(bytes);
    }

    /// Answer the waiting request, with a command or without.
    fn answer_waiter(&mut self, ctx: &Context, command: Option<Delivery>) {
        let Some(w) = self.down.waiter.take() else {
            if let Some(d) = command {
                self.state
                    .mailbox
                    .put_back(VecDeque::from([d]), Instant::now());
            }
            return;
        };
        let reply = match &command {
            Some(d) => self.command_reply(d, ResponseType::Changed),
            None => Reply::new(ResponseType::Changed),
        };
        if !w.acked {
            // Piggybacked (or the non-confirmable answer): delivered as sent.
            if let Some(d) = &command {
                ctx.metrics.delivered(d.message.payload.len());
                self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
            }
            self.answer(&w.exchange, &reply);
            return;
        }
        let id = self.new_id();
        // One confirmable message of ours at a time (NSTART 1): an empty answer while
        // another is outstanding goes non-confirmable (it carries nothing to lose).
        if command.is_none() && self.down.outstanding.is_some() {
            self.send(reply.non_confirmable(id, &w.exchange.token));
            return;
        }
        // A separate response: confirmable, until the device acknowledges it.
        let bytes = reply.confirmable(id, &w.exchange.token);
        self.start(ctx, id, bytes, command, false);
    }

    /// Send a confirmable message of ours and keep it until it is acknowledged.
    fn start(
        &mut self,
        ctx: &Context,
        id: u16,
        bytes: Vec<u8>,
        delivery: Option<Delivery>,
        notification: bool,
    ) {
        let timeout = initial_timeout(ctx.limits.ack_timeout);
        self.send(bytes.clone());
        self.down.outstanding = Some(Box::new(Outstanding {
            id,
            bytes,
            delivery,
            notification,
            sends: 1,
            timeout,
            due: Instant::now() + timeout,
        }));
    }

    /// The next command the device may receive now, through the downlink gates; when
    /// a gate holds commands back, when to look again.
    fn next_command(&mut self, now: Instant) -> Option<Delivery> {
        // One CoAP message per command (no Block2): one that cannot fit is dropped.
        let unfit = |d: &Delivery| {
            (command_size(d) > MAX_MESSAGE).then(|| {
                format!(
                    "deliver: a command of {} bytes does not fit one CoAP message ({MAX_MESSAGE} bytes); dropped",
                    d.message.payload.len()
                )
            })
        };
        match self.admission.next_command(&self.state.mailbox, now, unfit) {
            NextCommand::Send(d) => {
                self.down.next_pump = None;
                Some(d)
            }
            NextCommand::Empty => {
                self.down.next_pump = None;
                None
            }
            NextCommand::NotBefore(at) => {
                self.down.next_pump = Some(at);
                None
            }
        }
    }

    /// A command as a CoAP answer or notification.
    fn command_reply(&mut self, d: &Delivery, code: ResponseType) -> Reply {
        let m = &d.message;
        let mut reply = Reply::new(code);
        for level in m.topic.levels().skip(3) {
            reply = reply.option(CoapOption::LocationPath, level.as_bytes().to_vec());
        }
        if let Some(props) = &m.properties
            && let Some(topic) = &props.response_topic
        {
            let n = self
                .state
                .responses
                .remember(topic.clone(), props.correlation_data.clone());
            reply = reply.option(CoapOption::LocationQuery, format!("r={n}").into_bytes());
        }
        reply.payload = m.payload.to_vec();
        reply
    }

    /// Send what the device is waiting for: a command to the waiting request, else a
    /// notification to the observer.
    pub(super) fn pump(&mut self, ctx: &Context, now: Instant) {
        if !self.wants_commands() || self.down.next_pump.is_some_and(|at| at > now) {
            return;
        }
        let Some(d) = self.next_command(now) else {
            return;
        };
        if self.down.waiter.is_some() {
            self.answer_waiter(ctx, Some(d));
            return;
        }
        let Some(observer) = self.state.observer.as_mut() else {
            self.state.mailbox.put_back(VecDeque::from([d]), now);
            return;
        };
        let seq = observer.seq;
        observer.seq = observer.seq.wrapping_add(1);
        let token = observer.token.clone();
        let reply = self
            .command_reply(&d, ResponseType::Content)
            .option(CoapOption::Observe, uint(seq & 0xff_ffff));
        let id = self.new_id();
        let bytes = reply.confirmable(id, &token);
        self.start(ctx, id, bytes, Some(d), true);
    }

    /// Retransmissions, the waiting request's deadline, and the gates' waits.
    pub(super) fn timers(&mut self, ctx: &Context, now: Instant) {
        if self.down.waiter.as_ref().is_some_and(|w| w.deadline <= now) {
            self.answer_waiter(ctx, None);
        }
        if self.down.next_pump.is_some_and(|at| at <= now) {
            self.down.next_pump = None;
        }
        let Some(o) = self.down.outstanding.as_mut() else {
            return;
        };
        if o.due > now {
            return;
        }
        if o.sends > MAX_RETRANSMIT {
            Metrics::inc(&ctx.metrics.coap.exchanges_timed_out);
            let o = self.down.outstanding.take();
            self.failed(ctx, o, now);
            return;
        }
        Metrics::inc(&ctx.metrics.coap.retransmissions);
        o.sends += 1;
        o.timeout *= 2;
        o.due = now + o.timeout;
        let bytes = o.bytes.clone();
        self.send(bytes);
    }

    /// The device reset a message: our outstanding one fails (RFC 7641: an observer
    /// that resets a notification is removed).
    pub(super) fn reset_by_peer(&mut self, ctx: &Context, id: u16, now: Instant) {
        if self.down.outstanding.as_ref().is_some_and(|o| o.id == id) {
            let o = self.down.outstanding.take();
            self.failed(ctx, o, now);
        }
    }

    /// A confirmable message of ours was reset or never acknowledged: a notification's
    /// relation is dropped; the command goes back to the mailbox.
    fn failed(&mut self, ctx: &Context, o: Option<Box<Outstanding>>, now: Instant) {
        let Some(o) = o else { return };
        if o.notification && self.state.observer.take().is_some() {
            Metrics::inc(&ctx.metrics.coap.observe_dropped);
        }
        if let Some(d) = o.delivery {
            self.state.mailbox.put_back(VecDeque::from([d]), now);
        }
    }
}
