//! What the audit writer is configured with (`[audit]` in the config). It holds the
//! chain key, so its `Debug` leaves the key out.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the writer needs. The key is never printed (`Debug` redacts it).
#[derive(Clone)]
pub struct AuditSettings {
    /// The current file; rotated ones are `{path}.1` (newest) to `{path}.{keep_files}`.
    pub path: PathBuf,
    /// Entries queued towards the writer; beyond this they are counted as dropped.
    pub queue: usize,
    /// The chain key, from [`load_or_create_key`](super::load_or_create_key).
    pub key: [u8; 32],
    /// A file is rotated before a line would take it past this size.
    pub max_file_bytes: u64,
    /// Rotated files kept (at least 1); the oldest one beyond that is deleted.
    pub keep_files: usize,
    /// Identical refusals within this window of the first are counted, not written.
    /// Zero turns aggregation off.
    pub aggregate_window: Duration,
    /// How often a checkpoint is written and sent (at least one second).
    pub checkpoint_interval: Duration,
}

impl AuditSettings {
    /// The settings with the suggested defaults (those of `[audit]` in the config).
    pub fn new(path: PathBuf, key: [u8; 32]) -> Self {
        AuditSettings {
            path,
            queue: 4096,
            key,
            max_file_bytes: 16 * 1024 * 1024,
            keep_files: 8,
            aggregate_window: Duration::from_secs(60),
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for AuditSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSettings")
            .field("path", &self.path)
            .field("queue", &self.queue)
            .field("key", &"[redacted]")
            .field("max_file_bytes", &self.max_file_bytes)
            .field("keep_files", &self.keep_files)
            .field("aggregate_window", &self.aggregate_window)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_never_print_the_key() {
        let shown = format!("{:?}", AuditSettings::new("a.log".into(), [0xAB; 32]));
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("abab"),
            "{shown}"
        );
    }
}
