//! The registry file itself: verify every record, copy it consistently, and rotate
//! the master key its device keys are sealed under.

use super::protocol::{BackupRegistry, CheckRegistry, MasterKeyRotated, RotateMasterKey};
use super::{AdminError, AdminState, Handler};
use portcullis_core::audit::AuditEntry;
use portcullis_core::device_key::{KeyPurpose, SealedKey};
use portcullis_core::principal::PrincipalKind;
use portcullis_core::registry::{CheckSummary, PrincipalRecord, RegistryError};

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
        let master = &state.master;
        let runtime =
            |e: portcullis_core::device_key::DeviceKeyError| AdminError::Runtime(e.to_string());
        // The new key goes first; the file keeps the old ones until every device key
        // is sealed again, so a failure (or a crash) here loses no key.
        master.begin_rotation().map_err(runtime)?;
        let current = master.current();
        let reseal = |r: &PrincipalRecord,
                      sealed: &Option<SealedKey>,
                      purpose: KeyPurpose|
         -> Result<Option<SealedKey>, RegistryError> {
            let Some(s) = sealed.as_ref().filter(|s| s.master != current) else {
                return Ok(None);
            };
            let refuse = |e: portcullis_core::device_key::DeviceKeyError| {
                RegistryError::Storage(format!("{} {}'s {}: {e}", r.kind, r.id, purpose.as_str()))
            };
            let key = master.open(r.kind, &r.id, purpose, s).map_err(refuse)?;
            master
                .seal(r.kind, &r.id, purpose, key.as_bytes())
                .map(Some)
                .map_err(refuse)
        };
        let resealed = state.registry.update_all(|r| {
            let psk = reseal(r, &r.psk, KeyPurpose::Psk)?;
            let frame_key = reseal(r, &r.frame_key, KeyPurpose::FrameKey)?;
            if psk.is_none() && frame_key.is_none() {
                return Ok(None);
            }
            let mut next = r.clone();
            if psk.is_some() {
                next.psk = psk;
            }
            if frame_key.is_some() {
                next.frame_key = frame_key;
            }
            Ok(Some(next))
        })?;
        let retired = master.finish_rotation().map_err(runtime)?;
        state.write_audit(
            AuditEntry::new("master_key", "allow")
                .protocol("admin")
                .reason(format!(
                    "master key rotated to {current}: {resealed} record(s) sealed again, {retired} old key(s) dropped"
                )),
        );
        Ok(MasterKeyRotated {
            master: current,
            resealed,
            retired,
            source: master.source().to_string(),
        })
    }
}
