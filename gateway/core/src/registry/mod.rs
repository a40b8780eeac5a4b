//! The registry of devices and services, stored in redb.
//!
//! redb holds the truth and survives restarts; authentication reads an immutable
//! in-memory `Snapshot` that is swapped whole after each committed change, so a
//! CONNECT never touches the disk and never waits for an admin command. Mutations are
//! rare (admin API) and run synchronously under a mutex.
//!
//! Every stored value is sealed (`record.rs`: a MAC bound to its table and key), and a
//! sealed manifest keeps each table's record count and a digest of its records, so a
//! record altered, moved, added or lost outside Portcullis is found when the file is
//! opened: every record is checked then, and a corrupt file is refused whole.

mod device_keys;
mod sync;
mod upgrade;

pub use device_keys::{MasterKeyRotation, NewDeviceKeys};
pub use sync::SyncChange;

pub use upgrade::format2_copy;

use crate::bans::{Ban, BanList, BanTarget};
use crate::device_key::SealedKey;
use crate::principal::{GroupName, PrincipalId, PrincipalKind};
use crate::record::{RecordError, RecordSealer, SEALED_V1, decode_payload};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

const PRINCIPALS_TABLE: &str = "principals";
const BANS_TABLE: &str = "bans";
/// Behaviour states and their history, by device id (`behaviour_record::Record` as JSON).
const BEHAVIOUR_TABLE: &str = "behaviour";
/// The sealed manifest; its presence also marks a registry whose records are sealed.
const META_TABLE: &str = "meta";
const MANIFEST_KEY: &str = "manifest";
/// The tables of sealed records, in the order they are checked.
const SEALED_TABLES: [&str; 3] = [PRINCIPALS_TABLE, BANS_TABLE, BEHAVIOUR_TABLE];

fn table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// How to recover, in every error that says the file is corrupt.
pub const RECOVERY_HINT: &str = "restore a backup with `portcullis registry restore FILE` \
     (the gateway stopped; see docs/operations.md)";

/// A certificate credential: the group's CA must have issued it and its identity
/// field must equal the id. With a fingerprint, only that exact certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertCredential {
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalRecord {
    pub kind: PrincipalKind,
    pub id: PrincipalId,
    pub group: GroupName,
    pub enabled: bool,
    pub cert: Option<CertCredential>,
    /// HMAC-SHA256 of the secret (hex); never the secret.
    pub secret_hash: Option<String>,
    /// The DTLS pre-shared key (CoAP), encrypted under the master key
    /// (`device_key`); absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<SealedKey>,
    /// The serial frame key, encrypted the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_key: Option<SealedKey>,
    /// Bumped on every credential rotation; sessions remember theirs.
    pub generation: u64,
    pub created_unix: u64,
    pub updated_unix: u64,
}

impl PrincipalRecord {
    pub fn secret_hash_bytes(&self) -> Option<[u8; 32]> {
        let hex = self.secret_hash.as_ref()?;
        let bytes = hex::decode(hex).ok()?;
        bytes.try_into().ok()
    }
}

fn key(kind: PrincipalKind, id: &PrincipalId) -> String {
    format!("{}/{}", kind.as_str(), id)
}

/// Each table's record count and the XOR of a hash of each (key, stored value): kept
/// up to date in every write, so a record lost or added behind our back changes it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    tables: BTreeMap<String, TableSum>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct TableSum {
    count: u64,
    digest: [u8; 32],
}

impl TableSum {
    fn toggle(&mut self, key: &str, value: &[u8]) {
        let mut h = Sha256::new();
        h.update((key.len() as u64).to_be_bytes());
        h.update(key.as_bytes());
        h.update(value);
        for (d, e) in self.digest.iter_mut().zip(h.finalize()) {
            *d ^= e;
        }
    }
    fn add(&mut self, key: &str, value: &[u8]) {
        self.toggle(key, value);
        self.count = self.count.wrapping_add(1);
    }
    fn sub(&mut self, key: &str, value: &[u8]) {
        self.toggle(key, value);
        self.count = self.count.wrapping_sub(1);
    }
}

/// Every decoding a stored value can go through, on arbitrary bytes: for the fuzz
/// target and the test that replays its corpus. Returns; never panics.
pub fn decode_any(value: &[u8]) {
    let sealer = RecordSealer::derive(&[0; 32]);
    for name in SEALED_TABLES.iter().chain([&META_TABLE]) {
        let _ = sealer.open(name, "device/fuzz", value);
    }
    // What follows a MAC is JSON; legacy (unsealed) records are the JSON alone.
    let _ = decode_payload::<PrincipalRecord>(value);
    let _ = decode_payload::<Ban>(value);
    let _ = decode_payload::<crate::behaviour_record::Record>(value);
    let _ = decode_payload::<Manifest>(value);
}

/// What `check` found: the records of each table, all verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSummary {
    pub principals: u64,
    pub bans: u64,
    pub behaviour: u64,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    principals: HashMap<(PrincipalKind, PrincipalId), Arc<PrincipalRecord>>,
}

impl Snapshot {
    pub fn get(&self, kind: PrincipalKind, id: &PrincipalId) -> Option<&Arc<PrincipalRecord>> {
        self.principals.get(&(kind, id.clone()))
    }

