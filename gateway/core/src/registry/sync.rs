//! A sync of one kind of principal to a file (`device import --sync`), applied in one
//! commit: every addition, update and removal, or none of them.
//!
//! The plan is made from a snapshot, outside the write lock; the commit checks, inside
//! its transaction, that the records of that kind are still exactly the ones the plan
//! was made from. A change that landed in between (another admin command, another
//! sync) refuses the whole sync rather than applying a plan made for a registry that
//! is no longer there.

use super::{
    NewDeviceKeys, PRINCIPALS_TABLE, PrincipalRecord, Registry, RegistryError, corrupt, key,
    storage,
};
use crate::device_key::MasterKeys;
use crate::principal::{PrincipalId, PrincipalKind};
use redb::ReadableTable;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One change of a sync.
#[derive(Debug)]
pub enum SyncChange {
    /// Store this record (new or replacing the one of its id), the device keys given
    /// sealed into it inside the transaction; a key slot not given keeps what the
    /// record holds.
    Put(Box<PrincipalRecord>, NewDeviceKeys),
    /// Delete the record of this id.
    Remove(PrincipalId),
}

impl Registry {
    /// Apply `changes` to the principals of `kind` in one commit, provided the
    /// records of that kind are still exactly `base`; else nothing changes and the
    /// error says so. The records as stored (`None`: removed), in the order given.
    pub fn apply_sync(
        &self,
        kind: PrincipalKind,
        base: &[Arc<PrincipalRecord>],
        changes: Vec<SyncChange>,
        master: &MasterKeys,
    ) -> Result<Vec<(PrincipalId, Option<PrincipalRecord>)>, RegistryError> {
        let expected: BTreeMap<&PrincipalId, &PrincipalRecord> =
            base.iter().map(|r| (&r.id, &**r)).collect();
        let held = self.lock();
        let stored = self.write_locked(&held, PRINCIPALS_TABLE, |t| {
            let mut current = BTreeMap::new();
            for entry in t.table.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let record: PrincipalRecord = self
                    .sealer
                    .decode(PRINCIPALS_TABLE, k.value(), v.value())
                    .map_err(corrupt(PRINCIPALS_TABLE, k.value()))?;
                if record.kind == kind {
                    current.insert(record.id.clone(), record);
                }
            }
            let same = current.len() == expected.len()
                && current
                    .iter()
                    .all(|(id, r)| expected.get(id).is_some_and(|e| *e == r));
            if !same {
                return Err(RegistryError::ChangedDuringSync { kind });
            }
            let mut stored = Vec::with_capacity(changes.len());
            for change in changes {
                match change {
                    SyncChange::Put(mut record, keys) => {
                        if record.kind != kind {
                            return Err(RegistryError::Storage(format!(
                                "a {kind} sync cannot store {} {}",
                                record.kind, record.id
                            )));
                        }
                        keys.seal_into(&mut record, master)?;
                        let bytes = serde_json::to_vec(&record).map_err(storage)?;
                        t.insert(&key(kind, &record.id), &bytes)?;
                        stored.push((record.id.clone(), Some(*record)));
                    }
                    SyncChange::Remove(id) => {
                        if !t.remove(&key(kind, &id))? {
                            return Err(RegistryError::NotFound { kind, id });
                        }
                        stored.push((id, None));
                    }
                }
            }
            Ok(stored)
        })?;
        self.publish(
            &held,
            stored.iter().map(|(id, r)| ((kind, id.clone()), r.clone())),
        );
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_key::DeviceKey;
    use crate::record::RecordSealer;
    use crate::registry::tests::record;

    fn open(dir: &tempfile::TempDir) -> Registry {
        Registry::open(
            &dir.path().join("registry.redb"),
            RecordSealer::derive(&[5; 32]),
        )
        .unwrap()
    }

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    #[test]
    fn a_sync_adds_updates_and_removes_in_one_commit_that_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeys::from_keys(&[[8; 32]]);
        {
            let r = open(&dir);
            r.add(record("keep-1")).unwrap();
            r.add(record("gone-1")).unwrap();
            let base = r.snapshot().list(PrincipalKind::Device);
            let mut updated = record("keep-1");
            updated.enabled = false;
            let keys = NewDeviceKeys::psk(Some(
                DeviceKey::new(b"new-1-pre-shared-key".to_vec()).unwrap(),
            ));
            r.apply_sync(
                PrincipalKind::Device,
                &base,
                vec![
                    SyncChange::Put(Box::new(record("new-1")), keys),
                    SyncChange::Put(Box::new(updated), NewDeviceKeys::default()),
                    SyncChange::Remove(id("gone-1")),
                ],
                &master,
            )
            .unwrap();
        }
        let r = open(&dir);
        let s = r.snapshot();
        assert!(s.get(PrincipalKind::Device, &id("gone-1")).is_none());
        assert!(!s.get(PrincipalKind::Device, &id("keep-1")).unwrap().enabled);
        let new = s.get(PrincipalKind::Device, &id("new-1")).unwrap();
        let psk = master
            .open(
                PrincipalKind::Device,
                &new.id,
                crate::device_key::KeyPurpose::Psk,
                new.psk.as_ref().unwrap(),
            )
            .unwrap();
        assert_eq!(psk.as_bytes(), b"new-1-pre-shared-key");
    }

    #[test]
    fn a_sync_planned_on_a_registry_changed_since_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeys::from_keys(&[[8; 32]]);
        let r = open(&dir);
        r.add(record("keep-1")).unwrap();
        let base = r.snapshot().list(PrincipalKind::Device);
        // Another change lands between the plan and its commit.
        r.set_enabled(PrincipalKind::Device, &id("keep-1"), false)
            .unwrap();
        let err = r
            .apply_sync(
                PrincipalKind::Device,
                &base,
                vec![
                    SyncChange::Put(Box::new(record("new-1")), NewDeviceKeys::default()),
                    SyncChange::Remove(id("keep-1")),
                ],
                &master,
            )
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::ChangedDuringSync { .. }),
            "{err}"
        );
        let s = r.snapshot();
        assert!(s.get(PrincipalKind::Device, &id("new-1")).is_none());
        assert!(s.get(PrincipalKind::Device, &id("keep-1")).is_some());
    }

    #[test]
    fn a_failure_midway_leaves_the_registry_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeys::from_keys(&[[8; 32]]);
        let r = open(&dir);
        r.add(record("keep-1")).unwrap();
        let base = r.snapshot().list(PrincipalKind::Device);
        // The first change is fine, the second fails (no such record to remove).
        let err = r
            .apply_sync(
                PrincipalKind::Device,
                &base,
                vec![
                    SyncChange::Put(Box::new(record("new-1")), NewDeviceKeys::default()),
                    SyncChange::Remove(id("never-1")),
                ],
                &master,
            )
            .unwrap_err();
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
        drop(r);
        let r = open(&dir);
        assert!(
            r.snapshot()
                .get(PrincipalKind::Device, &id("new-1"))
                .is_none()
        );
        assert_eq!(r.snapshot().list(PrincipalKind::Device).len(), 1);
    }
}
