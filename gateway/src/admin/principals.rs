//! Devices and services in the registry: register, list, show, enable, disable,
//! remove, rotate credentials. Changes that revoke access end the live sessions
//! they cover.

use super::protocol::{
    AddPrincipal, DisablePrincipal, EnablePrincipal, ImportPrincipals, Imported, ListPrincipals,
    LiveSession, NewPrincipal, Principal, PrincipalChanged, PrincipalRemoved, PrincipalShown,
    RemovePrincipal, RotateCredentials, ShowPrincipal,
};
use super::{AdminError, AdminState, Handler, existing_id, parse_id};
use portcullis_core::device_key::{DeviceKey, FRAME_KEY_LEN};
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
use portcullis_core::registry::{CertCredential, NewDeviceKeys, PrincipalRecord, now_unix};
use portcullis_core::secret::MIN_SECRET_LEN;
use portcullis_core::sessions::KickReason;

fn check_fingerprint(fp: &str) -> Result<String, String> {
    let fp = fp.to_ascii_lowercase().replace(':', "");
    if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(fp)
    } else {
        Err("certificate fingerprint must be 64 hex digits (SHA-256)".into())
    }
}

fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "secret must be at least {MIN_SECRET_LEN} bytes (got {}); use --generate-secret",
            secret.len()
        ));
    }
    Ok(())
}

/// A pinned fingerprint wins over "any from the group's CA".
pub(super) fn cert_credential(
    fingerprint: Option<&str>,
    any: bool,
) -> Result<Option<CertCredential>, String> {
    Ok(match (fingerprint, any) {
        (Some(fp), _) => Some(CertCredential {
            fingerprint: Some(check_fingerprint(fp)?),
        }),
        (None, true) => Some(CertCredential { fingerprint: None }),
        (None, false) => None,
    })
}

impl From<&PrincipalRecord> for Principal {
    fn from(r: &PrincipalRecord) -> Self {
        Principal {
            id: r.id.clone(),
            kind: r.kind,
            group: r.group.clone(),
            enabled: r.enabled,
            certificate: r.cert.as_ref().map(|c| match &c.fingerprint {
                Some(fp) => format!("pinned sha256:{fp}"),
                None => "any from the group's CA".to_string(),
            }),
            secret: r.secret_hash.is_some(),
            psk: r.psk.is_some(),
            serial_key: r.frame_key.is_some(),
            generation: r.generation,
            created_unix: r.created_unix,
            updated_unix: r.updated_unix,
        }
    }
}

impl AdminState {
    /// What goes with a removed device: its retained commands (its desired state) and
    /// its behaviour, so that a device registered again starts afresh. The device is
    /// gone already; a stray behaviour record is ignored on start.
    pub(super) fn forget_device(&self, id: &PrincipalId) {
        if let Some(retained) = &self.retained {
            retained.purge(id);
        }
        if let Some(behaviours) = &self.behaviours {
            behaviours.forget(id);
        }
        if let Err(e) = self.registry.remove_behaviour_record(id) {
            tracing::warn!(error = %e, device = %id, "behaviour record not removed");
        }
    }

    /// Only the secret's hash is kept.
    pub(super) fn hash_secret(&self, secret: Option<&str>) -> Result<Option<String>, String> {
        secret
            .map(|s| {
                check_secret(s)?;
                Ok(hex::encode(self.hasher.hash(s.as_bytes())))
            })
            .transpose()
    }

    /// A pre-shared key (devices only: CoAP), checked here; the registry seals it under
    /// the master key inside the transaction that stores it, so that a master key
    /// rotation running beside this request cannot miss it.
    pub(super) fn psk_key(
        kind: PrincipalKind,
        id: &PrincipalId,
        psk: Option<&str>,
    ) -> Result<Option<DeviceKey>, String> {
        let Some(psk) = psk else {
            return Ok(None);
        };
        if kind != PrincipalKind::Device {
            return Err(format!(
                "{id}: a pre-shared key is a device credential (CoAP over DTLS)"
            ));
        }
        DeviceKey::new(psk.as_bytes().to_vec())
            .map(Some)
            .map_err(|e| format!("{id}: pre-shared key: {e}"))
    }

