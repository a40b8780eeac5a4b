//! A peer's life, whatever protocol it speaks: registered once authenticated (taking
//! over an earlier session of its identity), announced (behaviour model, clone check,
//! gauges, audit), watched for kicks while it runs, and closed (audit, gauges, the
//! model told). Adapters call these at the same points of their own session; the
//! Will decision is `admission::WillGate`, parking a persistent session is `parking`.

use crate::admission::Admission;
use crate::audit::Audit;
use crate::auth::Authenticator;
use crate::behaviour::{Observation, State as Behaviour};
use crate::metrics::Metrics;
use crate::quarantine::Behaviours;
use crate::refusal::Refusal;
use crate::sessions::{KickReason, Kicked, SessionGuard, Sessions, is_clone};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The protocols peers speak, as metrics and audit lines name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Mqtt311,
    Mqtt5,
    Coap,
    Serial,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [
        Protocol::Mqtt311,
        Protocol::Mqtt5,
        Protocol::Coap,
        Protocol::Serial,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt311 => "mqtt3.1.1",
            Protocol::Mqtt5 => "mqtt5",
            Protocol::Coap => "coap",
            Protocol::Serial => "serial",
        }
    }
}

/// What every peer's life touches.
#[derive(Clone)]
pub struct Lifecycle {
    pub sessions: Arc<Sessions>,
    pub auth: Arc<Authenticator>,
    pub behaviours: Arc<Behaviours>,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
}

/// How a session ended, as far as the core is concerned.
#[derive(Debug)]
pub struct Closed {
    /// In words, for the audit line: `client disconnected`, `keep-alive expired`, ...
    pub why: String,
    /// A newer connection of the same identity took it over.
    pub taken_over: bool,
    /// The peer broke its protocol (a malformed or oversized packet): a failed
    /// validation, as far as the device's behaviour goes.
    pub broke_protocol: bool,
}

impl Lifecycle {
    /// Register an authenticated peer: an earlier session of the same identity is
    /// taken over. A disable, removal or rotation that landed after authentication
    /// but before the session could be kicked refuses it now.
    pub fn register(
        &self,
        admission: &Admission,
        generation: u64,
        method: &'static str,
    ) -> Result<SessionGuard, Refusal> {
        let p = admission.peer();
        let guard = self.sessions.register(
            p.principal.clone(),
            generation,
            p.source,
            p.protocol.as_str(),
            method,
        );
        if !self.auth.still_current(&p.principal, generation) {
            return Err(Refusal::RegistryChanged);
        }
        Ok(guard)
    }

    /// The peer's session is open: the model hears of the connection (and of a clone:
    /// two connections taking turns with one identity), the gauges count it, and the
    /// audit says how it authenticated (`detail`: e.g. ", session resumed").
    pub fn opened(&self, admission: &Admission, guard: &SessionGuard, method: &str, detail: &str) {
        let now = Instant::now();
        if admission.tracked().is_some() {
            let source = self.behaviours.hash(admission.peer().source.ip());
            admission.observe(Observation::Connect { source }, now);
            // The session just taken over had itself taken over another a moment ago.
            let window = admission.behaviour_policy().settings.rule_window;
            if is_clone(guard.displaced, guard.registered_at, window) {
                admission.observe(Observation::Clone, now);
                self.audit.record(
                    admission
                        .peer()
                        .entry("clone", "refuse")
                        .reason("two connections taking turns with one identity (cloned identity)"),
                );
            }
        }
        let p = admission.peer();
        Metrics::inc(&self.metrics.connections_accepted);
        self.metrics
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .session_gauge(p.protocol, p.principal.kind)
            .fetch_add(1, Ordering::Relaxed);
        let state = match admission.behaviour() {
            Behaviour::Quarantined => ", device quarantined",
            Behaviour::Probation => ", device on probation",
            _ => "",
        };
        self.audit.record(
            admission
                .peer()
                .entry("connect", "allow")
                .reason(format!("{method}{detail}{state}")),
        );
    }

