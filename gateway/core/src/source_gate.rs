//! The gate every connection (or first datagram) passes before a byte of it is read,
//! whatever the protocol: bans, the connection caps in all and per source, the
//! per-source connection rate, and the bound on connections that have not logged in
//! yet (the oldest is shed for a newcomer).

use crate::audit::{Audit, AuditEntry};
use crate::auth::Authenticator;
use crate::limit::{Rate, TokenBucket};
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::source_key::SourceKey;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// The gate of one gateway: the caps, and where refusals are counted and audited.
#[derive(Clone)]
pub struct SourceGate {
    pub limits: Arc<ConnectionLimits>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
}

/// What an admitted connection holds: its place under the caps for as long as it
/// lives, and its token while it has not logged in.
pub struct Admitted {
    pub slot: ConnectionSlot,
    pub pre_auth: PreAuth,
}

impl SourceGate {
    /// A new connection from `peer`: a banned source, or one over the caps or the
    /// rate, is refused (counted and audited).
    pub fn admit(&self, peer: SocketAddr) -> Result<Admitted, Refusal> {
        if let Some(ban) = self.auth.source_ban(peer.ip()) {
            self.metrics.refused(Refusal::Banned);
            self.audit.record(
                AuditEntry::new("connect", "refuse")
                    .source(peer)
                    .reason(format!("banned: {ban}")),
            );
            return Err(Refusal::Banned);
        }
        let slot = self.limits.admit(peer.ip()).map_err(|why| {
            let refusal = match why {
                NotAdmitted::TooMany => Refusal::ConnectionLimit,
                NotAdmitted::TooFast => Refusal::ConnectionRate,
            };
            self.metrics.refused(refusal);
            self.audit.record(
                AuditEntry::new("connect", "refuse")
                    .source(peer)
                    .reason(format!("{}: {}", refusal.label(), refusal.detail())),
            );
            refusal
        })?;
        let (pre_auth, shed) = self.limits.pre_auth();
        if shed {
            self.metrics.refused(Refusal::UnauthenticatedShed);
        }
        Ok(Admitted { slot, pre_auth })
    }

    /// A connection that had not logged in was shed for a newer one.
    pub fn audit_shed(audit: &Audit, peer: SocketAddr) {
        audit.record(
            AuditEntry::new("connect", "refuse")
                .source(peer)
                .reason("unauthenticated_shed: not logged in, shed for a newer connection at limits.max_unauthenticated"),
        );
    }
}

/// Shared connection caps.
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    /// Connections not yet authenticated, oldest first; each holds the sender whose
    /// drop sheds it.
    unauthenticated: Mutex<Unauthenticated>,
    per_source_max: usize,
    per_source: Mutex<HashMap<SourceKey, usize>>,
    /// New connections per second from one source, before anything is read.
    rate: Rate,
    rates: Mutex<HashMap<SourceKey, TokenBucket>>,
    /// Prefix length of one IPv6 source (an IPv4 address is one source).
    ipv6_prefix: u8,
}

/// Sources whose connection rate is tracked at once; beyond it the table starts over
/// (a spray from very many addresses then meets only the per-source and total caps).
const MAX_RATE_SOURCES: usize = 100_000;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    TooMany,
    TooFast,
}

impl ConnectionLimits {
    pub fn new(
        total: usize,
        unauthenticated: usize,
        per_source: usize,
        rate: Rate,
        ipv6_prefix: u8,
    ) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            total: Arc::new(Semaphore::new(total)),
            unauthenticated: Mutex::new(Unauthenticated {
                cap: unauthenticated.max(1),
                next: 0,
                waiting: BTreeMap::new(),
            }),
            per_source_max: per_source,
            per_source: Mutex::new(HashMap::new()),
            rate,
            rates: Mutex::new(HashMap::new()),
            ipv6_prefix,
        })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, NotAdmitted> {
        let ip = SourceKey::new(ip, self.ipv6_prefix);
        {
            let now = Instant::now();
            let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            if rates.len() >= MAX_RATE_SOURCES && !rates.contains_key(&ip) {
                rates.clear();
            }
            let bucket = rates
                .entry(ip)
                .or_insert_with(|| TokenBucket::new(self.rate, now));
            if bucket.take(1.0, now).is_err() {
                return Err(NotAdmitted::TooFast);
            }
        }
        self.admit_slot(ip).ok_or(NotAdmitted::TooMany)
    }

    fn admit_slot(self: &Arc<Self>, ip: SourceKey) -> Option<ConnectionSlot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_source_max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            limits: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// Connections that have not logged in yet, by age.
struct Unauthenticated {
    cap: usize,
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

impl ConnectionLimits {
    /// Count a new connection as not yet authenticated; at the cap, the oldest such
    /// connection is shed to make room (a flood of connections that never log in
    /// cannot keep a device out). Returns the new one's token, and whether one was shed.
    pub fn pre_auth(self: &Arc<Self>) -> (PreAuth, bool) {
        let (tx, rx) = oneshot::channel();
        let mut u = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut shed = false;
        while u.waiting.len() >= u.cap {
            // Dropping its sender wakes the connection, which ends.
            u.waiting.pop_first();
            shed = true;
        }
        let number = u.next;
        u.next += 1;
        u.waiting.insert(number, tx);
        (
            PreAuth {
                limits: Some(self.clone()),
                number,
                shed: rx,
            },
            shed,
        )
    }
}

/// Held by a connection until it authenticates (or ends): it counts against
/// `limits.max_unauthenticated`, and `shed` resolves when a newer one displaces it.
pub struct PreAuth {
    limits: Option<Arc<ConnectionLimits>>,
    number: u64,
    shed: oneshot::Receiver<()>,
}

impl PreAuth {
    /// Resolves when the connection is shed for a newer one. Cancel-safe.
    pub async fn shed(&mut self) {
        let _ = (&mut self.shed).await;
    }

    /// The peer logged in: it no longer counts as unauthenticated.
    pub fn authenticated(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(limits) = self.limits.take() {
            limits
                .unauthenticated
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .waiting
                .remove(&self.number);
        }
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        self.release();
    }
}

/// A connection's place under the caps; given back on drop.
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: SourceKey,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self
            .limits
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(unauthenticated: usize) -> Arc<ConnectionLimits> {
        let rate = Rate {
            per_second: 1000.0,
            burst: 1000.0,
        };
        ConnectionLimits::new(100, unauthenticated, 100, rate, 64)
    }

    fn is_shed(token: &mut PreAuth) -> bool {
        matches!(
            token.shed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        )
    }

    #[test]
    fn a_connection_past_the_cap_sheds_the_oldest_unauthenticated_one() {
        let limits = limits(2);
        let (mut oldest, shed) = limits.pre_auth();
        assert!(!shed);
        let (mut middle, _) = limits.pre_auth();
        let (mut newest, shed) = limits.pre_auth();
        assert!(shed);
        assert!(is_shed(&mut oldest));
        assert!(!is_shed(&mut middle));
        assert!(!is_shed(&mut newest));
    }

    #[test]
    fn an_authenticated_connection_no_longer_counts_and_is_never_shed() {
        let limits = limits(1);
        let (first, _) = limits.pre_auth();
        first.authenticated();
        let (mut second, shed) = limits.pre_auth();
        assert!(!shed);
        assert!(!is_shed(&mut second));
        drop(second);
        let (_third, shed) = limits.pre_auth();
        assert!(!shed, "an ended connection frees its place");
    }
}
