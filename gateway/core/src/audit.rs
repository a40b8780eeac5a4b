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
//! `Chain` (sealing lines) and `Aggregator` (what is worth a line) are pure and take
//! the clock as an argument; `LogFile` owns the files; `Engine` runs one batch through
//! them; the task around it only waits. The format is described in `docs/audit.md`.

use crate::metrics::Metrics;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

type HmacSha256 = Hmac<Sha256>;

/// `prev` of the very first line of a log.
const GENESIS: [u8; 32] = [0; 32];
/// Domain tags, so that a line MAC can never pass for a checkpoint signature.
const LINE_TAG: &[u8] = b"portcullis-audit-line-v1\0";
const CHECKPOINT_TAG: &[u8] = b"portcullis-audit-checkpoint-v1\0";
/// Distinct refusals tracked at once; beyond it they share one overflow count.
pub const AGGREGATE_KEYS_MAX: usize = 10_000;
/// Longest line `verify` reads; the writer's lines are far shorter.
const MAX_LINE: usize = 1 << 20;
/// Entries taken from the queue per batch.
const BATCH: usize = 512;
/// After a failed write, how long before the log is reopened.
const RETRY: Duration = Duration::from_secs(1);
/// Longest window or interval honoured, so that deadlines never overflow.
const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
            time_ms: now_ms(),
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

    /// One of the log's own lines (checkpoint, recovery, drops, aggregates).
    fn own(event: &'static str, decision: &'static str, time_ms: u64) -> Self {
        AuditEntry {
            time_ms,
            ..AuditEntry::new(event, decision)
        }
    }
}

// ---------------------------------------------------------------------------------
// Settings and key

/// Everything the writer needs. The key is never printed (`Debug` redacts it).
#[derive(Clone)]
pub struct AuditSettings {
    /// The current file; rotated ones are `{path}.1` (newest) to `{path}.{keep_files}`.
    pub path: PathBuf,
    /// Entries queued towards the writer; beyond this they are counted as dropped.
    pub queue: usize,
    /// The chain key, from [`load_or_create_key`].
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

/// Load the chain key, creating it (32 random bytes, mode 0600, new parent directories
/// 0700) if the file does not exist. A file of another length is refused.
pub fn load_or_create_key(path: &Path) -> io::Result<[u8; 32]> {
    match load_key(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        loaded => return loaded,
    }
    let context =
        |e: io::Error| io::Error::new(e.kind(), format!("audit key {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(context)?;
    }
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(&key).map_err(context)?;
            file.sync_all().map_err(context)?;
            Ok(key)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_key(path),
        Err(e) => Err(context(e)),
    }
}

/// Load an existing chain key (never creates one: for `verify`).
pub fn load_key(path: &Path) -> io::Result<[u8; 32]> {
    let bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("audit key {}: {e}", path.display())))?;
    bytes.as_slice().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "audit key {}: must be exactly 32 bytes (found {}); restore the right key \
                 file, or move this one aside to start a new chain",
                path.display(),
                bytes.len()
            ),
        )
    })
}

// ---------------------------------------------------------------------------------
// The chain (pure)

/// Fields only the log's own lines carry.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
struct Extra {
    /// The event an `aggregate` line counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    of: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repeated: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
}

/// A line without its MAC, in the order it is written.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    #[serde(flatten)]
    entry: &'a AuditEntry,
    #[serde(flatten)]
    extra: &'a Extra,
    prev: String,
}

fn hmac(key: &[u8; 32]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// The MAC of a line: over the previous line's MAC and the exact text of this line
/// up to (not including) `,"mac":"…"}`.
fn line_mac(key: &[u8; 32], prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut mac = hmac(key);
    mac.update(LINE_TAG);
    mac.update(prev);
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn checkpoint_signature(key: &[u8; 32], seq: u64, mac: &[u8; 32], time_ms: u64) -> [u8; 32] {
    let mut sig = hmac(key);
    sig.update(CHECKPOINT_TAG);
    sig.update(&seq.to_be_bytes());
    sig.update(mac);
    sig.update(&time_ms.to_be_bytes());
    sig.finalize().into_bytes().into()
}

/// Seals lines into the chain: sequence number, link to the previous MAC, own MAC.
struct Chain {
    key: [u8; 32],
    next_seq: u64,
    prev: [u8; 32],
}

impl Chain {
    /// A chain going on after `last` (seq and MAC), or a new one.
    fn new(key: [u8; 32], last: Option<(u64, [u8; 32])>) -> Self {
        match last {
            Some((seq, mac)) => Chain {
                key,
                next_seq: seq.saturating_add(1),
                prev: mac,
            },
            None => Chain {
                key,
                next_seq: 0,
                prev: GENESIS,
            },
        }
    }

    /// The line for `entry`, newline included. None only if it cannot be serialized,
    /// which plain strings and numbers never fail.
    fn seal(&mut self, entry: &AuditEntry, extra: &Extra) -> Option<Vec<u8>> {
        let body = Body {
            seq: self.next_seq,
            entry,
            extra,
            prev: hex::encode(self.prev),
        };
        let mut line = serde_json::to_vec(&body).ok()?;
        // Drop the closing brace: the MAC covers everything before `,"mac":`.
        line.pop();
        let mac = line_mac(&self.key, &self.prev, &line);
        line.extend_from_slice(b",\"mac\":\"");
        line.extend_from_slice(hex::encode(mac).as_bytes());
        line.extend_from_slice(b"\"}\n");
        self.prev = mac;
        self.next_seq = self.next_seq.saturating_add(1);
        Some(line)
    }

    /// A `checkpoint` line, and the signed checkpoint that names it.
    fn checkpoint(&mut self, time_ms: u64) -> Option<(Vec<u8>, Checkpoint)> {
        let seq = self.next_seq;
        let line = self.seal(
            &AuditEntry::own("checkpoint", "allow", time_ms),
            &Extra::default(),
        )?;
        Some((line, Checkpoint::sign(&self.key, seq, &self.prev, time_ms)))
    }
}

/// "The log reached `seq`, and that line's MAC is `mac`", signed with the chain key.
/// Kept off the box (published under `portcullis/events/audit`), it lets
/// [`verify`] tell a log that was cut short or replaced since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// Hex MAC of line `seq` (the `checkpoint` line itself).
    pub mac: String,
    pub time_ms: u64,
    /// Hex HMAC-SHA256 over a domain tag, seq, MAC and time.
    pub signature: String,
}

impl Checkpoint {
    fn sign(key: &[u8; 32], seq: u64, mac: &[u8; 32], time_ms: u64) -> Self {
        Checkpoint {
            seq,
            mac: hex::encode(mac),
            time_ms,
            signature: hex::encode(checkpoint_signature(key, seq, mac, time_ms)),
        }
    }

    /// Whether the signature was made with `key` over these fields.
    pub fn verify_signature(&self, key: &[u8; 32]) -> bool {
        let (Some(mac), Some(signature)) = (decode32(&self.mac), decode32(&self.signature)) else {
            return false;
        };
        checkpoint_signature(key, self.seq, &mac, self.time_ms)
            .ct_eq(&signature)
            .into()
    }

    /// What [`verify`] is to find in the files.
    pub fn expectation(&self) -> (u64, String) {
        (self.seq, self.mac.clone())
    }
}

/// Parse `verify`'s `--checkpoint SEQ:MAC` argument.
pub fn parse_checkpoint_arg(arg: &str) -> Result<(u64, String), String> {
    let usage =
        || "--checkpoint: expected SEQ:MAC, a number, a colon and 64 hex digits".to_string();
    let (seq, mac) = arg.split_once(':').ok_or_else(usage)?;
    let seq = seq.trim().parse::<u64>().map_err(|_| usage())?;
    let mac = decode32(mac.trim()).ok_or_else(usage)?;
    Ok((seq, hex::encode(mac)))
}

fn decode32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

// ---------------------------------------------------------------------------------
// Reading lines back (pure)

/// A chain line, split into what the chain needs.
struct Parsed<'a> {
    seq: u64,
    prev: [u8; 32],
    mac: [u8; 32],
    /// The MACed text, when the line ends exactly as the writer ends it.
    body: Option<&'a [u8]>,
}

