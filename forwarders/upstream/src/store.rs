//! The outbox on disk: a redb file of sealed entries keyed by a sequence number, and
//! the dead letters beside them.
//!
//! Synchronous, like redb: the writer task runs it on the blocking pool, one commit at
//! a time; reads (the link, the admin commands) take their own read transactions.
//!
//! Every stored value is sealed: a MAC, under a key derived from the audit key (which
//! lives outside the data dir), over the table, the sequence number and the bytes. An
//! entry altered, moved or planted on disk is never forwarded: it goes to the dead
//! letters as corrupt. Sequence numbers are never reused (the high-water mark is
//! stored), so an old sealed value put back cannot pass for a new one either.

use crate::entry::Entry;
use hmac::{Hmac, KeyInit, Mac};
use portcullis_core::storage::contain;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sha2::Sha256;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";
const TAG_LEN: usize = 16;
/// Domain separation: this key seals outbox entries and nothing else.
const LABEL: &[u8] = b"portcullis outbox MAC v1";
/// Bytes an entry costs beyond its value (its key), as the byte bound counts them.
pub const KEY_BYTES: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("outbox {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("outbox storage: {0}")]
    Storage(String),
    #[error("outbox storage failed on a damaged page: {0}")]
    Panicked(String),
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// Seals and opens stored values.
#[derive(Clone)]
pub struct Sealer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

#[derive(Debug, Clone, Copy)]
enum Table {
    Outbox = 1,
    Dead = 2,
}

impl Sealer {
    /// The outbox key, derived from a root key kept outside the data dir.
    pub fn derive(root: &[u8; 32]) -> Sealer {
        let mut mac = Hmac::<Sha256>::new_from_slice(root).expect("HMAC takes any key");
        mac.update(LABEL);
        let key = mac.finalize().into_bytes();
        Sealer {
            mac: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key"),
        }
    }

    fn tag(&self, table: Table, seq: u64, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(&[table as u8]);
        mac.update(&seq.to_be_bytes());
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    fn seal(&self, table: Table, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(TAG_LEN + body.len());
        out.extend_from_slice(&self.tag(table, seq, body));
        out.extend_from_slice(body);
        out
    }

    fn open<'a>(&self, table: Table, seq: u64, value: &'a [u8]) -> Result<&'a [u8], String> {
        let (tag, body) = value
            .split_at_checked(TAG_LEN)
            .ok_or_else(|| format!("{} bytes, shorter than a sealed value", value.len()))?;
        if bool::from(self.tag(table, seq, body).ct_eq(tag)) {
            Ok(body)
        } else {
            Err("MAC does not match (altered, moved, or sealed under another key)".into())
        }
    }

    /// The stored form of an entry at `seq`.
    pub fn seal_entry(&self, seq: u64, entry: &Entry) -> Vec<u8> {
        self.seal(Table::Outbox, seq, &entry.encode())
    }
}

/// A value read back: the entry, or why it cannot be trusted or read.
#[derive(Debug, Clone)]
pub enum Stored {
    Entry(Entry),
    Corrupt { raw: Vec<u8>, reason: String },
}

impl Stored {
    fn open(sealer: &Sealer, table: Table, seq: u64, value: &[u8]) -> Stored {
        match sealer.open(table, seq, value) {
            Err(reason) => Stored::Corrupt {
                raw: value.to_vec(),
                reason,
            },
            Ok(body) => match Entry::decode(body) {
                Ok(e) => Stored::Entry(e),
                Err(e) => Stored::Corrupt {
                    raw: body.to_vec(),
                    reason: e.to_string(),
                },
            },
        }
    }
}

/// What the outbox holds when it is opened.
#[derive(Debug, Default)]
pub struct Loaded {
    pub next_seq: u64,
    pub depth: u64,
    pub bytes: u64,
    /// QoS 0 entries, oldest first, with their size: what `drop-oldest-qos0` drops.
    pub qos0: VecDeque<(u64, u64)>,
    pub oldest_ms: Option<u64>,
    pub dead: u64,
}

/// Why a message went to the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadNote {
    pub reason: String,
    pub attempts: u32,
    pub dead_ms: u64,
}