    /// A serial frame key (devices only), given as hex: exactly `FRAME_KEY_LEN` bytes.
    /// Sealed, like a pre-shared key, by the registry in the transaction that stores it.
    /// The key is never echoed, not even in part.
    pub(super) fn frame_key(
        kind: PrincipalKind,
        id: &PrincipalId,
        hex_key: Option<&str>,
    ) -> Result<Option<DeviceKey>, String> {
        let Some(hex_key) = hex_key else {
            return Ok(None);
        };
        if kind != PrincipalKind::Device {
            return Err(format!(
                "{id}: a serial key is a device credential (serial frames)"
            ));
        }
        let wrong = |got: String| {
            format!(
                "{id}: a serial key is exactly {FRAME_KEY_LEN} bytes, written as {} hex digits (got {got})",
                2 * FRAME_KEY_LEN
            )
        };
        let bytes = hex::decode(hex_key)
            .map_err(|_| wrong(format!("{} characters, not all hex digits", hex_key.len())))?;
        // Held as a key from here, so that it is wiped whichever way this returns.
        let len = bytes.len();
        let key = DeviceKey::new(bytes).map_err(|_| wrong(format!("{len} bytes")))?;
        if key.as_bytes().len() != FRAME_KEY_LEN {
            return Err(wrong(format!("{len} bytes")));
        }
        Ok(Some(key))
    }

    /// The record to add (its key slots not yet sealed) and its device keys, if any.
    fn record_for(
        &self,
        kind: PrincipalKind,
        p: &NewPrincipal,
    ) -> Result<(PrincipalRecord, NewDeviceKeys), String> {
        let id = parse_id(&p.id)?;
        let group_name = p.group.as_deref().unwrap_or("default");
        let group = GroupName::parse(group_name).map_err(|e| format!("group: {e}"))?;
        let policies = match &self.auth {
            Some(auth) => auth.policies(),
            None => self.policies.clone(),
        };
        if policies.group(kind, &group).is_none() {
            return Err(format!(
                "{id}: no {kind} group {group:?} in the configuration"
            ));
        }
        let cert = cert_credential(p.cert_fingerprint.as_deref(), p.cert_any)?;
        let secret_hash = self.hash_secret(p.secret.as_deref())?;
        let keys = NewDeviceKeys {
            psk: Self::psk_key(kind, &id, p.psk.as_deref())?,
            frame_key: Self::frame_key(kind, &id, p.serial_key.as_deref())?,
        };
        if cert.is_none() && secret_hash.is_none() && keys.psk.is_none() && keys.frame_key.is_none()
        {
            return Err(format!(
                "{id}: no credential (give a certificate, --cert-any, a secret, a pre-shared key or a serial key)"
            ));
        }
        let now = now_unix();
        let record = PrincipalRecord {
            kind,
            id,
            group,
            enabled: true,
            cert,
            secret_hash,
            psk: None,
            frame_key: None,
            generation: 0,
            created_unix: now,
            updated_unix: now,
        };
        Ok((record, keys))
    }
}

impl Handler for AddPrincipal {
    fn run(self, state: &AdminState) -> Result<Principal, AdminError> {
        let (record, keys) = state.record_for(self.kind, &self.principal)?;
        let stored = state.registry.add_with_keys(record, &keys, &state.master)?;
        state.audit("add", self.kind, &self.principal.id);
        Ok(Principal::from(&stored))
    }
}

impl Handler for ImportPrincipals {
    fn run(self, state: &AdminState) -> Result<Imported, AdminError> {
        let kind = self.kind;
        // Check everything first: an import is applied whole or not at all.
        let snapshot = state.registry.snapshot();
        let mut records = Vec::with_capacity(self.principals.len());
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            let (record, keys) = state
                .record_for(kind, p)
                .map_err(|e| format!("entry {}: {e}", i + 1))?;
            if snapshot.get(kind, &record.id).is_some() || !seen.insert(record.id.clone()) {
                return Err(format!("entry {}: {kind} {} already exists", i + 1, record.id).into());
            }
            records.push((record, keys));
        }
        let imported = records.len();
        let ids: Vec<String> = records.iter().map(|(r, _)| r.id.to_string()).collect();
        // One commit for the whole import.
        state.registry.add_all_with_keys(records, &state.master)?;
        for id in ids {
            state.audit("import", kind, &id);
        }
        Ok(Imported { imported })
    }
}

impl Handler for ListPrincipals {
    fn run(self, state: &AdminState) -> Result<Vec<Principal>, AdminError> {
        let snapshot = state.registry.snapshot();
        Ok(snapshot
            .list(self.kind)
            .iter()
            .map(|r| Principal::from(&**r))
            .collect())
    }
}