impl Parsed<'_> {
    fn mac_ok(&self, key: &[u8; 32]) -> bool {
        self.body
            .is_some_and(|body| line_mac(key, &self.prev, body).ct_eq(&self.mac).into())
    }
}

/// Why a line is not a chain line.
enum Unreadable {
    /// Valid JSON cut short.
    Torn,
    NotJson,
    /// JSON, but no `seq`, `prev` and `mac`.
    Unchained,
}

fn parse_line(line: &[u8]) -> Result<Parsed<'_>, Unreadable> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        // Only a cut object is torn; a blank line is not "incomplete".
        if e.is_eof() && line.trim_ascii_start().starts_with(b"{") {
            Unreadable::Torn
        } else {
            Unreadable::NotJson
        }
    })?;
    let seq = value.get("seq").and_then(Value::as_u64);
    let prev = value.get("prev").and_then(Value::as_str).and_then(decode32);
    let mac = value.get("mac").and_then(Value::as_str).and_then(decode32);
    let (Some(seq), Some(prev), Some(mac)) = (seq, prev, mac) else {
        return Err(Unreadable::Unchained);
    };
    let suffix = format!(",\"mac\":\"{}\"}}", hex::encode(mac));
    Ok(Parsed {
        seq,
        prev,
        mac,
        body: line.strip_suffix(suffix.as_bytes()),
    })
}

// ---------------------------------------------------------------------------------
// Aggregation (pure)

/// Two refusals are "the same" when all but their time and source port are: a
/// different topic or reason is a different fact, worth its own line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    event: &'static str,
    kind: Option<&'static str>,
    principal: Option<String>,
    /// The address without the port: every new connection gets a new port.
    source: Option<String>,
    protocol: Option<&'static str>,
    topic: Option<String>,
    reason: Option<String>,
}