/// A dead letter as `outbox list` and `outbox show` see it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: u64,
    pub note: DeadNote,
    pub stored: Stored,
}

/// One commit's worth of changes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Sealed values at new sequence numbers (`Sealer::seal_entry`).
    pub append: Vec<(u64, Vec<u8>)>,
    /// Entries delivered (or dropped): gone.
    pub remove: Vec<u64>,
    /// Entries moved to the dead letters.
    pub dead: Vec<(u64, DeadNote)>,
    /// Dead letters put back at the end of the outbox, at new sequence numbers.
    pub retry: Vec<(u64, u64)>,
    /// Dead letters removed for good (`None`: all of them).
    pub purge: Option<Vec<u64>>,
    /// The next sequence number after this batch.
    pub next_seq: u64,
    /// Wait for the disk (fsync) before returning.
    pub durable: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.append.is_empty()
            && self.remove.is_empty()
            && self.dead.is_empty()
            && self.retry.is_empty()
            && self.purge.is_none()
    }
}

/// What a commit changed, for the counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Entries removed (and their bytes) that were there.
    pub removed: u64,
    pub removed_bytes: u64,
    /// Dead letters added, put back, purged.
    pub dead: u64,
    pub retried: u64,
    pub retried_bytes: u64,
    pub purged: u64,
}