impl Handler for ShowPrincipal {
    fn run(self, state: &AdminState) -> Result<PrincipalShown, AdminError> {
        let id = existing_id(&self.id)?;
        let snapshot = state.registry.snapshot();
        let record = snapshot
            .get(self.kind, &id)
            .ok_or_else(|| AdminError::NotFound(format!("no such {}: {id}", self.kind)))?;
        let sessions = state.sessions.as_ref().map(|sessions| {
            sessions
                .list()
                .into_iter()
                .filter(|s| s.kind == self.kind && s.id == id.as_str())
                .map(LiveSession::from)
                .collect()
        });
        Ok(PrincipalShown {
            principal: Principal::from(&**record),
            sessions,
        })
    }
}

impl Handler for EnablePrincipal {
    fn run(self, state: &AdminState) -> Result<Principal, AdminError> {
        let pid = existing_id(&self.id)?;
        let r = state.registry.set_enabled(self.kind, &pid, true)?;
        state.audit("enable", self.kind, &self.id);
        Ok(Principal::from(&r))
    }
}

impl Handler for DisablePrincipal {
    fn run(self, state: &AdminState) -> Result<PrincipalChanged, AdminError> {
        let pid = existing_id(&self.id)?;
        let r = state.registry.set_enabled(self.kind, &pid, false)?;
        let ended = state.kick(self.kind, &pid, u64::MAX, KickReason::Disabled);
        state.audit("disable", self.kind, &self.id);
        Ok(PrincipalChanged {
            principal: Principal::from(&r),
            sessions_ended: ended,
        })
    }
}

impl Handler for RemovePrincipal {
    fn run(self, state: &AdminState) -> Result<PrincipalRemoved, AdminError> {
        let kind = self.kind;
        let pid = existing_id(&self.id)?;
        state.registry.remove(kind, &pid)?;
        let ended = state.kick(kind, &pid, u64::MAX, KickReason::Removed);
        if kind == PrincipalKind::Device {
            state.forget_device(&pid);
        }
        state.audit("remove", kind, &self.id);
        Ok(PrincipalRemoved {
            removed: pid,
            sessions_ended: ended,
        })
    }
}