impl RefusalKey {
    fn of(entry: &AuditEntry) -> Self {
        RefusalKey {
            event: entry.event,
            kind: entry.kind,
            principal: entry.principal.clone(),
            source: entry.source.as_deref().map(|s| {
                s.parse::<SocketAddr>()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_else(|_| s.to_string())
            }),
            protocol: entry.protocol,
            topic: entry.topic.clone(),
            reason: entry.reason.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Tally {
    closes: Instant,
    first_ms: u64,
    last_ms: u64,
    /// Refusals counted and not written.
    repeated: u64,
}

impl Tally {
    fn open(closes: Instant, time_ms: u64) -> Self {
        Tally {
            closes,
            first_ms: time_ms,
            last_ms: time_ms,
            repeated: 0,
        }
    }
}

/// Decides which refusals are written: the first of a kind in its window is, the
/// others are counted into one `aggregate` line when the window closes. Memory is
/// bounded by `cap` keys; refusals of new kinds beyond it share an overflow tally.
struct Aggregator {
    window: Duration,
    cap: usize,
    open: HashMap<RefusalKey, Tally>,
    /// Keys in the order their windows opened, which is the order they close.
    closing: VecDeque<RefusalKey>,
    overflow: Option<Tally>,
}

impl Aggregator {
    fn new(window: Duration, cap: usize) -> Self {
        Aggregator {
            window: window.min(LONGEST),
            cap,
            open: HashMap::new(),
            closing: VecDeque::new(),
            overflow: None,
        }
    }

    /// Whether `entry` is to be written now.
    fn admit(&mut self, entry: &AuditEntry, now: Instant) -> bool {
        if entry.decision != "refuse" || self.window.is_zero() {
            return true;
        }
        let key = RefusalKey::of(entry);
        if let Some(tally) = self.open.get_mut(&key) {
            tally.repeated += 1;
            tally.last_ms = entry.time_ms;
            return false;
        }
        let closes = now + self.window;
        if self.open.len() >= self.cap {
            let tally = self
                .overflow
                .get_or_insert_with(|| Tally::open(closes, entry.time_ms));
            tally.repeated += 1;
            tally.last_ms = entry.time_ms;
            return false;
        }
        self.closing.push_back(key.clone());
        self.open.insert(key, Tally::open(closes, entry.time_ms));
        true
    }

    /// Close the windows that ended by `now`; an `aggregate` line for each that
    /// counted something.
    fn close_expired(&mut self, now: Instant, wall_ms: u64) -> Vec<(AuditEntry, Extra)> {
        self.close(Some(now), wall_ms)
    }

    /// Close every window (the writer is stopping).
    fn close_all(&mut self, wall_ms: u64) -> Vec<(AuditEntry, Extra)> {
        self.close(None, wall_ms)
    }

    fn close(&mut self, now: Option<Instant>, wall_ms: u64) -> Vec<(AuditEntry, Extra)> {
        let due = |tally: &Tally| now.is_none_or(|now| tally.closes <= now);
        let mut lines = Vec::new();
        while let Some(key) = self.closing.front() {
            match self.open.get(key) {
                Some(tally) if !due(tally) => break,
                _ => {}
            }
            let Some(key) = self.closing.pop_front() else {
                break;
            };
            if let Some(tally) = self.open.remove(&key)
                && tally.repeated > 0
            {
                lines.push(self.aggregate_line(Some(key), tally, wall_ms));
            }
        }
        if self.overflow.as_ref().is_some_and(due)
            && let Some(tally) = self.overflow.take()
        {
            lines.push(self.aggregate_line(None, tally, wall_ms));
        }
        lines
    }

    fn aggregate_line(
        &self,
        key: Option<RefusalKey>,
        tally: Tally,
        wall_ms: u64,
    ) -> (AuditEntry, Extra) {
        let mut entry = AuditEntry::own("aggregate", "refuse", wall_ms);
        let of = match key {
            Some(key) => {
                entry.kind = key.kind;
                entry.principal = key.principal;
                entry.source = key.source;
                entry.protocol = key.protocol;
                entry.topic = key.topic;
                entry.reason = key.reason;
                Some(key.event)
            }
            None => {
                entry.reason = Some(format!(
                    "more than {} kinds of refusal in one window: the rest were counted together",
                    self.cap
                ));
                None
            }
        };
        let extra = Extra {
            of,
            repeated: Some(tally.repeated),
            first_ms: Some(tally.first_ms),
            last_ms: Some(tally.last_ms),
            dropped: None,
        };
        (entry, extra)
    }

    /// When the next window closes.
    fn next_deadline(&self) -> Option<Instant> {
        let first = self
            .closing
            .front()
            .and_then(|key| self.open.get(key))
            .map(|t| t.closes);
        let overflow = self.overflow.as_ref().map(|t| t.closes);
        match (first, overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

// ---------------------------------------------------------------------------------
// Files

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    sibling(path, &format!(".{n}"))
}

/// The files of the log at `path`, oldest first: `{path}.N` … `{path}.1`, `{path}`.
/// What `portcullis audit verify` checks when given no file.
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let name = path.file_name().and_then(|n| n.to_str());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let (Some(name), Ok(entries)) = (name, std::fs::read_dir(dir)) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let n = file_name
                .to_str()
                .and_then(|f| f.strip_prefix(name))
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(n) = n {
                found.push((n, path.with_file_name(&file_name)));
            }
        }
    }
    found.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = found.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Renames must survive a crash too.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(dir) = File::open(dir)
    {
        let _ = dir.sync_all();
    }
}

/// One writer per log: a second one would fork the chain.
fn lock(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(sibling(path, ".lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another writer (a running gateway?)",
                path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The last chain line of a file, and what follows it.
#[derive(Default)]
struct TailScan {
    /// seq, MAC, and whether the MAC verifies with our key.
    last: Option<(u64, [u8; 32], bool)>,
    /// Bytes of an incomplete final line.
    torn: usize,
    /// Complete lines after the last chain line that are not chain lines.
    skipped: usize,
    /// The file does not end with a newline.
    needs_newline: bool,
}

fn scan_tail(file: &mut File, key: &[u8; 32]) -> io::Result<TailScan> {
    let len = file.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start))?;
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        // Unless the window reaches the start of the file, its first line may be cut.
        let text = if start == 0 {
            Some(&buf[..])
        } else {
            buf.iter().position(|&b| b == b'\n').map(|i| &buf[i + 1..])
        };
        if let Some(text) = text {
            let scan = scan_lines_backwards(text, key);
            if scan.last.is_some() || start == 0 {
                return Ok(scan);
            }
        }
        window = window.saturating_mul(4);
    }
}

fn scan_lines_backwards(text: &[u8], key: &[u8; 32]) -> TailScan {
    let mut scan = TailScan::default();
    let newline = text.iter().rposition(|&b| b == b'\n');
    let (complete, trailing) = match newline {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (&text[..0], text),
    };
    if !trailing.is_empty() {
        scan.needs_newline = true;
        match parse_line(trailing) {
            Ok(line) => {
                scan.last = Some((line.seq, line.mac, line.mac_ok(key)));
                return scan;
            }
            Err(_) => scan.torn = trailing.len(),
        }
    }
    if newline.is_none() {
        return scan;
    }
    for line in complete.split(|&b| b == b'\n').rev() {
        match parse_line(line) {
            Ok(line) => {
                scan.last = Some((line.seq, line.mac, line.mac_ok(key)));
                break;
            }
            Err(_) => scan.skipped += 1,
        }
    }
    scan
}

/// Where the chain on disk stopped, and what was found amiss on the way.
struct Resume {
    last: Option<(u64, [u8; 32])>,
    notes: Vec<String>,
}

/// The files on disk: appending, rotating, finding where the chain stopped.
struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    _lock: File,
    /// A descriptor held in reserve, given up for the next file if the process has
    /// no other to give (see `rotate`).
    spare: Option<File>,
    /// Opens the next file; replaced in tests to fail like descriptor exhaustion.
    open_next: fn(&Path) -> io::Result<File>,
    /// Rotations that failed since the writer last counted them.
    rotation_failures: u64,
}

/// The process (or system) has no descriptor left.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

impl LogFile {
    fn open(settings: &AuditSettings) -> io::Result<(LogFile, Resume)> {
        let path = &settings.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let lock = lock(path)?;
        let mut file = open_append(path)?;
        let tail = scan_tail(&mut file, &settings.key)?;
        let name = path.display();
        let mut notes = Vec::new();
        if tail.torn > 0 {
            notes.push(format!(
                "{name} ended with an incomplete line ({} bytes): the previous run stopped mid-write",
                tail.torn
            ));
        }
        if tail.needs_newline {
            file.write_all(b"\n")?;
        }
        let mut last = None;
        match tail.last {
            Some((seq, mac, mac_ok)) => {
                last = Some((seq, mac));
                if tail.skipped > 0 {
                    notes.push(format!(
                        "{} unreadable line(s) in {name} after seq {seq}",
                        tail.skipped
                    ));
                }
                if !mac_ok {
                    notes.push(format!(
                        "the last line (seq {seq}) does not verify with this key: the key changed or the line was altered"
                    ));
                }
            }
            None => {
                if tail.skipped > 0 {
                    notes.push(format!(
                        "{name} holds {} line(s) that are not chain lines (an older format?)",
                        tail.skipped
                    ));
                }
                // A fresh file after a rotation: the chain goes on from the newest rotated one.
                let older = rotated(path, 1);
                match File::open(&older) {
                    Ok(mut f) => match scan_tail(&mut f, &settings.key)?.last {
                        Some((seq, mac, mac_ok)) => {
                            last = Some((seq, mac));
                            if !mac_ok {
                                notes.push(format!(
                                    "the last line of {} (seq {seq}) does not verify with this key",
                                    older.display()
                                ));
                            }
                        }
                        None => notes.push(format!("{} holds no chain line", older.display())),
                    },
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                if last.is_none() && !notes.is_empty() {
                    notes.push("a new chain starts here".to_string());
                }
            }
        }
        let size = file.metadata()?.len();
        let log = LogFile {
            path: path.clone(),
            file,
            size,
            max_bytes: settings.max_file_bytes,
            keep: settings.keep_files.max(1),
            _lock: lock,
            spare: File::open("/dev/null").ok(),
            open_next: open_append,
            rotation_failures: 0,
        };
        Ok((log, Resume { last, notes }))
    }

    /// Append the lines, rotating first whenever one would take the file past its size.
    /// A rotation that fails (no descriptor for the next file, say) loses nothing: the
    /// lines go on into the current file, the failure is logged and counted, and the
    /// next batch tries again.
    fn write_lines(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut rotation_failed = false;
        for line in lines {
            let size = self.size + buf.len() as u64;
            if !rotation_failed && size > 0 && size + line.len() as u64 > self.max_bytes {
                self.file.write_all(&buf)?;
                self.size += buf.len() as u64;
                buf.clear();
                if let Err(e) = self.rotate() {
                    rotation_failed = true;
                    self.rotation_failures += 1;
                    let path = self.path.display();
                    tracing::error!(error = %e, path = %path, "audit log rotation failed; writing on in the current file");
                }
            }
            buf.extend_from_slice(line);
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// `{path}` becomes `{path}.1`, `.1` becomes `.2`, …; the one past `keep` goes.
    /// The next file is opened before anything is renamed, so that without a
    /// descriptor for it the log stays as it was; the spare descriptor is given up
    /// for it when the process has no other.
    fn rotate(&mut self) -> io::Result<()> {
        // A rotation that failed after giving the spare up has left it to take back.
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
        self.file.sync_all()?;
        let next_path = sibling(&self.path, ".next");
        // Left by a crash mid-rotation: empty, or lines also in the current file.
        let _ = std::fs::remove_file(&next_path);
        let next = match (self.open_next)(&next_path) {
            Err(e) if out_of_descriptors(&e) && self.spare.is_some() => {
                self.spare = None;
                (self.open_next)(&next_path)?
            }
            other => other?,
        };
        for n in (1..self.keep).rev() {
            match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    let _ = std::fs::remove_file(&next_path);
                    return Err(e);
                }
                _ => {}
            }
        }
        if let Err(e) = std::fs::rename(&self.path, rotated(&self.path, 1)) {
            let _ = std::fs::remove_file(&next_path);
            return Err(e);
        }
        std::fs::rename(&next_path, &self.path)?;
        // The old file's descriptor is free now: take the spare back with it (at
        // once, before another thread's accept can), for the next rotation.
        self.file = next;
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
        self.size = 0;
        sync_dir(&self.path);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
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

// ---------------------------------------------------------------------------------
// The writer

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
struct Engine {
    settings: AuditSettings,
    chain: Chain,
    aggregator: Aggregator,
    /// None after a failed write, until the log is reopened (not before `retry_at`).
    log: Option<LogFile>,
    retry_at: Instant,
    /// Found amiss when the log was opened; written as a `chain-recovery` line.
    notes: Vec<String>,
    /// Entries lost since the last `audit-dropped` line.
    dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    next_checkpoint: Instant,
}

impl Engine {
    /// Open the log; the first step writes a checkpoint, so where the chain resumed is
    /// published at once.
    fn open(
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
    fn step(
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

// ---------------------------------------------------------------------------------
// Verification

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The MAC does not match the line: it was edited, or written with another key.
    BadMac,
    /// `prev` is not the MAC of the line before: a line removed, inserted or moved,
    /// or files given out of order or missing.
    BrokenLink,
    /// The link holds but `seq` does not follow on.
    SeqGap,
    /// An incomplete line: the file was cut, or the writer stopped mid-write.
    Torn,
    /// Not JSON.
    NotJson,
    /// JSON without `seq`, `prev` and `mac`: inserted, or older than the chain.
    Unchained,
    /// The expected checkpoint is not in the files: truncated or rewritten since.
    MissingCheckpoint,
    /// The file could not be read.
    Unreadable,
    /// A note, not a problem: the first file continues lines that were not given.
    StartsMidChain,
}

/// One finding, with where it is (`line` is 1-based; 0 when it is about a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub kind: ProblemKind,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.detail),
            n => write!(f, "{}: line {n}: {}", self.file.display(), self.detail),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines read, in all files.
    pub lines: u64,
    /// Files read.
    pub files: usize,
    pub problems: Vec<Problem>,
    /// Worth knowing, not wrong (`StartsMidChain`).
    pub notes: Vec<Problem>,
    /// seq and hex MAC of the last chain line.
    pub last: Option<(u64, String)>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the log files, given oldest first, against `key`; with `expect`, also that
/// the line with that seq carries that MAC (a checkpoint kept off the box). Never
/// panics, whatever the files hold.
pub fn verify(paths: &[PathBuf], key: &[u8; 32], expect: Option<(u64, String)>) -> VerifyReport {
    let mut verifier = Verifier {
        key,
        report: VerifyReport::default(),
        last: None,
        file_index: 0,
        expect: None,
        found: false,
        differs: None,
    };
    if let Some((seq, mac)) = expect {
        match decode32(&mac) {
            Some(mac) => verifier.expect = Some((seq, mac)),
            None => verifier.problem(
                Path::new(""),
                0,
                ProblemKind::MissingCheckpoint,
                "the expected checkpoint's MAC is not 64 hex digits".to_string(),
            ),
        }
    }
    for (index, path) in paths.iter().enumerate() {
        verifier.file_index = index;
        verifier.file(path);
    }
    verifier.finish(paths.last().map(PathBuf::as_path).unwrap_or(Path::new("")))
}

/// The last chain line read.
struct Link {
    seq: u64,
    mac: [u8; 32],
    /// When this line's MAC is bad, the line before it: the next line may link to
    /// either (this one edited, or inserted), and it has been reported already.
    before: Option<(u64, [u8; 32])>,
    file: PathBuf,
    file_index: usize,
    line: usize,
}

struct Verifier<'k> {
    key: &'k [u8; 32],
    report: VerifyReport,
    last: Option<Link>,
    file_index: usize,
    expect: Option<(u64, [u8; 32])>,
    found: bool,
    /// A line with the expected seq but another MAC.
    differs: Option<(PathBuf, usize)>,
}

impl Verifier<'_> {
    fn problem(&mut self, file: &Path, line: usize, kind: ProblemKind, detail: String) {
        let problem = Problem {
            file: file.to_path_buf(),
            line,
            kind,
            detail,
        };
        match kind {
            ProblemKind::StartsMidChain => self.report.notes.push(problem),
            _ => self.report.problems.push(problem),
        }
    }

    fn file(&mut self, path: &Path) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                self.problem(
                    path,
                    0,
                    ProblemKind::Unreadable,
                    format!("cannot be read: {e}"),
                );
                return;
            }
        };
        self.report.files += 1;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut n = 0;
        loop {
            match read_line_capped(&mut reader, &mut buf) {
                Ok(None) => break,
                Ok(Some(shape)) => {
                    n += 1;
                    self.report.lines += 1;
                    self.line(path, n, &buf, shape);
                }
                Err(e) => {
                    self.problem(
                        path,
                        n + 1,
                        ProblemKind::Unreadable,
                        format!("cannot be read: {e}"),
                    );
                    break;
                }
            }
        }
    }

