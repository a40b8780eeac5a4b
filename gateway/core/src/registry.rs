//! The registry of devices and services, stored in redb.
//!
//! redb holds the truth and survives restarts; authentication reads an immutable
//! in-memory `Snapshot` that is swapped whole after each committed change, so a
//! CONNECT never touches the disk and never waits for an admin command. Mutations are
//! rare (admin API) and run synchronously under a mutex.

use crate::bans::{Ban, BanList, BanTarget};
use crate::principal::{GroupName, PrincipalId, PrincipalKind};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

const PRINCIPALS: TableDefinition<&str, &[u8]> = TableDefinition::new("principals");
const BANS: TableDefinition<&str, &[u8]> = TableDefinition::new("bans");
/// Behaviour states and their history, by device id (`quarantine::Record` as JSON).
const BEHAVIOUR: TableDefinition<&str, &[u8]> = TableDefinition::new("behaviour");

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

    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {reason}")]
    Open { path: String, reason: String },
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
    #[error("corrupt registry entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

fn storage<E: std::fmt::Display>(e: E) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

pub struct Registry {
    db: Database,
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
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Open (or create) the registry file. redb locks it: a second gateway on the same
    /// data dir fails here with a clear error.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let open_err = |reason: String| RegistryError::Open {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                "already open by another process (is a gateway running on this data dir?)".into(),
            ),
            other => open_err(other.to_string()),
        })?;
        // Owner-only: ids, groups and secret hashes.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_err(e.to_string()))?;
        {
            let tx = db.begin_write().map_err(storage)?;
            tx.open_table(PRINCIPALS).map_err(storage)?;
            tx.open_table(BANS).map_err(storage)?;
            tx.open_table(BEHAVIOUR).map_err(storage)?;
            tx.commit().map_err(storage)?;
        }
        let registry = Registry {
            db,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            bans: RwLock::new(Arc::new(BanList::default())),
            write: Mutex::new(()),
        };
        let snapshot = registry.load()?;
        *registry.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
        let bans = registry.load_bans()?;
        *registry.bans.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(BanList::new(bans));
        Ok(registry)
    }

    fn load(&self) -> Result<Snapshot, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(PRINCIPALS).map_err(storage)?;
        let mut principals = HashMap::new();
        for entry in table.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let record: PrincipalRecord =
                serde_json::from_slice(v.value()).map_err(|e| RegistryError::Corrupt {
                    key: k.value().to_string(),
                    reason: e.to_string(),
                })?;
            principals.insert((record.kind, record.id.clone()), Arc::new(record));
        }
        Ok(Snapshot { principals })
    }

    fn load_bans(&self) -> Result<Vec<Ban>, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(BANS).map_err(storage)?;
        let mut bans = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let ban: Ban =
                serde_json::from_slice(v.value()).map_err(|e| RegistryError::Corrupt {
                    key: format!("ban {}", k.value()),
                    reason: e.to_string(),
                })?;
            bans.push(ban);
        }
        Ok(bans)
    }

    /// The kept behaviour records (quarantine state and history), by device id.
    pub fn behaviour_records(
        &self,
    ) -> Result<Vec<(String, crate::quarantine::Record)>, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(BEHAVIOUR).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            // One unreadable record costs that device its history, not the start.
            match serde_json::from_slice(v.value()) {
                Ok(record) => out.push((k.value().to_string(), record)),
                Err(e) => tracing::warn!(
                    device = k.value(),
                    error = %e,
                    "behaviour record unreadable: skipped"
                ),
            }
        }
        Ok(out)
    }

    /// Store behaviour records, all in one commit.
    pub fn put_behaviour_records(
        &self,
        records: &[(String, crate::quarantine::Record)],
    ) -> Result<(), RegistryError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(storage)?;
        {
            let mut table = tx.open_table(BEHAVIOUR).map_err(storage)?;
            for (id, record) in records {
                let bytes = serde_json::to_vec(record).map_err(storage)?;
                table
                    .insert(id.as_str(), bytes.as_slice())
                    .map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)
    }

    /// Forget a device's behaviour record (the device was removed).
    pub fn remove_behaviour_record(&self, id: &PrincipalId) -> Result<(), RegistryError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(storage)?;
        tx.open_table(BEHAVIOUR)
            .map_err(storage)?
            .remove(id.as_str())
            .map_err(storage)?;
        tx.commit().map_err(storage)
    }

    /// The bans in force (expired ones are dropped when the list next changes).
    pub fn bans(&self) -> Arc<BanList> {
        self.bans.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Add or replace a ban; expired bans are pruned in the same transaction.
    pub fn add_ban(&self, ban: Ban) -> Result<(), RegistryError> {
        self.change_bans(|table, now| {
            let bytes = serde_json::to_vec(&ban).map_err(storage)?;
            table
                .insert(ban.target.key().as_str(), bytes.as_slice())
                .map_err(storage)?;
            let _ = now;
            Ok(true)
        })
        .map(|_| ())
    }

    /// Lift a ban; false if there was none.
    pub fn remove_ban(&self, target: &BanTarget) -> Result<bool, RegistryError> {
        self.change_bans(|table, _| {
            Ok(table
                .remove(target.key().as_str())
                .map_err(storage)?
                .is_some())
        })
    }

    fn change_bans(
        &self,
        change: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>, u64) -> Result<bool, RegistryError>,
    ) -> Result<bool, RegistryError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_unix();
        let tx = self.db.begin_write().map_err(storage)?;
        let result = {
            let mut table = tx.open_table(BANS).map_err(storage)?;
            let result = change(&mut table, now)?;
            // Prune what has expired.
            let mut expired = Vec::new();
            for entry in table.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                if let Ok(ban) = serde_json::from_slice::<Ban>(v.value())
                    && !ban.active(now)
                {
                    expired.push(k.value().to_string());
                }
            }
            for k in expired {
                table.remove(k.as_str()).map_err(storage)?;
            }
            result
        };
        tx.commit().map_err(storage)?;
        let bans = self.load_bans()?;
        *self.bans.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(BanList::new(bans));
        Ok(result)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(kind, id);
        let tx = self.db.begin_write().map_err(storage)?;
        let result = {
            let mut table = tx.open_table(PRINCIPALS).map_err(storage)?;
            let current = match table.get(k.as_str()).map_err(storage)? {
                Some(v) => Some(
                    serde_json::from_slice::<PrincipalRecord>(v.value()).map_err(|e| {
                        RegistryError::Corrupt {
                            key: k.clone(),
                            reason: e.to_string(),
                        }
                    })?,
                ),
                None => None,
            };
            let next = change(current)?;
            match &next {
                Some(record) => {
                    let bytes = serde_json::to_vec(record).map_err(storage)?;
                    table
                        .insert(k.as_str(), bytes.as_slice())
                        .map_err(storage)?;
                }
                None => {
                    table.remove(k.as_str()).map_err(storage)?;
                }
            }
            next
        };
        tx.commit().map_err(storage)?;
        let mut snapshot = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let mut principals = snapshot.principals.clone();
        match &result {
            Some(record) => {
                principals.insert((kind, id.clone()), Arc::new(record.clone()));
            }
            None => {
                principals.remove(&(kind, id.clone()));
            }
        }
        *snapshot = Arc::new(Snapshot { principals });
        Ok(result)
    }

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
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write().map_err(storage)?;
        {
            let mut table = tx.open_table(PRINCIPALS).map_err(storage)?;
            for record in &records {
                let k = key(record.kind, &record.id);
                if table.get(k.as_str()).map_err(storage)?.is_some() {
                    return Err(RegistryError::Exists {
                        kind: record.kind,
                        id: record.id.clone(),
                    });
                }
                let bytes = serde_json::to_vec(record).map_err(storage)?;
                table
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)?;
        let mut snapshot = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let mut principals = snapshot.principals.clone();
        for record in records {
            principals.insert((record.kind, record.id.clone()), Arc::new(record));
        }
        *snapshot = Arc::new(Snapshot { principals });
        Ok(())
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

    /// Replace the credentials given (a `Some`), bump the generation.
    pub fn rotate(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        cert: Option<CertCredential>,
        secret_hash: Option<String>,
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
            let r = Registry::open(&path).unwrap();
            r.add(record("sensor-1")).unwrap();
            r.add(record("sensor-2")).unwrap();
            r.remove(
                PrincipalKind::Device,
                &PrincipalId::parse("sensor-2").unwrap(),
            )
            .unwrap();
        }
        let r = Registry::open(&path).unwrap();
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

    #[test]
    fn add_all_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
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
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        assert_eq!(r.snapshot().len(), 3);
    }

    #[test]
    fn duplicate_add_is_refused_and_snapshot_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        r.add(record("a")).unwrap();
        let err = r.add(record("a")).unwrap_err();
        assert!(matches!(err, RegistryError::Exists { .. }), "{err}");
        assert_eq!(r.snapshot().len(), 1);
    }

    #[test]
    fn snapshot_taken_before_a_change_is_unaffected() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
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
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        r.add(record("a")).unwrap();
        let id = PrincipalId::parse("a").unwrap();
        let rec = r
            .rotate(PrincipalKind::Device, &id, None, Some("00".repeat(32)))
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
            let r = Registry::open(&path).unwrap();
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
        let r = Registry::open(&path).unwrap();
        assert!(
            r.bans()
                .source("192.0.2.9".parse().unwrap(), now_unix())
                .is_some()
        );
        assert!(r.remove_ban(&target).unwrap());
        assert!(!r.remove_ban(&target).unwrap());
        assert!(r.bans().all().is_empty());
    }

    #[test]
    fn an_unreadable_behaviour_record_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("r.redb")).unwrap();
        let good = crate::quarantine::Record {
            state: crate::behaviour::State::Quarantined,
            since_unix: 5,
            history: Default::default(),
        };
        r.put_behaviour_records(&[("good".into(), good.clone())])
            .unwrap();
        let tx = r.db.begin_write().unwrap();
        tx.open_table(BEHAVIOUR)
            .unwrap()
            .insert("bad", b"{not json".as_slice())
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(r.behaviour_records().unwrap(), vec![("good".into(), good)]);
    }

    #[test]
    fn second_open_of_the_same_file_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let _a = Registry::open(&path).unwrap();
        let err = Registry::open(&path).unwrap_err().to_string();
        assert!(err.contains("already open"), "{err}");
    }
}
