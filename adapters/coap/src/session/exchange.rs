//! A session's requests: deduplicated, reassembled from Block1 blocks, offered to the
//! core's pipeline, and answered with the CoAP code that says what happened.
//!
//! A confirmable `POST /t/{path}` is a QoS 1 message: its 2.04 goes out only once the
//! forwarder has taken it. A non-confirmable one is QoS 0. Refusals, by stage:
//! authorize 4.03, limits 4.29 with Max-Age (RFC 8516), validation 4.00 (4.13 for
//! size), each with a diagnostic payload naming the rule; a full outbox 5.03. A
//! quarantined device's messages are paced and then taken as if delivered, as for MQTT.

use super::downlink::{self, Downlink};
use super::*;
use crate::message::{self, Block, Incoming, Reliability, Request, Route};
use crate::reply::{Exchange, Reply, uint};
use coap_lite::{CoapOption, RequestType, ResponseType};
use portcullis_core::admission::{Offer, Verdict};
use portcullis_core::behaviour::Observation;
use portcullis_core::content::Carried;
use portcullis_core::forward::{Taken, Uplink};
use portcullis_core::limit::{Rate, TokenBucket};
use portcullis_core::message::{Message, QoS};
use portcullis_core::sessions::{Kicked, SessionStats};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

/// How long an answer is kept for a retransmitted confirmable request
/// (EXCHANGE_LIFETIME, RFC 7252 §4.8.2), and a non-confirmable one's id remembered
/// (NON_LIFETIME).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
const NON_LIFETIME: Duration = Duration::from_secs(145);
/// Confirmable requests waiting for the forwarder at once, at most (NSTART is 1; a
/// device that sends more is told 5.03 for the extra ones).
const MAX_PENDING: usize = 8;
/// Datagrams one session may send, per message its rates allow (requests, ACKs,
/// retransmissions, pings), and at least this many per second (and at once).
const DATAGRAMS_PER_MESSAGE: f64 = 4.0;
const MIN_DATAGRAM_RATE: Rate = Rate {
    per_second: 50.0,
    burst: 100.0,
};

/// How many datagrams a session may send: a multiple of its message rate, with a floor.
fn datagram_rate(admission: &Admission) -> Rate {
    let m = admission.rates().messages;
    Rate {
        per_second: (m.per_second * DATAGRAMS_PER_MESSAGE).max(MIN_DATAGRAM_RATE.per_second),
        burst: (m.burst * DATAGRAMS_PER_MESSAGE).max(MIN_DATAGRAM_RATE.burst),
    }
}
/// A wait of the pipeline this short is waited out rather than answered 4.29: the
/// gateway-wide cap's turn (5 ms), not the device's being over its own rate.
const SHORT_WAIT: Duration = Duration::from_millis(10);

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The DTLS session ended (and why, if the endpoint said).
    Dtls(Option<dtls::Closed>),
    Kicked(KickReason),
    /// Over its rate for too long (`rate_limits` action "disconnect").
    RateTooHigh,
    BrokerGone,
    /// The session's own code failed (a panic, contained).
    Internal(String),
}

impl End {
    pub(crate) fn describe(&self) -> String {
        match self {
            End::Dtls(None) => "DTLS session closed".into(),
            End::Dtls(Some(dtls::Closed::Idle)) => "DTLS session idle".into(),
            End::Dtls(Some(dtls::Closed::PeerClosed)) => "device closed the DTLS session".into(),
            End::Dtls(Some(dtls::Closed::Failed(why))) => format!("DTLS error: {why}"),
            End::Dtls(Some(why)) => format!("DTLS session ended: {why:?}"),
            End::Kicked(reason) => reason.as_str().into(),
            End::RateTooHigh => "message rate too high for too long".into(),
            End::BrokerGone => "broker link closed".into(),
            End::Internal(why) => format!("internal error: {why}"),
        }
    }
}

/// Requests seen lately, by message id, with their answer once there is one.
struct Dedup {
    cap: usize,
    seen: VecDeque<Seen>,
}

