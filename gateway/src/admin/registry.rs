//! The registry file itself: verify every record, copy it consistently, and rotate
//! the master key its device keys are sealed under.

use super::protocol::{BackupRegistry, CheckRegistry, MasterKeyRotated, RotateMasterKey};
use super::{AdminError, AdminState, Handler};
use portcullis_core::audit::AuditEntry;
use portcullis_core::device_key::KeyPurpose;
use portcullis_core::principal::PrincipalKind;
use portcullis_core::registry::CheckSummary;

impl Handler for CheckRegistry {
    fn run(self, state: &AdminState) -> Result<CheckSummary, AdminError> {
        let summary = state.registry.check()?;
        // And every device key opens under the master keys at hand (a master key file
        // lost or swapped shows here, not at the device's next handshake).
        let snapshot = state.registry.snapshot();
        for kind in [PrincipalKind::Device, PrincipalKind::Service] {
            for r in snapshot.list(kind) {
                for (sealed, purpose) in [
                    (&r.psk, KeyPurpose::Psk),
                    (&r.frame_key, KeyPurpose::FrameKey),
                ] {
                    if let Some(sealed) = sealed
                        && let Err(e) = state.master.open(r.kind, &r.id, purpose, sealed)
                    {
                        return Err(AdminError::Runtime(format!(
                            "{} {}: its {} does not open under the {}: {e}",
                            r.kind,
                            r.id,
                            purpose.as_str(),
                            state.master.source()
                        )));
                    }
                }
            }
        }
        Ok(summary)
    }
}

impl Handler for BackupRegistry {
    fn run(self, state: &AdminState) -> Result<CheckSummary, AdminError> {
        if !self.path.is_absolute() {
            return Err(format!("backup path {} must be absolute", self.path.display()).into());
        }
        Ok(state.registry.backup(&self.path)?)
    }
}

impl Handler for RotateMasterKey {
    fn run(self, state: &AdminState) -> Result<MasterKeyRotated, AdminError> {
        // The registry runs the whole rotation under its write lock: every key is
        // checked first, the file keeps the old key until every key is sealed again
        // and opens under the new one, so a failure (or a crash) loses no key.
        let done = state.registry.rotate_master_key(&state.master)?;
        state.write_audit(
            AuditEntry::new("master_key", "allow")
                .protocol("admin")
                .reason(format!(
                    "master key rotated to {}: {} record(s) sealed again, {} old key(s) dropped",
                    done.master, done.resealed, done.retired
                )),
        );
        Ok(MasterKeyRotated {
            master: done.master,
            resealed: done.resealed,
            retired: done.retired,
            source: state.master.source().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::{AddPrincipal, NewPrincipal, RotateCredentials};
    use crate::admin::testing::offline;
    use portcullis_core::device_key::MasterKeys;
    use portcullis_core::principal::{GroupName, PrincipalId};
    use portcullis_core::registry::PrincipalRecord;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An offline admin state whose master keys live in a file (so that they rotate).
    fn with_key_file(dir: &Path) -> (AdminState, PathBuf, tempfile::TempDir) {
        let (registry_dir, mut state) = offline();
        let path = dir.join("master.key");
        state.master = Arc::new(MasterKeys::load_or_create(&path).unwrap());
        (state, path, registry_dir)
    }

    fn add_with_psk(id: &str) -> AddPrincipal {
        AddPrincipal {
            kind: PrincipalKind::Device,
            principal: NewPrincipal {
                id: id.into(),
                group: None,
                cert_fingerprint: None,
                cert_any: false,
                secret: None,
                psk: Some(format!("{id}-pre-shared-key")),
                serial_key: None,
            },
        }
    }

    fn key_lines(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count()
    }

    #[test]
    fn devices_added_while_the_master_key_rotates_keep_keys_that_open() {
        let dir = tempfile::tempdir().unwrap();
        let (state, path, _registry_dir) = with_key_file(dir.path());
        const ADDERS: usize = 3;
        let done = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..ADDERS {
                let (state, done) = (&state, &done);
                s.spawn(move || {
                    for i in 0..15 {
                        add_with_psk(&format!("d{t}-{i}")).run(state).unwrap();
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
            // And a device whose key is replaced over and over meanwhile.
            s.spawn(|| {
                for n in 0..15 {
                    RotateCredentials {
                        kind: PrincipalKind::Device,
                        id: "sensor-1".into(),
                        cert_fingerprint: None,
                        cert_any: false,
                        secret: None,
                        psk: Some(format!("sensor-1-pre-shared-key-{n}")),
                        serial_key: None,
                    }
                    .run(&state)
                    .unwrap();
                }
            });
            s.spawn(|| {
                let mut rotations = 0;
                while rotations == 0 || done.load(Ordering::SeqCst) < ADDERS {
                    RotateMasterKey {}.run(&state).unwrap();
                    rotations += 1;
                }
            });
        });
        // Every key opens under the one key left, in memory and in the file.
        assert_eq!(key_lines(&path), 1);
        CheckRegistry {}.run(&state).unwrap();
        let reread = MasterKeys::load_or_create(&path).unwrap();
        let snapshot = state.registry.snapshot();
        let devices = snapshot.list(PrincipalKind::Device);
        assert_eq!(devices.iter().filter(|r| r.psk.is_some()).count(), 46);
        for r in devices.iter().filter(|r| r.psk.is_some()) {
            let key = reread
                .open(r.kind, &r.id, KeyPurpose::Psk, r.psk.as_ref().unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", r.id));
            let expected = match r.id.as_str() {
                "sensor-1" => "sensor-1-pre-shared-key-14".to_string(),
                id => format!("{id}-pre-shared-key"),
            };
            assert_eq!(key.as_bytes(), expected.as_bytes());
        }
    }

    #[test]
    fn a_rotation_is_refused_while_a_device_key_does_not_open_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (state, path, _registry_dir) = with_key_file(dir.path());
        add_with_psk("opens-1").run(&state).unwrap();
        // Sealed under a master key this gateway does not hold (a key file swapped).
        let stranger = MasterKeys::from_keys(&[[3; 32]]);
        for id in ["lost-1", "lost-2"] {
            let id = PrincipalId::parse(id).unwrap();
            let psk = stranger
                .seal(PrincipalKind::Device, &id, KeyPurpose::Psk, &[7; 20])
                .unwrap();
            state
                .registry
                .add(PrincipalRecord {
                    kind: PrincipalKind::Device,
                    id,
                    group: GroupName::parse("default").unwrap(),
                    enabled: true,
                    cert: None,
                    secret_hash: None,
                    psk: Some(psk),
                    frame_key: None,
                    generation: 0,
                    created_unix: 0,
                    updated_unix: 0,
                })
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let refused = RotateMasterKey {}.run(&state);
        let err = match refused {
            Err(AdminError::Runtime(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(
            err.contains("lost-1") && err.contains("lost-2") && !err.contains("opens-1"),
            "{err}"
        );
        // No new key, none dropped: the file and the keys in memory are as they were.
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(state.master.len(), 1);
    }
}
