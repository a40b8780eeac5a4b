//! The writer: sessions hand entries to a bounded queue ([`Audit`]) and never wait on
//! the disk; an entry that does not fit is counted, and the count goes into the chain.
//! The `Engine` runs one batch through the chain, the aggregator and the files,
//! synchronously and fed the clock; the task around it only waits for entries, a
//! deadline or the stop. `append_blocking` is the same chain and files with no
//! gateway running.

use super::LONGEST;
use super::aggregate::{AGGREGATE_KEYS_MAX, Aggregator};
use super::chain::{Chain, Checkpoint};
use super::entry::{AuditEntry, Extra, now_ms};
use super::log_file::LogFile;
use super::settings::AuditSettings;
use crate::metrics::Metrics;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Entries taken from the queue per batch.
const BATCH: usize = 512;
/// After a failed write, how long before the log is reopened.
const RETRY: Duration = Duration::from_secs(1);

/// Lines of one batch, and how many entries they hold (lost if the write fails).
#[derive(Default)]
struct Batch {
    lines: Vec<Vec<u8>>,
    entries: u64,
    unsealed: u64,
}

impl Batch {
    fn push(&mut self, chain: &mut Chain, entry: &AuditEntry, extra: &Extra, is_entry: bool) {
        match chain.seal(entry, extra) {
            Some(line) => {
                self.lines.push(line);
                self.entries += u64::from(is_entry);
            }
            None => self.unsealed += 1,
        }
    }
}

/// What the writer task does with one batch, minus the waiting: synchronous, and fed
/// the clock, so tests drive it directly.
pub(super) struct Engine {
    settings: AuditSettings,
    chain: Chain,
    aggregator: Aggregator,
    /// None after a failed write, until the log is reopened (not before `retry_at`).
    pub(super) log: Option<LogFile>,
    retry_at: Instant,
    /// Found amiss when the log was opened; written as a `chain-recovery` line.
    notes: Vec<String>,
    /// Entries lost since the last `audit-dropped` line.
    dropped: Arc<AtomicU64>,
    pub(super) metrics: Arc<Metrics>,
    next_checkpoint: Instant,
}

impl Engine {
    /// Open the log; the first step writes a checkpoint, so where the chain resumed is
    /// published at once.
    pub(super) fn open(
        mut settings: AuditSettings,
        metrics: Arc<Metrics>,
        dropped: Arc<AtomicU64>,
        now: Instant,
    ) -> io::Result<Engine> {
        settings.checkpoint_interval = settings
            .checkpoint_interval
            .clamp(Duration::from_secs(1), LONGEST);
        let (log, resume) = LogFile::open(&settings)?;
        Ok(Engine {
            chain: Chain::new(settings.key, resume.last),
            aggregator: Aggregator::new(settings.aggregate_window, AGGREGATE_KEYS_MAX),
            log: Some(log),
            notes: resume.notes,
            dropped,
            metrics,
            next_checkpoint: now,
            retry_at: now,
            settings,
        })
    }