    fn line(&mut self, file: &Path, n: usize, text: &[u8], shape: Shape) {
        if shape.overlong {
            let detail = format!("longer than {MAX_LINE} bytes: not a line this log writes");
            return self.problem(file, n, ProblemKind::NotJson, detail);
        }
        let parsed = match parse_line(text) {
            Ok(parsed) => parsed,
            Err(Unreadable::Torn) => {
                let detail = if shape.newline {
                    "incomplete line: the writer stopped mid-write (a chain-recovery line \
                     after it says so) or the line was cut"
                } else {
                    "incomplete last line: the file was truncated, or the writer stopped mid-write"
                };
                return self.problem(file, n, ProblemKind::Torn, detail.to_string());
            }
            Err(Unreadable::NotJson) => {
                let detail = "not JSON: not a line this log writes (inserted or damaged)";
                return self.problem(file, n, ProblemKind::NotJson, detail.to_string());
            }
            Err(Unreadable::Unchained) => {
                let detail = "JSON without seq, prev and mac: inserted, or written before the log was chained";
                return self.problem(file, n, ProblemKind::Unchained, detail.to_string());
            }
        };
        let mac_ok = parsed.mac_ok(self.key);
        if mac_ok {
            self.check_link(file, n, &parsed);
        } else {
            let detail = if parsed.body.is_none() {
                "not in the form the writer produces (mac moved or reformatted): the entry was edited"
            } else {
                "MAC does not match its content: the entry was edited (or written with another key)"
            };
            self.problem(file, n, ProblemKind::BadMac, detail.to_string());
        }
        if let Some((seq, mac)) = self.expect
            && parsed.seq == seq
        {
            if parsed.mac == mac {
                self.found = true;
            } else if self.differs.is_none() {
                self.differs = Some((file.to_path_buf(), n));
            }
        }
        self.report.last = Some((parsed.seq, hex::encode(parsed.mac)));
        let before = match &self.last {
            Some(last) if !mac_ok => Some((last.seq, last.mac)),
            _ => None,
        };
        self.last = Some(Link {
            seq: parsed.seq,
            mac: parsed.mac,
            before,
            file: file.to_path_buf(),
            file_index: self.file_index,
            line: n,
        });
    }

