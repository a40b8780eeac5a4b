//! The audit log: one JSON line per security decision.
//!
//! Sessions hand entries to a bounded queue and never wait on the disk; one writer
//! task appends them. An entry that does not fit in the queue is counted (and the
//! count is visible in metrics), never blocks a session. No secret is ever a field.

use crate::metrics::Metrics;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// What happened: `connect`, `publish`, `subscribe`, `registry`, `handshake`, ...
    pub event: &'static str,
    /// `allow` or `refuse`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditEntry {
    pub fn new(event: &'static str, decision: &'static str) -> Self {
        AuditEntry {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            event,
            decision,
            principal: None,
            kind: None,
            source: None,
            protocol: None,
            topic: None,
            reason: None,
        }
    }
    pub fn principal(mut self, kind: &'static str, id: impl Into<String>) -> Self {
        self.kind = Some(kind);
        self.principal = Some(id.into());
        self
    }
    pub fn source(mut self, source: impl ToString) -> Self {
        self.source = Some(source.to_string());
        self
    }
    pub fn protocol(mut self, protocol: &'static str) -> Self {
        self.protocol = Some(protocol);
        self
    }
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::Sender<AuditEntry>,
    metrics: Arc<Metrics>,
}

impl Audit {
    /// Start the writer task. `AuditWriter::finish` flushes what is queued and stops it.
    pub async fn start(
        path: PathBuf,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Audit, AuditWriter)> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .await?;
        let (tx, mut rx) = mpsc::channel::<AuditEntry>(queue.max(1));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                let first = tokio::select! {
                    entry = rx.recv() => entry,
                    _ = &mut stopped => None,
                };
                buf.clear();
                if let Some(entry) = &first {
                    push_line(&mut buf, entry);
                }
                while let Ok(more) = rx.try_recv() {
                    push_line(&mut buf, &more);
                }
                if !buf.is_empty() {
                    if let Err(e) = file.write_all(&buf).await {
                        tracing::error!(error = %e, "audit log write failed");
                    }
                    let _ = file.flush().await;
                }
                if first.is_none() {
                    break;
                }
            }
            let _ = file.sync_all().await;
        });
        Ok((Audit { tx, metrics }, AuditWriter { stop, task }))
    }

    pub fn record(&self, entry: AuditEntry) {
        if self.tx.try_send(entry).is_err() {
            self.metrics.audit_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The audit writer task.
#[derive(Debug)]
pub struct AuditWriter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AuditWriter {
    /// Write out everything queued so far, sync the file, and stop.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn push_line(buf: &mut Vec<u8>, entry: &AuditEntry) {
    if serde_json::to_writer(&mut *buf, entry).is_ok() {
        buf.push(b'\n');
    }
}
