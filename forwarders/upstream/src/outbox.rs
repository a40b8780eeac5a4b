//! The outbox's one writer: group commit, the byte bound and its policy, removals.
//!
//! Every message on its way upstream comes through one bounded channel (the uplinks'
//! channel). The writer takes what is waiting, numbers it, and commits it to redb as
//! one sealed round in one transaction with one fsync; only then are
//! the QoS 1/2 senders told (`Taken::Yes`), and the link told that more is committed.
//! While a commit runs, the next batch gathers in the channel: many messages per fsync
//! under load, one commit per message when quiet.
//!
//! Removals (the broker acknowledged; expired) and dead letters come from the link on
//! a second channel and ride in the next commit; alone, they are committed without
//! waiting for the disk (redb's `Durability::None`), and made durable within a second.
//! A removal lost in a crash only means the message is sent again: QoS 1 allows it.
//!
//! Full (`max_bytes`): nothing is appended past the bound. With `back-pressure`, taken
//! messages wait in order for room, at most `queue` of them, and then the channel fills
//! and the sessions stop reading their peers; a QoS 1/2 message that waited
//! `full_wait` is refused (`Taken::Full`). With `drop-oldest-qos0`, the oldest QoS 0
//! entries are removed to make room, and a QoS 0 message finding none is dropped; QoS
//! 1/2 messages still wait. An acknowledged message is never dropped.

use crate::entry::Entry;
use crate::store::{Batch, Committed, DeadNote, Store, Stored, entry_size};
use portcullis_config::WhenFull;
use portcullis_core::audit::{Audit, AuditEntry};
use portcullis_core::forward::{Taken, UplinkItem};
use portcullis_core::message::QoS;
use portcullis_core::metrics::Metrics;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
// tokio's clock, so that the tests can drive it (`tokio::time::pause`).
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Messages per commit, at most (a commit also stops at `MAX_BATCH_BYTES`).
const MAX_BATCH: usize = 8192;
const MAX_BATCH_BYTES: u64 = 16 << 20;
/// Removals alone are made durable within this.
const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// Removals wait for the next commit of appends, or are committed alone after this
/// (a commit per PUBACK read would cost more than the appends).
const REMOVE_EVERY: Duration = Duration::from_millis(50);

pub use portcullis_core::registry::now_unix_ms as unix_ms;

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub full_wait: Duration,
    pub message_ttl: Duration,
    pub queue: usize,
}

impl Settings {
    pub fn from_config(o: &portcullis_config::Outbox) -> Settings {
        Settings {
            max_bytes: o.max_bytes,
            when_full: o.when_full,
            full_wait: *o.full_wait,
            message_ttl: *o.message_ttl,
            queue: o.queue,
        }
    }
}

/// What the link and the admin commands ask of the writer.
#[derive(Debug)]
pub enum Ctl {
    /// Acknowledged by the broker, sent at QoS 0, or expired: gone.
    Remove(Vec<u64>),
    /// To the dead letters.
    Dead(Vec<(u64, DeadNote)>),
    /// Answered once everything asked before it is committed.
    Barrier(oneshot::Sender<()>),
    /// At shutdown: answered once the removals asked so far are on disk and every round
    /// partly delivered is written again without what the broker has (else a restart
    /// would send that again).
    Close(oneshot::Sender<()>),
    /// Put dead letters back at the end of the outbox (`None`: all); answered with how
    /// many.
    Retry(Option<Vec<u64>>, oneshot::Sender<Result<u64, String>>),
    /// Remove dead letters for good (`None`: all); answered with how many.
    Purge(Option<Vec<u64>>, oneshot::Sender<Result<u64, String>>),
}

/// What was committed most recently, in memory: the link sends from here while it
/// keeps up, instead of reading back what was just written. Bounded in bytes; a link
/// that falls behind (or starts over after a lost connection) reads the outbox file.
///
/// It also paces the intake: while the link is connected and sending from the tail, the
/// writer takes no new messages once `LAG_BYTES` wait in the tail unsent, so devices are
/// held back (back-pressure) instead of the tail overflowing and the link falling back
/// to reading the file, which costs more and would let it fall further behind. A link
/// catching up from the file (after a reconnect) does not hold the intake.
#[derive(Debug, Default)]
pub struct Tail {
    inner: std::sync::Mutex<TailInner>,
    /// Told when the link takes from the tail and it drops below `LAG_BYTES`.
    drained: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct TailInner {
    entries: VecDeque<(u64, Entry, u64)>,
    bytes: u64,
    /// The link's last read found what it needed before the tail (in the file).
    behind: bool,
}

/// Bytes of entries the tail keeps, at most.
const TAIL_MAX_BYTES: u64 = 16 << 20;
/// Unsent bytes in the tail past which a link sending from it holds the intake.
const LAG_BYTES: u64 = 2 << 20;
const LAG_RECHECK: Duration = Duration::from_millis(100);

impl Tail {
    fn push(&self, fresh: Vec<(u64, Entry, u64)>) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for e in fresh {
            t.bytes += e.2;
            t.entries.push_back(e);
        }
        while t.bytes > TAIL_MAX_BYTES {
            match t.entries.pop_front() {
                Some(e) => t.bytes -= e.2,
                None => break,
            }
        }
    }

