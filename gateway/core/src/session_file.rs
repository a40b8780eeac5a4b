//! Parked device sessions and retained commands on disk, so a restart keeps them.
//!
//! One redb file (`{data_dir}/sessions.redb`) with a table per kind of record, keyed by
//! device id: a parked session (what its adapter keeps, its queued commands, when it
//! expires) and a device's retained commands. Every value is sealed like a registry
//! record (a MAC under a key derived from the audit key, bound to the table and the
//! key), so a record altered or moved on disk is dropped, not served.
//!
//! One writer. Whoever changes something either hands over its new bytes (`write`,
//! `forget`) or only marks it changed (`mark`, from paths that must stay cheap, such
//! as a command arriving in a parked session's mailbox). The writer waits a moment for
//! more, takes a snapshot of everything marked from its `Source`, and commits the lot
//! in one durable transaction on the blocking pool. Changes to one key are applied in
//! the order they were made.

use crate::metrics::Metrics;
use crate::record::RecordSealer;
use crate::storage::contain;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// How long the writer waits after a change for others to join its commit.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// After a failed commit, the writer waits this long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// A device's parked (or live, persistent) session.
    Sessions,
    /// A device's retained commands.
    Retained,
}

impl Table {
    const ALL: [Table; 2] = [Table::Sessions, Table::Retained];

    fn name(self) -> &'static str {
        match self {
            Table::Sessions => "device_session",
            Table::Retained => "retained_command",
        }
    }

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

/// What a record should now hold, as its owner sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Snapshot {
    Write(Vec<u8>),
    Delete,
    /// Leave it as last written (the owner cannot look now, and writes it itself
    /// when it can: a session held by a connection).
    Keep,
}

/// Who owns the records of a table, and can say what one should hold now.
pub trait Source: Send + Sync {
    fn snapshot(&self, key: &str) -> Snapshot;
}

#[derive(Debug, thiserror::Error)]
pub enum SessionFileError {
    #[error("session file {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("session file: {0}")]
    Storage(String),
    #[error("session file failed on a damaged page: {0}")]
    Panicked(String),
}

fn storage(e: impl std::fmt::Display) -> SessionFileError {
    SessionFileError::Storage(e.to_string())
}

/// The file: synchronous, like redb.
pub struct SessionFile {
    db: Database,
    sealer: RecordSealer,
    path: PathBuf,
}

impl std::fmt::Debug for SessionFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionFile")
            .field("path", &self.path)
            .finish()
    }
}

/// One record read back: its key, and its bytes or why they cannot be used.
pub type Loaded = (String, Result<Vec<u8>, String>);

impl SessionFile {
    pub fn open(path: &Path, sealer: RecordSealer) -> Result<SessionFile, SessionFileError> {
        let open_err = |reason: String| SessionFileError::Open {
            path: path.display().to_string(),
            reason,
        };
        let work = || {
            let db = Database::create(path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                    "already open by another process (is a gateway running on this data dir?)"
                        .into(),
                ),
                other => open_err(format!(
                    "{other} (the file is damaged: move it aside to start without the kept sessions)"
                )),
            })?;
            let tx = db.begin_write().map_err(|e| open_err(e.to_string()))?;
            for table in Table::ALL {
                tx.open_table(table.def())
                    .map_err(|e| open_err(e.to_string()))?;
            }
            tx.commit().map_err(|e| open_err(e.to_string()))?;
            Ok(db)
        };
        let db = contain(work, |why| {
            open_err(format!(
                "damaged ({why}): move it aside to start without the kept sessions"
            ))
        })?;
        Ok(SessionFile {
            db,
            sealer,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record of a table.
    pub fn load(&self, table: Table) -> Result<Vec<Loaded>, SessionFileError> {
        contain(
            || {
                let tx = self.db.begin_read().map_err(storage)?;
                let t = tx.open_table(table.def()).map_err(storage)?;
                let mut out = Vec::new();
                for row in t.iter().map_err(storage)? {
                    let (k, v) = row.map_err(storage)?;
                    let key = k.value().to_string();
                    let value = self
                        .sealer
                        .open(table.name(), &key, v.value())
                        .map(<[u8]>::to_vec)
                        .map_err(|e| e.to_string());
                    out.push((key, value));
                }
                Ok(out)
            },
            SessionFileError::Panicked,
        )
    }

    /// Apply changes in one durable transaction: bytes to write, or `None` to delete.
    pub fn commit(
        &self,
        changes: &[(Table, String, Option<Vec<u8>>)],
    ) -> Result<(), SessionFileError> {
        contain(
            || {
                let tx = self.db.begin_write().map_err(storage)?;
                for table in Table::ALL {
                    let mut t = tx.open_table(table.def()).map_err(storage)?;
                    for (_, key, value) in changes.iter().filter(|c| c.0 == table) {
                        match value {
                            Some(bytes) => {
                                let sealed = self.sealer.seal(table.name(), key, bytes);
                                t.insert(key.as_str(), sealed.as_slice()).map_err(storage)?;
                            }
                            None => {
                                t.remove(key.as_str()).map_err(storage)?;
                            }
                        }
                    }
                }
                tx.commit().map_err(storage)
            },
            SessionFileError::Panicked,
        )
    }
}

/// A change waiting for the writer: bytes handed over, a mark, or both (a mark made
/// after bytes were handed over: the snapshot wins unless its owner says `Keep`).
#[derive(Debug, Default)]
struct Change {
    value: Option<Option<Vec<u8>>>,
    marked: bool,
}

#[derive(Debug, Default)]
struct Pending {
    changes: HashMap<(Table, String), Change>,
    flushes: Vec<oneshot::Sender<()>>,
}

/// The handle every owner of records writes through.
pub struct Journal {
    pending: Mutex<Pending>,
    wake: Notify,
    sources: Mutex<HashMap<Table, Weak<dyn Source>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal(..)")
    }
}

