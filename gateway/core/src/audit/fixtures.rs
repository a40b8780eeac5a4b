//! What the audit's tests share: settings, a writer, entries, and reading the log back.

use super::writer::Engine;
use super::{AuditEntry, AuditSettings, Checkpoint, ProblemKind, VerifyReport, verify};
use crate::metrics::Metrics;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const KEY: [u8; 32] = [7; 32];

pub(super) fn settings(dir: &Path) -> AuditSettings {
    AuditSettings {
        checkpoint_interval: Duration::from_secs(3600),
        ..AuditSettings::new(dir.join("audit.log"), KEY)
    }
}

/// Settings whose files rotate after a few entries.
pub(super) fn small_files(dir: &Path) -> AuditSettings {
    AuditSettings {
        max_file_bytes: 1_000,
        ..settings(dir)
    }
}

/// One `connect` entry per number, each its own batch (unsynced).
pub(super) fn log_connects(engine: &mut Engine, numbers: std::ops::Range<usize>, now: Instant) {
    for i in numbers {
        engine.step(vec![connect(&format!("sensor-{i}"))], now, 1_000, false);
    }
}

pub(super) fn engine(settings: &AuditSettings, now: Instant) -> Engine {
    let metrics = Arc::new(Metrics::default());
    Engine::open(settings.clone(), metrics, Arc::default(), now).unwrap()
}

pub(super) fn connect(id: &str) -> AuditEntry {
    AuditEntry::new("connect", "allow")
        .principal("device", id)
        .source("10.0.0.1:4000")
        .reason("certificate")
}

pub(super) fn refusal(port: u16) -> AuditEntry {
    AuditEntry::new("connect", "refuse")
        .principal("device", "ghost")
        .source(format!("10.0.0.9:{port}"))
        .reason("unknown_principal")
}

/// A log of `n` connects and the checkpoint after them (the last line).
pub(super) fn write_log(settings: &AuditSettings, n: usize) -> Checkpoint {
    let now = Instant::now();
    let mut engine = engine(settings, now);
    let entries = (0..n).map(|i| connect(&format!("sensor-{i}"))).collect();
    engine.step(entries, now, 1_000, true).unwrap()
}

pub(super) fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub(super) fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

pub(super) fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

/// Verify the current file alone.
pub(super) fn check(s: &AuditSettings, expect: Option<(u64, String)>) -> VerifyReport {
    verify(std::slice::from_ref(&s.path), &KEY, expect)
}

pub(super) fn kinds(report: &VerifyReport) -> Vec<(usize, ProblemKind)> {
    report.problems.iter().map(|p| (p.line, p.kind)).collect()
}
