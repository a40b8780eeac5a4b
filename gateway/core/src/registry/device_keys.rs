//! Device keys inside the registry's write transactions, and the master key rotation.
//!
//! A key given in the clear is sealed in the transaction that stores it, under the
//! master key current at that moment; a rotation holds the same write lock from its
//! first check to dropping the old key. So no change can store a key sealed under a
//! master key that a rotation running beside it is about to drop: it is sealed either
//! before the rotation walks the table (and sealed again by it) or after the new key
//! is current.

use super::{
    CertCredential, PRINCIPALS_TABLE, PrincipalRecord, Registry, RegistryError, contain, storage,
};
use crate::device_key::{DeviceKey, KeyPurpose, MasterKeys, SealedKey};
use crate::principal::{PrincipalId, PrincipalKind};
use redb::{ReadableDatabase, ReadableTable};

/// What a master key rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyRotation {
    /// The id of the master key now current.
    pub master: String,
    /// Records whose keys were sealed again under it.
    pub resealed: usize,
    /// Old master keys dropped (0 from the environment: the operator drops them).
    pub retired: usize,
}

/// How many device keys an error lists by name before it counts the rest.
const NAMED: usize = 20;

/// "the keys of device a (psk), device b (frame_key) and 3 more do not open".
pub(super) fn list(keys: &[String]) -> String {
    let mut out = keys
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > NAMED {
        out.push_str(&format!(" and {} more", keys.len() - NAMED));
    }
    if keys.len() == 1 {
        format!("the key of {out} does not open")
    } else {
        format!("the keys of {out} do not open")
    }
}

/// Which master keys a check lets a sealed key open under.
#[derive(Clone, Copy)]
enum Under {
    /// Any key held now (before a rotation).
    Any,
    /// The current key alone (what is left after the rotation).
    Current,
}

fn seal(
    master: &MasterKeys,
    record: &PrincipalRecord,
    purpose: KeyPurpose,
    key: &DeviceKey,
) -> Result<SealedKey, RegistryError> {
    master
        .seal(record.kind, &record.id, purpose, key.as_bytes())
        .map_err(|reason| RegistryError::Seal {
            kind: record.kind,
            id: record.id.clone(),
            purpose,
            reason,
        })
}

/// Device keys given in the clear, to be sealed inside the write transaction that
/// stores them.
#[derive(Debug, Default)]
pub struct NewDeviceKeys {
    /// The DTLS pre-shared key (CoAP).
    pub psk: Option<DeviceKey>,
    /// The serial frame key.
    pub frame_key: Option<DeviceKey>,
}

impl NewDeviceKeys {
    /// Only a pre-shared key, or none.
    pub fn psk(psk: Option<DeviceKey>) -> NewDeviceKeys {
        NewDeviceKeys {
            psk,
            frame_key: None,
        }
    }

    /// Seal each key given into `record`, replacing what it held; a key not given
    /// leaves its slot as it was.
    pub(super) fn seal_into(
        &self,
        record: &mut PrincipalRecord,
        master: &MasterKeys,
    ) -> Result<(), RegistryError> {
        seal_into(self.psk.as_ref(), self.frame_key.as_ref(), record, master)
    }
}

/// Seal `psk` and `frame_key` (those given) into `record`'s slots for them.
fn seal_into(
    psk: Option<&DeviceKey>,
    frame_key: Option<&DeviceKey>,
    record: &mut PrincipalRecord,
    master: &MasterKeys,
) -> Result<(), RegistryError> {
    if let Some(key) = psk {
        record.psk = Some(seal(master, record, KeyPurpose::Psk, key)?);
    }
    if let Some(key) = frame_key {
        record.frame_key = Some(seal(master, record, KeyPurpose::FrameKey, key)?);
    }
    Ok(())
}

impl Registry {
    /// Add `record` (as `add`), its pre-shared key `psk` sealed under the master key
    /// current inside the write transaction; the record as stored.
    pub fn add_with_psk(
        &self,
        record: PrincipalRecord,
        psk: Option<&DeviceKey>,
        master: &MasterKeys,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.add_sealing(record, |r| seal_into(psk, None, r, master))
    }