struct Seen {
    id: u16,
    at: Instant,
    lifetime: Duration,
    answer: Option<Vec<u8>>,
}

impl Dedup {
    /// A request seen before (its answer, if it has one yet).
    fn get(&mut self, id: u16, now: Instant) -> Option<Option<&[u8]>> {
        self.seen
            .iter()
            .find(|s| s.id == id && now.saturating_duration_since(s.at) < s.lifetime)
            .map(|s| s.answer.as_deref())
    }

    fn begin(&mut self, id: u16, reliability: Reliability, now: Instant) {
        if self.seen.len() >= self.cap {
            self.seen
                .retain(|s| now.saturating_duration_since(s.at) < s.lifetime);
        }
        if self.seen.len() >= self.cap {
            // The oldest non-confirmable one first (forgetting it costs at most a
            // duplicate publish at QoS 0), else the oldest.
            match self.seen.iter().position(|s| s.lifetime == NON_LIFETIME) {
                Some(i) => {
                    self.seen.remove(i);
                }
                None => {
                    self.seen.pop_front();
                }
            }
        }
        let lifetime = match reliability {
            Reliability::Confirmable => EXCHANGE_LIFETIME,
            Reliability::NonConfirmable => NON_LIFETIME,
        };
        self.seen.push_back(Seen {
            id,
            at: now,
            lifetime,
            answer: None,
        });
    }

    fn answered(&mut self, id: u16, bytes: &[u8]) {
        if let Some(s) = self.seen.iter_mut().rev().find(|s| s.id == id) {
            s.answer = Some(bytes.to_vec());
        }
    }
}

/// A block-wise upload in progress (RFC 7959): one per session.
struct Upload {
    started: Instant,
    suffix: String,
    size: usize,
    next: u32,
    body: Vec<u8>,
}

/// A confirmable request whose message is with the forwarder.
struct Pending {
    exchange: Exchange,
    rx: oneshot::Receiver<Taken>,
    /// The Block1 option to echo on the answer (the last block of an upload).
    block: Option<Vec<u8>>,
    /// `?ttd=N`: the answer waits this long for a command.
    ttd: Option<Duration>,
}

/// Resolves with the forwarder's answer for the oldest pending request.
async fn front_taken(pending: &mut VecDeque<Pending>) -> Result<Taken, oneshot::error::RecvError> {
    match pending.front_mut() {
        Some(p) => (&mut p.rx).await,
        None => std::future::pending().await,
    }
}

/// The Block1 option of an answer: the block's number and size, `more` as given.
fn block_option(b: &Block, more: bool) -> Vec<u8> {
    let szx = b.size.trailing_zeros().saturating_sub(4);
    uint((b.num << 4) | (u32::from(more) << 3) | szx)
}

/// The answer to a refused message: the code says which stage, the payload the rule.
pub(crate) fn refusal_reply(refusal: Refusal) -> Reply {
    use portcullis_core::refusal::Stage;
    let why = refusal.to_string();
    match refusal {
        Refusal::Quarantined => Reply::new(ResponseType::Changed),
        Refusal::TooLarge => Reply::refusal(ResponseType::RequestEntityTooLarge, &why),
        r => match r.stage() {
            Stage::Validate | Stage::Decode => Reply::refusal(ResponseType::BadRequest, &why),
            Stage::Limit => Reply::refusal(ResponseType::TooManyRequests, &why).max_age(1),
            _ => Reply::refusal(ResponseType::Forbidden, &why),
        },
    }
}