    /// Write `entries` and whatever is due by `now`; on `finishing`, close every
    /// aggregation window, checkpoint and sync. Returns the checkpoint to send, if any.
    pub(super) fn step(
        &mut self,
        entries: Vec<AuditEntry>,
        now: Instant,
        wall_ms: u64,
        finishing: bool,
    ) -> Option<Checkpoint> {
        if self.log.is_none() && !self.reopen(now, finishing) {
            self.lose(entries.len() as u64, 0);
            return None;
        }
        let mut batch = Batch::default();
        if !self.notes.is_empty() {
            let recovery =
                AuditEntry::own("chain-recovery", "allow", wall_ms).reason(self.notes.join("; "));
            batch.push(&mut self.chain, &recovery, &Extra::default(), false);
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let entry = AuditEntry::own("audit-dropped", "allow", wall_ms)
                .reason("entries lost before they reached the log (queue full or write failed)");
            let extra = Extra {
                dropped: Some(dropped),
                ..Extra::default()
            };
            batch.push(&mut self.chain, &entry, &extra, false);
        }
        for (entry, extra) in self.aggregator.close_expired(now, wall_ms) {
            batch.push(&mut self.chain, &entry, &extra, true);
        }
        for entry in &entries {
            if self.aggregator.admit(entry, now) {
                batch.push(&mut self.chain, entry, &Extra::default(), true);
            }
        }
        if finishing {
            for (entry, extra) in self.aggregator.close_all(wall_ms) {
                batch.push(&mut self.chain, &entry, &extra, true);
            }
        }
        let mut checkpoint = None;
        if finishing || now >= self.next_checkpoint {
            if let Some((line, signed)) = self.chain.checkpoint(wall_ms) {
                batch.lines.push(line);
                checkpoint = Some(signed);
            }
            self.next_checkpoint = now + self.settings.checkpoint_interval;
        }
        self.dropped.fetch_add(batch.unsealed, Ordering::Relaxed);
        if batch.lines.is_empty() {
            return None;
        }
        let log = self.log.as_mut()?;
        let written = log
            .write_lines(&batch.lines)
            .and_then(|()| if finishing { log.sync() } else { Ok(()) });
        let failures = std::mem::take(&mut log.rotation_failures);
        self.metrics
            .audit_rotation_failures
            .fetch_add(failures, Ordering::Relaxed);
        match written {
            Ok(()) => {
                self.notes.clear();
                checkpoint
            }
            Err(e) => {
                // Some of the batch may be on disk: reopen and resume from what is there.
                let path = self.settings.path.display();
                tracing::error!(error = %e, path = %path, "audit log write failed");
                self.log = None;
                self.retry_at = now + RETRY;
                self.lose(batch.entries, dropped);
                None
            }
        }
    }

    /// Reopen the log after a failure, resuming from what reached the disk. Not more
    /// than once per `RETRY` (unless finishing), so a full disk is neither a busy loop
    /// nor a flood of errors.
    fn reopen(&mut self, now: Instant, finishing: bool) -> bool {
        if !finishing && now < self.retry_at {
            return false;
        }
        match LogFile::open(&self.settings) {
            Ok((log, resume)) => {
                self.log = Some(log);
                self.chain = Chain::new(self.settings.key, resume.last);
                self.notes = resume.notes;
                true
            }
            Err(e) => {
                let path = self.settings.path.display();
                tracing::error!(error = %e, path = %path, "audit log cannot be reopened");
                self.retry_at = now + RETRY;
                false
            }
        }
    }

    /// Count `entries` lost here (and `recounted` lost earlier) for the next
    /// `audit-dropped` line.
    fn lose(&self, entries: u64, recounted: u64) {
        self.dropped
            .fetch_add(entries + recounted, Ordering::Relaxed);
        self.metrics
            .audit_dropped
            .fetch_add(entries, Ordering::Relaxed);
    }

    /// When the next step is due even with no entry: a checkpoint or a closing window.
    fn next_deadline(&self) -> Instant {
        if self.log.is_none() {
            return self.retry_at;
        }
        match self.aggregator.next_deadline() {
            Some(closes) => closes.min(self.next_checkpoint),
            None => self.next_checkpoint,
        }
    }
}

/// Where sessions record entries. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::Sender<AuditEntry>,
    metrics: Arc<Metrics>,
    /// Shared with the writer, which writes the count into the chain.
    dropped: Arc<AtomicU64>,
}