    fn clear(&self) {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.entries.clear();
        t.bytes = 0;
    }

    /// Up to `max` committed entries from `cursor` on, if the tail holds `cursor`'s
    /// place (entries before it are dropped: they were sent); `None` when what comes
    /// next is older than the tail (read the file).
    pub fn take_from(&self, cursor: u64, max: usize) -> Option<Vec<(u64, Stored, u64)>> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while t.entries.front().is_some_and(|e| e.0 < cursor) {
            if let Some(e) = t.entries.pop_front() {
                t.bytes -= e.2;
            }
        }
        match t.entries.front() {
            Some(e) if e.0 != cursor => {
                t.behind = true;
                None
            }
            _ => {
                t.behind = false;
                let n = t.entries.len().min(max);
                let out: Vec<_> = t
                    .entries
                    .drain(..n)
                    .map(|(seq, e, size)| (seq, Stored::Entry(e), size))
                    .collect();
                t.bytes -= out.iter().map(|e| e.2).sum::<u64>();
                let drained = t.bytes < LAG_BYTES;
                drop(t);
                if drained {
                    self.drained.notify_one();
                }
                Some(out)
            }
        }
    }

    /// Whether a link sending from the tail has `LAG_BYTES` or more unsent in it.
    fn lags(&self) -> bool {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        !t.behind && t.bytes >= LAG_BYTES
    }
}

/// The outbox as the rest of the forwarder sees it.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub store: Arc<Store>,
    pub tail: Arc<Tail>,
    pub appends: mpsc::Sender<UplinkItem>,
    pub ctl: mpsc::UnboundedSender<Ctl>,
    /// The sequence number after the last committed append.
    pub committed: watch::Receiver<u64>,
}

impl Outbox {
    /// Start the writer over an opened store.
    pub fn start(
        store: Store,
        loaded: crate::store::Loaded,
        settings: Settings,
        metrics: Arc<Metrics>,
        audit: Audit,
    ) -> Outbox {
        let store = Arc::new(store);
        let (appends, rx) = mpsc::channel(settings.queue);
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let (committed_tx, committed) = watch::channel(loaded.next_seq);
        let m = &metrics.outbox;
        m.depth.store(loaded.depth, Ordering::Relaxed);
        m.bytes.store(loaded.bytes, Ordering::Relaxed);
        m.dead_letters.store(loaded.dead, Ordering::Relaxed);
        m.oldest_unix_ms
            .store(loaded.oldest_ms.unwrap_or(0), Ordering::Relaxed);
        let tail = Arc::new(Tail::default());
        let writer = Writer {
            tail: tail.clone(),
            store: store.clone(),
            settings,
            metrics,
            audit,
            next_seq: loaded.next_seq,
            bytes: loaded.bytes,
            qos0: loaded.qos0.into_iter().collect(),
            held: VecDeque::new(),
            loose_since: None,
            removals: Vec::new(),
            removals_since: None,
            full_noted: false,
            committed: committed_tx,
        };
        tokio::spawn(writer.run(rx, ctl_rx));
        Outbox {
            store,
            tail,
            appends,
            ctl,
            committed,
        }
    }

