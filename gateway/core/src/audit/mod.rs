//! The audit log: a tamper-evident, append-only record of every security decision.
//!
//! Sessions hand entries to a bounded queue and never wait on the disk: an entry that
//! does not fit is counted, and the count itself is written into the log. One writer
//! task appends the lines.
//!
//! Each line carries an HMAC-SHA256 over the previous line's MAC and its own text,
//! under a key kept outside the data dir, so whoever holds the files but not the key
//! cannot edit, remove, reorder or insert a line without [`verify`] saying where.
//! Cutting lines off the end, or replacing the whole log, leaves a chain that is
//! consistent in itself: signed [`Checkpoint`]s sent off the box expose that.
//! Repeated refusals are aggregated per window, so a flood costs a count, not the
//! disk; rotation by size keeps the chain running across files.
//!
//! `chain` (sealing lines, reading them back) and `aggregate` (what is worth a line)
//! are pure and take the clock as an argument; `log_file` owns the files; the
//! `writer`'s `Engine` runs one batch through them, and the task around it only
//! waits; `verify` reads the files back and says where the chain breaks. `entry` is
//! what a line says; `key` and `settings` are what the writer starts from.
//! The format is described in `docs/audit.md`.

mod aggregate;
mod chain;
mod entry;
#[cfg(test)]
mod fixtures;
mod key;
mod log_file;
mod settings;
mod verify;
mod writer;

pub use aggregate::AGGREGATE_KEYS_MAX;
pub use chain::{Checkpoint, parse_checkpoint_arg};
pub use entry::AuditEntry;
pub use key::{load_key, load_or_create_key};
pub use log_file::log_files;
pub use settings::AuditSettings;
pub use verify::{Problem, ProblemKind, VerifyReport, verify};
pub use writer::{Audit, AuditWriter, append_blocking};

use std::time::Duration;

/// Longest window or interval honoured, so that deadlines never overflow.
const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);
