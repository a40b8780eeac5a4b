//! The outbox on disk: a redb file of sealed rounds (the entries one commit appended,
//! one row for all of them) keyed by the sequence number of their first entry, and the
//! dead letters beside them, one row each.
//!
//! Synchronous, like redb: the writer task runs it on the blocking pool, one commit at
//! a time; reads (the link, the admin commands) take their own read transactions.
//!
//! One row per round, not per entry: a commit writes one value and, once the broker has
//! acknowledged every entry in it, deletes one, instead of a B-tree insert and delete
//! per message (half of the gateway's CPU in upstream mode went there). Which entries
//! of a round are still to send is kept in memory (the index). A round partly delivered
//! when the gateway stops is rewritten with what is left at a clean shutdown; after a
//! crash it is sent whole again (duplicates, as QoS 1 allows). A round losing entries to
//! the dead letters or to `drop-oldest-qos0` is rewritten in the same commit, so what
//! the byte bound frees is freed on disk.
//!
//! Every stored value is sealed: a MAC, under a key derived from the audit key (which
//! lives outside the data dir), over the table, the key and the bytes. A round altered,
//! moved or planted on disk is never forwarded: it goes to the dead letters as corrupt.
//! Sequence numbers are never reused (the high-water mark is stored), so an old sealed
//! value put back cannot pass for a new one either.

use crate::entry::Entry;
use hmac::{Hmac, KeyInit, Mac};
use portcullis_core::storage::contain;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use subtle::ConstantTimeEq;

/// Rounds: sealed rows of entries, keyed by their first entry's sequence number.
const ROUNDS: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_rounds");
/// The form before rounds, one sealed entry per row: moved into rounds when opened.
const LEGACY: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";
const TAG_LEN: usize = 16;
/// Domain separation: this key seals outbox values and nothing else.
const LABEL: &[u8] = b"portcullis outbox MAC v1";
/// Bytes an entry costs beyond its encoded form (its sequence number and length in its
/// round), as the byte bound counts them.
pub const ENTRY_OVERHEAD: u64 = 12;
/// Entries and bytes per round at most when entries are moved into rounds (from the
/// per-entry form, or dead letters put back).
const MOVE_ROUND: usize = 4096;
const MOVE_ROUND_BYTES: usize = 16 << 20;
/// Sequence numbers stay below this: a larger one on disk is damage (or tampering).
const MAX_SEQ: u64 = 1 << 62;