    /// Wait until everything asked of the writer so far is committed.
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Ctl::Barrier(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Held {
    item: UplinkItem,
    taken: Instant,
}

struct Writer {
    store: Arc<Store>,
    tail: Arc<Tail>,
    settings: Settings,
    metrics: Arc<Metrics>,
    audit: Audit,
    next_seq: u64,
    /// Bytes held on disk (as of the last commit, less what the next one drops).
    bytes: u64,
    /// QoS 0 entries on disk, by sequence number, with their size.
    qos0: BTreeMap<u64, u64>,
    /// Taken from the channel, waiting for room.
    held: VecDeque<Held>,
    /// Since when changes were committed without waiting for the disk.
    loose_since: Option<Instant>,
    /// Removals asked and not yet committed, and since when the oldest waits.
    removals: Vec<u64>,
    removals_since: Option<Instant>,
    /// The outbox was full, and that was audited (once per run of it).
    full_noted: bool,
    committed: watch::Sender<u64>,
}

/// What one round of the writer commits, and whom it answers.
#[derive(Default)]
struct Round {
    batch: Batch,
    acks: Vec<oneshot::Sender<Taken>>,
    barriers: Vec<oneshot::Sender<()>>,
    answers: Vec<(oneshot::Sender<Result<u64, String>>, bool)>,
    /// QoS 0 entries appended (seq, size), oldest first, and how many of them the
    /// round itself dropped again to make room (`unappended`).
    qos0: Vec<(u64, u64)>,
    qos0_dropped: usize,
    unappended: std::collections::HashSet<u64>,
    appended_bytes: u64,
    /// Bytes the QoS 0 entries this round drops will free.
    freed: u64,
    /// The entries appended, for the tail once they are committed.
    fresh: Vec<(u64, Entry, u64)>,
    oldest_appended: Option<u64>,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<UplinkItem>,
        mut ctl: mpsc::UnboundedReceiver<Ctl>,
    ) {
        let mut open = (true, true);
        loop {
            let mut round = Round::default();
            let lagging = self.link_lags();
            let hold_room = self.held.len() < self.settings.queue && !lagging;
            let wake = self.next_wake();
            tokio::select! {
                _ = self.tail.drained.notified(), if lagging => {}
                // And a look now and then (the link may have gone meanwhile).
                _ = tokio::time::sleep(LAG_RECHECK), if lagging => {}
                c = ctl.recv(), if open.1 => match c {
                    Some(c) => self.take_ctl(c, &mut round).await,
                    None => open.1 = false,
                },
                item = rx.recv(), if open.0 && hold_room => match item {
                    Some(item) => self.held.push_back(Held { item, taken: Instant::now() }),
                    None => open.0 = false,
                },
                _ = sleep_until(wake), if wake.is_some() => {}
            }
            if !open.0 && !open.1 && self.held.is_empty() {
                break;
            }
            while let Ok(c) = ctl.try_recv() {
                self.take_ctl(c, &mut round).await;
            }
            while self.held.len() < self.settings.queue
                && self.held.len() < MAX_BATCH
                && !lagging
                && let Ok(item) = rx.try_recv()
            {
                self.held.push_back(Held {
                    item,
                    taken: Instant::now(),
                });
            }
            self.place(&mut round);
            let now = Instant::now();
            self.refuse_stale(now);
            let due = |since: Option<Instant>, every| since.is_some_and(|t| now >= t + every);
            let commit = !round.batch.is_empty()
                || !round.barriers.is_empty()
                || due(self.removals_since, REMOVE_EVERY)
                || self.removals.len() >= MAX_BATCH
                || due(self.loose_since, DURABLE_EVERY);
            if !commit {
                self.answer(round, None);
                continue;
            }
            self.take_removals(&mut round);
            if !self.commit(round).await {
                return;
            }
        }
        // The last removals reach the disk before the writer goes.
        if self.loose_since.is_some() || !self.removals.is_empty() {
            let mut round = Round::default();
            self.take_removals(&mut round);
            let _ = self.commit(round).await;
        }
    }

    /// The removals waiting go into this round.
    fn take_removals(&mut self, round: &mut Round) {
        round.batch.remove.append(&mut self.removals);
        self.removals_since = None;
    }

    /// The link is connected and sending from the tail, and has fallen `LAG_BYTES`
    /// behind: take no more until it catches up.
    fn link_lags(&self) -> bool {
        self.metrics.outbox.connected.load(Ordering::Relaxed) == 1 && self.tail.lags()
    }

    fn next_wake(&self) -> Option<Instant> {
        let stale = self
            .held
            .iter()
            .filter(|h| h.item.ack.is_some())
            .map(|h| h.taken + self.settings.full_wait)
            .min();
        let loose = self.loose_since.map(|t| t + DURABLE_EVERY);
        let removals = self.removals_since.map(|t| t + REMOVE_EVERY);
        [stale, loose, removals].into_iter().flatten().min()
    }

    async fn take_ctl(&mut self, c: Ctl, round: &mut Round) {
        match c {
            Ctl::Remove(seqs) => {
                for seq in &seqs {
                    self.qos0.remove(seq);
                }
                self.removals_since.get_or_insert(Instant::now());
                self.removals.extend(seqs);
            }
            Ctl::Dead(notes) => {
                for (seq, _) in &notes {
                    self.qos0.remove(seq);
                }
                round.batch.dead.extend(notes);
            }
            Ctl::Barrier(tx) => round.barriers.push(tx),
            Ctl::Close(tx) => {
                round.batch.compact = true;
                round.barriers.push(tx);
            }
            Ctl::Retry(which, tx) => match self.dead_seqs(which).await {
                Ok(seqs) => {
                    for old in seqs {
                        round.batch.retry.push((old, self.next_seq));
                        self.next_seq += 1;
                    }
                    round.answers.push((tx, true));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Ctl::Purge(which, tx) => {
                round.batch.purge = Some(which.unwrap_or_default());
                round.answers.push((tx, false));
            }
        }
    }

    /// The dead letters a retry names (all of them for `None`).
    async fn dead_seqs(&self, which: Option<Vec<u64>>) -> Result<Vec<u64>, String> {
        if let Some(seqs) = which {
            return Ok(seqs);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.dead_seqs().map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Move held messages into the batch while there is room (making room by the
    /// policy).
    fn place(&mut self, round: &mut Round) {
        let max = self.settings.max_bytes;
        let now_ms = unix_ms();
        let mut kept = VecDeque::new();
        let mut blocked = false;
        while let Some(held) = self.held.pop_front() {
            // Order: once one message waits for room, the later ones wait behind it
            // (QoS 0 ones may still be dropped under drop-oldest-qos0).
            if blocked
                || round.batch.append.len() >= MAX_BATCH
                || round.appended_bytes >= MAX_BATCH_BYTES
            {
                kept.push_back(held);
                continue;
            }
            let entry = self.entry(&held.item, now_ms);
            let seq = self.next_seq;
            let encoded = entry.encode();
            let size = entry_size(&encoded);
            let mut room = self.bytes + round.appended_bytes + size <= max + round.freed;
            if !room && self.settings.when_full == WhenFull::DropOldestQos0 {
                room = self.drop_oldest_qos0(size, round);
                if !room && held.item.message.qos == QoS::AtMostOnce {
                    Metrics::inc(&self.metrics.outbox.dropped_full);
                    self.note_full();
                    continue;
                }
            }
            if !room {
                self.note_full();
                self.metrics.outbox.full.store(1, Ordering::Relaxed);
                blocked = true;
                kept.push_back(held);
                continue;
            }
            // Room again: whatever waited has been placed up to here.
            if !blocked {
                self.metrics.outbox.full.store(0, Ordering::Relaxed);
            }
            self.next_seq += 1;
            round.appended_bytes += size;
            round.oldest_appended.get_or_insert(entry.enqueued_ms);
            if held.item.message.qos == QoS::AtMostOnce {
                round.qos0.push((seq, size));
            }
            round.batch.append.push((seq, encoded));
            round.fresh.push((seq, entry, size));
            if let Some(ack) = held.item.ack {
                round.acks.push(ack);
            }
        }
        self.held = kept;
        if self.held.is_empty() {
            self.full_noted = false;
        }
    }

    fn entry(&self, item: &UplinkItem, now_ms: u64) -> Entry {
        let mut ttl = self.settings.message_ttl.as_millis() as u64;
        if let Some(secs) = item
            .message
            .properties
            .as_deref()
            .and_then(|p| p.message_expiry_secs)
        {
            ttl = ttl.min(u64::from(secs) * 1000);
        }
        Entry {
            message: item.message.clone(),
            enqueued_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl),
        }
    }

    /// Remove the oldest QoS 0 entries until `size` more bytes fit; whether they do.
    fn drop_oldest_qos0(&mut self, size: u64, round: &mut Round) -> bool {
        let max = self.settings.max_bytes;
        while self.bytes + round.appended_bytes + size > max + round.freed {
            // On disk first (older), then those this round took before this one.
            if let Some((seq, freed)) = self.qos0.pop_first() {
                round.batch.drop.push(seq);
                round.freed += freed;
            } else if let Some(&(seq, freed)) = round.qos0.get(round.qos0_dropped) {
                round.qos0_dropped += 1;
                round.unappended.insert(seq);
                round.appended_bytes -= freed;
            } else {
                return false;
            }
            Metrics::inc(&self.metrics.outbox.dropped_full);
        }
        true
    }

    fn note_full(&mut self) {
        if !self.full_noted {
            self.full_noted = true;
            tracing::warn!(
                max_bytes = self.settings.max_bytes,
                "the outbox is full: new messages wait (or are dropped, by upstream.outbox.when_full)"
            );
            self.audit.record(AuditEntry::new("outbox", "refuse").reason(format!(
                "the outbox is full ({} bytes): {}",
                self.settings.max_bytes,
                match self.settings.when_full {
                    WhenFull::BackPressure => "devices are held back; QoS 1/2 publishes waiting longer than full_wait are refused",
                    WhenFull::DropOldestQos0 => "the oldest QoS 0 messages are dropped; QoS 1/2 publishes wait",
                }
            )));
        }
    }

    /// Refuse QoS 1/2 messages that waited for room longer than `full_wait`.
    fn refuse_stale(&mut self, now: Instant) {
        let wait = self.settings.full_wait;
        self.held.retain_mut(|h| {
            if h.item.ack.is_some() && now.duration_since(h.taken) >= wait {
                if let Some(ack) = h.item.ack.take() {
                    let _ = ack.send(Taken::Full);
                }
                false
            } else {
                true
            }
        });
    }

    /// Commit a round and answer everyone in it; false if the store failed.
    async fn commit(&mut self, mut round: Round) -> bool {
        if !round.unappended.is_empty() {
            let gone = std::mem::take(&mut round.unappended);
            round.batch.append.retain(|(seq, _)| !gone.contains(seq));
            round.qos0.retain(|(seq, _)| !gone.contains(seq));
            round.fresh.retain(|(seq, _, _)| !gone.contains(seq));
        }
        let now = Instant::now();
        let loose_due = self
            .loose_since
            .is_some_and(|t| now.duration_since(t) >= DURABLE_EVERY);
        round.batch.durable = !round.batch.append.is_empty()
            || !round.batch.retry.is_empty()
            || round.batch.purge.is_some()
            || round.batch.compact
            || loose_due;
        round.batch.next_seq = self.next_seq;
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let done = store.commit(&round.batch);
            let oldest = store.oldest_ms();
            (round, done, oldest)
        })
        .await;
        let (round, done, oldest) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the outbox writer failed");
                return false;
            }
        };
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // Nothing in this round is acknowledged: the senders hear the
                // forwarder stopped, and their peers keep the messages.
                tracing::error!(error = %e, "the outbox could not commit; upstream forwarding stops");
                self.audit.record(
                    AuditEntry::new("outbox", "refuse")
                        .reason(format!("the outbox could not commit: {e}")),
                );
                return false;
            }
        };
        if round.batch.durable {
            self.loose_since = None;
            Metrics::inc(&self.metrics.outbox.commits);
        } else if self.loose_since.is_none() {
            self.loose_since = Some(now);
        }
        self.account(&round, &done, oldest.ok().flatten());
        self.answer(round, Some(done));
        true
    }

    fn account(&mut self, round: &Round, done: &Committed, oldest: Option<u64>) {
        let m = &self.metrics.outbox;
        let appended = round.batch.append.len() as u64;
        self.bytes = (self.bytes + round.appended_bytes + done.retried_bytes)
            .saturating_sub(done.removed_bytes);
        self.qos0.extend(round.qos0.iter().copied());
        m.committed.fetch_add(appended, Ordering::Relaxed);
        m.bytes.store(self.bytes, Ordering::Relaxed);
        // Full until a message finds room, or the broker has taken a tenth back.
        if self.bytes <= self.settings.max_bytes / 10 * 9 {
            m.full.store(0, Ordering::Relaxed);
        }
        let depth = m.depth.load(Ordering::Relaxed) + appended + done.retried;
        m.depth
            .store(depth.saturating_sub(done.removed), Ordering::Relaxed);
        let dead = m.dead_letters.load(Ordering::Relaxed) + done.dead;
        m.dead_letters.store(
            dead.saturating_sub(done.retried + done.purged),
            Ordering::Relaxed,
        );
        m.dead_lettered.fetch_add(done.dead, Ordering::Relaxed);
        m.oldest_unix_ms.store(
            oldest.or(round.oldest_appended).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    fn answer(&mut self, mut round: Round, done: Option<Committed>) {
        for ack in round.acks {
            let _ = ack.send(Taken::Yes);
        }
        if !round.batch.retry.is_empty() {
            // Retried letters are on disk only: the link must read them there.
            self.tail.clear();
        } else if !round.fresh.is_empty() {
            self.tail.push(std::mem::take(&mut round.fresh));
        }
        if !round.batch.append.is_empty() || !round.batch.retry.is_empty() {
            self.committed.send_replace(self.next_seq);
        }
        for b in round.barriers {
            let _ = b.send(());
        }
        for (tx, retry) in round.answers {
            let n = done
                .as_ref()
                .map_or(0, |d| if retry { d.retried } else { d.purged });
            let _ = tx.send(Ok(n));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The outbox for `portcullis outbox …`: the running gateway's (changes go through
/// its writer), or, with no gateway running, the file opened directly.
#[derive(Debug)]
pub struct OutboxAdmin {
    store: Arc<Store>,
    ctl: Option<mpsc::UnboundedSender<Ctl>>,
    /// Offline: the next sequence number (a retried letter takes a new one).
    next_seq: std::sync::Mutex<u64>,
}

impl OutboxAdmin {
    pub fn live(outbox: &Outbox) -> OutboxAdmin {
        OutboxAdmin {
            store: outbox.store.clone(),
            ctl: Some(outbox.ctl.clone()),
            next_seq: std::sync::Mutex::new(0),
        }
    }

    pub fn offline(store: Store, loaded: &crate::store::Loaded) -> OutboxAdmin {
        OutboxAdmin {
            store: Arc::new(store),
            ctl: None,
            next_seq: std::sync::Mutex::new(loaded.next_seq),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// At shutdown, once the devices are gone: what the broker acknowledged so far is
    /// written to disk, so that a restart does not send it again.
    pub async fn close(&self) {
        if let Some(ctl) = &self.ctl {
            let (tx, rx) = oneshot::channel();
            if ctl.send(Ctl::Close(tx)).is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Put dead letters back at the end of the outbox (`None`: all); how many.
    /// Blocking: call it off the runtime's workers.
    pub fn retry(&self, which: Option<Vec<u64>>) -> Result<u64, String> {
        match &self.ctl {
            Some(ctl) => ask(ctl, |tx| Ctl::Retry(which, tx)),
            None => {
                let seqs = match which {
                    Some(s) => s,
                    None => self.store.dead_seqs().map_err(|e| e.to_string())?,
                };
                let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
                let mut batch = Batch::default();
                for old in seqs {
                    batch.retry.push((old, *next));
                    *next += 1;
                }
                batch.next_seq = *next;
                batch.durable = true;
                self.store
                    .commit(&batch)
                    .map(|d| d.retried)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Remove dead letters for good (`None`: all); how many.
    pub fn purge(&self, which: Option<Vec<u64>>) -> Result<u64, String> {
        if which.as_ref().is_some_and(Vec::is_empty) {
            return Ok(0);
        }
        match &self.ctl {
            Some(ctl) => ask(ctl, |tx| Ctl::Purge(which, tx)),
            None => {
                let next = *self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
                let batch = Batch {
                    purge: Some(which.unwrap_or_default()),
                    next_seq: next,
                    durable: true,
                    ..Batch::default()
                };
                self.store
                    .commit(&batch)
                    .map(|d| d.purged)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

fn ask(
    ctl: &mpsc::UnboundedSender<Ctl>,
    make: impl FnOnce(oneshot::Sender<Result<u64, String>>) -> Ctl,
) -> Result<u64, String> {
    let (tx, rx) = oneshot::channel();
    ctl.send(make(tx))
        .map_err(|_| "the outbox writer has stopped".to_string())?;
    rx.blocking_recv()
        .map_err(|_| "the outbox writer has stopped".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Sealer, Stored};
    use bytes::Bytes;
    use portcullis_core::message::Message;
    use portcullis_core::topic::TopicName;

    struct Fixture {
        _dir: tempfile::TempDir,
        outbox: Outbox,
        metrics: Arc<Metrics>,
        _audit: mpsc::Receiver<AuditEntry>,
    }

    fn fixture(max_bytes: u64, when_full: WhenFull) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) =
            Store::open(&dir.path().join("outbox.redb"), Sealer::derive(&[1; 32])).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (audit, audit_rx) = Audit::detached(1024, metrics.clone());
        let settings = Settings {
            max_bytes,
            when_full,
            full_wait: Duration::from_secs(5),
            message_ttl: Duration::from_secs(3600),
            queue: 8192,
        };
        let outbox = Outbox::start(store, loaded, settings, metrics.clone(), audit);
        Fixture {
            _dir: dir,
            outbox,
            metrics,
            _audit: audit_rx,
        }
    }

    fn item(n: usize, qos: QoS, size: usize) -> (UplinkItem, Option<oneshot::Receiver<Taken>>) {
        let (tx, rx) = oneshot::channel();
        let acked = qos != QoS::AtMostOnce;
        let mut payload = format!("{n:06}").into_bytes();
        payload.resize(size.max(6), b'.');
        (
            UplinkItem {
                message: Message {
                    topic: TopicName::parse_unlimited("devices/d/telemetry").unwrap(),
                    payload: Bytes::from(payload),
                    qos,
                    retain: false,
                    properties: None,
                },
                ack: acked.then_some(tx),
                origin: None,
            },
            acked.then_some(rx),
        )
    }

    fn payloads(outbox: &Outbox) -> Vec<String> {
        outbox
            .store
            .read(0, 100_000)
            .unwrap()
            .into_iter()
            .map(|(_, s, _)| match s {
                Stored::Entry(e) => String::from_utf8_lossy(&e.message.payload[..6]).into_owned(),
                Stored::Corrupt { reason, .. } => reason,
            })
            .collect()
    }

    fn entry(n: u64) -> (u64, Entry, u64) {
        let (it, _) = item(n as usize, QoS::AtLeastOnce, 10);
        (
            n,
            Entry {
                message: it.message,
                enqueued_ms: 0,
                expires_ms: u64::MAX,
            },
            100,
        )
    }

    fn seqs(rows: Option<Vec<(u64, Stored, u64)>>) -> Option<Vec<u64>> {
        rows.map(|r| r.into_iter().map(|e| e.0).collect())
    }

    #[test]
    fn the_tail_serves_a_link_that_keeps_up_and_sends_one_that_fell_behind_to_the_file() {
        let tail = Tail::default();
        tail.push((5..10).map(entry).collect());
        // Behind the tail: the file.
        assert_eq!(seqs(tail.take_from(3, 100)), None);
        // At its start: served, in order, up to the batch.
        assert_eq!(seqs(tail.take_from(5, 2)), Some(vec![5, 6]));
        assert_eq!(seqs(tail.take_from(7, 100)), Some(vec![7, 8, 9]));
        // Caught up: nothing more in memory.
        assert_eq!(seqs(tail.take_from(10, 100)), Some(vec![]));
        // Bounded: the oldest go first.
        tail.push((10..10 + TAIL_MAX_BYTES / 100 + 5).map(entry).collect());
        assert_eq!(seqs(tail.take_from(10, 1)), None);
        let first = 15;
        assert_eq!(seqs(tail.take_from(first, 1)), Some(vec![first]));
        tail.clear();
        assert_eq!(seqs(tail.take_from(first + 1, 1)), Some(vec![]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn what_waits_together_is_committed_together_in_order_then_acknowledged() {
        let f = fixture(1 << 30, WhenFull::BackPressure);
        let mut acks = Vec::new();
        // Queued before the writer runs (one thread): one round takes them all.
        for n in 0..2000 {
            let (it, rx) = item(n, QoS::AtLeastOnce, 50);
            f.outbox.appends.try_send(it).unwrap();
            acks.extend(rx);
        }
        for rx in acks {
            assert_eq!(rx.await, Ok(Taken::Yes));
        }
        let commits = f.metrics.outbox.commits.load(Ordering::Relaxed);
        assert!(commits <= 2, "{commits} fsyncs for 2000 messages");
        let stored = payloads(&f.outbox);
        assert_eq!(stored.len(), 2000);
        assert!(stored.windows(2).all(|w| w[0] < w[1]), "out of order");
        assert_eq!(*f.outbox.committed.borrow(), 2001);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn closing_writes_what_the_broker_acknowledged_so_a_restart_does_not_send_it_again() {
        let f = fixture(1 << 30, WhenFull::BackPressure);
        let path = f._dir.path().join("outbox.redb");
        let mut acks = Vec::new();
        for n in 0..10 {
            let (it, rx) = item(n, QoS::AtLeastOnce, 20);
            f.outbox.appends.try_send(it).unwrap();
            acks.extend(rx);
        }
        for rx in acks {
            assert_eq!(rx.await, Ok(Taken::Yes));
        }
        // One round of ten; the broker acknowledged the first four.
        let first = *f.outbox.committed.borrow() - 10;
        f.outbox
            .ctl
            .send(Ctl::Remove((first..first + 4).collect()))
            .unwrap();
        OutboxAdmin::live(&f.outbox).close().await;
        let Fixture { outbox, _dir, .. } = f;
        drop(outbox);
        // The writer lets the file go once its channels are closed.
        let mut reopened = None;
        for _ in 0..500 {
            match Store::open(&path, Sealer::derive(&[1; 32])) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let (store, loaded) = reopened.expect("the outbox file is released");
        assert_eq!(loaded.depth, 6);
        let read: Vec<String> = store
            .read(0, 100)
            .unwrap()
            .into_iter()
            .map(|(_, s, _)| match s {
                Stored::Entry(e) => String::from_utf8_lossy(&e.message.payload[..6]).into_owned(),
                Stored::Corrupt { reason, .. } => reason,
            })
            .collect();
        assert_eq!(
            read,
            ["000004", "000005", "000006", "000007", "000008", "000009"]
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_full_outbox_holds_a_message_until_room_is_made_or_refuses_it_after_the_wait() {
        let f = fixture(3000, WhenFull::BackPressure);
        let (a, rx_a) = item(1, QoS::AtLeastOnce, 1200);
        let (b, rx_b) = item(2, QoS::AtLeastOnce, 1200);
        let (c, rx_c) = item(3, QoS::AtLeastOnce, 1200);
        for it in [a, b, c] {
            f.outbox.appends.send(it).await.unwrap();
        }
        assert_eq!(rx_a.unwrap().await, Ok(Taken::Yes));
        assert_eq!(rx_b.unwrap().await, Ok(Taken::Yes));
        // No room for the third: held. Removing the first makes room.
        let mut rx_c = rx_c.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rx_c.try_recv().is_err(), "taken without room");
        f.outbox.ctl.send(Ctl::Remove(vec![1])).unwrap();
        assert_eq!(rx_c.await, Ok(Taken::Yes));
        assert_eq!(payloads(&f.outbox), ["000002", "000003"]);
        // A fourth waits full_wait (5 s on the paused clock) and is refused.
        let (d, rx_d) = item(4, QoS::AtLeastOnce, 1200);
        f.outbox.appends.send(d).await.unwrap();
        let started = Instant::now();
        assert_eq!(rx_d.unwrap().await, Ok(Taken::Full));
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert_eq!(payloads(&f.outbox), ["000002", "000003"]);
        assert!(f.metrics.outbox.bytes.load(Ordering::Relaxed) <= 3000);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn drop_oldest_qos0_drops_the_oldest_qos0_never_a_qos1() {
        let f = fixture(4000, WhenFull::DropOldestQos0);
        let (q1, rx) = item(0, QoS::AtLeastOnce, 900);
        f.outbox.appends.send(q1).await.unwrap();
        assert_eq!(rx.unwrap().await, Ok(Taken::Yes));
        // Eight QoS 0 of ~900 bytes in one burst: only three fit beside the QoS 1.
        for n in 1..=8 {
            f.outbox
                .appends
                .send(item(n, QoS::AtMostOnce, 900).0)
                .await
                .unwrap();
        }
        let (q1, rx) = item(9, QoS::AtLeastOnce, 900);
        f.outbox.appends.send(q1).await.unwrap();
        assert_eq!(rx.unwrap().await, Ok(Taken::Yes));
        assert_eq!(
            payloads(&f.outbox),
            ["000000", "000007", "000008", "000009"]
        );
        assert_eq!(f.metrics.outbox.dropped_full.load(Ordering::Relaxed), 6);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connected_link_that_falls_behind_in_the_tail_holds_the_intake_until_it_takes() {
        let f = fixture(1 << 30, WhenFull::BackPressure);
        f.metrics.outbox.connected.store(1, Ordering::Relaxed);
        // The link sends from the tail: its first read finds the tail's front.
        assert_eq!(f.outbox.tail.take_from(0, 1).map(|r| r.len()), Some(0));
        // Committed and not taken until LAG_BYTES wait in the tail.
        let mut n = 0;
        while !f.outbox.tail.lags() {
            let (d, rx) = item(n, QoS::AtLeastOnce, 64 * 1024);
            f.outbox.appends.send(d).await.unwrap();
            assert_eq!(rx.unwrap().await, Ok(Taken::Yes));
            n += 1;
        }
        let (d, rx) = item(n, QoS::AtLeastOnce, 64 * 1024);
        f.outbox.appends.send(d).await.unwrap();
        let mut rx = rx.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "held while the link lags");
        // The link takes from the tail: the intake goes on.
        let first = *f.outbox.committed.borrow() - n as u64;
        let taken = f.outbox.tail.take_from(first, 1024).unwrap();
        assert_eq!(taken.len(), n);
        assert_eq!(rx.await, Ok(Taken::Yes));
        // A link that is not connected (or reads the file) never holds it.
        f.metrics.outbox.connected.store(0, Ordering::Relaxed);
        for n in n + 1..n + 60 {
            let (d, rx) = item(n, QoS::AtLeastOnce, 64 * 1024);
            f.outbox.appends.send(d).await.unwrap();
            assert_eq!(rx.unwrap().await, Ok(Taken::Yes));
        }
    }
}