    pub fn list(&self, kind: PrincipalKind) -> Vec<Arc<PrincipalRecord>> {
        let mut out: Vec<_> = self
            .principals
            .values()
            .filter(|r| r.kind == kind)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn len(&self) -> usize {
        self.principals.len()
    }

    /// How many principals of one kind are registered.
    pub fn count(&self, kind: PrincipalKind) -> usize {
        self.principals.keys().filter(|(k, _)| *k == kind).count()
    }

    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("registry {path} is corrupt: {reason}; {hint}", hint = RECOVERY_HINT)]
    CorruptFile { path: String, reason: String },
    #[error("registry storage: {0}")]
    Storage(String),
    #[error("{kind} {id} already exists")]
    Exists {
        kind: PrincipalKind,
        id: PrincipalId,
    },
    #[error("no such {kind}: {id}")]
    NotFound {
        kind: PrincipalKind,
        id: PrincipalId,
    },
    /// The records a sync was planned from changed before it could commit: nothing
    /// was changed.
    #[error("the {kind}s changed while the sync was planned; nothing changed: run it again")]
    ChangedDuringSync { kind: PrincipalKind },
    #[error("corrupt registry entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// redb panicked on the file's content (contained at the storage boundary).
    #[error("the storage library (redb) stopped on an internal check of the file's content: {0}")]
    StoragePanic(String),
    /// A device key could not be sealed (the system's random source failed).
    #[error("{kind} {id}: its {}: {reason}", purpose.as_str())]
    Seal {
        kind: PrincipalKind,
        id: PrincipalId,
        purpose: crate::device_key::KeyPurpose,
        reason: crate::device_key::DeviceKeyError,
    },
    /// The master key source refused a rotation step.
    #[error("{0}")]
    MasterKey(crate::device_key::DeviceKeyError),
    /// A master key rotation would lose these device keys: nothing was changed.
    #[error(
        "master key rotation refused, nothing changed: {} under the {keys_from}; \
         give those devices new keys (`portcullis device rotate ID --psk-generate`) or put \
         back the master key that sealed them, then run it again",
        device_keys::list(keys)
    )]
    KeysDoNotOpen {
        keys_from: String,
        keys: Vec<String>,
    },
    /// After a rotation sealed everything again, these keys still need an old master
    /// key: it was kept.
    #[error(
        "master key rotation not finished: {} under the new key alone, so the \
         old key stays in the {keys_from} (every key still opens); run `portcullis master-key \
         rotate` again",
        device_keys::list(keys)
    )]
    NotResealed {
        keys_from: String,
        keys: Vec<String>,
    },
}

fn storage<E: std::fmt::Display>(e: E) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

fn corrupt(table: &str, key: &str) -> impl FnOnce(RecordError) -> RegistryError {
    let key = format!("{table}/{key}");
    move |e| RegistryError::Corrupt {
        key,
        reason: e.to_string(),
    }
}

/// Run storage work so that a panic inside it (redb on a corrupt page) becomes an
/// error.
fn contain<T>(work: impl FnOnce() -> Result<T, RegistryError>) -> Result<T, RegistryError> {
    crate::storage::contain(work, RegistryError::StoragePanic)
}

/// A table of sealed records inside a write transaction, keeping its manifest sum.
struct SealedTable<'t, 's> {
    table: redb::Table<'t, &'static str, &'static [u8]>,
    name: &'static str,
    sealer: &'s RecordSealer,
    sum: TableSum,
}

impl SealedTable<'_, '_> {
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, RegistryError> {
        match self.table.get(key).map_err(storage)? {
            Some(v) => Ok(Some(
                self.sealer
                    .decode(self.name, key, v.value())
                    .map_err(corrupt(self.name, key))?,
            )),
            None => Ok(None),
        }
    }