/// Entries cut into rounds of at most `MOVE_ROUND` entries and `MOVE_ROUND_BYTES`.
fn rounds_of(entries: &[(u64, Vec<u8>)]) -> Vec<&[(u64, Vec<u8>)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, b)) in entries.iter().enumerate() {
        if i > start && (i - start >= MOVE_ROUND || bytes + b.len() > MOVE_ROUND_BYTES) {
            out.push(&entries[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += b.len();
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

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
    /// One entry per row (the form before rounds).
    Legacy = 1,
    Dead = 2,
    Round = 3,
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

    /// The entries of the round stored at `key`, or why they cannot be trusted or read.
    fn open_round<'a>(&self, key: u64, value: &'a [u8]) -> Result<Vec<(u64, &'a [u8])>, String> {
        let body = self.open(Table::Round, key, value)?;
        decode_round(key, body).map_err(str::to_string)
    }
}

/// A round's body: the number of entries, then each one's sequence number, length and
/// bytes.
fn encode_round<'a>(entries: impl ExactSizeIterator<Item = (u64, &'a [u8])> + Clone) -> Vec<u8> {
    let len = 4 + entries.clone().map(|(_, b)| 12 + b.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (seq, body) in entries {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    out
}

fn decode_round(key: u64, body: &[u8]) -> Result<Vec<(u64, &[u8])>, &'static str> {
    let (count, mut rest) = body.split_at_checked(4).ok_or("round: truncated")?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let mut out = Vec::with_capacity(count.min(rest.len() / 12));
    let mut floor = key;
    for _ in 0..count {
        let (head, r) = rest.split_at_checked(12).ok_or("round: truncated entry")?;
        let seq = u64::from_be_bytes([
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
        ]);
        let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let (bytes, r) = r.split_at_checked(len).ok_or("round: truncated entry")?;
        if seq < floor {
            return Err("round: entries out of order");
        }
        floor = seq.saturating_add(1);
        out.push((seq, bytes));
        rest = r;
    }
    if !rest.is_empty() {
        return Err("round: bytes after its last entry");
    }
    Ok(out)
}

/// When an encoded entry was taken, read from its header (without decoding it).
fn enqueued_of(bytes: &[u8]) -> Option<u64> {
    Entry::decode(bytes).ok().map(|e| e.enqueued_ms)
}

/// A value read back: the entry, or why it cannot be trusted or read.
#[derive(Debug, Clone)]
pub enum Stored {
    Entry(Entry),
    Corrupt { raw: Vec<u8>, reason: String },
}

impl Stored {
    fn decode(bytes: &[u8]) -> Stored {
        match Entry::decode(bytes) {
            Ok(e) => Stored::Entry(e),
            Err(e) => Stored::Corrupt {
                raw: bytes.to_vec(),
                reason: e.to_string(),
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
    /// Encoded entries (`Entry::encode`) at new sequence numbers, in order: one round.
    pub append: Vec<(u64, Vec<u8>)>,
    /// Entries delivered (or expired): gone. Their round goes when all of it has.
    pub remove: Vec<u64>,
    /// Entries dropped to make room: gone, and their round rewritten without them.
    pub drop: Vec<u64>,
    /// Entries moved to the dead letters.
    pub dead: Vec<(u64, DeadNote)>,
    /// Dead letters put back at the end of the outbox, at new sequence numbers.
    pub retry: Vec<(u64, u64)>,
    /// Dead letters removed for good (`None`: all of them).
    pub purge: Option<Vec<u64>>,
    /// Rewrite every partly delivered round with what is left of it (at shutdown, so
    /// that a restart does not send the delivered part again).
    pub compact: bool,
    /// The next sequence number after this batch.
    pub next_seq: u64,
    /// Wait for the disk (fsync) before returning.
    pub durable: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.append.is_empty()
            && self.remove.is_empty()
            && self.drop.is_empty()
            && self.dead.is_empty()
            && self.retry.is_empty()
            && self.purge.is_none()
            && !self.compact
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

/// A round in memory: its entries, and which are still to send.
#[derive(Debug)]
struct Round {
    seqs: Vec<u64>,
    /// Each entry's size as the byte bound counts it.
    sizes: Vec<u32>,
    live: Vec<bool>,
    left: usize,
    /// Bytes of its entries as written, and of those still to send.
    stored: u64,
    live_bytes: u64,
    /// When its first entry was taken (None if it does not decode).
    oldest_ms: Option<u64>,
    /// The value does not open: it stands as one entry, at its key, of its raw bytes.
    corrupt: bool,
}

impl Round {
    fn new<'a>(entries: impl Iterator<Item = (u64, &'a [u8])>) -> Round {
        let mut round = Round {
            seqs: Vec::new(),
            sizes: Vec::new(),
            live: Vec::new(),
            left: 0,
            stored: 0,
            live_bytes: 0,
            oldest_ms: None,
            corrupt: false,
        };
        for (seq, bytes) in entries {
            if round.seqs.is_empty() {
                round.oldest_ms = enqueued_of(bytes);
            }
            let size = u32::try_from(entry_size(bytes)).unwrap_or(u32::MAX);
            round.seqs.push(seq);
            round.sizes.push(size);
            round.live.push(true);
            round.left += 1;
            round.stored += u64::from(size);
        }
        round.live_bytes = round.stored;
        round
    }

    fn corrupt(key: u64, raw_len: usize) -> Round {
        let size = u32::try_from(raw_len).unwrap_or(u32::MAX);
        Round {
            seqs: vec![key],
            sizes: vec![size],
            live: vec![true],
            left: 1,
            stored: u64::from(size),
            live_bytes: u64::from(size),
            oldest_ms: None,
            corrupt: true,
        }
    }

    /// Half of it or more is gone: worth writing again without what went.
    fn mostly_gone(&self) -> bool {
        self.live_bytes * 2 <= self.stored
    }

    /// Mark the entry at `i` gone; its size if it was still there.
    fn take(&mut self, i: usize) -> Option<u64> {
        if !std::mem::replace(&mut self.live[i], false) {
            return None;
        }
        self.left -= 1;
        let size = u64::from(self.sizes[i]);
        self.live_bytes -= size;
        Some(size)
    }
}

/// An entry's size as the byte bound counts it.
pub fn entry_size(encoded: &[u8]) -> u64 {
    encoded.len() as u64 + ENTRY_OVERHEAD
}

type Index = BTreeMap<u64, Round>;

/// A round as a commit read it: its entries, or its raw bytes if it does not open.
enum Opened {
    Missing,
    Entries(Vec<(u64, Vec<u8>)>),
    Raw(Vec<u8>),
}

/// The round holding `seq` (its key) and the entry's place in it.
fn locate(index: &Index, seq: u64) -> Option<(u64, usize)> {
    let (key, round) = index.range(..=seq).next_back()?;
    round.seqs.binary_search(&seq).ok().map(|i| (*key, i))
}

pub struct Store {
    db: Database,
    sealer: Sealer,
    path: PathBuf,
    /// Every round on disk, by key, with what is left of it to send.
    index: Mutex<Index>,
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

type RoundTable<'t> = redb::Table<'t, u64, &'static [u8]>;

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
            index: Mutex::new(Index::new()),
        };
        let loaded = contain(|| store.load(), StoreError::Panicked)?;
        Ok((store, loaded))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_write().map_err(storage)?;
        let mut loaded = Loaded::default();
        let mut index = self.index();
        {
            let mut rounds = tx.open_table(ROUNDS).map_err(storage)?;
            let mut dead = tx.open_table(DEAD).map_err(storage)?;
            let meta = tx.open_table(META).map_err(storage)?;
            let mut high = meta
                .get(NEXT_SEQ)
                .map_err(storage)?
                .map_or(1, |v| v.value());
            self.migrate(&tx, &mut rounds)?;
            // Rows stored inside the numbers of the round before them: planted or
            // damaged (this writer never makes one).
            let mut overlapping = Vec::new();
            let mut last: Option<u64> = None;
            for row in rounds.iter().map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let (key, value) = (k.value(), v.value());
                if last.is_some_and(|l| key <= l) {
                    overlapping.push((key, value.to_vec()));
                    continue;
                }
                high = high.max(key.saturating_add(1));
                let round = match self.sealer.open_round(key, value) {
                    // Read again, and dead-lettered, when it is next sent.
                    Err(_) => Round::corrupt(key, value.len()),
                    Ok(entries) => {
                        for &(seq, bytes) in &entries {
                            high = high.max(seq.saturating_add(1));
                            if let Ok(entry) = Entry::decode(bytes)
                                && entry.message.qos as u8 == 0
                            {
                                loaded.qos0.push_back((seq, entry_size(bytes)));
                            }
                        }
                        Round::new(entries.into_iter())
                    }
                };
                loaded.depth += round.left as u64;
                loaded.bytes += round.sizes.iter().map(|s| u64::from(*s)).sum::<u64>();
                if loaded.oldest_ms.is_none() {
                    loaded.oldest_ms = round.oldest_ms;
                }
                last = round.seqs.last().copied();
                index.insert(key, round);
            }
            for row in dead.iter().map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                loaded.dead += 1;
                high = high.max(k.value().saturating_add(1));
            }
            if high > MAX_SEQ {
                return Err(StoreError::Open {
                    path: self.path.display().to_string(),
                    reason: format!(
                        "sequence number {high} is past any this gateway writes: the file \
                         is damaged or was altered (move it aside to start with an empty \
                         outbox; what it held is then not sent)"
                    ),
                });
            }
            // Overlapping rows go to the dead letters, as they were, at new numbers.
            for (key, raw) in overlapping {
                rounds.remove(key).map_err(storage)?;
                let note = DeadNote {
                    reason: format!(
                        "stored at {key}, inside the numbers of the round before it \
                         (planted or damaged)"
                    ),
                    attempts: 0,
                    dead_ms: portcullis_core::registry::now_unix_ms(),
                };
                let sealed = self
                    .sealer
                    .seal(Table::Dead, high, &encode_dead(&note, &raw));
                dead.insert(high, sealed.as_slice()).map_err(storage)?;
                loaded.dead += 1;
                high += 1;
            }
            loaded.next_seq = high;
        }
        tx.commit().map_err(storage)?;
        Ok(loaded)
    }

    /// Move entries of the per-entry form into rounds, in order (an entry that does not
    /// open stays a value of its own, to be dead-lettered as corrupt when sent).
    fn migrate(
        &self,
        tx: &redb::WriteTransaction,
        rounds: &mut RoundTable<'_>,
    ) -> Result<(), StoreError> {
        let mut run: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut run_bytes = 0;
        let flush = |run: &mut Vec<(u64, Vec<u8>)>, rounds: &mut RoundTable<'_>| {
            let Some(&(key, _)) = run.first() else {
                return Ok(());
            };
            let body = encode_round(run.iter().map(|(s, b)| (*s, b.as_slice())));
            let value = self.sealer.seal(Table::Round, key, &body);
            run.clear();
            rounds
                .insert(key, value.as_slice())
                .map(|_| ())
                .map_err(storage)
        };
        {
            let legacy = match tx.open_table(LEGACY) {
                Ok(t) => t,
                Err(e) => return Err(storage(e)),
            };
            if redb::ReadableTableMetadata::is_empty(&legacy).map_err(storage)? {
                drop(legacy);
                return tx.delete_table(LEGACY).map(|_| ()).map_err(storage);
            }
            for row in legacy.iter().map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let (seq, value) = (k.value(), v.value());
                match self.sealer.open(Table::Legacy, seq, value) {
                    Ok(body) => {
                        run_bytes += body.len();
                        run.push((seq, body.to_vec()));
                        if run.len() >= MOVE_ROUND || run_bytes >= MOVE_ROUND_BYTES {
                            flush(&mut run, rounds)?;
                            run_bytes = 0;
                        }
                    }
                    Err(_) => {
                        flush(&mut run, rounds)?;
                        run_bytes = 0;
                        rounds.insert(seq, value).map_err(storage)?;
                    }
                }
            }
            flush(&mut run, rounds)?;
        }
        tx.delete_table(LEGACY).map(|_| ()).map_err(storage)
    }

    /// Apply one batch in one transaction.
    pub fn commit(&self, batch: &Batch) -> Result<Committed, StoreError> {
        contain(|| self.commit_inner(batch), StoreError::Panicked)
    }

    fn commit_inner(&self, batch: &Batch) -> Result<Committed, StoreError> {
        let mut tx = self.db.begin_write().map_err(storage)?;
        tx.set_durability(if batch.durable || batch.compact {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(storage)?;
        let mut done = Committed::default();
        let mut index = self.index();
        {
            let mut rounds = tx.open_table(ROUNDS).map_err(storage)?;
            let mut dead = tx.open_table(DEAD).map_err(storage)?;
            let mut meta = tx.open_table(META).map_err(storage)?;
            // Rounds that lost entries, and those to write again without them.
            let mut touched = BTreeSet::new();
            let mut rewrite = BTreeSet::new();
            if let Some(&(key, _)) = batch.append.first() {
                let entries = batch.append.iter().map(|(s, b)| (*s, b.as_slice()));
                let value = self
                    .sealer
                    .seal(Table::Round, key, &encode_round(entries.clone()));
                rounds.insert(key, value.as_slice()).map_err(storage)?;
                index.insert(key, Round::new(entries));
            }
            for (seqs, dropped) in [(&batch.remove, false), (&batch.drop, true)] {
                for &seq in seqs {
                    let Some((key, i)) = locate(&index, seq) else {
                        continue;
                    };
                    let Some(round) = index.get_mut(&key) else {
                        continue;
                    };
                    let Some(size) = round.take(i) else {
                        continue;
                    };
                    done.removed += 1;
                    done.removed_bytes += size;
                    touched.insert(key);
                    // Room made for new messages is made on disk too, once half of the
                    // round has gone (written again each time, a round filling the
                    // bound would cost its size per commit).
                    if dropped && round.mostly_gone() {
                        rewrite.insert(key);
                    }
                }
            }
            // Each round losing entries to the dead letters is opened once: its
            // entries, or its raw bytes if it does not open.
            let mut opened: HashMap<u64, Opened> = HashMap::new();
            for (seq, note) in &batch.dead {
                let Some((key, i)) = locate(&index, *seq) else {
                    continue;
                };
                if !index.get(&key).is_some_and(|r| r.live[i]) {
                    continue;
                }
                if let std::collections::hash_map::Entry::Vacant(slot) = opened.entry(key) {
                    slot.insert(match rounds.get(key).map_err(storage)? {
                        None => Opened::Missing,
                        Some(value) => {
                            let value = value.value();
                            match self.sealer.open_round(key, value) {
                                Ok(entries) => Opened::Entries(
                                    entries.into_iter().map(|(s, b)| (s, b.to_vec())).collect(),
                                ),
                                Err(_) => Opened::Raw(value.to_vec()),
                            }
                        }
                    });
                }
                let Some(round) = index.get_mut(&key) else {
                    continue;
                };
                // The entry's bytes as they were (readable or not), under a dead-letter
                // seal of their own. A round that does not open goes whole, its raw
                // bytes once, with the first of its entries still here.
                let victims: Vec<(u64, Vec<u8>)> = match opened.get_mut(&key) {
                    Some(Opened::Entries(entries)) => {
                        let body = entries
                            .binary_search_by_key(seq, |e| e.0)
                            .map_or_else(|_| Vec::new(), |j| entries[j].1.clone());
                        vec![(*seq, body)]
                    }
                    Some(Opened::Raw(raw)) => round
                        .seqs
                        .iter()
                        .zip(&round.live)
                        .filter(|(_, live)| **live)
                        .enumerate()
                        .map(|(n, (s, _))| {
                            (
                                *s,
                                if n == 0 {
                                    std::mem::take(raw)
                                } else {
                                    Vec::new()
                                },
                            )
                        })
                        .collect(),
                    _ => vec![(*seq, Vec::new())],
                };
                for (victim, body) in victims {
                    let Ok(j) = round.seqs.binary_search(&victim) else {
                        continue;
                    };
                    let Some(size) = round.take(j) else {
                        continue;
                    };
                    done.removed += 1;
                    done.removed_bytes += size;
                    let sealed = self
                        .sealer
                        .seal(Table::Dead, victim, &encode_dead(note, &body));
                    dead.insert(victim, sealed.as_slice()).map_err(storage)?;
                    done.dead += 1;
                }
                touched.insert(key);
                if round.mostly_gone() {
                    rewrite.insert(key);
                }
            }
            let mut retried = Vec::new();
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
                done.retried += 1;
                done.retried_bytes += entry_size(body);
                retried.push((*new, body.to_vec()));
            }
            for chunk in rounds_of(&retried) {
                let key = chunk[0].0;
                let entries = chunk.iter().map(|(s, b)| (*s, b.as_slice()));
                let value = self
                    .sealer
                    .seal(Table::Round, key, &encode_round(entries.clone()));
                rounds.insert(key, value.as_slice()).map_err(storage)?;
                index.insert(key, Round::new(entries));
            }
            match &batch.purge {
                None => {}
                Some(seqs) if seqs.is_empty() => {
                    done.purged = redb::ReadableTableMetadata::len(&dead).map_err(storage)?;
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
            if batch.compact {
                rewrite.extend(
                    index
                        .iter()
                        .filter(|(_, r)| r.left < r.seqs.len())
                        .map(|(k, _)| *k),
                );
            }
            // Rounds with nothing left go; those that lost entries to a drop or to the
            // dead letters (or, at shutdown, to the broker) are written again.
            for key in touched {
                if index.get(&key).is_none_or(|r| r.left > 0) {
                    continue;
                }
                rounds.remove(key).map_err(storage)?;
                index.remove(&key);
                rewrite.remove(&key);
            }
            for key in rewrite {
                self.rewrite(&mut rounds, &mut index, key)?;
            }
            meta.insert(NEXT_SEQ, batch.next_seq).map_err(storage)?;
        }
        tx.commit().map_err(storage)?;
        Ok(done)
    }

    /// Write the round at `key` again with its live entries only.
    fn rewrite(
        &self,
        rounds: &mut RoundTable<'_>,
        index: &mut Index,
        key: u64,
    ) -> Result<(), StoreError> {
        let Some(round) = index.get_mut(&key) else {
            return Ok(());
        };
        if round.corrupt {
            return Ok(());
        }
        let kept: Vec<(u64, Vec<u8>)> = {
            let Some(value) = rounds.get(key).map_err(storage)? else {
                return Ok(());
            };
            // Changed on disk since it was read: left as it is, to be dead-lettered.
            let Ok(entries) = self.sealer.open_round(key, value.value()) else {
                return Ok(());
            };
            entries
                .into_iter()
                .filter(|(s, _)| round.seqs.binary_search(s).is_ok_and(|i| round.live[i]))
                .map(|(s, b)| (s, b.to_vec()))
                .collect()
        };
        let entries = kept.iter().map(|(s, b)| (*s, b.as_slice()));
        let value = self
            .sealer
            .seal(Table::Round, key, &encode_round(entries.clone()));
        rounds.insert(key, value.as_slice()).map_err(storage)?;
        *round = Round::new(entries);
        Ok(())
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

    /// Up to `max` entries still to send from `from` on, in order, with their size.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Stored, u64)>, StoreError> {
        // Per round: its key, whether it opens, and the entries wanted with their size.
        type Wanted = (u64, bool, Vec<(u64, u64)>);
        contain(
            || {
                // Which entries, from the index, and the snapshot to read them from,
                // taken before the index is let go: a commit holds the index until it is
                // done, so none lands between the two (a round deleted meanwhile would
                // read as nothing left, and the link would skip what follows it).
                let mut plan: Vec<Wanted> = Vec::new();
                let tx = {
                    let index = self.index();
                    let start = index.range(..=from).next_back().map_or(from, |(k, _)| *k);
                    let mut n = 0;
                    for (key, round) in index.range(start..) {
                        if n >= max {
                            break;
                        }
                        let wanted: Vec<(u64, u64)> = round
                            .seqs
                            .iter()
                            .zip(&round.live)
                            .zip(&round.sizes)
                            .filter(|((s, live), _)| **live && **s >= from)
                            .take(max - n)
                            .map(|((s, _), size)| (*s, u64::from(*size)))
                            .collect();
                        n += wanted.len();
                        if !wanted.is_empty() {
                            plan.push((*key, round.corrupt, wanted));
                        }
                    }
                    self.db.begin_read().map_err(storage)?
                };
                let rounds = match tx.open_table(ROUNDS) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(storage(e)),
                };
                let mut out = Vec::new();
                for (key, corrupt, wanted) in plan {
                    let Some(value) = rounds.get(key).map_err(storage)? else {
                        continue;
                    };
                    let value = value.value();
                    let opened = if corrupt {
                        Err(
                            "MAC does not match (altered, moved, or sealed under another key)"
                                .to_string(),
                        )
                    } else {
                        self.sealer.open_round(key, value)
                    };
                    match opened {
                        Err(reason) => {
                            // The raw value once (it goes to the dead letters with the
                            // first), not once per entry.
                            for (n, (seq, size)) in wanted.into_iter().enumerate() {
                                let raw = if n == 0 { value.to_vec() } else { Vec::new() };
                                let reason = reason.clone();
                                out.push((seq, Stored::Corrupt { raw, reason }, size));
                            }
                        }
                        Ok(entries) => {
                            for (seq, size) in wanted {
                                if let Ok(i) = entries.binary_search_by_key(&seq, |e| e.0) {
                                    out.push((seq, Stored::decode(entries[i].1), size));
                                }
                            }
                        }
                    }
                }
                Ok(out)
            },
            StoreError::Panicked,
        )
    }

    /// Entries held now (still to send).
    pub fn depth(&self) -> Result<u64, StoreError> {
        Ok(self.index().values().map(|r| r.left as u64).sum())
    }

    /// The enqueue time of the oldest round still to send, if any.
    pub fn oldest_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .index()
            .values()
            .find(|r| r.left > 0)
            .and_then(|r| r.oldest_ms))
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
        DeadLetter {
            seq,
            note,
            stored: Stored::decode(body),
        }
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
            append: seqs.clone().map(|s| (s, entry(s, qos).encode())).collect(),
            next_seq: seqs.end,
            durable: true,
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
    }

    fn payloads(store: &Store) -> Vec<String> {
        store
            .read(0, 100_000)
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
            // While running, what was removed is not read again.
            assert_eq!(payloads(&store), ["1", "3", "5", "6", "7"]);
            // A clean stop writes the partly delivered round again.
            store
                .commit(&Batch {
                    compact: true,
                    next_seq: 8,
                    ..Batch::default()
                })
                .unwrap();
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

    fn round_value(sealer: &Sealer, key: u64, seqs: &[u64]) -> Vec<u8> {
        let entries: Vec<(u64, Vec<u8>)> = seqs
            .iter()
            .map(|s| (*s, entry(*s, QoS::AtLeastOnce).encode()))
            .collect();
        let body = encode_round(entries.iter().map(|(s, b)| (*s, b.as_slice())));
        sealer.seal(Table::Round, key, &body)
    }

    /// Write raw values into a table of the file, as an attacker with the disk could.
    fn plant(path: &Path, table: TableDefinition<u64, &[u8]>, rows: &[(u64, Vec<u8>)]) {
        let db = Database::create(path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(table).unwrap();
            for (k, v) in rows {
                t.insert(*k, v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    #[test]
    fn a_value_sealed_under_another_key_or_moved_is_read_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        let forged = round_value(&Sealer::derive(&[8; 32]), 1, &[1]);
        let moved = round_value(&sealer, 9, &[2]);
        plant(&path, ROUNDS, &[(1, forged), (2, moved)]);
        let (store, loaded) = Store::open(&path, sealer).unwrap();
        assert_eq!((loaded.depth, loaded.next_seq), (2, 3));
        let read = payloads(&store);
        assert_eq!(read.len(), 2);
        assert!(
            read.iter().all(|p| p.starts_with("corrupt: MAC")),
            "{read:?}"
        );
        // Dead-lettered as they were, and gone from the outbox.
        let note = DeadNote {
            reason: "unreadable".into(),
            attempts: 0,
            dead_ms: 1,
        };
        store
            .commit(&Batch {
                dead: vec![(1, note.clone()), (2, note)],
                next_seq: 3,
                ..Batch::default()
            })
            .unwrap();
        assert!(payloads(&store).is_empty());
        assert_eq!(store.dead_letters(0, 10).unwrap().len(), 2);
    }

    #[test]
    fn a_round_partly_delivered_comes_back_whole_after_a_crash_but_not_after_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        {
            let (store, _) = Store::open(&path, sealer.clone()).unwrap();
            append(&store, 1..5, QoS::AtLeastOnce);
            let done = store
                .commit(&Batch {
                    remove: vec![1, 2],
                    next_seq: 5,
                    durable: true,
                    ..Batch::default()
                })
                .unwrap();
            assert_eq!(done.removed, 2);
            assert_eq!(payloads(&store), ["3", "4"]);
            // Dropped without a clean stop (a crash): what was delivered of the round
            // is sent again, as QoS 1 allows.
        }
        let (store, loaded) = Store::open(&path, sealer.clone()).unwrap();
        assert_eq!(payloads(&store), ["1", "2", "3", "4"]);
        assert_eq!(loaded.depth, 4);
        store
            .commit(&Batch {
                remove: vec![1, 2],
                compact: true,
                next_seq: 5,
                ..Batch::default()
            })
            .unwrap();
        drop(store);
        let (store, loaded) = Store::open(&path, sealer.clone()).unwrap();
        assert_eq!(payloads(&store), ["3", "4"]);
        assert_eq!(loaded.depth, 2);
        let sizes: u64 = store.read(0, 100).unwrap().iter().map(|r| r.2).sum();
        assert_eq!(loaded.bytes, sizes);
        // Delivered whole, a round is deleted from the file.
        store
            .commit(&Batch {
                remove: vec![3, 4],
                next_seq: 5,
                durable: true,
                ..Batch::default()
            })
            .unwrap();
        drop(store);
        let db = Database::create(&path).unwrap();
        let tx = db.begin_read().unwrap();
        assert_eq!(
            redb::ReadableTableMetadata::len(&tx.open_table(ROUNDS).unwrap()).unwrap(),
            0
        );
    }

    #[test]
    fn entries_dropped_for_room_leave_the_file_once_half_their_round_has_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        let drop_and_reopen = |drop: Vec<u64>| {
            {
                let (store, _) = Store::open(&path, sealer.clone()).unwrap();
                store
                    .commit(&Batch {
                        drop,
                        next_seq: 6,
                        durable: true,
                        ..Batch::default()
                    })
                    .unwrap();
            }
            let (store, loaded) = Store::open(&path, sealer.clone()).unwrap();
            let qos0: Vec<u64> = loaded.qos0.iter().map(|(s, _)| *s).collect();
            (payloads(&store), qos0)
        };
        {
            let (store, _) = Store::open(&path, sealer.clone()).unwrap();
            append(&store, 1..6, QoS::AtMostOnce);
        }
        // One of five: not yet worth writing the round again (a crash would bring it
        // back: a QoS 0 message sent after all).
        let (left, _) = drop_and_reopen(vec![1]);
        assert_eq!(left, ["1", "2", "3", "4", "5"]);
        // Three of five: the round is written again without them.
        let (left, qos0) = drop_and_reopen(vec![1, 2, 3]);
        assert_eq!(left, ["4", "5"]);
        assert_eq!(qos0, [4, 5]);
    }

    #[test]
    fn a_row_planted_inside_a_rounds_numbers_goes_to_the_dead_letters_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        {
            let (store, _) = Store::open(&path, sealer.clone()).unwrap();
            append(&store, 1..6, QoS::AtLeastOnce);
        }
        plant(&path, ROUNDS, &[(3, b"planted".to_vec())]);
        let (store, loaded) = Store::open(&path, sealer.clone()).unwrap();
        assert_eq!(loaded.dead, 1);
        assert_eq!(payloads(&store), ["1", "2", "3", "4", "5"]);
        let dead = store.dead_letters(0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].seq >= 6, "{}", dead[0].seq);
        assert!(
            dead[0].note.reason.contains("stored at 3"),
            "{:?}",
            dead[0].note
        );
        // The round's own entries are acknowledged as usual.
        let done = store
            .commit(&Batch {
                remove: vec![3, 4],
                next_seq: loaded.next_seq,
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(done.removed, 2);
        assert_eq!(payloads(&store), ["1", "2", "5"]);
    }

    #[test]
    fn a_round_that_stops_opening_goes_to_the_dead_letters_whole_with_its_bytes_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        let (store, _) = Store::open(&path, sealer.clone()).unwrap();
        append(&store, 1..5, QoS::AtLeastOnce);
        // Damaged under the running gateway: the value no longer opens.
        {
            let tx = store.db.begin_write().unwrap();
            {
                let mut t = tx.open_table(ROUNDS).unwrap();
                t.insert(1, b"damaged".as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let read = store.read(0, 10).unwrap();
        assert_eq!(read.len(), 4);
        assert!(read.iter().all(|r| matches!(r.1, Stored::Corrupt { .. })));
        let note = DeadNote {
            reason: "unreadable".into(),
            attempts: 0,
            dead_ms: 1,
        };
        let done = store
            .commit(&Batch {
                dead: vec![(2, note)],
                next_seq: 5,
                ..Batch::default()
            })
            .unwrap();
        assert_eq!((done.dead, done.removed), (4, 4));
        assert!(payloads(&store).is_empty());
        let letters = store.dead_letters(0, 10).unwrap();
        let raw: Vec<usize> = letters
            .iter()
            .map(|l| match &l.stored {
                Stored::Corrupt { raw, .. } => raw.len(),
                Stored::Entry(_) => usize::MAX,
            })
            .collect();
        assert_eq!(raw, [b"damaged".len(), 0, 0, 0]);
    }

    #[test]
    fn a_sequence_number_past_any_the_gateway_writes_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(NEXT_SEQ, u64::MAX)
                .unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(&path, Sealer::derive(&[7; 32])).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("outbox.redb") && err.contains("sequence number"),
            "{err}"
        );
    }

    #[test]
    fn entries_of_the_per_entry_form_are_moved_into_rounds_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let sealer = Sealer::derive(&[7; 32]);
        let legacy =
            |seq: u64| sealer.seal(Table::Legacy, seq, &entry(seq, QoS::AtLeastOnce).encode());
        // 3 is damaged: it stays in its place, to be dead-lettered when sent.
        let mut damaged = legacy(3);
        damaged[0] ^= 1;
        // And more than one round's worth after it.
        let mut rows = vec![(1, legacy(1)), (2, legacy(2)), (3, damaged), (4, legacy(4))];
        rows.extend((5..5 + MOVE_ROUND as u64 + 10).map(|s| (s, legacy(s))));
        plant(&path, LEGACY, &rows);
        let total = rows.len() as u64;
        {
            let (store, loaded) = Store::open(&path, sealer.clone()).unwrap();
            assert_eq!((loaded.depth, loaded.next_seq), (total, total + 1));
            let read = payloads(&store);
            assert_eq!(read[..2], ["1", "2"]);
            assert!(read[2].starts_with("corrupt: MAC"), "{read:?}");
            let rest: Vec<u64> = read[3..].iter().map(|p| p.parse().unwrap()).collect();
            assert_eq!(rest, (4..=total).collect::<Vec<_>>());
        }
        // Moved once: the old table is gone, the rounds stay.
        let (store, _) = Store::open(&path, sealer).unwrap();
        assert_eq!(payloads(&store).len() as u64, total);
        let tx = store.db.begin_read().unwrap();
        assert!(matches!(
            tx.open_table(LEGACY),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }

    #[test]
    fn a_round_that_does_not_decode_is_an_error_not_a_panic() {
        let entries: Vec<(u64, Vec<u8>)> = (5..9)
            .map(|s| (s, entry(s, QoS::AtLeastOnce).encode()))
            .collect();
        let body = encode_round(entries.iter().map(|(s, b)| (*s, b.as_slice())));
        assert_eq!(decode_round(5, &body).unwrap().len(), 4);
        for cut in 0..body.len() {
            assert!(decode_round(5, &body[..cut]).is_err(), "cut at {cut}");
        }
        // Entries before the round's key, or out of order, are refused.
        assert!(decode_round(6, &body).is_err());
        let mut swapped = body.clone();
        swapped[4..12].copy_from_slice(&9u64.to_be_bytes());
        assert!(decode_round(5, &swapped).is_err());
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
