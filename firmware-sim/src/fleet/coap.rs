//! CoAP members: devices over DTLS 1.2 with a pre-shared key (the CoAP crate's own
//! client), well-behaved or hostile, counted in the same report as MQTT members. A
//! session is a completed DTLS handshake; an acknowledgement, a success code (2.04);
//! a refusal, the response code's name (`too_many_requests` for 4.29, …).

use super::{ANSWER_TIMEOUT, Member, Plan, Shared, futures_join, interval, telemetry};
use crate::provision::{Secret, random_secret};
use crate::report::GroupStats;
use crate::scenario::{Behaviour, COAP_FLOOD_INFLIGHT};
use coap_lite::{MessageType, RequestType, ResponseType};
use portcullis_coap::client::{Client, ClientError, Credentials, Request, Response};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::{Instant, sleep, sleep_until};

/// How long a wrong-key attempt waits for a session: the gateway says nothing to a
/// failed handshake, so no answer by then is the refusal.
const WRONG_KEY_WAIT: Duration = Duration::from_secs(3);
/// A flooder's request unanswered this long counts as `no_answer` (it never
/// retransmits), and this many in a row mean the session is gone.
const FLOOD_EXPIRY: Duration = Duration::from_secs(2);
const FLOOD_MISSES: u32 = 5;
/// How long a replayed record is given to be answered.
const REPLAY_WAIT: Duration = Duration::from_millis(300);
/// How long a stalled handshake, resumed at the end of the run, has to complete.
const RESUME_WAIT: Duration = Duration::from_secs(3);

/// The name a response code is counted under in the report.
pub fn code_name(code: ResponseType) -> &'static str {
    use ResponseType::*;
    match code {
        Created => "created",
        Deleted => "deleted",
        Valid => "valid",
        Changed => "changed",
        Content => "content",
        Continue => "continue",
        BadRequest => "bad_request",
        Unauthorized => "unauthorized",
        BadOption => "bad_option",
        Forbidden => "forbidden",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
        NotAcceptable => "not_acceptable",
        Conflict => "conflict",
        PreconditionFailed => "precondition_failed",
        RequestEntityTooLarge => "request_entity_too_large",
        UnsupportedContentFormat => "unsupported_content_format",
        RequestEntityIncomplete => "request_entity_incomplete",
        UnprocessableEntity => "unprocessable_entity",
        TooManyRequests => "too_many_requests",
        InternalServerError => "internal_server_error",
        NotImplemented => "not_implemented",
        BadGateway => "bad_gateway",
        ServiceUnavailable => "service_unavailable",
        GatewayTimeout => "gateway_timeout",
        ProxyingNotSupported => "proxying_not_supported",
        HopLimitReached => "hop_limit_reached",
        UnKnown => "unknown_code",
    }
}

/// 2.xx.
pub fn success(code: ResponseType) -> bool {
    !code.is_error()
}

/// Count an answer: a success as acknowledged, anything else as refused by its name.
fn record(stats: &GroupStats, code: ResponseType) -> bool {
    if success(code) {
        stats.add(&stats.acknowledged, 1);
        true
    } else {
        stats.refused(code_name(code));
        false
    }
}

/// Why a request or session ended without an answer.
fn lost(e: &ClientError) -> &'static str {
    match e {
        ClientError::NoAnswer(_) => "no_answer",
        ClientError::Io(_) => "io_error",
        _ => "closed",
    }
}

impl Member {
    /// The member's key: its own, or (an unknown identity) one made up now.
    fn key(&self) -> Vec<u8> {
        match &self.secret {
            Secret::Psk(k) => k.as_bytes().to_vec(),
            _ => random_secret().into_bytes(),
        }
    }