    /// Add `record` (as `add`), each of its device `keys` sealed under the master key
    /// current inside the write transaction; the record as stored.
    pub fn add_with_keys(
        &self,
        record: PrincipalRecord,
        keys: &NewDeviceKeys,
        master: &MasterKeys,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.add_sealing(record, |r| keys.seal_into(r, master))
    }

    /// Add `record`, `seal` filling its key slots inside the write transaction.
    fn add_sealing(
        &self,
        record: PrincipalRecord,
        seal: impl FnOnce(&mut PrincipalRecord) -> Result<(), RegistryError>,
    ) -> Result<PrincipalRecord, RegistryError> {
        let (kind, id) = (record.kind, record.id.clone());
        let stored = self.mutate(kind, &id, |current| match current {
            Some(_) => Err(RegistryError::Exists {
                kind,
                id: id.clone(),
            }),
            None => {
                let mut record = record;
                seal(&mut record)?;
                Ok(Some(record))
            }
        })?;
        stored.ok_or(RegistryError::NotFound { kind, id })
    }

    /// Add many records in one transaction (as `add_all`), each with its pre-shared
    /// key sealed inside it.
    pub fn add_all_with_psks(
        &self,
        records: Vec<(PrincipalRecord, Option<DeviceKey>)>,
        master: &MasterKeys,
    ) -> Result<(), RegistryError> {
        self.add_all_with_keys(
            records
                .into_iter()
                .map(|(r, psk)| (r, NewDeviceKeys::psk(psk)))
                .collect(),
            master,
        )
    }

    /// Add many records in one transaction (as `add_all`), each with its device keys
    /// sealed inside it.
    pub fn add_all_with_keys(
        &self,
        records: Vec<(PrincipalRecord, NewDeviceKeys)>,
        master: &MasterKeys,
    ) -> Result<(), RegistryError> {
        self.add_all_as(records, |mut record, keys| {
            keys.seal_into(&mut record, master)?;
            Ok(record)
        })
    }

    /// Replace the credentials given (as `rotate`), a new pre-shared key sealed inside
    /// the write transaction.
    pub fn rotate_with_psk(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        cert: Option<CertCredential>,
        secret_hash: Option<String>,
        psk: Option<&DeviceKey>,
        master: &MasterKeys,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.rotate_as(kind, id, cert, secret_hash, |r| {
            seal_into(psk, None, r, master)
        })
    }

    /// Replace the credentials given (as `rotate`), the new device keys given sealed
    /// inside the write transaction; a key not given stays as it was.
    pub fn rotate_with_keys(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        cert: Option<CertCredential>,
        secret_hash: Option<String>,
        keys: &NewDeviceKeys,
        master: &MasterKeys,
    ) -> Result<PrincipalRecord, RegistryError> {
        self.rotate_as(kind, id, cert, secret_hash, |r| keys.seal_into(r, master))
    }

    /// How many device keys (pre-shared keys, frame keys) the registry holds sealed.
    pub fn sealed_key_count(&self) -> usize {
        let snapshot = self.snapshot();
        snapshot
            .principals
            .values()
            .map(|r| usize::from(r.psk.is_some()) + usize::from(r.frame_key.is_some()))
            .sum()
    }