impl Journal {
    /// Start the writer of `file`.
    pub fn start(file: Arc<SessionFile>, metrics: Arc<Metrics>) -> Arc<Journal> {
        let journal = Arc::new(Journal {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            sources: Mutex::new(HashMap::new()),
        });
        tokio::spawn(writer(journal.clone(), file, metrics));
        journal
    }

    /// The owner of a table's records, asked for a snapshot of what is marked.
    pub fn set_source(&self, table: Table, source: Weak<dyn Source>) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table, source);
    }

    fn change(&self, table: Table, key: &str, f: impl FnOnce(&mut Change)) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = pending.changes.is_empty();
        f(pending.changes.entry((table, key.to_string())).or_default());
        drop(pending);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// The record is now these bytes.
    pub fn write(&self, table: Table, key: &str, bytes: Vec<u8>) {
        self.change(table, key, |c| {
            c.value = Some(Some(bytes));
            c.marked = false;
        });
    }

    /// The record is gone.
    pub fn forget(&self, table: Table, key: &str) {
        self.change(table, key, |c| {
            c.value = Some(None);
            c.marked = false;
        });
    }

    /// The record changed: the writer asks its source what it holds now.
    pub fn mark(&self, table: Table, key: &str) {
        self.change(table, key, |c| c.marked = true);
    }

    /// Wait until everything changed before this call is on disk (or its commit
    /// failed and was reported).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.flushes.push(tx);
        }
        self.wake.notify_one();
        let _ = rx.await;
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Put back what a failed commit held, unless bytes were handed over for it since
    /// (a mark made since keeps the failed value to fall back on).
    fn put_back(&self, failed: Vec<(Table, String, Option<Vec<u8>>)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (table, key, value) in failed {
            let change = pending.changes.entry((table, key)).or_default();
            if change.value.is_none() {
                change.value = Some(value);
            }
        }
    }

    /// What each change comes to, asking the sources about marked records.
    fn resolve(
        &self,
        changes: HashMap<(Table, String), Change>,
    ) -> Vec<(Table, String, Option<Vec<u8>>)> {
        let sources: HashMap<Table, Arc<dyn Source>> = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(t, s)| Some((*t, s.upgrade()?)))
            .collect();
        let mut out = Vec::with_capacity(changes.len());
        for ((table, key), change) in changes {
            let snapshot = match (change.marked, sources.get(&table)) {
                (true, Some(source)) => source.snapshot(&key),
                _ => Snapshot::Keep,
            };
            let value = match snapshot {
                Snapshot::Write(bytes) => Some(Some(bytes)),
                Snapshot::Delete => Some(None),
                Snapshot::Keep => change.value,
            };
            if let Some(value) = value {
                out.push((table, key, value));
            }
        }
        out
    }
}