    /// A UDP socket from the member's source address (or the system's choice).
    async fn udp(&self) -> std::io::Result<UdpSocket> {
        let server = self.endpoint.addr;
        let ip = self.source.unwrap_or(if server.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        });
        UdpSocket::bind(SocketAddr::new(ip, 0)).await
    }

    /// The member's identity with `key`, made once per key (it takes milliseconds).
    fn credentials(&self, key: &[u8]) -> Result<Credentials, &'static str> {
        Credentials::new(&self.id, key).map_err(|_| "dtls_error")
    }

    /// A client whose handshake is ready to run, on a socket of its own.
    async fn client(&self, credentials: &Credentials) -> Result<Client, &'static str> {
        let socket = self.udp().await.map_err(|_| "io_error")?;
        Client::start_with(socket, self.endpoint.addr, credentials).map_err(|_| "io_error")
    }

    /// A DTLS session, or why there is none: the gateway answers a failed handshake
    /// (wrong key, unknown identity, backed off, capped) with silence.
    async fn dtls(
        &self,
        credentials: &Credentials,
        within: Duration,
    ) -> Result<Client, &'static str> {
        let mut c = self.client(credentials).await?;
        match c.handshake(within).await {
            Ok(()) => Ok(c),
            Err(ClientError::Io(_)) => Err("io_error"),
            Err(_) => Err("handshake_failed"),
        }
    }
}