    fn insert(&mut self, key: &str, payload: &[u8]) -> Result<(), RegistryError> {
        let value = self.sealer.seal(self.name, key, payload);
        if let Some(old) = self.table.insert(key, value.as_slice()).map_err(storage)? {
            self.sum.sub(key, old.value());
        }
        self.sum.add(key, &value);
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, RegistryError> {
        match self.table.remove(key).map_err(storage)? {
            Some(old) => {
                self.sum.sub(key, old.value());
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Every record that decodes as `T` (for pruning; the open check verified all).
    fn entries<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, RegistryError> {
        let mut out = Vec::new();
        for entry in self.table.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            if let Ok(record) = self.sealer.decode(self.name, k.value(), v.value()) {
                out.push((k.value().to_string(), record));
            }
        }
        Ok(out)
    }
}

pub struct Registry {
    db: Database,
    path: PathBuf,
    sealer: RecordSealer,
    snapshot: RwLock<Arc<Snapshot>>,
    bans: RwLock<Arc<BanList>>,
    write: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `Registry::open_with` does with a file that has no manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legacy {
    /// Seal its records (a registry from before sealing, or a new file).
    Seal,
    /// Refuse it as corrupt.
    Refuse,
}

impl Registry {
    /// Open (or create) the registry file and check every record in it; a corrupt file
    /// is refused with an error naming it and the way to recover. redb locks the file:
    /// a second gateway on the same data dir fails here with a clear error.
    ///
    /// A registry written before records were sealed (no manifest) has its records
    /// sealed once, here.
    pub fn open(path: &Path, sealer: RecordSealer) -> Result<Registry, RegistryError> {
        Self::open_with(path, sealer, Legacy::Seal)
    }

    /// As `open`, saying what to do with a file that has no manifest: seal it (a
    /// registry from before sealing, or a new one), or refuse it (this gateway has
    /// sealed its registry before, so an unsealed file is one put in its place; and a
    /// backup is always sealed).
    pub fn open_with(
        path: &Path,
        sealer: RecordSealer,
        legacy: Legacy,
    ) -> Result<Registry, RegistryError> {
        let display = path.display().to_string();
        let open_err = |reason: String| RegistryError::Open {
            path: display.clone(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(e.to_string()))?;
        }
        // redb makes a new database of an empty file: a registry truncated to nothing
        // would come back empty, every principal silently gone.
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(RegistryError::CorruptFile {
                path: display.clone(),
                reason: "the file is empty (0 bytes)".into(),
            });
        }
        contain(|| Self::open_checked(path, sealer, legacy)).map_err(|e| match e {
            e @ (RegistryError::Open { .. } | RegistryError::CorruptFile { .. }) => e,
            other => RegistryError::CorruptFile {
                path: display.clone(),
                reason: other.to_string(),
            },
        })
    }

    fn open_checked(
        path: &Path,
        sealer: RecordSealer,
        legacy: Legacy,
    ) -> Result<Registry, RegistryError> {
        let open_err = |reason: String| RegistryError::Open {
            path: path.display().to_string(),
            reason,
        };
        let db = match Database::create(path) {
            Err(redb::DatabaseError::UpgradeRequired(2)) => {
                upgrade::upgrade(path)?;
                Database::create(path)
            }
            other => other,
        };
        let db = db.map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                "already open by another process (is a gateway running on this data dir?)".into(),
            ),
            // Not the content's fault: no restore needed.
            redb::DatabaseError::Storage(redb::StorageError::Io(e))
                if e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                open_err(e.to_string())
            }
            other => RegistryError::CorruptFile {
                path: path.display().to_string(),
                reason: other.to_string(),
            },
        })?;
        // Owner-only: ids, groups and secret hashes.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_err(e.to_string()))?;
        {
            let tx = db.begin_write().map_err(storage)?;
            for name in SEALED_TABLES.iter().chain([&META_TABLE]) {
                tx.open_table(table(name)).map_err(storage)?;
            }
            tx.commit().map_err(storage)?;
        }
        let registry = Registry {
            db,
            path: path.to_path_buf(),
            sealer,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            bans: RwLock::new(Arc::new(BanList::default())),
            write: Mutex::new(()),
        };
        if registry.manifest()?.is_none() {
            if legacy == Legacy::Refuse {
                return Err(RegistryError::Corrupt {
                    key: format!("{META_TABLE}/{MANIFEST_KEY}"),
                    reason: "missing: the file is not sealed, but a sealed registry is \
                             expected here (this gateway sealed its registry before, or \
                             this is a backup)"
                        .into(),
                });
            }
            registry.seal_legacy()?;
        }
        registry.verify()?;
        let snapshot = registry.load()?;
        *registry.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
        let bans = registry.load_bans()?;
        *registry.bans.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(BanList::new(bans));
        Ok(registry)
    }

    fn manifest(&self) -> Result<Option<Manifest>, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let meta = tx.open_table(table(META_TABLE)).map_err(storage)?;
        let value = meta.get(MANIFEST_KEY).map_err(storage)?;
        value
            .map(|v| {
                self.sealer
                    .decode(META_TABLE, MANIFEST_KEY, v.value())
                    .map_err(corrupt(META_TABLE, MANIFEST_KEY))
            })
            .transpose()
    }

    /// Seal the records of a registry written before records were sealed, and write
    /// its manifest, in one transaction. A sealed record here means the manifest was
    /// lost: that is corruption, not an old file.
    fn seal_legacy(&self) -> Result<(), RegistryError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(storage)?;
        let mut manifest = Manifest::default();
        let mut sealed = 0usize;
        for name in SEALED_TABLES {
            let mut t = tx.open_table(table(name)).map_err(storage)?;
            let mut old = Vec::new();
            for entry in t.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                old.push((k.value().to_string(), v.value().to_vec()));
            }
            let mut sum = TableSum::default();
            for (k, v) in old {
                if v.first() == Some(&SEALED_V1) {
                    return Err(RegistryError::Corrupt {
                        key: format!("{META_TABLE}/{MANIFEST_KEY}"),
                        reason: "missing, but the records are sealed".into(),
                    });
                }
                let readable = match name {
                    PRINCIPALS_TABLE => decode_payload::<PrincipalRecord>(&v).map(|_| ()),
                    BANS_TABLE => decode_payload::<Ban>(&v).map(|_| ()),
                    _ => decode_payload::<crate::behaviour_record::Record>(&v).map(|_| ()),
                };
                match (readable, name) {
                    (Ok(()), _) => {
                        let value = self.sealer.seal(name, &k, &v);
                        t.insert(k.as_str(), value.as_slice()).map_err(storage)?;
                        sum.add(&k, &value);
                        sealed += 1;
                    }
                    // As before sealing: an unreadable behaviour record costs that
                    // device its history, not the start.
                    (Err(e), BEHAVIOUR_TABLE) => {
                        tracing::warn!(device = k, error = %e, "behaviour record unreadable: dropped");
                        t.remove(k.as_str()).map_err(storage)?;
                    }
                    (Err(e), _) => return Err(corrupt(name, &k)(e)),
                }
            }
            manifest.tables.insert(name.to_string(), sum);
        }
        self.write_manifest(&tx, &manifest)?;
        tx.commit().map_err(storage)?;
        if sealed > 0 {
            tracing::warn!(
                records = sealed,
                "registry records were unsealed (written before sealing): sealed now"
            );
        }
        Ok(())
    }

    fn write_manifest(
        &self,
        tx: &redb::WriteTransaction,
        manifest: &Manifest,
    ) -> Result<(), RegistryError> {
        let payload = serde_json::to_vec(manifest).map_err(storage)?;
        let value = self.sealer.seal(META_TABLE, MANIFEST_KEY, &payload);
        tx.open_table(table(META_TABLE))
            .map_err(storage)?
            .insert(MANIFEST_KEY, value.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Check every record: its MAC, its content, and each table against the manifest.
    fn verify(&self) -> Result<CheckSummary, RegistryError> {
        let manifest = self.manifest()?.ok_or_else(|| RegistryError::Corrupt {
            key: format!("{META_TABLE}/{MANIFEST_KEY}"),
            reason: "missing".into(),
        })?;
        let tx = self.db.begin_read().map_err(storage)?;
        let mut counts = [0u64; 3];
        for (i, name) in SEALED_TABLES.into_iter().enumerate() {
            let t = tx.open_table(table(name)).map_err(storage)?;
            let mut sum = TableSum::default();
            for entry in t.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let (k, v) = (k.value(), v.value());
                let payload = self.sealer.open(name, k, v).map_err(corrupt(name, k))?;
                let readable = match name {
                    PRINCIPALS_TABLE => decode_payload::<PrincipalRecord>(payload).map(|_| ()),
                    BANS_TABLE => decode_payload::<Ban>(payload).map(|_| ()),
                    _ => decode_payload::<crate::behaviour_record::Record>(payload).map(|_| ()),
                };
                readable.map_err(corrupt(name, k))?;
                sum.add(k, v);
            }
            let expected = manifest.tables.get(name).copied().unwrap_or_default();
            if sum != expected || t.len().map_err(storage)? != sum.count {
                return Err(RegistryError::Corrupt {
                    key: name.to_string(),
                    reason: format!(
                        "holds {} records that do not match the manifest's {} \
                         (records lost, added or replaced outside Portcullis)",
                        sum.count, expected.count
                    ),
                });
            }
            counts[i] = sum.count;
        }
        Ok(CheckSummary {
            principals: counts[0],
            bans: counts[1],
            behaviour: counts[2],
        })
    }

    /// Check every record again (the `registry check` command).
    pub fn check(&self) -> Result<CheckSummary, RegistryError> {
        contain(|| self.verify()).map_err(|e| self.file_error(e))
    }

    fn file_error(&self, e: RegistryError) -> RegistryError {
        RegistryError::CorruptFile {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// Copy the registry, as of one read transaction, to a new file `dest` (never
    /// overwritten), then open the copy to check it. Consistent while the gateway
    /// runs: writers do not wait for it and it sees no half-made change.
    pub fn backup(&self, dest: &Path) -> Result<CheckSummary, RegistryError> {
        let dest_err = |reason: String| RegistryError::Open {
            path: dest.display().to_string(),
            reason,
        };
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dest)
                .map_err(|e| dest_err(e.to_string()))?
        };
        let copied = contain(|| {
            self.verify().map_err(|e| self.file_error(e))?;
            let out = Database::builder()
                .create_with_backend(redb::backends::FileBackend::new(file))
                .map_err(|e| dest_err(e.to_string()))?;
            let rx = self.db.begin_read().map_err(storage)?;
            let wx = out.begin_write().map_err(storage)?;
            for name in SEALED_TABLES.iter().chain([&META_TABLE]) {
                let from = rx.open_table(table(name)).map_err(storage)?;
                let mut to = wx.open_table(table(name)).map_err(storage)?;
                for entry in from.iter().map_err(storage)? {
                    let (k, v) = entry.map_err(storage)?;
                    to.insert(k.value(), v.value()).map_err(storage)?;
                }
            }
            wx.commit().map_err(storage)
        });
        let checked = copied.and_then(|()| Registry::open(dest, self.sealer.clone())?.check());
        if checked.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        checked
    }

    fn load(&self) -> Result<Snapshot, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let t = tx.open_table(table(PRINCIPALS_TABLE)).map_err(storage)?;
        let mut principals = HashMap::new();
        for entry in t.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let record: PrincipalRecord = self
                .sealer
                .decode(PRINCIPALS_TABLE, k.value(), v.value())
                .map_err(corrupt(PRINCIPALS_TABLE, k.value()))?;
            principals.insert((record.kind, record.id.clone()), Arc::new(record));
        }
        Ok(Snapshot { principals })
    }

    fn load_bans(&self) -> Result<Vec<Ban>, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let t = tx.open_table(table(BANS_TABLE)).map_err(storage)?;
        let mut bans = Vec::new();
        for entry in t.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let ban: Ban = self
                .sealer
                .decode(BANS_TABLE, k.value(), v.value())
                .map_err(corrupt(BANS_TABLE, k.value()))?;
            bans.push(ban);
        }
        Ok(bans)
    }

    /// The kept behaviour records (quarantine state and history), by device id.
    pub fn behaviour_records(
        &self,
    ) -> Result<Vec<(String, crate::behaviour_record::Record)>, RegistryError> {
        contain(|| {
            let tx = self.db.begin_read().map_err(storage)?;
            let t = tx.open_table(table(BEHAVIOUR_TABLE)).map_err(storage)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let record = self
                    .sealer
                    .decode(BEHAVIOUR_TABLE, k.value(), v.value())
                    .map_err(corrupt(BEHAVIOUR_TABLE, k.value()))?;
                out.push((k.value().to_string(), record));
            }
            Ok(out)
        })
    }

    /// The lock every change holds from its first read to publishing its snapshot.
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One write transaction on one table of sealed records, its manifest sum kept.
    fn write<R>(
        &self,
        name: &'static str,
        change: impl FnOnce(&mut SealedTable<'_, '_>) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        let held = self.lock();
        self.write_locked(&held, name, change)
    }

    /// As `write`, under the lock the caller holds (a change that publishes a snapshot
    /// after its commit, or does more than one step).
    fn write_locked<R>(
        &self,
        _held: &MutexGuard<'_, ()>,
        name: &'static str,
        change: impl FnOnce(&mut SealedTable<'_, '_>) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        contain(|| {
            let mut manifest = self.manifest()?.unwrap_or_default();
            let tx = self.db.begin_write().map_err(storage)?;
            let (result, sum) = {
                let mut sealed = SealedTable {
                    table: tx.open_table(table(name)).map_err(storage)?,
                    name,
                    sealer: &self.sealer,
                    sum: manifest.tables.get(name).copied().unwrap_or_default(),
                };
                (change(&mut sealed)?, sealed.sum)
            };
            manifest.tables.insert(name.to_string(), sum);
            self.write_manifest(&tx, &manifest)?;
            tx.commit().map_err(storage)?;
            Ok(result)
        })
    }

    /// Store behaviour records, all in one commit.
    pub fn put_behaviour_records(
        &self,
        records: &[(String, crate::behaviour_record::Record)],
    ) -> Result<(), RegistryError> {
        self.write(BEHAVIOUR_TABLE, |t| {
            for (id, record) in records {
                let bytes = serde_json::to_vec(record).map_err(storage)?;
                t.insert(id, &bytes)?;
            }
            Ok(())
        })
    }

    /// Forget a device's behaviour record (the device was removed).
    pub fn remove_behaviour_record(&self, id: &PrincipalId) -> Result<(), RegistryError> {
        self.write(BEHAVIOUR_TABLE, |t| t.remove(id.as_str()).map(|_| ()))
    }

    /// The bans in force (expired ones are dropped when the list next changes).
    pub fn bans(&self) -> Arc<BanList> {
        self.bans.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Add or replace a ban; expired bans are pruned in the same transaction.
    pub fn add_ban(&self, ban: Ban) -> Result<(), RegistryError> {
        self.change_bans(|t| {
            let bytes = serde_json::to_vec(&ban).map_err(storage)?;
            t.insert(&ban.target.key(), &bytes)?;
            Ok(true)
        })
        .map(|_| ())
    }

    /// Lift a ban; false if there was none.
    pub fn remove_ban(&self, target: &BanTarget) -> Result<bool, RegistryError> {
        self.change_bans(|t| t.remove(&target.key()))
    }

    fn change_bans(
        &self,
        change: impl FnOnce(&mut SealedTable<'_, '_>) -> Result<bool, RegistryError>,
    ) -> Result<bool, RegistryError> {
        let now = now_unix();
        let result = self.write(BANS_TABLE, |t| {
            let result = change(t)?;
            // Prune what has expired.
            for (k, ban) in t.entries::<Ban>()? {
                if !ban.active(now) {
                    t.remove(&k)?;
                }
            }
            Ok(result)
        })?;
        let bans = contain(|| self.load_bans())?;
        *self.bans.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(BanList::new(bans));
        Ok(result)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Publish the records a commit changed (`None`: removed), under the write lock,
    /// so that snapshots are published in the order of their commits (else a slower
    /// change could put back a record a later one replaced).
    fn publish(
        &self,
        _held: &MutexGuard<'_, ()>,
        changed: impl IntoIterator<Item = ((PrincipalKind, PrincipalId), Option<PrincipalRecord>)>,
    ) {
        let mut snapshot = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let mut principals = snapshot.principals.clone();
        for (k, record) in changed {
            match record {
                Some(record) => principals.insert(k, Arc::new(record)),
                None => principals.remove(&k),
            };
        }
        *snapshot = Arc::new(Snapshot { principals });
    }

    /// Apply one change to a record inside a write transaction, then publish a new
    /// snapshot. `change` sees the current record (if any) and returns the new one
    /// (or `None` to delete).
    fn mutate(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        change: impl FnOnce(Option<PrincipalRecord>) -> Result<Option<PrincipalRecord>, RegistryError>,
    ) -> Result<Option<PrincipalRecord>, RegistryError> {
        let k = key(kind, id);
        let held = self.lock();
        let result = self.write_locked(&held, PRINCIPALS_TABLE, |t| {
            let next = change(t.get::<PrincipalRecord>(&k)?)?;
            match &next {
                Some(record) => {
                    let bytes = serde_json::to_vec(record).map_err(storage)?;
                    t.insert(&k, &bytes)?;
                }
                None => {
                    t.remove(&k)?;
                }
            }
            Ok(next)
        })?;
        self.publish(&held, [((kind, id.clone()), result.clone())]);
        Ok(result)
    }

    /// Add a record as it is (its device keys, if any, sealed already: see `rotate`;
    /// the admin API uses `add_with_psk`).
    pub fn add(&self, record: PrincipalRecord) -> Result<(), RegistryError> {
        let (kind, id) = (record.kind, record.id.clone());
        self.mutate(kind, &id, |current| match current {
            Some(_) => Err(RegistryError::Exists {
                kind,
                id: id.clone(),
            }),
            None => Ok(Some(record)),
        })?;
        Ok(())
    }

    /// Add many records in one transaction (one commit, one new snapshot): all of
    /// them, or none if any already exists.
    pub fn add_all(&self, records: Vec<PrincipalRecord>) -> Result<(), RegistryError> {
        self.add_all_as(records.into_iter().map(|r| (r, ())).collect(), |r, ()| {
            Ok(r)
        })
    }

    /// As `add_all`, each record made by `finish` from its part inside the write
    /// transaction (a device key sealed there).
    fn add_all_as<P>(
        &self,
        records: Vec<(PrincipalRecord, P)>,
        finish: impl Fn(PrincipalRecord, P) -> Result<PrincipalRecord, RegistryError>,
    ) -> Result<(), RegistryError> {
        let held = self.lock();
        let stored = self.write_locked(&held, PRINCIPALS_TABLE, |t| {
            let mut stored = Vec::with_capacity(records.len());
            for (record, part) in records {
                let k = key(record.kind, &record.id);
                if t.table.get(k.as_str()).map_err(storage)?.is_some() {
                    return Err(RegistryError::Exists {
                        kind: record.kind,
                        id: record.id.clone(),
                    });
                }
                let record = finish(record, part)?;
                let bytes = serde_json::to_vec(&record).map_err(storage)?;
                t.insert(&k, &bytes)?;
                stored.push(record);
            }
            Ok(stored)
        })?;
        self.publish(
            &held,
            stored
                .into_iter()
                .map(|r| ((r.kind, r.id.clone()), Some(r))),
        );
        Ok(())
    }

    /// Replace every principal record `change` returns a new version of, in one
    /// commit, under the registry's write lock (`held`); how many changed. The table
    /// itself is walked inside the transaction, so a record added just before is not
    /// missed.
    fn update_all_locked(
        &self,
        held: &MutexGuard<'_, ()>,
        change: impl Fn(&PrincipalRecord) -> Result<Option<PrincipalRecord>, RegistryError>,
    ) -> Result<usize, RegistryError> {
        let changed = self.write_locked(held, PRINCIPALS_TABLE, |t| {
            let mut current = Vec::new();
            for entry in t.table.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let record: PrincipalRecord = self
                    .sealer
                    .decode(PRINCIPALS_TABLE, k.value(), v.value())
                    .map_err(corrupt(PRINCIPALS_TABLE, k.value()))?;
                current.push((k.value().to_string(), record));
            }
            let mut changed = Vec::new();
            for (k, record) in current {
                if let Some(next) = change(&record)? {
                    let bytes = serde_json::to_vec(&next).map_err(storage)?;
                    t.insert(&k, &bytes)?;
                    changed.push(next);
                }
            }
            Ok(changed)
        })?;
        let n = changed.len();
        self.publish(
            held,
            changed
                .into_iter()
                .map(|r| ((r.kind, r.id.clone()), Some(r))),
        );
        Ok(n)
    }

    pub fn set_enabled(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        enabled: bool,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.mutate(kind, id, |current| {
            let mut record = current.ok_or_else(|| RegistryError::NotFound {
                kind,
                id: id.clone(),
            })?;
            record.enabled = enabled;
            record.updated_unix = now_unix();
            Ok(Some(record))
        })?
        .ok_or_else(|| RegistryError::NotFound {
            kind,
            id: id.clone(),
        })
    }

    pub fn remove(&self, kind: PrincipalKind, id: &PrincipalId) -> Result<(), RegistryError> {
        self.mutate(kind, id, |current| match current {
            Some(_) => Ok(None),
            None => Err(RegistryError::NotFound {
                kind,
                id: id.clone(),
            }),
        })?;
        Ok(())
    }

    /// Replace the credentials given (a `Some`), bump the generation. A `psk` sealed
    /// before this call could have been sealed under a master key that a rotation has
    /// dropped since: the admin API gives keys in the clear to `rotate_with_psk`.
    pub fn rotate(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        cert: Option<CertCredential>,
        secret_hash: Option<String>,
        psk: Option<SealedKey>,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.rotate_as(kind, id, cert, secret_hash, |record| {
            if psk.is_some() {
                record.psk = psk;
            }
            Ok(())
        })
    }

    /// As `rotate`, the new device keys (if any) sealed into the record by `keys`
    /// inside the write transaction.
    fn rotate_as(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        cert: Option<CertCredential>,
        secret_hash: Option<String>,
        keys: impl FnOnce(&mut PrincipalRecord) -> Result<(), RegistryError>,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.mutate(kind, id, |current| {
            let mut record = current.ok_or_else(|| RegistryError::NotFound {
                kind,
                id: id.clone(),
            })?;
            if cert.is_some() {
                record.cert = cert;
            }
            if secret_hash.is_some() {
                record.secret_hash = secret_hash;
            }
            keys(&mut record)?;
            record.generation += 1;
            record.updated_unix = now_unix();
            Ok(Some(record))
        })?
        .ok_or_else(|| RegistryError::NotFound {
            kind,
            id: id.clone(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device of group `default` with a certificate from the group's CA.
    pub(crate) fn record(id: &str) -> PrincipalRecord {
        PrincipalRecord {
            kind: PrincipalKind::Device,
            id: PrincipalId::parse(id).unwrap(),
            group: GroupName::parse("default").unwrap(),
            enabled: true,
            cert: Some(CertCredential { fingerprint: None }),
            secret_hash: None,
            psk: None,
            frame_key: None,
            generation: 0,
            created_unix: 1,
            updated_unix: 1,
        }
    }

    #[test]
    fn registry_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        {
            let r = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
            r.add(record("sensor-1")).unwrap();
            r.add(record("sensor-2")).unwrap();
            r.remove(
                PrincipalKind::Device,
                &PrincipalId::parse("sensor-2").unwrap(),
            )
            .unwrap();
        }
        let r = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
        let snap = r.snapshot();
        assert_eq!(snap.len(), 1);
        let got = snap
            .get(
                PrincipalKind::Device,
                &PrincipalId::parse("sensor-1").unwrap(),
            )
            .unwrap();
        assert_eq!(**got, record("sensor-1"));
    }

    /// Ids of dots only are refused when new; one stored before that rule still
    /// opens, verifies and can be removed.
    #[test]
    fn a_stored_dot_only_id_still_opens_and_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let dots = PrincipalId::existing("..").unwrap();
        {
            let r = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
            r.add(PrincipalRecord {
                id: dots.clone(),
                ..record("sensor-1")
            })
            .unwrap();
        }
        let r = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
        r.verify().unwrap();
        assert!(r.snapshot().get(PrincipalKind::Device, &dots).is_some());
        r.remove(PrincipalKind::Device, &dots).unwrap();
        assert_eq!(r.snapshot().len(), 0);
    }

    #[test]
    fn add_all_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap();
        r.add(record("b")).unwrap();
        let err = r.add_all(vec![record("a"), record("b")]).unwrap_err();
        assert!(matches!(err, RegistryError::Exists { .. }), "{err}");
        assert!(
            r.snapshot()
                .get(PrincipalKind::Device, &PrincipalId::parse("a").unwrap())
                .is_none()
        );
        r.add_all(vec![record("a"), record("c")]).unwrap();
        assert_eq!(r.snapshot().len(), 3);
        drop(r);
        // Committed: there after reopening.
        let r = Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap();
        assert_eq!(r.snapshot().len(), 3);
    }

    #[test]
    fn duplicate_add_is_refused_and_snapshot_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap();
        r.add(record("a")).unwrap();
        let err = r.add(record("a")).unwrap_err();
        assert!(matches!(err, RegistryError::Exists { .. }), "{err}");
        assert_eq!(r.snapshot().len(), 1);
    }

    #[test]
    fn snapshot_taken_before_a_change_is_unaffected() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap();
        r.add(record("a")).unwrap();
        let before = r.snapshot();
        let id = PrincipalId::parse("a").unwrap();
        r.set_enabled(PrincipalKind::Device, &id, false).unwrap();
        assert!(before.get(PrincipalKind::Device, &id).unwrap().enabled);
        assert!(
            !r.snapshot()
                .get(PrincipalKind::Device, &id)
                .unwrap()
                .enabled
        );
    }

    #[test]
    fn rotate_bumps_generation() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap();
        r.add(record("a")).unwrap();
        let id = PrincipalId::parse("a").unwrap();
        let rec = r
            .rotate(
                PrincipalKind::Device,
                &id,
                None,
                Some("00".repeat(32)),
                None,
            )
            .unwrap();
        assert_eq!(rec.generation, 1);
        assert!(rec.secret_hash_bytes().is_some());
    }

    #[test]
    fn bans_persist_and_expired_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let target = BanTarget::Source("192.0.2.0/24".parse().unwrap());
        {
            let r = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
            r.add_ban(Ban {
                target: target.clone(),
                reason: "scanner".into(),
                created_unix: 1,
                expires_unix: None,
            })
            .unwrap();
            r.add_ban(Ban {
                target: BanTarget::Source("198.51.100.1".parse().unwrap()),
                reason: "old".into(),
                created_unix: 1,
                expires_unix: Some(2),
            })
            .unwrap();
            // The expired one was pruned when the list changed.
            assert_eq!(r.bans().all().len(), 1);
        }
        let r = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
        assert!(
            r.bans()
                .source("192.0.2.9".parse().unwrap(), now_unix())
                .is_some()
        );
        assert!(r.remove_ban(&target).unwrap());
        assert!(!r.remove_ban(&target).unwrap());
        assert!(r.bans().all().is_empty());
    }

    fn sealer() -> RecordSealer {
        RecordSealer::derive(&[5; 32])
    }

    /// Write `value` at `key` of `name` behind the registry's back.
    fn poke(path: &Path, name: &str, key: &str, value: Option<&[u8]>) {
        let db = Database::create(path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(table(name)).unwrap();
            match value {
                Some(v) => drop(t.insert(key, v).unwrap()),
                None => drop(t.remove(key).unwrap()),
            }
        }
        tx.commit().unwrap();
    }

    fn stored(path: &Path, name: &str, key: &str) -> Vec<u8> {
        let db = Database::create(path).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(table(name)).unwrap();
        t.get(key).unwrap().unwrap().value().to_vec()
    }

    fn quarantined() -> crate::behaviour_record::Record {
        crate::behaviour_record::Record {
            state: crate::behaviour::State::Quarantined,
            since_unix: 5,
            history: Default::default(),
        }
    }

    #[test]
    fn an_altered_record_refuses_the_registry_naming_the_file_and_the_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        drop(Registry::open(&path, sealer()).unwrap().add(record("a")));
        let mut v = stored(&path, PRINCIPALS_TABLE, "device/a");
        let last = v.len() - 2;
        v[last] ^= 0x01;
        poke(&path, PRINCIPALS_TABLE, "device/a", Some(&v));
        let err = Registry::open(&path, sealer()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("principals/device/a"), "{err}");
        assert!(err.contains("portcullis registry restore"), "{err}");
    }

    #[test]
    fn a_record_copied_to_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path, sealer()).unwrap();
            r.add(record("a")).unwrap();
            r.put_behaviour_records(&[("a".into(), quarantined())])
                .unwrap();
            r.put_behaviour_records(&[(
                "b".into(),
                crate::behaviour_record::Record {
                    state: crate::behaviour::State::Normal,
                    ..quarantined()
                },
            )])
            .unwrap();
        }
        // Swap the quarantined device's record for the other's: "a" looks released.
        let b = stored(&path, BEHAVIOUR_TABLE, "b");
        poke(&path, BEHAVIOUR_TABLE, "a", Some(&b));
        let err = Registry::open(&path, sealer()).unwrap_err().to_string();
        assert!(err.contains("behaviour/a"), "{err}");
    }

    #[test]
    fn a_lost_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path, sealer()).unwrap();
            r.put_behaviour_records(&[("a".into(), quarantined())])
                .unwrap();
        }
        poke(&path, BEHAVIOUR_TABLE, "a", None);
        let err = Registry::open(&path, sealer()).unwrap_err().to_string();
        assert!(
            err.contains("behaviour") && err.contains("manifest"),
            "{err}"
        );
    }

    #[test]
    fn records_sealed_under_another_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        drop(Registry::open(&path, sealer()).unwrap().add(record("a")));
        let err = Registry::open(&path, RecordSealer::derive(&[6; 32])).unwrap_err();
        assert!(matches!(err, RegistryError::CorruptFile { .. }), "{err}");
    }

    #[test]
    fn a_registry_from_before_sealing_is_sealed_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let legacy = serde_json::to_vec(&record("old")).unwrap();
        poke(&path, PRINCIPALS_TABLE, "device/old", Some(&legacy));
        poke(
            &path,
            BEHAVIOUR_TABLE,
            "old",
            Some(&serde_json::to_vec(&quarantined()).unwrap()),
        );
        poke(&path, BEHAVIOUR_TABLE, "junk", Some(b"{not json"));
        let r = Registry::open(&path, sealer()).unwrap();
        let id = PrincipalId::parse("old").unwrap();
        assert_eq!(
            **r.snapshot().get(PrincipalKind::Device, &id).unwrap(),
            record("old")
        );
        assert_eq!(
            r.behaviour_records().unwrap(),
            vec![("old".into(), quarantined())]
        );
        drop(r);
        assert_eq!(stored(&path, PRINCIPALS_TABLE, "device/old")[0], SEALED_V1);
        // Once sealed, an unsealed record is an alteration, not an old file.
        poke(&path, PRINCIPALS_TABLE, "device/new", Some(&legacy));
        assert!(Registry::open(&path, sealer()).is_err());
    }

    #[test]
    fn an_unsealed_file_is_refused_where_a_sealed_one_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let legacy = serde_json::to_vec(&record("planted")).unwrap();
        poke(&path, PRINCIPALS_TABLE, "device/planted", Some(&legacy));
        let err = Registry::open_with(&path, sealer(), Legacy::Refuse).unwrap_err();
        assert!(matches!(err, RegistryError::CorruptFile { .. }), "{err}");
        assert!(err.to_string().contains("not sealed"), "{err}");
        // Refusing changed nothing: the file is still unsealed.
        assert_ne!(
            stored(&path, PRINCIPALS_TABLE, "device/planted")[0],
            SEALED_V1
        );
    }

    #[test]
    fn a_backup_is_a_checked_copy_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb"), sealer()).unwrap();
        r.add(record("a")).unwrap();
        r.put_behaviour_records(&[("a".into(), quarantined())])
            .unwrap();
        let dest = dir.path().join("backup.redb");
        let summary = r.backup(&dest).unwrap();
        assert_eq!((summary.principals, summary.behaviour), (1, 1));
        let copy = Registry::open(&dest, sealer()).unwrap();
        assert_eq!(copy.snapshot().len(), 1);
        assert_eq!(
            copy.behaviour_records().unwrap(),
            r.behaviour_records().unwrap()
        );
        drop(copy);
        let err = r.backup(&dest).unwrap_err().to_string();
        assert!(err.contains("backup.redb"), "{err}");
    }

    #[test]
    fn second_open_of_the_same_file_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let _a = Registry::open(&path, RecordSealer::derive(&[5; 32])).unwrap();
        let err = Registry::open(&path, RecordSealer::derive(&[5; 32]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already open"), "{err}");
    }
}