    /// The peer's session is over (it was `opened`).
    pub fn closed(&self, admission: &Admission, closed: &Closed) {
        let p = admission.peer();
        self.metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .session_gauge(p.protocol, p.principal.kind)
            .fetch_sub(1, Ordering::Relaxed);
        if closed.taken_over {
            Metrics::inc(&self.metrics.takeovers);
            self.audit.record(
                admission
                    .peer()
                    .entry("takeover", "allow")
                    .reason("session taken over by a new connection with the same identity"),
            );
        }
        self.audit.record(
            admission
                .peer()
                .entry("disconnect", "allow")
                .reason(closed.why.clone()),
        );
        let now = Instant::now();
        if closed.broke_protocol {
            admission.observe(Observation::Invalid, now);
        }
        admission.observe(Observation::Disconnect, now);
    }
}

/// How work run under `until_kicked` ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// On its own (perhaps after seeing the kick itself, within the grace).
    Finished(T),
    /// Kicked, and cut off after the grace.
    CutOff(KickReason),
    /// It panicked (contained): the message.
    Panicked(String),
}

/// Run a session's work until it ends or the gateway ends it. A kick (operator, ban,
/// disable, take-over, shutdown) ends the session whatever the work is blocked on: a
/// write to a peer that never reads, a read, a lock. The work sees the kick itself
/// between steps and gets `grace` to finish; past that it is dropped (its state lives
/// in the session, so the cleanup that follows parks it). A panic in the work ends the
/// session the same way, so that its slot, mailbox and registration are still
/// released.
pub async fn until_kicked<T>(
    work: impl Future<Output = T>,
    kicked: Kicked,
    grace: Duration,
) -> Ended<T> {
    let mut work = CatchUnwind(std::pin::pin!(work));
    let ended = |r: Result<T, String>| match r {
        Ok(t) => Ended::Finished(t),
        Err(why) => Ended::Panicked(why),
    };
    let reason = tokio::select! {
        biased;
        end = &mut work => return ended(end),
        reason = kicked.wait() => reason,
    };
    match tokio::time::timeout(grace, &mut work).await {
        Ok(end) => ended(end),
        Err(_) => Ended::CutOff(reason),
    }
}

/// `work` with a panic returned as an error instead of unwinding the task, for a
/// session that watches for kicks itself (see `until_kicked`).
pub fn catch_unwind<F: Future + Unpin>(work: F) -> CatchUnwind<F> {
    CatchUnwind(work)
}

/// A future whose panic is returned as an error instead of unwinding the task.
pub struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        // Not polled again after a panic: the caller takes the error and drops it.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Pin::new(&mut *inner).poll(cx)
        })) {
            Ok(poll) => poll.map(Ok),
            Err(panic) => Poll::Ready(Err(panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kick_ends_work_blocked_forever_once_the_grace_is_over() {
        let (kick, kicked) = Kicked::pair();
        kick.send(KickReason::Operator);
        let ended = until_kicked(
            std::future::pending::<()>(),
            kicked,
            Duration::from_millis(10),
        )
        .await;
        assert!(matches!(ended, Ended::CutOff(KickReason::Operator)));
    }

    #[tokio::test]
    async fn kicked_work_that_ends_within_the_grace_ends_its_own_way() {
        let (kick, kicked) = Kicked::pair();
        kick.send(KickReason::TakenOver);
        let ended = until_kicked(async { "flushed" }, kicked, Duration::from_secs(1)).await;
        assert!(matches!(ended, Ended::Finished("flushed")));
    }

    #[tokio::test]
    async fn a_panicking_session_ends_as_an_internal_error_instead_of_unwinding() {
        let (_kick, kicked) = Kicked::pair();
        let work = async { panic!("bug in a handler") };
        let ended: Ended<()> = until_kicked(work, kicked, Duration::from_secs(1)).await;
        assert!(matches!(ended, Ended::Panicked(ref why) if why == "bug in a handler"));
    }

    #[test]
    fn every_protocol_has_its_own_gauge() {
        let m = std::sync::Arc::new(Metrics::default());
        for p in Protocol::ALL {
            m.session_gauge(p, crate::principal::PrincipalKind::Device)
                .fetch_add(1, Ordering::Relaxed);
        }
        let text = m.render(crate::metrics::Exposition::Prometheus);
        for p in Protocol::ALL {
            let line = format!(
                "portcullis_sessions{{protocol=\"{}\",kind=\"device\"}} 1",
                p.as_str()
            );
            assert!(text.contains(&line), "{text}");
        }
    }
}