/// A session, retrying with back-off while the run lasts.
async fn connect_retrying(m: &Member, shared: &Shared) -> Option<Client> {
    let stats = &shared.stats[m.group];
    let credentials = match m.credentials(&m.key()) {
        Ok(c) => c,
        Err(reason) => {
            stats.connect_refused(reason);
            return None;
        }
    };
    let mut backoff = Duration::from_millis(100);
    while shared.running() {
        match m.dtls(&credentials, ANSWER_TIMEOUT).await {
            Ok(c) => {
                stats.add(&stats.connected, 1);
                return Some(c);
            }
            Err(reason) => {
                stats.connect_refused(reason);
                sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    None
}

/// A hostile CoAP member's run (`well_behaved` is the other kind).
pub(super) async fn device(m: &Member, shared: &Shared, stats: &GroupStats) {
    match m.behaviour.clone() {
        Behaviour::Flood {
            inflight,
            payload_bytes,
        } => {
            flood(
                m,
                shared,
                stats,
                inflight.unwrap_or(COAP_FLOOD_INFLIGHT),
                payload_bytes,
            )
            .await
        }
        Behaviour::CredentialStuffing { rate } => wrong_key(m, shared, stats, rate).await,
        Behaviour::Slowloris { connections } => stall(m, shared, stats, connections).await,
        Behaviour::Replay { rate } => replay(m, shared, stats, rate).await,
        // Refused at load for CoAP groups.
        _ => {}
    }
}

fn post<'a>(path: &'a str, payload: &'a [u8], confirmable: bool) -> Request<'a> {
    Request {
        confirmable,
        ..Request::post(path, payload)
    }
}

/// Confirmable (QoS 1) or non-confirmable (QoS 0) telemetry at the plan's rate,
/// one request at a time (NSTART 1); `/c` observed for commands, each acknowledged
/// by a POST to the acknowledgement topic. A 4.29 is honoured: nothing more is sent
/// before its Max-Age is over.
pub(super) async fn well_behaved(m: &Member, shared: &Shared, stats: &GroupStats, plan: Plan) {
    let path = format!("t/{}", plan.topic);
    let ack_path = plan.ack_topic.as_ref().map(|t| format!("t/{t}"));
    let mut payload = Vec::with_capacity(128);
    let mut seq = 0u64;
    let mut booted = false;
    let listening = shared.devices.get(&m.id).map(|d| &d.listening);
    let listen = |on: bool| {
        if let Some(l) = listening {
            l.store(on, Relaxed);
        }
    };
    // Notifications already counted (a retransmission whose ACK was lost).
    let mut seen: VecDeque<u16> = VecDeque::new();
    'session: while shared.running() {
        listen(false);
        let Some(mut c) = connect_retrying(m, shared).await else {
            break;
        };
        let mut token = None;
        if ack_path.is_some() {
            let observe = Request {
                method: RequestType::Get,
                path: "c",
                payload: &[],
                confirmable: true,
                observe: Some(0),
            };
            match c.request(&observe, ANSWER_TIMEOUT).await {
                Ok(r) if success(r.code) && r.observe.is_some() => {
                    token = Some(r.token);
                    listen(true);
                }
                Ok(r) => stats.refused(code_name(r.code)),
                Err(e) => {
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
        }
        let mut next = Instant::now();
        if !booted {
            booted = true;
            for _ in 0..plan.boot_burst {
                if let Err(e) =
                    telemetry_post(&mut c, shared, stats, &path, &mut payload, &mut seq, &plan)
                        .await
                {
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
        }
        next += interval(&plan, shared);
        let stop = shared.end + shared.grace;
        loop {
            // Commands that came during an exchange, then the clock.
            while let Some(n) = c.notifications.pop_front() {
                if let Err(e) =
                    command(&mut c, stats, &n, token.as_deref(), &ack_path, &mut seen).await
                {
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
            let now = Instant::now();
            if now >= stop {
                c.close().await;
                break 'session;
            }
            if shared.running() && now >= next {
                match telemetry_post(&mut c, shared, stats, &path, &mut payload, &mut seq, &plan)
                    .await
                {
                    Ok(wait) => next = (next + interval(&plan, shared)).max(Instant::now() + wait),
                    Err(e) => {
                        stats.disconnected(lost(&e));
                        continue 'session;
                    }
                }
                continue;
            }
            let until = if shared.running() {
                next.min(stop)
            } else {
                stop
            };
            match c.next_message(until - now, true).await {
                Ok(Some(n)) => {
                    if let Err(e) =
                        command(&mut c, stats, &n, token.as_deref(), &ack_path, &mut seen).await
                    {
                        stats.disconnected(lost(&e));
                        continue 'session;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
        }
    }
    listen(false);
}

/// One telemetry POST, answered; how long to wait before the next (a 4.29's Max-Age).
async fn telemetry_post(
    c: &mut Client,
    shared: &Shared,
    stats: &GroupStats,
    path: &str,
    payload: &mut Vec<u8>,
    seq: &mut u64,
    plan: &Plan,
) -> Result<Duration, ClientError> {
    *seq += 1;
    let sent = shared.now_us();
    telemetry(payload, *seq, sent, 0);
    stats.add(&stats.sent, 1);
    match c
        .request(&post(path, payload, plan.qos > 0), ANSWER_TIMEOUT)
        .await
    {
        Ok(r) => {
            if record(stats, r.code) && !shared.service_listens {
                stats.latency_us(shared.now_us().saturating_sub(sent));
            }
            let wait = match r.code {
                ResponseType::TooManyRequests => r.max_age.unwrap_or(60),
                _ => 0,
            };
            Ok(Duration::from_secs(wait.into()))
        }
        Err(e) => {
            stats.refused(lost(&e));
            Err(e)
        }
    }
}

/// A notification on the commands relation: counted once, and acknowledged by a
/// POST of `{"ack":<command>}`.
async fn command(
    c: &mut Client,
    stats: &GroupStats,
    n: &Response,
    token: Option<&[u8]>,
    ack_path: &Option<String>,
    seen: &mut VecDeque<u16>,
) -> Result<(), ClientError> {
    if token != Some(n.token.as_slice()) || !success(n.code) {
        return Ok(());
    }
    if n.kind == MessageType::Confirmable {
        if seen.contains(&n.message_id) {
            return Ok(());
        }
        if seen.len() == 32 {
            seen.pop_front();
        }
        seen.push_back(n.message_id);
    }
    stats.add(&stats.commands_received, 1);
    if let Some(path) = ack_path {
        let mut body = b"{\"ack\":".to_vec();
        body.extend_from_slice(&n.payload);
        body.push(b'}');
        c.request(&Request::post(path, &body), ANSWER_TIMEOUT)
            .await?;
    }
    Ok(())
}

/// Confirmable POSTs as fast as they are answered, `inflight` unanswered at a time,
/// whatever the answer says (Max-Age ignored), never retransmitted.
async fn flood(m: &Member, shared: &Shared, stats: &GroupStats, inflight: u16, bytes: usize) {
    let mut payload = Vec::new();
    let mut seq = 0;
    'session: while shared.running() {
        let Some(mut c) = connect_retrying(m, shared).await else {
            break;
        };
        // Token → when it was sent.
        let mut outstanding: HashMap<Vec<u8>, Instant> = HashMap::new();
        let mut misses = 0;
        loop {
            while outstanding.len() < inflight as usize && shared.running() {
                seq += 1;
                telemetry(&mut payload, seq, shared.now_us(), bytes);
                let (_, token, wire) = c.encode(&Request::post("t/telemetry", &payload));
                if let Err(e) = c.send_raw(&wire).await {
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
                stats.add(&stats.sent, 1);
                outstanding.insert(token, Instant::now());
            }
            let now = Instant::now();
            if outstanding.is_empty() || now >= shared.end + shared.grace {
                c.close().await;
                break 'session;
            }
            let oldest = outstanding.values().min().copied().unwrap_or(now);
            match c
                .recv((oldest + FLOOD_EXPIRY).saturating_duration_since(now))
                .await
            {
                Ok(Some(d)) => {
                    let Some(r) = Response::read(&d) else {
                        continue;
                    };
                    if r.kind == MessageType::Confirmable && c.ack(r.message_id).await.is_err() {
                        continue 'session;
                    }
                    if outstanding.remove(&r.token).is_some() {
                        misses = 0;
                        record(stats, r.code);
                    }
                }
                Ok(None) => {
                    let now = Instant::now();
                    outstanding.retain(|_, at| {
                        let keep = now.duration_since(*at) < FLOOD_EXPIRY;
                        if !keep {
                            stats.refused("no_answer");
                            misses += 1;
                        }
                        keep
                    });
                    if misses >= FLOOD_MISSES {
                        stats.disconnected("no_answer");
                        continue 'session;
                    }
                }
                Err(e) => {
                    for _ in outstanding.drain() {
                        stats.refused("no_answer");
                    }
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
        }
    }
}

/// Handshakes with a made-up key for the member's identity, `rate` a second, each
/// from a new port of the member's address.
async fn wrong_key(m: &Member, shared: &Shared, stats: &GroupStats, rate: f64) {
    let period = Duration::from_secs_f64(1.0 / rate);
    while shared.running() {
        let at = Instant::now();
        stats.add(&stats.sent, 1);
        let session = match m.credentials(random_secret().as_bytes()) {
            Ok(wrong) => m.dtls(&wrong, WRONG_KEY_WAIT).await,
            Err(reason) => Err(reason),
        };
        match session {
            Ok(c) => {
                stats.add(&stats.accepted, 1);
                stats.add(&stats.connected, 1);
                c.close().await;
            }
            Err(reason) => stats.connect_refused(reason),
        }
        sleep_until(at + period).await;
    }
}

/// Handshakes begun and left: each ClientHello, the cookie exchange, the gateway's
/// flight received and not answered. At the end of the run each is resumed: one
/// that completes was still held by the gateway (accepted, as a slowloris connection
/// still open); one that does not had been dropped at the gateway's deadline.
async fn stall(m: &Member, shared: &Shared, stats: &GroupStats, connections: u32) {
    let credentials = match m.credentials(&m.key()) {
        Ok(c) => c,
        Err(reason) => return stats.connect_refused(reason),
    };
    let mut begun = Vec::new();
    for _ in 0..connections {
        stats.add(&stats.sent, 1);
        let mut c = match m.client(&credentials).await {
            Ok(c) => c,
            Err(reason) => {
                stats.connect_refused(reason);
                continue;
            }
        };
        begun.push(async move {
            match c.stall(ANSWER_TIMEOUT).await {
                Ok(true) => Ok(c),
                Ok(false) => Err("no_answer"),
                Err(_) => Err("io_error"),
            }
        });
    }
    let mut stalled = Vec::new();
    for r in futures_join(begun).await {
        match r {
            Ok(c) => stalled.push(c),
            Err(reason) => stats.connect_refused(reason),
        }
    }
    sleep_until(shared.end).await;
    let resumed = stalled.into_iter().map(|mut c| async move {
        let done = c.resume(RESUME_WAIT).await.is_ok();
        if done {
            c.close().await;
        }
        done
    });
    for done in futures_join(resumed.collect()).await {
        if done {
            stats.add(&stats.accepted, 1);
        } else {
            stats.connect_refused("handshake_expired");
        }
    }
}

/// A genuine session, captured from its first flight: each cycle, a telemetry POST
/// (answered as any), then the records that carried it sent again as they were, into
/// the live session and, with the session's handshake before them, from another
/// port. The gateway's DTLS replay window and its per-address sessions should drop
/// every one: `replay_dropped`; one answered is accepted.
async fn replay(m: &Member, shared: &Shared, stats: &GroupStats, rate: f64) {
    let period = Duration::from_secs_f64(1.0 / rate);
    let credentials = match m.credentials(&m.key()) {
        Ok(c) => c,
        Err(reason) => return stats.connect_refused(reason),
    };
    let mut payload = Vec::new();
    let mut seq = 0;
    let mut backoff = Duration::from_millis(100);
    'session: while shared.running() {
        let mut c = match m.client(&credentials).await {
            Ok(c) => c,
            Err(reason) => {
                stats.connect_refused(reason);
                sleep(backoff).await;
                continue;
            }
        };
        c.captured = Some(Vec::new());
        if c.handshake(ANSWER_TIMEOUT).await.is_err() {
            stats.connect_refused("handshake_failed");
            sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        }
        stats.add(&stats.connected, 1);
        let handshake = c.captured.take().unwrap_or_default();
        while shared.running() {
            let at = Instant::now();
            c.captured = Some(Vec::new());
            seq += 1;
            let sent = shared.now_us();
            telemetry(&mut payload, seq, sent, 0);
            stats.add(&stats.sent, 1);
            match c
                .request(&Request::post("t/telemetry", &payload), ANSWER_TIMEOUT)
                .await
            {
                Ok(r) => {
                    if record(stats, r.code) && !shared.service_listens {
                        stats.latency_us(shared.now_us().saturating_sub(sent));
                    }
                }
                Err(e) => {
                    stats.refused(lost(&e));
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
            let records = c.captured.take().unwrap_or_default();
            // Into the live session, from the same address.
            stats.add(&stats.sent, 1);
            for r in &records {
                if c.send_wire(r).await.is_err() {
                    continue 'session;
                }
            }
            match c.recv(REPLAY_WAIT).await {
                Ok(Some(_)) => stats.add(&stats.accepted, 1),
                Ok(None) => stats.refused("replay_dropped"),
                Err(e) => {
                    stats.refused("replay_dropped");
                    stats.disconnected(lost(&e));
                    continue 'session;
                }
            }
            // The whole capture, handshake first, from another port.
            stats.add(&stats.sent, 1);
            let answered = match m.udp().await {
                Ok(other) => from_elsewhere(&other, m.endpoint.addr, &handshake, &records).await,
                Err(_) => false,
            };
            if answered {
                stats.add(&stats.accepted, 1);
            } else {
                stats.refused("replay_dropped");
            }
            // A replay answered late shows up during the next exchange.
            while c.notifications.pop_front().is_some() {
                stats.add(&stats.accepted, 1);
            }
            sleep_until(at + period).await;
        }
        c.close().await;
    }
}

/// Send captured records from `socket`; whether application data (record type 23)
/// came back within `REPLAY_WAIT` (a HelloVerifyRequest is no answer).
async fn from_elsewhere(
    socket: &UdpSocket,
    server: SocketAddr,
    handshake: &[Vec<u8>],
    records: &[Vec<u8>],
) -> bool {
    for r in handshake.iter().chain(records) {
        if socket.send_to(r, server).await.is_err() {
            return false;
        }
    }
    let deadline = Instant::now() + REPLAY_WAIT;
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
        if n > 0 && buf[0] == 23 {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_named_as_the_report_counts_them() {
        assert_eq!(
            code_name(ResponseType::TooManyRequests),
            "too_many_requests"
        );
        assert_eq!(code_name(ResponseType::Forbidden), "forbidden");
        assert_eq!(
            code_name(ResponseType::RequestEntityTooLarge),
            "request_entity_too_large"
        );
        assert!(success(ResponseType::Changed) && success(ResponseType::Content));
        assert!(!success(ResponseType::TooManyRequests));
        assert!(!success(ResponseType::ServiceUnavailable));
    }
}