    fn check_link(&mut self, file: &Path, n: usize, parsed: &Parsed<'_>) {
        let seq = parsed.seq;
        let Some(last) = &self.last else {
            if parsed.prev != GENESIS {
                let detail = format!(
                    "the chain starts at seq {seq}, after lines not given here (rotated away or \
                     not listed): those are not checked"
                );
                self.problem(file, n, ProblemKind::StartsMidChain, detail);
            } else if seq != 0 {
                let detail = format!("the chain starts at seq {seq} instead of 0");
                self.problem(file, n, ProblemKind::SeqGap, detail);
            }
            return;
        };
        // After a line with a bad MAC, linking to the line before it is fine too.
        let (last_seq, last_mac) = match last.before {
            Some((seq, mac)) if parsed.prev == mac => (seq, mac),
            _ => (last.seq, last.mac),
        };
        let expected = last_seq.saturating_add(1);
        if parsed.prev != last_mac {
            let detail = if last.file_index != self.file_index {
                format!(
                    "does not continue {} (which ends at seq {}): the files are out of order or \
                     one is missing (give them oldest first)",
                    last.file.display(),
                    last.seq
                )
            } else if parsed.prev == GENESIS {
                format!(
                    "the chain starts over here (seq {seq}) after seq {} on line {}: the log \
                     was emptied and restarted, or another log was joined on",
                    last.seq, last.line
                )
            } else if seq > expected {
                format!(
                    "prev is not the MAC of the line before: {} line(s) removed here (seq jumps \
                     from {} to {seq})",
                    seq - expected,
                    last_seq
                )
            } else if seq < expected {
                format!(
                    "prev is not the MAC of the line before: lines reordered or repeated (seq \
                     goes back from {} to {seq})",
                    last_seq
                )
            } else {
                "prev is not the MAC of the line before: that line was replaced, or lines reordered"
                    .to_string()
            };
            self.problem(file, n, ProblemKind::BrokenLink, detail);
        } else if seq != expected {
            let detail = format!("seq is {seq}, but {expected} follows {last_seq}");
            self.problem(file, n, ProblemKind::SeqGap, detail);
        }
    }