pub(crate) struct Session {
    link: Link,
    pub(super) admission: Admission,
    uplink: Uplink,
    pub(super) state: CoapState,
    pub(super) stats: Arc<SessionStats>,
    next_id: u16,
    dedup: Dedup,
    /// Boxed: an idle session holds none.
    upload: Option<Box<Upload>>,
    pending: VecDeque<Pending>,
    pub(super) down: Downlink,
    /// Datagrams of any kind the device may send (CoAP has no back-pressure): beyond
    /// it they are dropped unread, so one device cannot flood the audit or the CPU.
    datagrams: TokenBucket,
    /// Malformed datagrams since the last good one (one audit line per run).
    malformed_run: bool,
    /// Requests refused for the rate or for room since the last one taken (one audit
    /// line per run; each is counted).
    limited_run: bool,
    /// This DTLS session's first Observe relation got the retained commands.
    pub(super) retained_sent: bool,
    /// A publish was refused for a full outbox since the last one taken (one audit
    /// line per run of them).
    refused_full: bool,
}

impl Session {
    pub(super) fn new(
        ctx: &Context,
        link: Link,
        admission: Admission,
        uplink: Uplink,
        state: CoapState,
        stats: Arc<SessionStats>,
    ) -> Session {
        // Message ids start somewhere unpredictable (RFC 7252 §4.4).
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let datagrams = TokenBucket::new(datagram_rate(&admission), Instant::now());
        Session {
            link,
            admission,
            uplink,
            state,
            stats,
            next_id: (seed ^ (seed >> 16)) as u16,
            dedup: Dedup {
                cap: ctx.limits.dedup_entries.max(1),
                seen: VecDeque::new(),
            },
            upload: None,
            pending: VecDeque::new(),
            down: Downlink::default(),
            datagrams,
            malformed_run: false,
            limited_run: false,
            retained_sent: false,
            refused_full: false,
        }
    }

    pub(super) fn link(&self) -> &Link {
        &self.link
    }

    pub(super) fn admission(&self) -> &Admission {
        &self.admission
    }

    pub(super) fn new_id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub(super) fn send(&self, bytes: Vec<u8>) {
        self.link.send(bytes);
    }

    /// Answer a request, and keep the answer for its retransmissions.
    pub(super) fn answer(&mut self, exchange: &Exchange, reply: &Reply) {
        let id = self.new_id();
        let bytes = reply.answer(exchange, id);
        self.dedup.answered(exchange.message_id, &bytes);
        self.send(bytes);
    }

    /// Keep `bytes` as the answer to request `id`, for its retransmissions.
    pub(super) fn remember_answer(&mut self, id: u16, bytes: &[u8]) {
        self.dedup.answered(id, bytes);
    }

    /// What the session leaves for the next one: what it was sending goes back to the
    /// mailbox.
    pub(super) fn finish(&mut self) -> CoapState {
        self.down.give_back(&self.state, Instant::now());
        let mailbox = self.state.mailbox.clone();
        std::mem::replace(
            &mut self.state,
            CoapState {
                mailbox,
                observer: None,
                registered: 0,
                buckets: None,
                responses: downlink::Responses::default(),
            },
        )
    }