impl Handler for RotateCredentials {
    fn run(self, state: &AdminState) -> Result<PrincipalChanged, AdminError> {
        let pid = existing_id(&self.id)?;
        if self.cert_fingerprint.is_none()
            && !self.cert_any
            && self.secret.is_none()
            && self.psk.is_none()
            && self.serial_key.is_none()
        {
            return Err(
                "rotate needs a new certificate, --cert-any, a new secret, a new pre-shared key or a new serial key"
                    .into(),
            );
        }
        let cert = cert_credential(self.cert_fingerprint.as_deref(), self.cert_any)?;
        let secret_hash = state.hash_secret(self.secret.as_deref())?;
        let keys = NewDeviceKeys {
            psk: AdminState::psk_key(self.kind, &pid, self.psk.as_deref())?,
            frame_key: AdminState::frame_key(self.kind, &pid, self.serial_key.as_deref())?,
        };
        let r = state.registry.rotate_with_keys(
            self.kind,
            &pid,
            cert,
            secret_hash,
            &keys,
            &state.master,
        )?;
        // Sessions authenticated with the old credentials end.
        let ended = state.kick(self.kind, &pid, r.generation, KickReason::CredentialRotated);
        state.audit("rotate", self.kind, &self.id);
        Ok(PrincipalChanged {
            principal: Principal::from(&r),
            sessions_ended: ended,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::testing::{offline, usage, wire};

    #[test]
    fn disable_and_remove_answer_the_record_and_the_sessions_ended_side_by_side() {
        let (_dir, state) = offline();
        let kind = PrincipalKind::Device;
        let disabled = DisablePrincipal {
            kind,
            id: "sensor-1".into(),
        }
        .run(&state)
        .unwrap();
        let v = wire(disabled);
        assert_eq!(
            (v["id"].as_str(), v["enabled"].as_bool()),
            (Some("sensor-1"), Some(false))
        );
        assert_eq!(v["sessions_ended"], 0);
        assert_eq!(v["certificate"], serde_json::Value::Null);
        let removed = RemovePrincipal {
            kind,
            id: "sensor-1".into(),
        }
        .run(&state)
        .unwrap();
        assert_eq!(
            wire(removed),
            serde_json::json!({ "removed": "sensor-1", "sessions_ended": 0 })
        );
    }

    #[test]
    fn show_offline_has_no_sessions_and_a_missing_one_is_a_usage_error() {
        let (_dir, state) = offline();
        let show = |id: &str| {
            ShowPrincipal {
                kind: PrincipalKind::Device,
                id: id.into(),
            }
            .run(&state)
        };
        let v = wire(show("sensor-2").unwrap());
        assert_eq!(v["secret"], true);
        assert_eq!(v.get("sessions"), None);
        assert_eq!(usage(show("nope")), "no such device: nope");
    }

    fn add_with_serial_key(kind: PrincipalKind, id: &str, key: &str) -> AddPrincipal {
        AddPrincipal {
            kind,
            principal: NewPrincipal {
                id: id.into(),
                group: None,
                cert_fingerprint: None,
                cert_any: false,
                secret: None,
                psk: None,
                serial_key: Some(key.into()),
            },
        }
    }

    #[test]
    fn a_serial_key_alone_registers_a_device_sealed_as_its_frame_key() {
        use portcullis_core::device_key::KeyPurpose;
        let (_dir, state) = offline();
        let key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let shown = add_with_serial_key(PrincipalKind::Device, "pump-1", key)
            .run(&state)
            .unwrap();
        let v = wire(&shown);
        assert_eq!(
            (v["serial_key"].as_bool(), v["psk"].as_bool()),
            (Some(true), Some(false))
        );
        assert!(!v.to_string().contains(key), "{v}");
        let snapshot = state.registry.snapshot();
        let record = snapshot
            .get(
                PrincipalKind::Device,
                &PrincipalId::parse("pump-1").unwrap(),
            )
            .unwrap();
        let sealed = record.frame_key.as_ref().unwrap();
        assert!(!sealed.sealed.contains(key));
        let opened = state
            .master
            .open(record.kind, &record.id, KeyPurpose::FrameKey, sealed)
            .unwrap();
        assert_eq!(opened.as_bytes(), hex::decode(key).unwrap());
    }

    #[test]
    fn a_serial_key_is_exactly_32_bytes_of_hex_for_a_device_and_never_echoed() {
        let (_dir, state) = offline();
        let add = |kind, key: &str| usage(add_with_serial_key(kind, "pump-2", key).run(&state));
        assert_eq!(
            add(PrincipalKind::Device, &"ab".repeat(31)),
            "pump-2: a serial key is exactly 32 bytes, written as 64 hex digits (got 31 bytes)"
        );
        assert_eq!(
            add(PrincipalKind::Device, &"ab".repeat(33)),
            "pump-2: a serial key is exactly 32 bytes, written as 64 hex digits (got 33 bytes)"
        );
        let not_hex = format!("{}zz", "ab".repeat(31));
        let m = add(PrincipalKind::Device, &not_hex);
        assert!(m.contains("64 characters, not all hex digits"), "{m}");
        assert!(!m.contains("abab"), "{m}");
        let m = add(PrincipalKind::Service, &"ab".repeat(32));
        assert!(m.contains("device credential"), "{m}");
        assert!(
            state
                .registry
                .snapshot()
                .get(
                    PrincipalKind::Device,
                    &PrincipalId::parse("pump-2").unwrap()
                )
                .is_none()
        );
    }

    #[test]
    fn rotating_the_serial_key_keeps_the_other_credentials() {
        let (_dir, state) = offline();
        let before = state
            .registry
            .snapshot()
            .get(
                PrincipalKind::Device,
                &PrincipalId::parse("sensor-1").unwrap(),
            )
            .unwrap()
            .clone();
        let changed = RotateCredentials {
            kind: PrincipalKind::Device,
            id: "sensor-1".into(),
            cert_fingerprint: None,
            cert_any: false,
            secret: None,
            psk: None,
            serial_key: Some("11".repeat(32)),
        }
        .run(&state)
        .unwrap();
        let v = wire(&changed);
        assert_eq!(
            (v["serial_key"].as_bool(), v["secret"].as_bool()),
            (Some(true), Some(true))
        );
        let after = state
            .registry
            .snapshot()
            .get(
                PrincipalKind::Device,
                &PrincipalId::parse("sensor-1").unwrap(),
            )
            .unwrap()
            .clone();
        assert_eq!(after.secret_hash, before.secret_hash);
        assert_eq!(after.generation, before.generation + 1);
    }

    #[test]
    fn rotate_needs_a_new_credential() {
        let (_dir, state) = offline();
        let m = usage(
            RotateCredentials {
                kind: PrincipalKind::Device,
                id: "sensor-1".into(),
                cert_fingerprint: None,
                cert_any: false,
                secret: None,
                psk: None,
                serial_key: None,
            }
            .run(&state),
        );
        assert_eq!(
            m,
            "rotate needs a new certificate, --cert-any, a new secret, a new pre-shared key or a new serial key"
        );
    }
}
