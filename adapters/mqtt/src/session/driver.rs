//! The driver: frames read with a deadline, output gathered and written, kicks, reloads
//! and timers, and each frame handed to its handler.

use super::*;

#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Strict(#[from] StrictError),
}

/// Buffers bytes from the peer and cuts them into complete frames.
pub(super) struct FrameReader {
    pub(super) buf: BytesMut,
    pub(super) max: usize,
    /// Bytes reserved for the next read: small while a peer is quiet (an idle
    /// connection holds little), doubled each time a read fills it, up to 64 KiB.
    pub(super) want: usize,
}

pub(super) const READ_MIN: usize = 256;

pub(super) const READ_MAX: usize = 64 * 1024;

impl FrameReader {
    /// A whole frame is already buffered (reading it will not wait).
    pub(super) fn has_frame(&self) -> bool {
        matches!(strict::frame_len(&self.buf, self.max), Ok(Some(_)))
    }

    /// Cancel-safe: bytes read so far stay in the buffer.
    pub(super) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(len) = strict::frame_len(&self.buf, self.max)? {
                return Ok(self.buf.split_to(len));
            }
            if self.buf.is_empty() && self.buf.capacity() > 4 * self.want {
                // A burst is over: its buffer is not kept while the peer is quiet.
                self.buf = BytesMut::new();
            }
            self.buf.reserve(self.want);
            let spare = self.buf.capacity() - self.buf.len();
            let n = r.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            if n == spare {
                self.want = (self.want * 2).min(READ_MAX);
            } else if n < spare / 4 {
                self.want = (self.want / 2).max(READ_MIN);
            }
        }
    }
}

pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Session {
    pub(super) async fn serve<R, W>(
        &mut self,
        ctx: &Context,
        reader: &mut FrameReader,
        rd: &mut R,
        wr: &mut W,
        kicked: &Kicked,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut keep_alive = KeepAlive::new(self.keep_alive, Instant::now());
        let mailbox = self.state.mailbox.clone();
        let mut shutdown = ctx.shutdown.clone();
        let mut live = ctx.live.clone();
        live.mark_unchanged();
        let mut live_open = true;
        let mut out = BytesMut::new();
        loop {
            let kick = kicked.reason();
            if let Some(reason) = kick {
                // What was gathered (acknowledgements the broker already took) goes
                // out before the session ends.
                if !out.is_empty() {
                    let _ =
                        tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await;
                }
                return End::Kicked(reason);
            }

            // Queued messages go out once the frames the peer already sent are taken
            // (its acknowledgements free the window), so that many deliveries leave in
            // one write, not one per acknowledgement; and at least once per read.
            if !reader.has_frame() {
                self.pump_mailbox(ctx, &mut out);
            }
            // Output is written once the acknowledgements that are ready have been
            // gathered, and always before more is read (the flush branch below); the
            // deliveries that are ready are taken in one go; and here, when a lot has
            // gathered. One write for many packets, not one system call per
            // acknowledgement or delivery.
            if out.len() >= FLUSH_AT {
                match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
                    Ok(Ok(())) => out.clear(),
                    Ok(Err(_)) => return End::Closed,
                    Err(_) => return End::WriteTimeout,
                }
            }
            // Biased: owed acknowledgements first, then the write, then reading, so a
            // peer that is being held back still hears about what already passed
            // before anything more of its is read.
            let step = tokio::select! {
                biased;
                Some(result) = front_ack(&mut self.pending_acks) => {
                    let done = self.pending_acks.pop_front();
                    match (result, done) {
                        (Ok(Taken::Yes), Some(p)) => {
                            self.ack_publish(p.pkid, p.qos, p.code, &mut out);
                            Ok(())
                        }
                        // No room in the forwarder: MQTT 5 says so; MQTT 3.1.1 cannot
                        // refuse a publish, so the peer is disconnected unacknowledged
                        // and sends it again when it returns.
                        (Ok(Taken::Full), Some(p)) => self.refuse_full(ctx, p, &mut out),
                        _ => Err(End::BrokerGone),
                    }
                }
                // Nothing more ready to send at once: write what was gathered.
                _ = std::future::ready(()), if !out.is_empty() => {
                    match tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await {
                        Ok(Ok(())) => {
                            out.clear();
                            // A burst's buffer is not kept by a session gone quiet.
                            if out.capacity() > READ_MAX {
                                out = BytesMut::new();
                            }
                            Ok(())
                        }
                        Ok(Err(_)) => return End::Closed,
                        Err(_) => return End::WriteTimeout,
                    }
                }
                // Kicks, reloads and the drain before more input: a frame that arrives
                // after a reload is judged by the new rules.
                _ = kicked.wait() => continue,
                changed = live.changed(), if live_open => match changed {
                    Ok(()) => {
                        let next = live.borrow_and_update().clone();
                        Box::pin(self.reload(ctx, next)).await
                    }
                    // The gateway is stopping: nothing more will be reloaded.
                    Err(_) => {
                        live_open = false;
                        Ok(())
                    }
                },
                // Registered after the drain began: end like everyone else.
                _ = stopped(&mut shutdown) => Err(End::Kicked(KickReason::Shutdown)),
                frame = reader.next(rd) => {
                    let now = Instant::now();
                    keep_alive.heard(now);
                    self.stats.heard(now);
                    match frame {
                        // Boxed: its state is large and needed only while a frame is
                        // handled, not while the session waits (a few KB per idle
                        // connection).
                        Ok(frame) => match self.on_frame(ctx, frame, now, &mut out) {
                            Ok(Step::Done) => Ok(()),
                            Ok(step) => Box::pin(self.carry_out(ctx, step, &mut out)).await,
                            Err(end) => Err(end),
                        },
                        Err(ReadError::Strict(e)) => {
                            ctx.metrics.refused(Refusal::MalformedPacket);
                            self.audit_refusal("packet", None, &e.to_string());
                            Err(End::Protocol(e.reason_code(), e.to_string()))
                        }
                        Err(_) => Err(End::Closed),
                    }
                }
                _ = std::future::ready(()), if self.pump_more => {
                    self.pump_more = false;
                    Ok(())
                }
                _ = mailbox.notify.notified() => Ok(()),
                _ = sleep_until_opt(self.next_pump) => {
                    self.next_pump = None;
                    Ok(())
                }
                _ = tokio::time::sleep_until(keep_alive.deadline().into()) => Err(End::KeepAlive),
            };
            if let Err(end) = step {
                if !out.is_empty() {
                    let _ =
                        tokio::time::timeout(ctx.limits.write_timeout, wr.write_all(&out)).await;
                }
                return end;
            }
        }
    }

    /// A configuration reload: the session keeps running under the new rules. Rights
    /// it lost are gone from now on (subscriptions no longer allowed are dropped); a
    /// certificate that no longer verifies (CA removed, or revoked by a CRL) ends it.
    pub(super) async fn reload(&mut self, ctx: &Context, live: Arc<Live>) -> Result<(), End> {
        let principal = self.principal().clone();
        let Some(acl) = ctx.auth.current_acl(&principal) else {
            return Err(End::Kicked(KickReason::PolicyChanged));
        };
        if let Some(chain) = &self.certs
            && !ctx.auth.certificate_still_valid(&principal, chain)
        {
            return Err(End::Kicked(KickReason::CertificateRevoked));
        }
        self.admission
            .reload(rules(ctx, &live, &principal, acl), Instant::now());
        let lost: Vec<SubscriptionKey> = self
            .state
            .subscriptions()
            .iter()
            .filter(|s| !self.admission.may_subscribe(&s.key.filter))
            .map(|s| s.key.clone())
            .collect();
        for key in &lost {
            self.state.unsubscribe(key);
            self.audit_refusal(
                "subscribe",
                Some(&key.to_string()),
                "subscription no longer allowed after reload",
            );
        }
        if !lost.is_empty() {
            self.keep(ctx);
        }
        if ctx.kind == PrincipalKind::Service && !lost.is_empty() {
            ctx.forwarder
                .unsubscribe(principal.id.clone(), lost)
                .await
                .map_err(|_| End::BrokerGone)?;
        }
        Ok(())
    }

    /// Do what a frame's handler asked for: wait, forward, change a service's
    /// fan-out; then let the session go on from there.
    pub(super) async fn carry_out(
        &mut self,
        ctx: &Context,
        mut step: Step,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        loop {
            step = match step {
                Step::Done => return Ok(()),
                Step::Wait(held) => {
                    tokio::time::sleep_until(held.until.into()).await;
                    self.offer(held.offer, held.pkid, held.qos, Instant::now(), out)?
                }
                Step::Forward(f) => return self.forward(ctx, f, out).await,
                Step::Subscribe(s) => {
                    let subs = s.accepted.iter().map(|(_, s)| s.clone()).collect();
                    let added = ctx
                        .forwarder
                        .subscribe(self.principal().id.clone(), subs)
                        .await
                        .map_err(|_| End::BrokerGone)?;
                    self.subscribed(ctx, s, added, out);
                    return Ok(());
                }
                Step::Unsubscribe {
                    pkid,
                    existed,
                    removed,
                } => {
                    ctx.forwarder
                        .unsubscribe(self.principal().id.clone(), removed)
                        .await
                        .map_err(|_| End::BrokerGone)?;
                    codec::encode(&Outgoing::UnsubAck { pkid, existed }, self.version, out);
                    return Ok(());
                }
            }
        }
    }

    /// Hand a message to the forwarder. The acknowledgement of a clean QoS 1/2
    /// message waits for the forwarder's, in its own queue: never behind deliveries
    /// held by the peer's Receive Maximum.
    async fn forward(&mut self, ctx: &Context, f: Forward, out: &mut BytesMut) -> Result<(), End> {
        let Some(uplink) = &self.link else {
            return Err(End::BrokerGone);
        };
        match f.why {
            Why::Diverted => {
                uplink.send(f.message).await.map_err(|_| End::BrokerGone)?;
                if f.qos > 0 {
                    self.answer_publish(f.pkid, f.qos, reason::SUCCESS, out);
                }
            }
            Why::Clean { arrived } => {
                if f.qos == 0 {
                    uplink.send(f.message).await.map_err(|_| End::BrokerGone)?;
                } else {
                    let acked = uplink
                        .send_acked(f.message)
                        .await
                        .map_err(|_| End::BrokerGone)?;
                    self.pending_acks.push_back(PendingAck {
                        pkid: f.pkid,
                        qos: f.qos,
                        code: reason::SUCCESS,
                        rx: Some(acked),
                    });
                }
                ctx.metrics.forward_latency.record(arrived.elapsed());
            }
        }
        Ok(())
    }

    /// One frame from the peer, without I/O: answers go into `out`; what needs the
    /// outside world comes back as a step.
    pub(super) fn on_frame(
        &mut self,
        ctx: &Context,
        frame: BytesMut,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<Step, End> {
        let packet = match codec::decode(frame, self.version) {
            Ok(p) => p,
            Err(e) => {
                ctx.metrics.refused(Refusal::MalformedPacket);
                self.audit_refusal("packet", None, &e.to_string());
                return Err(End::Protocol(e.reason_code(), e.to_string()));
            }
        };
        match packet {
            Incoming::Publish(p) => self.on_publish(ctx, p, now, out),
            Incoming::PubRel(pkid) => {
                self.state.on_pubrel(pkid);
                codec::encode(&Outgoing::PubComp { pkid }, self.version, out);
                Ok(Step::Done)
            }
            Incoming::PubAck(pkid) => {
                self.state.on_puback(pkid);
                Ok(Step::Done)
            }
            Incoming::PubRec(pkid) => {
                if let Some(send) = self.state.on_pubrec(pkid) {
                    self.encode_send(&send, out);
                }
                Ok(Step::Done)
            }
            Incoming::PubComp(pkid) => {
                self.state.on_pubcomp(pkid);
                Ok(Step::Done)
            }
            Incoming::Subscribe {
                pkid,
                filters,
                identifier,
            } => self.on_subscribe(ctx, pkid, filters, identifier, now, out),
            Incoming::Unsubscribe { pkid, filters } => {
                let shared = ctx.kind == PrincipalKind::Service;
                // A filter that does not parse was never subscribed to.
                let keys: Vec<Option<SubscriptionKey>> = filters
                    .iter()
                    .map(|f| SubscriptionKey::parse(f, ctx.limits.topic, shared).ok())
                    .collect();
                let existed: Vec<bool> = keys
                    .iter()
                    .map(|k| k.as_ref().is_some_and(|k| self.state.unsubscribe(k)))
                    .collect();
                let removed: Vec<SubscriptionKey> = keys
                    .into_iter()
                    .zip(&existed)
                    .filter_map(|(k, e)| k.filter(|_| *e))
                    .collect();
                if !removed.is_empty() {
                    self.keep(ctx);
                }
                // A service's subscriptions are gone from the fan-out before the
                // UNSUBACK (a message or two already queued may still follow it).
                if shared && !removed.is_empty() {
                    return Ok(Step::Unsubscribe {
                        pkid,
                        existed,
                        removed,
                    });
                }
                codec::encode(&Outgoing::UnsubAck { pkid, existed }, self.version, out);
                Ok(Step::Done)
            }
            Incoming::PingReq => {
                codec::encode(&Outgoing::PingResp, self.version, out);
                Ok(Step::Done)
            }
            Incoming::Disconnect {
                reason: code,
                session_expiry,
            } => {
                if let Some(requested) = session_expiry {
                    // A session that was clean cannot be made persistent at the end.
                    if self.expiry == 0 && requested > 0 {
                        return Err(End::Protocol(
                            reason::PROTOCOL_ERROR,
                            "session expiry set on DISCONNECT of a clean session".into(),
                        ));
                    }
                    self.expiry = requested.min(ctx.limits.max_session_expiry);
                }
                Err(End::ClientDisconnect {
                    with_will: code == reason::DISCONNECT_WITH_WILL,
                })
            }
        }
    }
}