    /// The session's loop: datagrams, the forwarder's answers, commands, timers,
    /// reloads and kicks.
    pub(super) async fn serve(
        &mut self,
        ctx: &Context,
        mut live: watch::Receiver<Arc<Live>>,
        mut rx: super::inbox::Receiver,
        kicked: Kicked,
    ) -> End {
        let mailbox = self.state.mailbox.clone();
        let mut live_open = true;
        loop {
            // Kicks and reloads ring the session's input; they are looked at on every
            // turn, before anything else.
            if let Some(reason) = kicked.reason() {
                return End::Kicked(reason);
            }
            if live_open {
                match live.has_changed() {
                    Ok(true) => {
                        let next = live.borrow_and_update().clone();
                        if let Err(end) = self.reload(ctx, &next) {
                            return end;
                        }
                    }
                    Ok(false) => {}
                    Err(_) => live_open = false,
                }
            }
            self.pump(ctx, Instant::now());
            let wake = self.next_wake();
            let wants = self.wants_commands();
            let step = tokio::select! {
                biased;
                taken = front_taken(&mut self.pending) => self.taken(ctx, taken),
                // Its own deadlines before more input: a device that sends without
                // pause still gets its retransmissions and its ttd answers.
                _ = sleep_until(wake), if wake.is_some() => {
                    self.timers(ctx, Instant::now());
                    Ok(())
                }
                input = rx.recv() => match input {
                    None => Err(End::Dtls(None)),
                    Some(Input::Bell) => Ok(()),
                    Some(Input::Closed(why)) => Err(End::Dtls(Some(*why))),
                    Some(Input::Datagram(d)) => self.datagram_until_kicked(ctx, &d, &kicked).await,
                },
                _ = command_arrived(&mailbox, wants) => Ok(()),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// A datagram's work, which may wait (for the forwarder, for pacing). A kick ends
    /// the session whatever it waits for: the work gets `KICK_GRACE` to finish, and is
    /// dropped after it (its state lives in the session, which is parked).
    async fn datagram_until_kicked(
        &mut self,
        ctx: &Context,
        datagram: &[u8],
        kicked: &Kicked,
    ) -> Result<(), End> {
        // Kicked since the loop looked (a ban): the datagram is not acted on.
        if let Some(reason) = kicked.reason() {
            return Err(End::Kicked(reason));
        }
        // Boxed: an idle session does not carry a datagram's state.
        let mut work = Box::pin(self.datagram(ctx, datagram));
        let reason = tokio::select! {
            biased;
            done = &mut work => return done,
            reason = kicked.wait() => reason,
        };
        match tokio::time::timeout(KICK_GRACE, &mut work).await {
            Ok(Err(end)) => Err(end),
            _ => Err(End::Kicked(reason)),
        }
    }

    /// A configuration reload: the new rules apply from the next message on; a device
    /// whose group is gone is ended.
    fn reload(&mut self, ctx: &Context, live: &Live) -> Result<(), End> {
        let principal = self.admission.peer().principal.clone();
        let Some(acl) = ctx.auth.current_acl(&principal) else {
            return Err(End::Kicked(KickReason::PolicyChanged));
        };
        let now = Instant::now();
        self.admission
            .reload(live.rules(&principal, acl, &ctx.behaviours), now);
        self.datagrams = TokenBucket::new(datagram_rate(&self.admission), now);
        Ok(())
    }

    async fn datagram(&mut self, ctx: &Context, datagram: &[u8]) -> Result<(), End> {
        let now = Instant::now();
        self.stats.heard(now);
        if self.datagrams.take(1.0, now).is_err() {
            Metrics::inc(&ctx.metrics.coap.dropped_busy);
            return Ok(());
        }
        let parsed = message::parse(datagram);
        if parsed.is_ok() {
            self.malformed_run = false;
        }
        match parsed {
            Ok(Incoming::Ping { message_id }) => self.send(message::reset(message_id)),
            Ok(Incoming::Ack { message_id }) => self.acknowledged(ctx, message_id),
            Ok(Incoming::Reset { message_id }) => self.reset_by_peer(ctx, message_id, now),
            Ok(Incoming::Response) => {}
            Ok(Incoming::Request(request)) => return self.request(ctx, request, now).await,
            Err(malformed) if malformed.bad_option.is_some() => {
                // A request with an option it may not carry: 4.02 (or 5.05 for a
                // proxy request), a client error the device can correct.
                if let Some(bad) = &malformed.bad_option {
                    let id = self.new_id();
                    self.send(bad.response(id));
                }
            }
            Err(malformed) => {
                // A datagram that breaks CoAP is a failed validation, as far as the
                // device's behaviour goes; a confirmable one is rejected (RST). The
                // first of a run is audited, the rest counted.
                if self.malformed_run {
                    ctx.metrics.refused(Refusal::MalformedPacket);
                } else {
                    self.malformed_run = true;
                    self.admission.refused(
                        Refusal::MalformedPacket,
                        "publish",
                        None,
                        Some(malformed.reason),
                        now,
                    );
                }
                self.admission.observe(Observation::Invalid, now);
                if let Some(id) = malformed.reset {
                    self.send(message::reset(id));
                }
            }
        }
        Ok(())
    }

    async fn request(&mut self, ctx: &Context, r: Request, now: Instant) -> Result<(), End> {
        if let Some(seen) = self.dedup.get(r.message_id, now) {
            Metrics::inc(&ctx.metrics.coap.duplicates);
            // A confirmable request is answered again; a non-confirmable one is not
            // processed twice.
            if let (Some(bytes), Reliability::Confirmable) = (seen, r.reliability) {
                let bytes = bytes.to_vec();
                self.send(bytes);
            }
            return Ok(());
        }
        self.dedup.begin(r.message_id, r.reliability, now);
        let exchange = Exchange::of(&r);
        match (&r.route, r.method) {
            (_, RequestType::UnKnown) => self.answer(
                &exchange,
                &Reply::refusal(
                    ResponseType::MethodNotAllowed,
                    "unknown method: POST to /t/{path} and /r/{n}; GET (Observe) on /c",
                ),
            ),
            (Route::Telemetry(_), RequestType::Post | RequestType::Put) => {
                return self.telemetry(ctx, r, now).await;
            }
            (Route::Commands, RequestType::Get) => self.commands(ctx, &r, now),
            (Route::Response(n), RequestType::Post | RequestType::Put) => {
                let n = *n;
                return self.command_result(ctx, r, n, now).await;
            }
            (Route::Telemetry(_) | Route::Commands | Route::Response(_), _) => self.answer(
                &exchange,
                &Reply::refusal(
                    ResponseType::MethodNotAllowed,
                    "POST to /t/{path} and /r/{n}; GET (Observe) on /c",
                ),
            ),
            (Route::Unknown, _) => self.answer(
                &exchange,
                &Reply::refusal(ResponseType::NotFound, "no such resource: /t/{path}, /c"),
            ),
        }
        Ok(())
    }

    /// `POST /t/{path}`: a message to `devices/{id}/{path}`.
    async fn telemetry(&mut self, ctx: &Context, r: Request, now: Instant) -> Result<(), End> {
        let exchange = Exchange::of(&r);
        let Route::Telemetry(suffix) = &r.route else {
            return Ok(());
        };
        let suffix = suffix.clone();
        let max = ctx.limits.max_body_size;
        // Room to wait for the forwarder, before the last block is taken (a 5.03 then
        // keeps the upload for the block sent again).
        if r.reliability == Reliability::Confirmable
            && r.block1.is_none_or(|b| !b.more)
            && !self.room_for_another(&exchange, now)
        {
            return Ok(());
        }
        let (payload, block) = match r.block1 {
            None if r.payload.len() > max => {
                self.too_large(ctx, &exchange, &suffix, now);
                return Ok(());
            }
            None => (r.payload, None),
            Some(b) => match self.block(ctx, &exchange, &suffix, b, r.payload, now) {
                Some(body) => (body, Some(block_option(&b, false))),
                None => return Ok(()),
            },
        };
        let topic = match self
            .admission
            .device_topic(&suffix, &payload, ctx.limits.topic, now)
        {
            Ok(topic) => topic,
            Err((refusal, None)) => {
                self.answer(&exchange, &refusal_reply(refusal));
                return Ok(());
            }
            Err((refusal, Some(words))) => {
                let reply =
                    Reply::refusal(ResponseType::BadRequest, &format!("{refusal}: {words}"));
                self.answer(&exchange, &reply);
                return Ok(());
            }
        };
        let qos = match r.reliability {
            Reliability::Confirmable => QoS::AtLeastOnce,
            Reliability::NonConfirmable => QoS::AtMostOnce,
        };
        let ttd = r
            .ttd
            .map(|s| Duration::from_secs(u64::from(s)).min(ctx.limits.max_ttd))
            .filter(|d| !d.is_zero());
        let message = Message {
            topic,
            payload: payload.into(),
            qos,
            retain: false,
            properties: None,
        };
        self.offer(ctx, Offer::new(message, now), exchange, block, ttd)
            .await
            .map(|_| ())
    }

    /// `POST /r/{n}`: the result of command `n`, published to the Response Topic its
    /// sender gave, with its Correlation Data, through the pipeline like any publish
    /// (the ACL decides whether the device may publish there). Once per command.
    async fn command_result(
        &mut self,
        ctx: &Context,
        r: Request,
        n: u32,
        now: Instant,
    ) -> Result<(), End> {
        let exchange = Exchange::of(&r);
        if r.block1.is_some() {
            let reply = Reply::refusal(
                ResponseType::RequestEntityTooLarge,
                "a command's result goes in one message, not in blocks",
            );
            self.answer(&exchange, &reply);
            return Ok(());
        }
        if r.reliability == Reliability::Confirmable && !self.room_for_another(&exchange, now) {
            return Ok(());
        }
        let Some((topic, correlation)) = self.state.responses.take(n) else {
            let reply = Reply::refusal(
                ResponseType::NotFound,
                "no command awaits this response (answered already, or forgotten)",
            );
            self.answer(&exchange, &reply);
            return Ok(());
        };
        // A refused result may be posted again: the command keeps its number.
        if r.payload.len() > ctx.limits.max_body_size {
            self.too_large(ctx, &exchange, topic.as_str(), now);
            self.state.responses.put_back(n, topic, correlation);
            return Ok(());
        }
        if let Err(refusal) =
            self.admission
                .screen(topic.as_str(), &Carried::payload(&r.payload), now)
        {
            self.answer(&exchange, &refusal_reply(refusal));
            self.state.responses.put_back(n, topic, correlation);
            return Ok(());
        }
        let kept = (topic.clone(), correlation.clone());
        let properties = correlation.map(|c| {
            Arc::new(portcullis_core::message::Properties {
                correlation_data: Some(c),
                ..Default::default()
            })
        });
        let qos = match r.reliability {
            Reliability::Confirmable => QoS::AtLeastOnce,
            Reliability::NonConfirmable => QoS::AtMostOnce,
        };
        let message = Message {
            topic,
            payload: r.payload.into(),
            qos,
            retain: false,
            properties,
        };
        if !self
            .offer(ctx, Offer::new(message, now), exchange, None, None)
            .await?
        {
            self.state.responses.put_back(n, kept.0, kept.1);
        }
        Ok(())
    }

    /// A body over `coap.max_body_size`: 4.13 with Size1 saying how much is taken.
    fn too_large(&mut self, ctx: &Context, exchange: &Exchange, suffix: &str, now: Instant) {
        let max = ctx.limits.max_body_size;
        self.admission.refused(
            Refusal::TooLarge,
            "publish",
            Some(suffix),
            Some(&format!(
                "request body over coap.max_body_size ({max} bytes)"
            )),
            now,
        );
        let reply = refusal_reply(Refusal::TooLarge).option(CoapOption::Size1, uint(max as u32));
        self.answer(exchange, &reply);
    }

    /// One Block1 block: the whole body once the last block is in (`None` while the
    /// upload goes on or after it was refused; the block was answered).
    fn block(
        &mut self,
        ctx: &Context,
        exchange: &Exchange,
        suffix: &str,
        b: Block,
        payload: Vec<u8>,
        now: Instant,
    ) -> Option<Vec<u8>> {
        if b.num == 0 {
            self.upload = Some(Box::new(Upload {
                started: now,
                suffix: suffix.to_string(),
                size: b.size,
                next: 0,
                body: Vec::new(),
            }));
        }
        // An upload with no block for EXCHANGE_LIFETIME is forgotten.
        if self
            .upload
            .as_ref()
            .is_some_and(|u| now.saturating_duration_since(u.started) >= EXCHANGE_LIFETIME)
        {
            self.upload = None;
        }
        let in_order = self.upload.as_ref().is_some_and(|u| {
            u.suffix == suffix
                && u.next == b.num
                && u.size == b.size
                && u.body.len() == b.num as usize * b.size
        });
        if !in_order || (b.more && payload.len() != b.size) || payload.len() > b.size {
            self.upload = None;
            let reply = Reply::refusal(
                ResponseType::RequestEntityIncomplete,
                "Block1: blocks out of order, or a block of the wrong size",
            );
            self.answer(exchange, &reply);
            return None;
        }
        let upload = self.upload.as_mut()?;
        if upload.body.len() + payload.len() > ctx.limits.max_body_size {
            self.upload = None;
            self.too_large(ctx, exchange, suffix, now);
            return None;
        }
        upload.body.extend_from_slice(&payload);
        upload.next += 1;
        upload.started = now;
        if b.more {
            let reply = Reply::new(ResponseType::Continue)
                .option(CoapOption::Block1, block_option(&b, true));
            self.answer(exchange, &reply);
            return None;
        }
        self.upload.take().map(|u| u.body)
    }

    /// Offer a message to the core and answer its verdict: whether it was taken
    /// (forwarded, or dropped as if it were), not refused.
    async fn offer(
        &mut self,
        ctx: &Context,
        offer: Offer,
        exchange: Exchange,
        block: Option<Vec<u8>>,
        ttd: Option<Duration>,
    ) -> Result<bool, End> {
        let len = offer.message().payload.len();
        let with_block = |reply: Reply| match &block {
            Some(b) => reply.option(CoapOption::Block1, b.clone()),
            None => reply,
        };
        let (verdict, arrived) = self.admission.uplink_paced(offer, SHORT_WAIT).await;
        let now = Instant::now();
        match verdict {
            Verdict::Forward(message) => {
                self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                self.limited_run = false;
                self.forward(ctx, message, exchange, block, ttd, arrived)
                    .await?;
                Ok(true)
            }
            Verdict::Divert(forensic) => {
                self.uplink
                    .send(forensic)
                    .await
                    .map_err(|_| End::BrokerGone)?;
                self.answer(&exchange, &with_block(Reply::new(ResponseType::Changed)));
                Ok(true)
            }
            // Over its rate, whatever the action (drop, quota exceeded): CoAP can say
            // when to try again (RFC 8516), so it does.
            Verdict::Discard(Refusal::RateLimited) | Verdict::Refuse(Refusal::RateLimited) => {
                self.too_many(&exchange, len, now);
                Ok(false)
            }
            // Dropped by quarantine: answered as if delivered, so the device does not
            // retry.
            Verdict::Discard(_) => {
                self.answer(&exchange, &with_block(Reply::new(ResponseType::Changed)));
                Ok(true)
            }
            Verdict::Refuse(refusal) => {
                self.answer(&exchange, &refusal_reply(refusal));
                Ok(false)
            }
            Verdict::Disconnect(refusal) => {
                self.answer(&exchange, &refusal_reply(refusal));
                Err(End::RateTooHigh)
            }
            // Over its rate: CoAP has no back-pressure, so the device is told when to
            // try again (RFC 8516).
            Verdict::Wait(held, _) => {
                let topic = held.message().topic.clone();
                self.limited(
                    Refusal::RateLimited,
                    Some(topic.as_str()),
                    "over the rate: 4.29 Too Many Requests",
                    now,
                );
                self.too_many(&exchange, len, now);
                Ok(false)
            }
        }
    }

    /// A request refused for the rate or for room: counted each time, audited (and
    /// told to the model) once per run of them, so one device cannot flood the audit.
    fn limited(&mut self, refusal: Refusal, topic: Option<&str>, words: &str, now: Instant) {
        if self.limited_run {
            self.admission.count(refusal);
        } else {
            self.limited_run = true;
            self.admission
                .refused(refusal, "publish", topic, Some(words), now);
        }
    }

    /// Whether another confirmable request may wait for the forwarder; if not, it is
    /// refused (counted and audited) with 5.03 before the pipeline sees it.
    fn room_for_another(&mut self, exchange: &Exchange, now: Instant) -> bool {
        if self.pending.len() < MAX_PENDING {
            return true;
        }
        self.limited(
            Refusal::ReceiveMaximumExceeded,
            None,
            "more than 8 confirmable requests in flight (NSTART is 1)",
            now,
        );
        let reply = Reply::refusal(
            ResponseType::ServiceUnavailable,
            "too many requests in flight (NSTART is 1)",
        )
        .max_age(1);
        self.answer(exchange, &reply);
        false
    }

    /// 4.29 Too Many Requests, with Max-Age saying in how many seconds the device's
    /// rate lets it send again.
    fn too_many(&mut self, exchange: &Exchange, len: usize, now: Instant) {
        let wait = self.admission.retry_after(len, now);
        let secs = wait.as_secs_f64().ceil().clamp(1.0, 86_400.0) as u32;
        let reply = Reply::refusal(
            ResponseType::TooManyRequests,
            &Refusal::RateLimited.to_string(),
        )
        .max_age(secs);
        self.answer(exchange, &reply);
    }

    /// A message the pipeline let through, to the forwarder: a confirmable request is
    /// answered once the forwarder has it, a non-confirmable one at once.
    async fn forward(
        &mut self,
        ctx: &Context,
        message: Message,
        exchange: Exchange,
        block: Option<Vec<u8>>,
        ttd: Option<Duration>,
        arrived: Instant,
    ) -> Result<(), End> {
        if message.qos == QoS::AtMostOnce {
            self.uplink
                .send(message)
                .await
                .map_err(|_| End::BrokerGone)?;
            ctx.metrics.forward_latency.record(arrived.elapsed());
            self.after_taken(ctx, exchange, block, ttd);
            return Ok(());
        }
        let rx = self
            .uplink
            .send_acked(message)
            .await
            .map_err(|_| End::BrokerGone)?;
        ctx.metrics.forward_latency.record(arrived.elapsed());
        self.pending.push_back(Pending {
            exchange,
            rx,
            block,
            ttd,
        });
        Ok(())
    }

    /// The forwarder answered for the oldest pending request.
    fn taken(
        &mut self,
        ctx: &Context,
        taken: Result<Taken, oneshot::error::RecvError>,
    ) -> Result<(), End> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        match taken {
            Ok(Taken::Yes) => {
                self.refused_full = false;
                self.after_taken(ctx, p.exchange, p.block, p.ttd);
                Ok(())
            }
            Ok(Taken::Full) => {
                Metrics::inc(&ctx.metrics.outbox.refused_full);
                if !self.refused_full {
                    self.refused_full = true;
                    self.admission.audit(
                        "outbox",
                        None,
                        "the outbox is full: a confirmable request was answered 5.03".into(),
                    );
                }
                let reply = Reply::refusal(ResponseType::ServiceUnavailable, "the outbox is full")
                    .max_age(1);
                self.answer(&p.exchange, &reply);
                Ok(())
            }
            Err(_) => Err(End::BrokerGone),
        }
    }

    /// The forwarder has the message: 2.04, or with `?ttd=N` a wait for a command.
    fn after_taken(
        &mut self,
        ctx: &Context,
        exchange: Exchange,
        block: Option<Vec<u8>>,
        ttd: Option<Duration>,
    ) {
        match ttd {
            Some(wait) => self.wait_for_command(ctx, exchange, wait),
            None => {
                let mut reply = Reply::new(ResponseType::Changed);
                if let Some(b) = block {
                    reply = reply.option(CoapOption::Block1, b);
                }
                self.answer(&exchange, &reply);
            }
        }
    }

    /// The device acknowledged a confirmable message of ours.
    fn acknowledged(&mut self, ctx: &Context, id: u16) {
        if let Some(size) = self.down.acknowledged(id) {
            ctx.metrics.delivered(size);
            self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A command arrived, if the session wants to hear of it (boxed, as the timer).
async fn command_arrived(mailbox: &Mailbox, wants: bool) {
    if wants {
        Box::pin(mailbox.notify.notified()).await
    } else {
        std::future::pending().await
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        // Boxed: the loop of an idle session, which has no deadline, holds no timer.
        Some(at) => Box::pin(tokio::time::sleep_until(at.into())).await,
        None => std::future::pending().await,
    }
}