    /// Rotate the master key: check that every sealed key opens under the keys held
    /// now (else refuse, naming the devices, having changed nothing); put a new key
    /// first; seal every key again under it in one commit, walking the table inside
    /// the transaction; check that every key opens under the new key alone (else keep
    /// the old one and say which do not); then drop the old keys. All under the write
    /// lock, so that no other change lands in between.
    pub fn rotate_master_key(
        &self,
        master: &MasterKeys,
    ) -> Result<MasterKeyRotation, RegistryError> {
        let held = self.lock();
        let refused = contain(|| self.keys_that_do_not_open(master, Under::Any))?;
        if !refused.is_empty() {
            return Err(RegistryError::KeysDoNotOpen {
                keys_from: master.source().to_string(),
                keys: refused,
            });
        }
        master.begin_rotation().map_err(RegistryError::MasterKey)?;
        let current = master.current();
        let reseal = |r: &PrincipalRecord,
                      sealed: &Option<SealedKey>,
                      purpose: KeyPurpose|
         -> Result<Option<SealedKey>, RegistryError> {
            let Some(s) = sealed.as_ref().filter(|s| s.master != current) else {
                return Ok(None);
            };
            let key =
                master
                    .open(r.kind, &r.id, purpose, s)
                    .map_err(|reason| RegistryError::Seal {
                        kind: r.kind,
                        id: r.id.clone(),
                        purpose,
                        reason,
                    })?;
            seal(master, r, purpose, &key).map(Some)
        };
        let resealed = self.update_all_locked(&held, |r| {
            let psk = reseal(r, &r.psk, KeyPurpose::Psk)?;
            let frame_key = reseal(r, &r.frame_key, KeyPurpose::FrameKey)?;
            if psk.is_none() && frame_key.is_none() {
                return Ok(None);
            }
            let mut next = r.clone();
            next.psk = psk.or(next.psk);
            next.frame_key = frame_key.or(next.frame_key);
            Ok(Some(next))
        })?;
        let left = contain(|| self.keys_that_do_not_open(master, Under::Current))?;
        if !left.is_empty() {
            return Err(RegistryError::NotResealed {
                keys_from: master.source().to_string(),
                keys: left,
            });
        }
        let retired = master.finish_rotation().map_err(RegistryError::MasterKey)?;
        Ok(MasterKeyRotation {
            master: current,
            resealed,
            retired,
        })
    }

    /// Every sealed key in the table (not the snapshot) that does not open `under`
    /// the master keys, as "device ID (purpose)".
    fn keys_that_do_not_open(
        &self,
        master: &MasterKeys,
        under: Under,
    ) -> Result<Vec<String>, RegistryError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx
            .open_table(super::table(PRINCIPALS_TABLE))
            .map_err(storage)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let r: PrincipalRecord = self
                .sealer
                .decode(PRINCIPALS_TABLE, k.value(), v.value())
                .map_err(super::corrupt(PRINCIPALS_TABLE, k.value()))?;
            for (sealed, purpose) in [
                (&r.psk, KeyPurpose::Psk),
                (&r.frame_key, KeyPurpose::FrameKey),
            ] {
                let Some(sealed) = sealed else { continue };
                let opened = match under {
                    Under::Any => master.open(r.kind, &r.id, purpose, sealed),
                    Under::Current => master.open_current(r.kind, &r.id, purpose, sealed),
                };
                if opened.is_err() {
                    out.push(format!("{} {} ({})", r.kind, r.id, purpose.as_str()));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordSealer;
    use crate::registry::tests::record;

    fn registry(dir: &tempfile::TempDir) -> Registry {
        Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[5; 32])).unwrap()
    }

    fn key(text: &str) -> DeviceKey {
        DeviceKey::new(text.as_bytes().to_vec()).unwrap()
    }