impl Audit {
    /// Open the log (resuming its chain) and start the writer task. Each checkpoint is
    /// also offered to `checkpoints` without waiting. `AuditWriter::finish` writes out
    /// what is queued, checkpoints, syncs and stops.
    pub async fn start(
        settings: AuditSettings,
        metrics: Arc<Metrics>,
        checkpoints: Option<mpsc::Sender<Checkpoint>>,
    ) -> io::Result<(Audit, AuditWriter)> {
        let dropped = Arc::new(AtomicU64::new(0));
        let queue = settings.queue.max(1);
        let engine = {
            let (metrics, dropped) = (metrics.clone(), dropped.clone());
            tokio::task::spawn_blocking(move || {
                Engine::open(settings, metrics, dropped, Instant::now())
            })
            .await
            .map_err(io::Error::other)??
        };
        let (tx, rx) = mpsc::channel(queue);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(engine, rx, stopped, checkpoints));
        Ok((
            Audit {
                tx,
                metrics,
                dropped,
            },
            AuditWriter { stop, task },
        ))
    }

    /// An audit whose entries go to the returned receiver instead of a log: for the
    /// simulator, which runs the pipeline without a gateway, and for tests.
    pub fn detached(capacity: usize, metrics: Arc<Metrics>) -> (Audit, mpsc::Receiver<AuditEntry>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        (
            Audit {
                tx,
                metrics,
                dropped,
            },
            rx,
        )
    }

    pub fn record(&self, entry: AuditEntry) {
        if self.tx.try_send(entry).is_err() {
            self.metrics.audit_dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(
    mut engine: Engine,
    mut rx: mpsc::Receiver<AuditEntry>,
    mut stop: oneshot::Receiver<()>,
    checkpoints: Option<mpsc::Sender<Checkpoint>>,
) {
    let mut entries = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::Instant::from_std(engine.next_deadline());
        let finishing = tokio::select! {
            biased;
            _ = &mut stop => true,
            n = rx.recv_many(&mut entries, BATCH) => n == 0,
            _ = tokio::time::sleep_until(deadline) => false,
        };
        if finishing {
            // Later entries count as dropped; take what is queued.
            rx.close();
            while let Ok(entry) = rx.try_recv() {
                entries.push(entry);
            }
        }
        let batch = std::mem::take(&mut entries);
        let stepped = tokio::task::spawn_blocking(move || {
            let mut checkpoint = engine.step(batch, Instant::now(), now_ms(), finishing);
            if finishing && engine.log.is_none() {
                // One more try, so the loss and the last checkpoint are written down.
                checkpoint = engine.step(Vec::new(), Instant::now(), now_ms(), true);
            }
            (engine, checkpoint)
        })
        .await;
        let checkpoint;
        (engine, checkpoint) = match stepped {
            Ok(stepped) => stepped,
            Err(e) => {
                tracing::error!(error = %e, "audit writer stopped");
                return;
            }
        };
        if let (Some(checkpoint), Some(tx)) = (checkpoint, &checkpoints)
            && tx.try_send(checkpoint).is_err()
        {
            tracing::warn!("audit checkpoint not sent: its channel is full or closed");
        }
        if finishing {
            return;
        }
    }
}

/// The audit writer task.
#[derive(Debug)]
pub struct AuditWriter {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AuditWriter {
    /// Write out everything queued so far, close aggregation windows, write and send a
    /// last checkpoint, sync the file, and stop.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Append entries with no gateway running (the CLI's registry commands): the same
/// chain and files, synced before returning; no aggregation, no checkpoint. Fails if
/// a running writer holds the log.
pub fn append_blocking(settings: &AuditSettings, entries: &[AuditEntry]) -> io::Result<()> {
    let (mut log, resume) = LogFile::open(settings)?;
    let mut chain = Chain::new(settings.key, resume.last);
    let mut lines = Vec::new();
    if !resume.notes.is_empty() {
        let recovery =
            AuditEntry::own("chain-recovery", "allow", now_ms()).reason(resume.notes.join("; "));
        lines.extend(chain.seal(&recovery, &Extra::default()));
    }
    for entry in entries {
        lines.extend(chain.seal(entry, &Extra::default()));
    }
    log.write_lines(&lines)?;
    log.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::*;
    use crate::audit::log_file::lock;
    use serde_json::Value;

    #[test]
    fn repeated_refusals_make_one_line_and_one_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let t0 = Instant::now();
        let mut engine = engine(&s, t0);
        engine.step((1000..1004).map(refusal).collect(), t0, 1_000, false);
        let other_topic = refusal(1007).topic("devices/x/commands");
        engine.step(
            vec![refusal(1005), other_topic, connect("sensor-1")],
            t0 + Duration::from_secs(59),
            60_000,
            false,
        );
        assert_eq!(engine.next_deadline(), t0 + Duration::from_secs(60));
        engine.step(Vec::new(), t0 + Duration::from_secs(60), 61_000, false);
        engine.step(
            vec![refusal(1006)],
            t0 + Duration::from_secs(61),
            62_000,
            true,
        );
        drop(engine);
        let events: Vec<Value> = lines(&s.path).iter().map(|l| json(l)).collect();
        let names: Vec<&str> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "connect",
                "checkpoint",
                "connect",
                "connect",
                "aggregate",
                "connect",
                "checkpoint"
            ]
        );
        // Another topic is another fact: written, not counted.
        assert_eq!(events[2]["topic"], "devices/x/commands");
        let aggregate = &events[4];
        assert_eq!(aggregate["of"], "connect");
        assert_eq!(aggregate["repeated"], 4);
        assert_eq!(aggregate["principal"], "ghost");
        assert_eq!(aggregate["source"], "10.0.0.9");
        assert_eq!(aggregate["reason"], "unknown_principal");
        // The refusal after the window is written again, and opens a new window.
        assert_eq!(events[5]["source"], "10.0.0.9:1006");
        assert!(check(&s, None).is_clean());
    }

    #[test]
    fn dropped_entries_are_counted_into_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let (tx, _rx) = mpsc::channel(1);
        let audit = Audit {
            tx,
            metrics: Arc::new(Metrics::default()),
            dropped: Arc::default(),
        };
        for i in 0..4 {
            audit.record(connect(&format!("sensor-{i}")));
        }
        assert_eq!(audit.metrics.audit_dropped.load(Ordering::Relaxed), 3);
        let now = Instant::now();
        let mut engine =
            Engine::open(s.clone(), audit.metrics.clone(), audit.dropped.clone(), now).unwrap();
        engine.step(Vec::new(), now, 1_000, true);
        drop(engine);
        let first = json(&lines(&s.path)[0]);
        assert_eq!(first["event"], "audit-dropped");
        assert_eq!(first["dropped"], 3);
        assert_eq!(audit.dropped.load(Ordering::Relaxed), 0);
        assert!(check(&s, None).is_clean());
    }

    #[test]
    fn a_log_that_cannot_be_reopened_counts_what_it_loses_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let t0 = Instant::now();
        let mut engine = engine(&s, t0);
        engine.step(vec![connect("sensor-1")], t0, 1_000, false);
        // As after a failed write, with the log held by someone else.
        engine.log = None;
        let blocker = lock(&s.path).unwrap();
        let lost = vec![connect("sensor-2"), connect("sensor-3")];
        assert_eq!(engine.step(lost, t0, 1_000, false), None);
        assert_eq!(engine.next_deadline(), t0 + RETRY);
        // Before the retry time nothing is tried; the entry is counted.
        engine.step(vec![connect("sensor-4")], t0 + RETRY / 2, 1_500, false);
        drop(blocker);
        engine.step(Vec::new(), t0 + RETRY, 2_000, true);
        drop(engine);
        let events: Vec<Value> = lines(&s.path).iter().map(|l| json(l)).collect();
        let dropped = events
            .iter()
            .find(|e| e["event"] == "audit-dropped")
            .unwrap();
        assert_eq!(dropped["dropped"], 3);
        assert!(check(&s, None).is_clean());
    }

    #[test]
    fn the_offline_append_joins_the_chain_and_a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 1);
        append_blocking(&s, &[AuditEntry::new("registry", "allow").reason("add")]).unwrap();
        assert!(check(&s, None).is_clean());
        let now = Instant::now();
        let _running = engine(&s, now);
        let refused = append_blocking(&s, &[AuditEntry::new("registry", "allow")]).unwrap_err();
        assert!(refused.to_string().contains("in use"), "{refused}");
    }

    #[tokio::test]
    async fn the_writer_task_writes_a_verifiable_log_and_sends_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let (checkpoints_tx, mut checkpoints) = mpsc::channel(8);
        let metrics = Arc::new(Metrics::default());
        let (audit, writer) = Audit::start(s.clone(), metrics, Some(checkpoints_tx))
            .await
            .unwrap();
        for i in 0..3 {
            audit.record(connect(&format!("sensor-{i}")));
        }
        writer.finish().await;
        let mut last = None;
        while let Ok(checkpoint) = checkpoints.try_recv() {
            assert!(checkpoint.verify_signature(&KEY));
            last = Some(checkpoint);
        }
        let last = last.expect("a checkpoint at finish");
        let report = check(&s, Some(last.expectation()));
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.last, Some(last.expectation()));
        let text = std::fs::read_to_string(&s.path).unwrap();
        assert_eq!(text.matches("\"connect\"").count(), 3);
        // After finish, entries are refused and counted.
        audit.record(connect("late"));
        assert_eq!(audit.metrics.audit_dropped.load(Ordering::Relaxed), 1);
    }
}