    fn finish(mut self, last_path: &Path) -> VerifyReport {
        if let Some((seq, mac)) = self.expect
            && !self.found
        {
            let short = &hex::encode(mac)[..16];
            let (file, line, detail) = if let Some((file, line)) = self.differs.take() {
                let detail = format!(
                    "the checkpoint says seq {seq} has MAC {short}…, this line has another: the \
                     log was rewritten"
                );
                (file, line, detail)
            } else {
                match &self.last {
                    None => {
                        let detail = format!(
                            "no chain line at all, but a checkpoint for seq {seq} was published: \
                             the log was emptied or replaced"
                        );
                        (last_path.to_path_buf(), 0, detail)
                    }
                    Some(last) if last.seq < seq => {
                        let detail = format!(
                            "the log ends at seq {}, before the checkpoint at seq {seq}: it was \
                             truncated (or rewritten)",
                            last.seq
                        );
                        (last.file.clone(), last.line, detail)
                    }
                    Some(_) => {
                        let detail = format!(
                            "seq {seq} of the checkpoint is not in these files: give the file \
                             that holds it, or the log was rewritten"
                        );
                        (last_path.to_path_buf(), 0, detail)
                    }
                }
            };
            self.problem(&file, line, ProblemKind::MissingCheckpoint, detail);
        }
        self.report
    }
}

/// How a line ended.
struct Shape {
    newline: bool,
    overlong: bool,
}

/// The next line into `buf` (without its newline), keeping at most `MAX_LINE` bytes
/// of it, so a hostile file cannot take the memory. None at the end of the file.
fn read_line_capped<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<Shape>> {
    buf.clear();
    let mut overlong = false;
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(any.then_some(Shape {
                newline: false,
                overlong,
            }));
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        let room = MAX_LINE.saturating_sub(buf.len());
        if chunk.len() > room {
            overlong = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(Shape {
                newline: true,
                overlong,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn settings(dir: &Path) -> AuditSettings {
        AuditSettings {
            checkpoint_interval: Duration::from_secs(3600),
            ..AuditSettings::new(dir.join("audit.log"), KEY)
        }
    }

    /// Settings whose files rotate after a few entries.
    fn small_files(dir: &Path) -> AuditSettings {
        AuditSettings {
            max_file_bytes: 1_000,
            ..settings(dir)
        }
    }

    /// One `connect` entry per number, each its own batch (unsynced).
    fn log_connects(engine: &mut Engine, numbers: std::ops::Range<usize>, now: Instant) {
        for i in numbers {
            engine.step(vec![connect(&format!("sensor-{i}"))], now, 1_000, false);
        }
    }

    fn engine(settings: &AuditSettings, now: Instant) -> Engine {
        let metrics = Arc::new(Metrics::default());
        Engine::open(settings.clone(), metrics, Arc::default(), now).unwrap()
    }

    fn connect(id: &str) -> AuditEntry {
        AuditEntry::new("connect", "allow")
            .principal("device", id)
            .source("10.0.0.1:4000")
            .reason("certificate")
    }

    fn refusal(port: u16) -> AuditEntry {
        AuditEntry::new("connect", "refuse")
            .principal("device", "ghost")
            .source(format!("10.0.0.9:{port}"))
            .reason("unknown_principal")
    }

    /// A log of `n` connects and the checkpoint after them (the last line).
    fn write_log(settings: &AuditSettings, n: usize) -> Checkpoint {
        let now = Instant::now();
        let mut engine = engine(settings, now);
        let entries = (0..n).map(|i| connect(&format!("sensor-{i}"))).collect();
        engine.step(entries, now, 1_000, true).unwrap()
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    fn json(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    /// Verify the current file alone.
    fn check(s: &AuditSettings, expect: Option<(u64, String)>) -> VerifyReport {
        verify(std::slice::from_ref(&s.path), &KEY, expect)
    }

    fn kinds(report: &VerifyReport) -> Vec<(usize, ProblemKind)> {
        report.problems.iter().map(|p| (p.line, p.kind)).collect()
    }

    #[test]
    fn a_clean_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 5);
        let report = check(&s, Some(checkpoint.expectation()));
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!((report.lines, report.files), (6, 1));
        assert_eq!(report.last, Some((5, checkpoint.mac.clone())));
        let first = json(&lines(&s.path)[0]);
        assert_eq!(first["seq"], 0);
        assert_eq!(first["prev"], "0".repeat(64));
        assert_eq!(first["principal"], "sensor-0");
        assert_eq!(json(&lines(&s.path)[5])["event"], "checkpoint");
    }

    #[test]
    fn an_edited_field_is_reported_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        text[2] = text[2].replace("sensor-2", "sensor-9");
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(3, ProblemKind::BadMac)]);
        let shown = report.problems[0].to_string();
        assert!(shown.ends_with("line 3: MAC does not match its content: the entry was edited (or written with another key)"), "{shown}");
    }

    #[test]
    fn a_removed_line_is_reported_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        text.remove(2);
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(3, ProblemKind::BrokenLink)]);
        assert!(
            report.problems[0].detail.contains("1 line(s) removed"),
            "{}",
            report.problems[0]
        );
    }

    #[test]
    fn an_inserted_line_is_one_problem_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        let real_mac = json(&text[2])["mac"].as_str().unwrap().to_string();
        let forged = text[2]
            .replace("sensor-2", "sensor-x")
            .replace(&real_mac, &"ab".repeat(32));
        text.insert(3, forged);
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(4, ProblemKind::BadMac)]);
    }

    #[test]
    fn reordered_lines_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        text.swap(1, 2);
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(
            kinds(&report),
            vec![
                (2, ProblemKind::BrokenLink),
                (3, ProblemKind::BrokenLink),
                (4, ProblemKind::BrokenLink)
            ]
        );
    }

    #[test]
    fn a_cut_last_line_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let text = std::fs::read(&s.path).unwrap();
        std::fs::write(&s.path, &text[..text.len() - 40]).unwrap();
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(6, ProblemKind::Torn)]);
        assert!(report.problems[0].detail.contains("truncated"));
    }

    #[test]
    fn a_truncated_log_misses_the_checkpoint_kept_off_the_box() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 5);
        let text = lines(&s.path);
        rewrite(&s.path, &text[..3]);
        // On its own, the shorter chain is consistent: that is what checkpoints are for.
        assert!(check(&s, None).is_clean());
        let report = check(&s, Some(checkpoint.expectation()));
        assert_eq!(kinds(&report), vec![(3, ProblemKind::MissingCheckpoint)]);
        assert!(report.problems[0].detail.contains("truncated"));
    }

    #[test]
    fn a_log_rewritten_with_another_key_fails_on_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            key: [9; 32],
            ..settings(dir.path())
        };
        write_log(&s, 4);
        let report = check(&s, None);
        assert_eq!(report.problems.len(), 5);
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.kind == ProblemKind::BadMac)
        );
    }

    #[test]
    fn a_log_rewritten_with_the_key_misses_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 5);
        std::fs::remove_file(&s.path).unwrap();
        let now = Instant::now();
        let mut forger = engine(&s, now);
        let forged = (0..5).map(|i| connect(&format!("other-{i}"))).collect();
        forger.step(forged, now, 1_000, true);
        drop(forger);
        let report = check(&s, Some(checkpoint.expectation()));
        assert_eq!(kinds(&report), vec![(6, ProblemKind::MissingCheckpoint)]);
        assert!(report.problems[0].detail.contains("rewritten"));
    }

    fn no_descriptor(_: &Path) -> io::Result<File> {
        Err(io::Error::from_raw_os_error(24))
    }

    #[test]
    fn a_rotation_without_a_descriptor_loses_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_files(dir.path());
        let now = Instant::now();
        let mut engine = engine(&s, now);
        engine.log.as_mut().unwrap().open_next = no_descriptor;
        log_connects(&mut engine, 0..12, now);
        // Every entry went on into the one file; each failed rotation was counted.
        assert_eq!(log_files(&s.path), vec![s.path.clone()]);
        assert_eq!(engine.metrics.audit_dropped.load(Ordering::Relaxed), 0);
        assert!(
            engine
                .metrics
                .audit_rotation_failures
                .load(Ordering::Relaxed)
                > 0
        );
        // Descriptors again: the next batch rotates, and the chain runs on.
        engine.log.as_mut().unwrap().open_next = open_append;
        engine.step(vec![connect("sensor-12")], now, 1_000, true);
        drop(engine);
        let files = log_files(&s.path);
        assert_eq!(files.len(), 2, "{files:?}");
        let report = verify(&files, &KEY, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        let text: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        for i in 0..=12 {
            assert!(text.contains(&format!("\"sensor-{i}\"")), "sensor-{i} lost");
        }
    }

    #[test]
    fn a_rotation_short_of_descriptors_uses_the_spare_one() {
        fn only_without_spare(path: &Path) -> io::Result<File> {
            // Succeeds only once the spare was given up (stands for EMFILE until then).
            static GIVEN_UP: AtomicU64 = AtomicU64::new(0);
            if GIVEN_UP.fetch_add(1, Ordering::Relaxed) == 0 {
                return Err(io::Error::from_raw_os_error(24));
            }
            open_append(path)
        }
        let dir = tempfile::tempdir().unwrap();
        let s = small_files(dir.path());
        let now = Instant::now();
        let mut engine = engine(&s, now);
        engine.log.as_mut().unwrap().open_next = only_without_spare;
        log_connects(&mut engine, 0..8, now);
        assert_eq!(
            engine
                .metrics
                .audit_rotation_failures
                .load(Ordering::Relaxed),
            0
        );
        assert!(log_files(&s.path).len() >= 2);
        assert!(
            engine.log.as_ref().unwrap().spare.is_some(),
            "the spare is taken back for the next rotation"
        );
    }

    #[test]
    fn rotation_keeps_the_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_files(dir.path());
        let now = Instant::now();
        let mut engine = engine(&s, now);
        log_connects(&mut engine, 0..12, now);
        engine.step(Vec::new(), now, 1_000, true);
        drop(engine);
        let files = log_files(&s.path);
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(files.last(), Some(&s.path));
        for file in &files {
            assert!(std::fs::metadata(file).unwrap().len() <= 1_000);
        }
        let report = verify(&files, &KEY, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.lines, 14);

        // A middle file alone is consistent, and says it starts mid-chain.
        let middle = verify(&files[1..2], &KEY, None);
        assert!(middle.is_clean(), "{:?}", middle.problems);
        assert_eq!(middle.notes[0].kind, ProblemKind::StartsMidChain);

        // Swapping two rotated files is seen where the second one starts.
        let (a, b) = (files[0].clone(), files[1].clone());
        let swap = dir.path().join("swap");
        std::fs::rename(&a, &swap).unwrap();
        std::fs::rename(&b, &a).unwrap();
        std::fs::rename(&swap, &b).unwrap();
        let report = verify(&files, &KEY, None);
        assert_eq!(report.problems[0].kind, ProblemKind::BrokenLink);
        assert_eq!((&report.problems[0].file, report.problems[0].line), (&b, 1));
        assert!(report.problems[0].detail.contains("out of order"));
    }

    #[test]
    fn rotation_deletes_the_oldest_file_beyond_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            max_file_bytes: 600,
            keep_files: 2,
            ..settings(dir.path())
        };
        let now = Instant::now();
        let mut engine = engine(&s, now);
        let entries = (0..20).map(|i| connect(&format!("sensor-{i}"))).collect();
        engine.step(entries, now, 1_000, true);
        drop(engine);
        let files = log_files(&s.path);
        assert_eq!(
            files,
            vec![rotated(&s.path, 2), rotated(&s.path, 1), s.path.clone()]
        );
        let report = verify(&files, &KEY, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.notes.len(), 1);
    }

    #[test]
    fn a_restart_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 2);
        let before = json(lines(&s.path).last().unwrap());
        write_log(&s, 2);
        let text = lines(&s.path);
        let resumed = json(&text[before["seq"].as_u64().unwrap() as usize + 1]);
        assert_eq!(resumed["seq"], before["seq"].as_u64().unwrap() + 1);
        assert_eq!(resumed["prev"], before["mac"]);
        assert_eq!(resumed["event"], "connect");
        assert!(check(&s, None).is_clean());
    }

    #[test]
    fn a_restart_after_rotation_continues_from_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 2);
        std::fs::rename(&s.path, rotated(&s.path, 1)).unwrap();
        write_log(&s, 1);
        let first = json(&lines(&s.path)[0]);
        assert_eq!(first["seq"], checkpoint.seq + 1);
        assert_eq!(first["prev"], checkpoint.mac.as_str());
        assert!(verify(&log_files(&s.path), &KEY, None).is_clean());
    }

    #[test]
    fn a_torn_line_is_recorded_at_restart_and_verify_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 3);
        let mut file = OpenOptions::new().append(true).open(&s.path).unwrap();
        file.write_all(br#"{"seq":4,"time_ms":17"#).unwrap();
        drop(file);
        write_log(&s, 1);
        let text = lines(&s.path);
        let recovery = json(&text[5]);
        assert_eq!(recovery["event"], "chain-recovery");
        assert!(
            recovery["reason"]
                .as_str()
                .unwrap()
                .contains("incomplete line")
        );
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(5, ProblemKind::Torn)]);
    }

    #[test]
    fn an_older_unchained_log_gets_a_new_chain_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        std::fs::write(
            &s.path,
            "{\"time_ms\":1,\"event\":\"start\",\"decision\":\"allow\"}\n",
        )
        .unwrap();
        write_log(&s, 1);
        let text = lines(&s.path);
        assert_eq!(json(&text[1])["event"], "chain-recovery");
        assert_eq!(json(&text[1])["seq"], 0);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(1, ProblemKind::Unchained)]);
    }

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
    fn aggregation_memory_is_bounded() {
        let t0 = Instant::now();
        let mut aggregator = Aggregator::new(Duration::from_secs(60), 2);
        let refused = |id: &str| AuditEntry::new("connect", "refuse").principal("device", id);
        assert!(aggregator.admit(&refused("a"), t0));
        assert!(aggregator.admit(&refused("b"), t0));
        assert!(!aggregator.admit(&refused("c"), t0));
        assert!(!aggregator.admit(&refused("d"), t0));
        assert!(!aggregator.admit(&refused("a"), t0));
        assert_eq!(aggregator.open.len(), 2);
        assert!(
            aggregator
                .close_expired(t0 + Duration::from_secs(59), 0)
                .is_empty()
        );
        let closed = aggregator.close_expired(t0 + Duration::from_secs(60), 0);
        let counts: Vec<_> = closed
            .iter()
            .map(|(e, x)| (e.principal.clone(), x.repeated))
            .collect();
        assert_eq!(
            counts,
            vec![(Some("a".to_string()), Some(1)), (None, Some(2))]
        );
        assert_eq!(aggregator.next_deadline(), None);
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

    #[test]
    fn a_checkpoint_signature_binds_its_fields_and_key() {
        let checkpoint = Checkpoint::sign(&KEY, 41, &[3; 32], 1_700_000_000_000);
        assert!(checkpoint.verify_signature(&KEY));
        assert!(!checkpoint.verify_signature(&[8; 32]));
        let moved = Checkpoint {
            seq: 40,
            ..checkpoint.clone()
        };
        assert!(!moved.verify_signature(&KEY));
        let garbled = Checkpoint {
            mac: "zz".into(),
            ..checkpoint
        };
        assert!(!garbled.verify_signature(&KEY));
    }

    #[test]
    fn the_checkpoint_argument_is_seq_colon_mac() {
        let mac = "AB".repeat(32);
        assert_eq!(
            parse_checkpoint_arg(&format!("17:{mac}")),
            Ok((17, "ab".repeat(32)))
        );
        assert!(parse_checkpoint_arg("17").is_err());
        assert!(parse_checkpoint_arg("x:00").is_err());
        assert!(parse_checkpoint_arg(&format!("17:{}", "0".repeat(63))).is_err());
    }

    #[test]
    fn the_key_is_created_private_and_a_wrong_length_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/audit.key");
        assert_eq!(load_key(&path).unwrap_err().kind(), io::ErrorKind::NotFound);
        let key = load_or_create_key(&path).unwrap();
        assert_eq!(load_or_create_key(&path).unwrap(), key);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        std::fs::write(&path, [1u8; 31]).unwrap();
        let refused = load_or_create_key(&path).unwrap_err().to_string();
        assert!(refused.contains("exactly 32 bytes (found 31)"), "{refused}");
    }

    #[test]
    fn settings_never_print_the_key() {
        let shown = format!("{:?}", AuditSettings::new("a.log".into(), [0xAB; 32]));
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("abab"),
            "{shown}"
        );
    }

    #[test]
    fn verify_never_panics_on_hostile_files() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>, ProblemKind)> = vec![
            (
                "binary",
                vec![0xff, 0x00, 0xfe, b'\n'],
                ProblemKind::NotJson,
            ),
            (
                "deep",
                "[".repeat(100_000).into_bytes(),
                ProblemKind::NotJson,
            ),
            ("array", b"[1,2]\n".to_vec(), ProblemKind::Unchained),
            (
                "string seq",
                br#"{"seq":"1","prev":"00","mac":"00"}"#.to_vec(),
                ProblemKind::Unchained,
            ),
            (
                "huge seq",
                format!(
                    "{{\"seq\":18446744073709551616,\"prev\":\"{0}\",\"mac\":\"{0}\"}}\n",
                    "0".repeat(64)
                )
                .into_bytes(),
                ProblemKind::Unchained,
            ),
            (
                "forged",
                format!(
                    "{{\"seq\":18446744073709551615,\"prev\":\"{0}\",\"mac\":\"{0}\"}}\n",
                    "0".repeat(64)
                )
                .into_bytes(),
                ProblemKind::BadMac,
            ),
            ("blank", b"\n\n".to_vec(), ProblemKind::NotJson),
            ("long", vec![b'a'; MAX_LINE + 10], ProblemKind::NotJson),
            ("cut", br#"{"seq":1,"#.to_vec(), ProblemKind::Torn),
        ];
        for (name, bytes, kind) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let report = verify(&[path], &KEY, Some((3, "0".repeat(64))));
            assert_eq!(
                report.problems[0].kind, kind,
                "{name}: {:?}",
                report.problems
            );
            assert_eq!(
                report.problems.last().unwrap().kind,
                ProblemKind::MissingCheckpoint,
                "{name}"
            );
        }
        let report = verify(
            &[dir.path().to_path_buf(), dir.path().join("absent")],
            &KEY,
            None,
        );
        assert_eq!(
            kinds(&report),
            vec![(1, ProblemKind::Unreadable), (0, ProblemKind::Unreadable)]
        );
        let report = verify(&[], &KEY, Some((0, "bad".into())));
        assert_eq!(report.problems[0].kind, ProblemKind::MissingCheckpoint);
    }
}