pub struct Store {
    db: Database,
    sealer: Sealer,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

fn encode_dead(note: &DeadNote, body: &[u8]) -> Vec<u8> {
    let reason = &note.reason.as_bytes()[..note.reason.len().min(1024)];
    let mut out = Vec::with_capacity(2 + reason.len() + 12 + body.len());
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(&note.attempts.to_be_bytes());
    out.extend_from_slice(&note.dead_ms.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn decode_dead(bytes: &[u8]) -> Option<(DeadNote, &[u8])> {
    let (len, rest) = bytes.split_at_checked(2)?;
    let (reason, rest) =
        rest.split_at_checked(usize::from(u16::from_be_bytes([len[0], len[1]])))?;
    let (attempts, rest) = rest.split_at_checked(4)?;
    let (dead_ms, body) = rest.split_at_checked(8)?;
    Some((
        DeadNote {
            reason: String::from_utf8_lossy(reason).into_owned(),
            attempts: u32::from_be_bytes(attempts.try_into().ok()?),
            dead_ms: u64::from_be_bytes(dead_ms.try_into().ok()?),
        },
        body,
    ))
}

impl Store {
    /// Open (or create) the outbox at `path`, and read what it holds.
    pub fn open(path: &Path, sealer: Sealer) -> Result<(Store, Loaded), StoreError> {
        let display = path.display().to_string();
        let open_err = |reason: String| StoreError::Open {
            path: display.clone(),
            reason,
        };
        let db = contain(
            || {
                Database::create(path).map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                        "already open by another process (is a gateway running on this data dir?)"
                            .into(),
                    ),
                    other => open_err(format!(
                        "{other} (move the file aside to start with an empty outbox; \
                         what it held is then not sent)"
                    )),
                })
            },
            |m| open_err(format!("damaged: {m}")),
        )?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        let store = Store {
            db,
            sealer,
            path: path.to_path_buf(),
        };
        let loaded = contain(|| store.load(), StoreError::Panicked)?;
        Ok((store, loaded))
    }

    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_write().map_err(storage)?;
        let mut loaded = Loaded::default();
        {
            let outbox = tx.open_table(OUTBOX).map_err(storage)?;
            let dead = tx.open_table(DEAD).map_err(storage)?;
            let meta = tx.open_table(META).map_err(storage)?;
            let mut high = meta
                .get(NEXT_SEQ)
                .map_err(storage)?
                .map_or(1, |v| v.value());
            for row in outbox.iter().map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let (seq, value) = (k.value(), v.value());
                let size = value.len() as u64 + KEY_BYTES;
                loaded.depth += 1;
                loaded.bytes += size;
                high = high.max(seq + 1);
                // The QoS and the time sit in the entry's header; a value that does not
                // open is read again, and dead-lettered, when it is next sent.
                if let Ok(body) = self.sealer.open(Table::Outbox, seq, value)
                    && let Ok(entry) = Entry::decode(body)
                {
                    if entry.message.qos as u8 == 0 {
                        loaded.qos0.push_back((seq, size));
                    }
                    if loaded.oldest_ms.is_none() {
                        loaded.oldest_ms = Some(entry.enqueued_ms);
                    }
                }
            }
            for row in dead.iter().map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                loaded.dead += 1;
                high = high.max(k.value() + 1);
            }
            loaded.next_seq = high;
        }
        tx.commit().map_err(storage)?;
        Ok(loaded)
    }

    /// Apply one batch in one transaction.
    pub fn commit(&self, batch: &Batch) -> Result<Committed, StoreError> {
        contain(|| self.commit_inner(batch), StoreError::Panicked)
    }

    fn commit_inner(&self, batch: &Batch) -> Result<Committed, StoreError> {
        let mut tx = self.db.begin_write().map_err(storage)?;
        tx.set_durability(if batch.durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(storage)?;
        let mut done = Committed::default();
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(storage)?;
            let mut dead = tx.open_table(DEAD).map_err(storage)?;
            let mut meta = tx.open_table(META).map_err(storage)?;
            for (seq, value) in &batch.append {
                outbox.insert(*seq, value.as_slice()).map_err(storage)?;
            }
            for seq in &batch.remove {
                if let Some(v) = outbox.remove(*seq).map_err(storage)? {
                    done.removed += 1;
                    done.removed_bytes += v.value().len() as u64 + KEY_BYTES;
                }
            }
            for (seq, note) in &batch.dead {
                let Some(value) = outbox.remove(*seq).map_err(storage)? else {
                    continue;
                };
                let value = value.value().to_vec();
                done.removed += 1;
                done.removed_bytes += value.len() as u64 + KEY_BYTES;
                // The entry's bytes as they were (sealed or not, readable or not),
                // under a dead-letter seal of their own.
                let body = match self.sealer.open(Table::Outbox, *seq, &value) {
                    Ok(body) => body.to_vec(),
                    Err(_) => value,
                };
                let sealed = self
                    .sealer
                    .seal(Table::Dead, *seq, &encode_dead(note, &body));
                dead.insert(*seq, sealed.as_slice()).map_err(storage)?;
                done.dead += 1;
            }
            for (old, new) in &batch.retry {
                let Some(value) = dead.remove(*old).map_err(storage)? else {
                    continue;
                };
                let value = value.value().to_vec();
                let Ok(letter) = self.sealer.open(Table::Dead, *old, &value) else {
                    continue;
                };
                let Some((_, body)) = decode_dead(letter) else {
                    continue;
                };
                let sealed = self.sealer.seal(Table::Outbox, *new, body);
                done.retried += 1;
                done.retried_bytes += sealed.len() as u64 + KEY_BYTES;
                outbox.insert(*new, sealed.as_slice()).map_err(storage)?;
            }
            match &batch.purge {
                None => {}
                Some(seqs) if seqs.is_empty() => {
                    done.purged = dead.len().map_err(storage)?;
                    dead.retain(|_, _| false).map_err(storage)?;
                }
                Some(seqs) => {
                    for seq in seqs {
                        if dead.remove(*seq).map_err(storage)?.is_some() {
                            done.purged += 1;
                        }
                    }
                }
            }
            meta.insert(NEXT_SEQ, batch.next_seq).map_err(storage)?;
        }
        tx.commit().map_err(storage)?;
        Ok(done)
    }

    /// Up to `max` rows of `table` from `from` on, in order, each made by `row`.
    fn rows<T>(
        &self,
        table: TableDefinition<u64, &[u8]>,
        from: u64,
        max: usize,
        row: impl Fn(u64, &[u8]) -> T,
    ) -> Result<Vec<T>, StoreError> {
        contain(
            || {
                let tx = self.db.begin_read().map_err(storage)?;
                let table = match tx.open_table(table) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(storage(e)),
                };
                let mut out = Vec::new();
                for r in table.range(from..).map_err(storage)?.take(max) {
                    let (k, v) = r.map_err(storage)?;
                    out.push(row(k.value(), v.value()));
                }
                Ok(out)
            },
            StoreError::Panicked,
        )
    }

    /// Up to `max` entries from `from` on, in order, with their stored size.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Stored, u64)>, StoreError> {
        self.rows(OUTBOX, from, max, |seq, value| {
            (
                seq,
                Stored::open(&self.sealer, Table::Outbox, seq, value),
                value.len() as u64 + KEY_BYTES,
            )
        })
    }

    /// Entries held now.
    pub fn depth(&self) -> Result<u64, StoreError> {
        contain(
            || {
                let tx = self.db.begin_read().map_err(storage)?;
                match tx.open_table(OUTBOX) {
                    Ok(t) => t.len().map_err(storage),
                    Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                    Err(e) => Err(storage(e)),
                }
            },
            StoreError::Panicked,
        )
    }

    /// The enqueue time of the oldest entry, if any.
    pub fn oldest_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.read(0, 1)?.into_iter().find_map(|(_, s, _)| match s {
            Stored::Entry(e) => Some(e.enqueued_ms),
            Stored::Corrupt { .. } => None,
        }))
    }

    /// The sequence numbers of every dead letter (their keys only: nothing opened).
    pub fn dead_seqs(&self) -> Result<Vec<u64>, StoreError> {
        self.rows(DEAD, 0, usize::MAX, |seq, _| seq)
    }

    /// Dead letters from `from` on, up to `max`, in order.
    pub fn dead_letters(&self, from: u64, max: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.rows(DEAD, from, max, |seq, value| self.open_dead(seq, value))
    }

    fn open_dead(&self, seq: u64, value: &[u8]) -> DeadLetter {
        let unreadable = |reason: String| DeadLetter {
            seq,
            note: DeadNote {
                reason: reason.clone(),
                attempts: 0,
                dead_ms: 0,
            },
            stored: Stored::Corrupt {
                raw: value.to_vec(),
                reason,
            },
        };
        let Ok(letter) = self.sealer.open(Table::Dead, seq, value) else {
            return unreadable("dead letter: MAC does not match".into());
        };
        let Some((note, body)) = decode_dead(letter) else {
            return unreadable("dead letter: truncated".into());
        };
        let stored = match Entry::decode(body) {
            Ok(e) => Stored::Entry(e),
            Err(e) => Stored::Corrupt {
                raw: body.to_vec(),
                reason: e.to_string(),
            },
        };
        DeadLetter { seq, note, stored }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use portcullis_core::message::{Message, QoS};
    use portcullis_core::topic::TopicName;

    fn entry(n: u64, qos: QoS) -> Entry {
        Entry {
            message: Message {
                topic: TopicName::parse_unlimited("devices/d/telemetry").unwrap(),
                payload: Bytes::from(n.to_string()),
                qos,
                retain: false,
                properties: None,
            },
            enqueued_ms: 1000 + n,
            expires_ms: u64::MAX,
        }
    }

    fn append(store: &Store, seqs: std::ops::Range<u64>, qos: QoS) {
        let batch = Batch {
            append: seqs
                .clone()
                .map(|s| (s, store.sealer().seal_entry(s, &entry(s, qos))))
                .collect(),
            next_seq: seqs.end,
            durable: true,
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
    }

    fn payloads(store: &Store) -> Vec<String> {
        store
            .read(0, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, s, _)| match s {
                Stored::Entry(e) => String::from_utf8(e.message.payload.to_vec()).unwrap(),
                Stored::Corrupt { reason, .. } => format!("corrupt: {reason}"),
            })
            .collect()
    }

    #[test]
    fn entries_survive_reopening_in_order_and_removed_ones_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        {
            let (store, loaded) = Store::open(&path, sealer.clone()).unwrap();
            assert_eq!((loaded.depth, loaded.next_seq), (0, 1));
            append(&store, 1..6, QoS::AtLeastOnce);
            append(&store, 6..8, QoS::AtMostOnce);
            let done = store
                .commit(&Batch {
                    remove: vec![2, 4, 99],
                    next_seq: 8,
                    ..Batch::default()
                })
                .unwrap();
            assert_eq!(done.removed, 2);
        }
        let (store, loaded) = Store::open(&path, sealer).unwrap();
        assert_eq!(payloads(&store), ["1", "3", "5", "6", "7"]);
        assert_eq!(loaded.depth, 5);
        assert_eq!(loaded.next_seq, 8);
        assert_eq!(loaded.oldest_ms, Some(1001));
        assert_eq!(
            loaded.qos0.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [6, 7]
        );
        let sizes: u64 = store.read(0, 100).unwrap().iter().map(|r| r.2).sum();
        assert_eq!(loaded.bytes, sizes);
    }

    #[test]
    fn sequence_numbers_are_not_reused_after_everything_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        {
            let (store, _) = Store::open(&path, sealer.clone()).unwrap();
            append(&store, 1..4, QoS::AtLeastOnce);
            store
                .commit(&Batch {
                    remove: vec![1, 2, 3],
                    next_seq: 4,
                    durable: true,
                    ..Batch::default()
                })
                .unwrap();
        }
        let (_, loaded) = Store::open(&path, sealer).unwrap();
        assert_eq!((loaded.depth, loaded.next_seq), (0, 4));
    }

    #[test]
    fn a_value_sealed_under_another_key_or_moved_is_read_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let (store, _) = Store::open(&path, Sealer::derive(&[7; 32])).unwrap();
        let forged = Sealer::derive(&[8; 32]).seal_entry(1, &entry(1, QoS::AtLeastOnce));
        let moved = store.sealer().seal_entry(9, &entry(2, QoS::AtLeastOnce));
        store
            .commit(&Batch {
                append: vec![(1, forged), (2, moved)],
                next_seq: 3,
                durable: true,
                ..Batch::default()
            })
            .unwrap();
        let read = payloads(&store);
        assert!(
            read.iter().all(|p| p.starts_with("corrupt: MAC")),
            "{read:?}"
        );
    }

    #[test]
    fn dead_letters_keep_their_reason_and_can_be_retried_or_purged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let (store, _) = Store::open(&path, Sealer::derive(&[7; 32])).unwrap();
        append(&store, 1..4, QoS::AtLeastOnce);
        let note = DeadNote {
            reason: "refused by the broker: not authorized (0x87)".into(),
            attempts: 1,
            dead_ms: 5,
        };
        let done = store
            .commit(&Batch {
                dead: vec![(1, note.clone()), (2, note.clone())],
                next_seq: 4,
                ..Batch::default()
            })
            .unwrap();
        assert_eq!((done.dead, done.removed), (2, 2));
        assert_eq!(payloads(&store), ["3"]);
        let dead = store.dead_letters(0, 10).unwrap();
        assert_eq!(dead.len(), 2);
        assert_eq!(dead[0].note, note);
        assert!(matches!(&dead[0].stored, Stored::Entry(e) if e.message.payload == "1"));
        // Retried: back at the end, under a new number.
        store
            .commit(&Batch {
                retry: vec![(1, 4)],
                next_seq: 5,
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(payloads(&store), ["3", "1"]);
        store
            .commit(&Batch {
                purge: Some(Vec::new()),
                next_seq: 5,
                ..Batch::default()
            })
            .unwrap();
        assert!(store.dead_letters(0, 10).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        {
            let (store, _) = Store::open(&path, Sealer::derive(&[7; 32])).unwrap();
            append(&store, 1..200, QoS::AtLeastOnce);
        }
        let clean = std::fs::read(&path).unwrap();
        // Flip bytes across the file, one position at a time: opening and reading
        // either works or says what is wrong.
        let mut step = clean.len() / 97;
        step = step.max(1);
        for at in (0..clean.len()).step_by(step) {
            let mut bytes = clean.clone();
            bytes[at] ^= 0xff;
            std::fs::write(&path, &bytes).unwrap();
            if let Ok((store, _)) = Store::open(&path, Sealer::derive(&[7; 32])) {
                let _ = store.read(0, 1000);
                let _ = store.dead_letters(0, 1000);
            }
        }
        std::fs::write(&path, b"not a database").unwrap();
        let err = Store::open(&path, Sealer::derive(&[7; 32])).unwrap_err();
        assert!(err.to_string().contains("outbox.redb"), "{err}");
    }
}