async fn writer(journal: Arc<Journal>, file: Arc<SessionFile>, metrics: Arc<Metrics>) {
    loop {
        journal.wake.notified().await;
        tokio::time::sleep(BATCH_WINDOW).await;
        let Pending { changes, flushes } = journal.take();
        let batch = journal.resolve(changes);
        let mut failed = false;
        if !batch.is_empty() {
            let f = file.clone();
            let result =
                tokio::task::spawn_blocking(move || f.commit(&batch).map_err(|e| (e, batch))).await;
            match result {
                Ok(Ok(())) => {
                    metrics
                        .session_store_commits
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err((e, batch))) => {
                    metrics.session_store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(file = %file.path().display(), error = %e, "could not save sessions; trying again");
                    journal.put_back(batch);
                    failed = true;
                }
                Err(e) => {
                    metrics.session_store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "session writer failed");
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
        if failed {
            tokio::time::sleep(RETRY_AFTER).await;
            journal.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Held(Mutex<HashMap<String, Snapshot>>);

    impl Source for Held {
        fn snapshot(&self, key: &str) -> Snapshot {
            self.0
                .lock()
                .unwrap()
                .remove(key)
                .unwrap_or(Snapshot::Delete)
        }
    }

    fn sealer(n: u8) -> RecordSealer {
        RecordSealer::derive(&[n; 32])
    }

    fn read(file: &SessionFile, table: Table) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<_> = file
            .load(table)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.unwrap()))
            .collect();
        rows.sort();
        rows
    }

    #[tokio::test]
    async fn writes_marks_and_deletes_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        let file = Arc::new(SessionFile::open(&path, sealer(1)).unwrap());
        let journal = Journal::start(file.clone(), Arc::new(Metrics::default()));
        let held: Arc<Held> = Arc::new(Held(Mutex::new(HashMap::new())));
        let weak: Weak<dyn Source> = Arc::downgrade(&(held.clone() as Arc<dyn Source>));
        journal.set_source(Table::Sessions, weak);
        journal.write(Table::Sessions, "a", b"parked".to_vec());
        journal.write(Table::Sessions, "b", b"gone soon".to_vec());
        journal.forget(Table::Sessions, "b");
        journal.write(Table::Retained, "a", b"retained".to_vec());
        // A mark after a write: the owner's snapshot wins...
        journal.write(Table::Sessions, "c", b"old".to_vec());
        held.0
            .lock()
            .unwrap()
            .insert("c".into(), Snapshot::Write(b"new".to_vec()));
        journal.mark(Table::Sessions, "c");
        // ...unless it says Keep: then what was handed over is written.
        journal.write(Table::Sessions, "d", b"handed over".to_vec());
        held.0.lock().unwrap().insert("d".into(), Snapshot::Keep);
        journal.mark(Table::Sessions, "d");
        journal.flush().await;
        assert_eq!(
            read(&file, Table::Sessions),
            vec![
                ("a".to_string(), b"parked".to_vec()),
                ("c".to_string(), b"new".to_vec()),
                ("d".to_string(), b"handed over".to_vec()),
            ]
        );
        assert_eq!(
            read(&file, Table::Retained),
            vec![("a".to_string(), b"retained".to_vec())]
        );
    }

    #[test]
    fn a_record_sealed_under_another_key_or_moved_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        let file = SessionFile::open(&path, sealer(1)).unwrap();
        file.commit(&[(Table::Sessions, "a".into(), Some(b"x".to_vec()))])
            .unwrap();
        drop(file);
        let other = SessionFile::open(&path, sealer(2)).unwrap();
        let rows = other.load(Table::Sessions).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].1.is_err(), "sealed under another key");
        drop(other);
        // The same bytes under another key: refused too.
        let file = SessionFile::open(&path, sealer(1)).unwrap();
        let sealed = RecordSealer::derive(&[1; 32]).seal(Table::Sessions.name(), "a", b"x");
        {
            let tx = file.db.begin_write().unwrap();
            tx.open_table(Table::Sessions.def())
                .unwrap()
                .insert("b", sealed.as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let rows = file.load(Table::Sessions).unwrap();
        let b = rows.iter().find(|r| r.0 == "b").unwrap();
        assert!(b.1.is_err(), "moved to another key");
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let e = SessionFile::open(&path, sealer(1)).unwrap_err().to_string();
        assert!(e.contains("sessions.redb"), "{e}");
        assert!(e.contains("move it aside"), "{e}");
    }
}
