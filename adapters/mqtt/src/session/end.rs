//! How a session ends: why (`End`), what the peer is told, and what is left behind
//! (the session parked or dropped, the Will decided).

use super::*;

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    Closed,
    WriteTimeout,
    ClientDisconnect {
        with_will: bool,
    },
    KeepAlive,
    Kicked(KickReason),
    Protocol(u8, String),
    Refused(String),
    BrokerGone,
    /// MQTT 3.1.1: a publish the forwarder had no room for (it cannot be refused).
    OutboxFull,
    /// The session's own code failed (a panic, contained).
    Internal(String),
}

impl End {
    pub(super) fn disconnect_reason(&self) -> Option<u8> {
        match self {
            End::Closed | End::ClientDisconnect { .. } | End::WriteTimeout => None,
            End::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::Kicked(KickReason::Shutdown) => Some(reason::SHUTTING_DOWN),
            End::Kicked(KickReason::TakenOver) => Some(reason::SESSION_TAKEN_OVER),
            End::Kicked(KickReason::Banned) => Some(reason::NOT_AUTHORIZED),
            End::Kicked(_) => Some(reason::ADMINISTRATIVE_ACTION),
            End::Protocol(code, _) => Some(*code),
            End::Refused(_) => Some(reason::NOT_AUTHORIZED),
            End::BrokerGone => Some(reason::SERVER_UNAVAILABLE),
            End::OutboxFull => Some(reason::QUOTA_EXCEEDED),
            End::Internal(_) => Some(reason::UNSPECIFIED),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            End::Closed => "connection closed".into(),
            End::WriteTimeout => "peer stopped reading".into(),
            End::ClientDisconnect { with_will: false } => "client disconnected".into(),
            End::ClientDisconnect { with_will: true } => {
                "client disconnected, asking for its Will".into()
            }
            End::KeepAlive => "keep-alive expired".into(),
            End::Kicked(r) => r.as_str().into(),
            End::Protocol(_, why) => format!("protocol error: {why}"),
            End::Refused(why) => format!("disconnected on refusal: {why}"),
            End::BrokerGone => "broker link closed".into(),
            End::OutboxFull => {
                "the outbox is full: a publish could not be acknowledged (sent again on reconnect)"
                    .into()
            }
            End::Internal(why) => format!("internal error: {why}"),
        }
    }

    /// The Last Will goes out only on an unexpected end: never after a normal
    /// DISCONNECT, a kick, a take-over or a security refusal.
    pub(super) fn fires_will(&self) -> bool {
        matches!(
            self,
            End::Closed
                | End::WriteTimeout
                | End::KeepAlive
                | End::ClientDisconnect { with_will: true }
        )
    }

    /// A removed or disabled principal keeps no session.
    pub(super) fn discards_session(&self) -> bool {
        matches!(
            self,
            End::Kicked(KickReason::Removed | KickReason::Disabled | KickReason::Banned)
        )
    }
}

impl Session {
    /// After the connection: park or drop the session, fire the Will if due.
    pub(super) async fn finish(
        mut self,
        ctx: &Context,
        end: &End,
        mut slot: OwnedMutexGuard<Slot>,
    ) {
        let id = self.principal().id.clone();
        let mailbox = self.state.mailbox.clone();
        mailbox.put_back(std::mem::take(&mut self.staged), Instant::now());
        if self.expiry > 0 && !end.discards_session() {
            // Parked: its mailbox keeps collecting (within its bounds) until the peer
            // returns or the session expires.
            let expires_at = Instant::now() + Duration::from_secs(u64::from(self.expiry));
            ctx.store.park(&id, &mut slot, self.state, expires_at);
            if ctx.kind == PrincipalKind::Service {
                ctx.forwarder.service_online(id.clone(), false).await;
            }
        } else {
            mailbox.clear();
            ctx.store.forget(&id);
            match ctx.kind {
                PrincipalKind::Device => ctx.forwarder.unregister_device(id.clone(), mailbox).await,
                PrincipalKind::Service => ctx.forwarder.detach_service(id.clone(), mailbox).await,
            }
        }
        let epoch = slot.epoch;
        let slot = OwnedMutexGuard::mutex(&slot).clone();
        drop(self.link.take());
        let gate = self.admission.will_gate();
        // A quarantined device's Last Will is suppressed: the device is not trusted.
        if gate.quarantined() {
            self.will = None;
        }
        let (Some(will), true) = (self.will.take(), end.fires_will()) else {
            return;
        };
        // MQTT 5: the Will waits for its delay (never longer than the session lives),
        // and is dropped if the device comes back first.
        let delay = will_delay(will.delay_secs, self.expiry);
        let uplink = match ctx.kind {
            PrincipalKind::Device => ctx.forwarder.uplink_for(&id),
            PrincipalKind::Service => ctx.forwarder.service_uplink(&id),
        };
        let kind = ctx.kind;
        let principal = self.admission.peer().principal.clone();
        let auth = ctx.auth.clone();
        let audit = ctx.audit.clone();
        let metrics = ctx.metrics.clone();
        let generation = self.generation;
        let peer = self.peer;
        let publish = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                // Held by a connection, or taken by one since: the device came back.
                match slot.try_lock() {
                    Ok(s) if s.epoch == epoch => {}
                    _ => return,
                }
            }
            // Re-checked as it fires: rights may have changed since CONNECT, and the
            // device may have been quarantined since.
            if !auth.still_current(&principal, generation) || !gate.admit(&will.message) {
                return;
            }
            let topic = will.message.topic.to_string();
            let sent = if will.message.qos == QoS::AtMostOnce {
                uplink.send(will.message).await.is_ok()
            } else {
                uplink.send_acked(will.message).await.is_ok()
            };
            if sent {
                Metrics::inc(&metrics.wills_published);
                audit.record(
                    AuditEntry::new("will", "allow")
                        .principal(kind.as_str(), principal.id.to_string())
                        .source(peer)
                        .topic(topic),
                );
            }
        };
        tokio::spawn(publish);
    }
}