    fn opens(r: &Registry, master: &MasterKeys, id: &str) -> Vec<u8> {
        let snapshot = r.snapshot();
        let record = snapshot
            .get(PrincipalKind::Device, &PrincipalId::parse(id).unwrap())
            .unwrap();
        master
            .open(
                record.kind,
                &record.id,
                KeyPurpose::Psk,
                record.psk.as_ref().unwrap(),
            )
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn a_key_given_in_the_clear_is_sealed_under_the_key_current_when_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir);
        let master = MasterKeys::from_keys(&[[2; 32], [1; 32]]);
        let stored = r
            .add_with_psk(record("a"), Some(&key("a-pre-shared-key")), &master)
            .unwrap();
        assert_eq!(stored.psk.as_ref().unwrap().master, master.current());
        assert_eq!(opens(&r, &master, "a"), b"a-pre-shared-key");
        r.add_all_with_psks(
            vec![
                (record("b"), Some(key("b-pre-shared-key"))),
                (record("c"), None),
            ],
            &master,
        )
        .unwrap();
        assert_eq!(opens(&r, &master, "b"), b"b-pre-shared-key");
        let rotated = r
            .rotate_with_psk(
                PrincipalKind::Device,
                &PrincipalId::parse("c").unwrap(),
                None,
                None,
                Some(&key("c-pre-shared-key")),
                &master,
            )
            .unwrap();
        assert_eq!(rotated.generation, 1);
        assert_eq!(opens(&r, &master, "c"), b"c-pre-shared-key");
        assert_eq!(r.sealed_key_count(), 3);
    }

    #[test]
    fn a_frame_key_is_sealed_beside_a_psk_for_its_own_purpose_and_kept_when_the_psk_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir);
        let master = MasterKeys::from_keys(&[[2; 32]]);
        let both = NewDeviceKeys {
            psk: Some(key("a-pre-shared-key")),
            frame_key: Some(DeviceKey::new(vec![7; 32]).unwrap()),
        };
        let stored = r.add_with_keys(record("a"), &both, &master).unwrap();
        let frame_key = |r: &PrincipalRecord| {
            master
                .open(
                    r.kind,
                    &r.id,
                    KeyPurpose::FrameKey,
                    r.frame_key.as_ref().unwrap(),
                )
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        assert_eq!(frame_key(&stored), [7; 32]);
        assert_eq!(opens(&r, &master, "a"), b"a-pre-shared-key");
        // Not under the other purpose: the slots cannot be swapped.
        assert!(
            master
                .open(
                    stored.kind,
                    &stored.id,
                    KeyPurpose::Psk,
                    stored.frame_key.as_ref().unwrap()
                )
                .is_err()
        );
        // A new PSK alone leaves the frame key; a new frame key alone leaves the PSK.
        let id = PrincipalId::parse("a").unwrap();
        let psk_only = NewDeviceKeys::psk(Some(key("a-second-pre-shared-key")));
        let rotated = r
            .rotate_with_keys(PrincipalKind::Device, &id, None, None, &psk_only, &master)
            .unwrap();
        assert_eq!(rotated.frame_key, stored.frame_key);
        let frame_only = NewDeviceKeys {
            psk: None,
            frame_key: Some(DeviceKey::new(vec![8; 32]).unwrap()),
        };
        let rotated = r
            .rotate_with_keys(PrincipalKind::Device, &id, None, None, &frame_only, &master)
            .unwrap();
        assert_eq!(frame_key(&rotated), [8; 32]);
        assert_eq!(opens(&r, &master, "a"), b"a-second-pre-shared-key");
        assert_eq!(rotated.generation, 2);
        r.add_all_with_keys(
            vec![(
                record("b"),
                NewDeviceKeys {
                    psk: None,
                    frame_key: Some(DeviceKey::new(vec![9; 32]).unwrap()),
                },
            )],
            &master,
        )
        .unwrap();
        assert_eq!(r.sealed_key_count(), 3);
        // And a master key rotation seals frame keys again too.
        let next = MasterKeys::from_keys(&[[3; 32], [2; 32]]);
        assert_eq!(r.rotate_master_key(&next).unwrap().resealed, 2);
    }

    #[test]
    fn a_rotation_reseals_what_the_old_key_sealed_and_names_what_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(&dir);
        // From the environment: new key first, the old after it.
        let old = MasterKeys::from_keys(&[[1; 32]]);
        r.add_with_psk(record("a"), Some(&key("a-pre-shared-key")), &old)
            .unwrap();
        let both = MasterKeys::from_keys(&[[2; 32], [1; 32]]);
        let done = r.rotate_master_key(&both).unwrap();
        assert_eq!((done.resealed, done.retired), (1, 0));
        let new = MasterKeys::from_keys(&[[2; 32]]);
        assert_eq!(opens(&r, &new, "a"), b"a-pre-shared-key");
        // Again: nothing left to seal.
        assert_eq!(r.rotate_master_key(&both).unwrap().resealed, 0);
        // A key under a master key not held: refused by name, nothing changed.
        r.add_with_psk(record("lost"), Some(&key("lost-pre-shared-key")), &old)
            .unwrap();
        let err = r.rotate_master_key(&new).unwrap_err().to_string();
        assert!(
            err.contains("the key of device lost (psk) does not open") && !err.contains("device a"),
            "{err}"
        );
    }

    #[test]
    fn a_long_list_of_keys_names_twenty_and_counts_the_rest() {
        let keys: Vec<String> = (0..25).map(|i| format!("device d{i} (psk)")).collect();
        let text = list(&keys);
        assert!(text.contains("device d19 (psk) and 5 more"), "{text}");
        assert!(!text.contains("d20"), "{text}");
    }
}
