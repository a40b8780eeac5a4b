//! `device import --sync` and `service import --sync`: reconcile one kind of principal
//! to a list. Every entry is checked first and every error named; then the plan (add,
//! update, remove, each sorted by id) is made against a snapshot and applied in one
//! registry commit, which refuses if the registry changed in between.
//!
//! What counts as a change, field by field:
//! - `group`, `enabled` and the certificate credential are declarative: the list's
//!   value wins (absent: `enabled = true`, no certificate).
//! - A secret, pre-shared key or serial key left out keeps the one held; one given
//!   replaces it only if it differs (compared by hash, or opened under the master key).
//! - `*_generate` makes a credential only for a principal that has none of that kind,
//!   so a list synced again never rotates a key behind the operator's back.
//!
//! A new group or new credentials bump the generation and end the sessions opened
//! before; a principal disabled or removed has all its sessions ended. A new group
//! also counts as a new registration, so no persistent session from the old group is
//! resumed.

use super::principals::cert_credential;
use super::protocol::{
    GeneratedCredential, SyncAdd, SyncEntry, SyncPlan, SyncPrincipals, SyncUpdate,
};
use super::{AdminError, AdminState, Handler, parse_id};
use portcullis_core::device_key::{DeviceKey, FRAME_KEY_LEN, KeyPurpose, generate_device_key};
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
use portcullis_core::registry::{
    CertCredential, NewDeviceKeys, PrincipalRecord, SyncChange, now_unix,
};
use portcullis_core::sessions::KickReason;
use std::collections::{BTreeMap, BTreeSet};

/// A list entry, checked: what the principal should be.
struct Wanted {
    id: PrincipalId,
    group: GroupName,
    enabled: bool,
    cert: Option<CertCredential>,
    secret_hash: Option<String>,
    psk: Option<DeviceKey>,
    frame_key: Option<DeviceKey>,
    generate_secret: bool,
    psk_generate: bool,
    serial_key_generate: bool,
    place: String,
}

/// The plan's changes with what must happen to live sessions once committed.
struct Planned {
    plan: SyncPlan,
    changes: Vec<SyncChange>,
    generated: Vec<GeneratedCredential>,
    /// id → why its sessions end, and below which generation (`u64::MAX`: all).
    kicks: Vec<(PrincipalId, KickReason, u64)>,
    audit: Vec<(String, String)>,
}

/// "line 4: entry 2 (sensor-1)", as much of it as is known.
fn place(index: usize, entry: &SyncEntry) -> String {
    let mut place = String::new();
    if let Some(line) = entry.line {
        place.push_str(&format!("line {line}: "));
    }
    place.push_str(&format!("entry {}", index + 1));
    if !entry.principal.id.is_empty() && entry.principal.id.len() <= 128 {
        place.push_str(&format!(" ({:?})", entry.principal.id));
    }
    place
}

fn describe_cert(cert: &Option<CertCredential>) -> String {
    match cert {
        None => "none".to_string(),
        Some(CertCredential { fingerprint: None }) => "any from the group's CA".to_string(),
        Some(CertCredential {
            fingerprint: Some(fp),
        }) => format!("pinned sha256:{fp}"),
    }
}

fn random_hex(len: usize) -> Result<String, AdminError> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes)
        .map_err(|e| AdminError::Runtime(format!("the system's random source: {e}")))?;
    let text = hex::encode(&bytes);
    bytes.fill(0);
    Ok(text)
}

impl AdminState {
    /// Check one entry; every problem it has, each a sentence.
    fn wanted(&self, kind: PrincipalKind, index: usize, e: &SyncEntry) -> Result<Wanted, String> {
        let place = place(index, e);
        let mut problems = Vec::new();
        let id = parse_id(&e.principal.id).map_err(|m| problems.push(m)).ok();
        let group = GroupName::parse(e.principal.group.as_deref().unwrap_or("default"))
            .map_err(|m| problems.push(format!("group: {m}")))
            .ok();
        if let Some(group) = &group {
            let policies = match &self.auth {
                Some(auth) => auth.policies(),
                None => self.policies.clone(),
            };
            if policies.group(kind, group).is_none() {
                problems.push(format!("no {kind} group {group:?} in the configuration"));
            }
        }
        let cert = cert_credential(
            e.principal.cert_fingerprint.as_deref(),
            e.principal.cert_any,
        )
        .map_err(|m| problems.push(m))
        .ok()
        .flatten();
        let secret_hash = self
            .hash_secret(e.principal.secret.as_deref())
            .map_err(|m| problems.push(m.replace("--generate-secret", "generate_secret = true")))
            .ok()
            .flatten();
        let (mut psk, mut frame_key) = (None, None);
        if let Some(id) = &id {
            psk = AdminState::psk_key(kind, id, e.principal.psk.as_deref())
                .map_err(|m| problems.push(m))
                .ok()
                .flatten();
            frame_key = AdminState::frame_key(kind, id, e.principal.serial_key.as_deref())
                .map_err(|m| problems.push(m))
                .ok()
                .flatten();
        }
        for (generate, given, name, flag) in [
            (
                e.generate_secret,
                e.principal.secret.is_some(),
                "secret",
                "generate_secret",
            ),
            (
                e.psk_generate,
                e.principal.psk.is_some(),
                "psk",
                "psk_generate",
            ),
            (
                e.serial_key_generate,
                e.principal.serial_key.is_some(),
                "serial_key",
                "serial_key_generate",
            ),
        ] {
            if generate && given {
                problems.push(format!("{name} and {flag}: give one or the other"));
            }
        }
        if kind == PrincipalKind::Service && (e.psk_generate || e.serial_key_generate) {
            problems.push("a pre-shared key or serial key is a device credential".to_string());
        }
        match (id, group) {
            (Some(id), Some(group)) if problems.is_empty() => Ok(Wanted {
                id,
                group,
                enabled: e.enabled.unwrap_or(true),
                cert,
                secret_hash,
                psk,
                frame_key,
                generate_secret: e.generate_secret,
                psk_generate: e.psk_generate,
                serial_key_generate: e.serial_key_generate,
                place,
            }),
            _ => Err(format!("{place}: {}", problems.join("; "))),
        }
    }

    /// Does `sealed` hold exactly `key`? A key that does not open counts as different.
    fn same_key(
        &self,
        r: &PrincipalRecord,
        purpose: KeyPurpose,
        sealed: &Option<portcullis_core::device_key::SealedKey>,
        key: &DeviceKey,
    ) -> bool {
        sealed
            .as_ref()
            .and_then(|s| self.master.open(r.kind, &r.id, purpose, s).ok())
            .is_some_and(|held| held.as_bytes() == key.as_bytes())
    }

    /// The plan for `wanted` against the records of `kind` in `base`.
    fn plan(
        &self,
        kind: PrincipalKind,
        wanted: Vec<Wanted>,
        base: &[std::sync::Arc<PrincipalRecord>],
    ) -> Result<Planned, AdminError> {
        let current: BTreeMap<&PrincipalId, &PrincipalRecord> =
            base.iter().map(|r| (&r.id, &**r)).collect();
        let mut out = Planned {
            plan: SyncPlan::default(),
            changes: Vec::new(),
            generated: Vec::new(),
            kicks: Vec::new(),
            audit: Vec::new(),
        };
        let mut errors = Vec::new();
        let now = now_unix();
        let mut listed = BTreeSet::new();
        for w in wanted {
            listed.insert(w.id.clone());
            let mut keys = NewDeviceKeys::default();
            let mut generate = |what: &str| -> Result<String, AdminError> {
                let value = match what {
                    "psk" => generate_device_key().map_err(|e| {
                        AdminError::Runtime(format!("the system's random source: {e}"))
                    })?,
                    "serial key" => random_hex(FRAME_KEY_LEN)?,
                    _ => random_hex(24)?,
                };
                out.generated.push(GeneratedCredential {
                    id: w.id.to_string(),
                    credential: what.to_string(),
                    value: value.clone(),
                });
                Ok(value)
            };
            let Some(cur) = current.get(&w.id) else {
                // New: everything the entry gives, and what it asks to be generated.
                let mut credentials = Vec::new();
                if w.cert.is_some() {
                    credentials.push(format!("certificate ({})", describe_cert(&w.cert)));
                }
                let mut secret_hash = w.secret_hash;
                if secret_hash.is_some() {
                    credentials.push("secret".into());
                } else if w.generate_secret {
                    let secret = generate("secret")?;
                    secret_hash = Some(hex::encode(self.hasher.hash(secret.as_bytes())));
                    credentials.push("secret (generated)".into());
                }
                keys.psk = w.psk;
                if keys.psk.is_some() {
                    credentials.push("psk".into());
                } else if w.psk_generate {
                    let psk = generate("psk")?;
                    keys.psk = AdminState::psk_key(kind, &w.id, Some(&psk))?;
                    credentials.push("psk (generated)".into());
                }
                keys.frame_key = w.frame_key;
                if keys.frame_key.is_some() {
                    credentials.push("serial key".into());
                } else if w.serial_key_generate {
                    let key = generate("serial key")?;
                    keys.frame_key = AdminState::frame_key(kind, &w.id, Some(&key))?;
                    credentials.push("serial key (generated)".into());
                }
                if credentials.is_empty() {
                    errors.push(format!(
                        "{}: no credential (give cert, cert_any, secret, psk or serial_key, \
                         or a *_generate)",
                        w.place
                    ));
                    continue;
                }
                out.plan.add.push(SyncAdd {
                    id: w.id.to_string(),
                    group: w.group.to_string(),
                    enabled: w.enabled,
                    credentials,
                });
                out.audit.push((w.id.to_string(), "sync: add".into()));
                out.changes.push(SyncChange::Put(
                    Box::new(PrincipalRecord {
                        kind,
                        id: w.id,
                        group: w.group,
                        enabled: w.enabled,
                        cert: w.cert,
                        secret_hash,
                        psk: None,
                        frame_key: None,
                        generation: 0,
                        created_unix: now,
                        updated_unix: now,
                    }),
                    keys,
                ));
                continue;
            };
            let mut next = (*cur).clone();
            let (mut changes, mut kept) = (Vec::new(), Vec::new());
            // Changes that a session authenticated before must not outlive.
            let mut reauth = false;
            if cur.group != w.group {
                changes.push(format!("group: {} -> {}", cur.group, w.group));
                next.group = w.group;
            }
            if cur.enabled != w.enabled {
                changes.push(format!("enabled: {} -> {}", cur.enabled, w.enabled));
                next.enabled = w.enabled;
            }
            if cur.cert != w.cert {
                changes.push(format!(
                    "certificate: {} -> {}",
                    describe_cert(&cur.cert),
                    describe_cert(&w.cert)
                ));
                next.cert = w.cert;
                reauth = true;
            }
            match (&w.secret_hash, &cur.secret_hash) {
                (Some(new), Some(old)) if new == old => {}
                (Some(new), old) => {
                    changes.push(format!(
                        "secret: {}",
                        if old.is_some() { "replaced" } else { "added" }
                    ));
                    next.secret_hash = Some(new.clone());
                    reauth = true;
                }
                (None, None) if w.generate_secret => {
                    let secret = generate("secret")?;
                    next.secret_hash = Some(hex::encode(self.hasher.hash(secret.as_bytes())));
                    changes.push("secret: generated".into());
                    reauth = true;
                }
                (None, Some(_)) => kept.push("secret".to_string()),
                (None, None) => {}
            }
            for (given, sealed, want_generate, purpose, name) in [
                (&w.psk, &cur.psk, w.psk_generate, KeyPurpose::Psk, "psk"),
                (
                    &w.frame_key,
                    &cur.frame_key,
                    w.serial_key_generate,
                    KeyPurpose::FrameKey,
                    "serial key",
                ),
            ] {
                let slot = match purpose {
                    KeyPurpose::Psk => &mut keys.psk,
                    _ => &mut keys.frame_key,
                };
                match given {
                    Some(key) if self.same_key(cur, purpose, sealed, key) => {}
                    Some(key) => {
                        changes.push(format!(
                            "{name}: {}",
                            if sealed.is_some() {
                                "replaced"
                            } else {
                                "added"
                            }
                        ));
                        *slot =
                            Some(DeviceKey::new(key.as_bytes().to_vec()).map_err(|e| {
                                AdminError::Runtime(format!("{}: {name}: {e}", w.id))
                            })?);
                        reauth = true;
                    }
                    None if sealed.is_none() && want_generate => {
                        let value = generate(name)?;
                        *slot = match purpose {
                            KeyPurpose::Psk => AdminState::psk_key(kind, &w.id, Some(&value))?,
                            _ => AdminState::frame_key(kind, &w.id, Some(&value))?,
                        };
                        changes.push(format!("{name}: generated"));
                        reauth = true;
                    }
                    None if sealed.is_some() => kept.push(name.to_string()),
                    None => {}
                }
            }
            if next.cert.is_none()
                && next.secret_hash.is_none()
                && next.psk.is_none()
                && keys.psk.is_none()
                && next.frame_key.is_none()
                && keys.frame_key.is_none()
            {
                errors.push(format!(
                    "{}: no credential would be left (the list drops the certificate and gives no other)",
                    w.place
                ));
                continue;
            }
            if changes.is_empty() {
                out.plan.unchanged += 1;
                continue;
            }
            let group_changed = cur.group != next.group;
            if reauth || group_changed {
                next.generation += 1;
            }
            if group_changed {
                // A new registration as far as sessions go: a persistent session (its
                // subscriptions granted under the old group's ACL, its queued commands)
                // is not resumed, whether live now or parked.
                next.created_unix = now;
            }
            next.updated_unix = now;
            if !next.enabled {
                out.kicks
                    .push((w.id.clone(), KickReason::Disabled, u64::MAX));
            } else if group_changed {
                out.kicks
                    .push((w.id.clone(), KickReason::GroupChanged, next.generation));
            } else if reauth {
                out.kicks
                    .push((w.id.clone(), KickReason::CredentialRotated, next.generation));
            }
            let fields: Vec<&str> = changes
                .iter()
                .map(|c| c.split(':').next().unwrap_or(c))
                .collect();
            out.audit.push((
                w.id.to_string(),
                format!("sync: update ({})", fields.join(", ")),
            ));
            out.plan.update.push(SyncUpdate {
                id: w.id.to_string(),
                changes,
                kept,
            });
            out.changes.push(SyncChange::Put(Box::new(next), keys));
        }
        if !errors.is_empty() {
            return Err(refused(errors));
        }
        for id in current.keys().filter(|id| !listed.contains(*id)) {
            out.plan.remove.push(id.to_string());
            out.audit.push((id.to_string(), "sync: remove".into()));
            out.kicks
                .push(((*id).clone(), KickReason::Removed, u64::MAX));
            out.changes.push(SyncChange::Remove((*id).clone()));
        }
        out.plan.add.sort_by(|a, b| a.id.cmp(&b.id));
        out.plan.update.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// Every error of the list, one a line, and that nothing changed.
fn refused(errors: Vec<String>) -> AdminError {
    AdminError::Usage(format!(
        "{} error(s), nothing changed:\n  {}",
        errors.len(),
        errors.join("\n  ")
    ))
}

impl Handler for SyncPrincipals {
    fn run(self, state: &AdminState) -> Result<SyncPlan, AdminError> {
        let kind = self.kind;
        if self.entries.is_empty() {
            return Err(AdminError::Usage(format!(
                "the list is empty: a sync to it would remove every {kind}; \
                 remove them with `portcullis {kind} remove ID` instead"
            )));
        }
        let mut errors = Vec::new();
        let mut wanted = Vec::with_capacity(self.entries.len());
        let mut first: BTreeMap<PrincipalId, String> = BTreeMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            match state.wanted(kind, i, e) {
                Ok(w) => {
                    if let Some(earlier) = first.get(&w.id) {
                        errors.push(format!(
                            "{}: {kind} {} is listed already, at {earlier}",
                            w.place, w.id
                        ));
                        continue;
                    }
                    first.insert(w.id.clone(), w.place.clone());
                    wanted.push(w);
                }
                Err(m) => errors.push(m),
            }
        }
        if !errors.is_empty() {
            return Err(refused(errors));
        }
        let snapshot = state.registry.snapshot();
        let base = snapshot.list(kind);
        let planned = state.plan(kind, wanted, &base)?;
        let mut plan = planned.plan;
        if self.dry_run || planned.changes.is_empty() {
            return Ok(plan);
        }
        // One commit for the whole sync, refused if the registry moved since `base`.
        state
            .registry
            .apply_sync(kind, &base, planned.changes, &state.master)?;
        plan.applied = true;
        plan.generated = planned.generated;
        for (id, reason, below) in planned.kicks {
            plan.sessions_ended += state.kick(kind, &id, below, reason);
            if reason == KickReason::Removed && kind == PrincipalKind::Device {
                // As `device remove`: its desired state and behaviour go with it.
                state.forget_device(&id);
            }
        }
        for (id, action) in planned.audit {
            state.audit(&action, kind, &id);
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::NewPrincipal;
    use crate::admin::testing::{offline, usage};

    /// The secret `testing::state` registers sensor-1 and sensor-2 with.
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn entry(id: &str) -> SyncEntry {
        SyncEntry {
            principal: NewPrincipal {
                id: id.into(),
                group: None,
                cert_fingerprint: None,
                cert_any: false,
                secret: None,
                psk: None,
                serial_key: None,
            },
            enabled: None,
            generate_secret: false,
            psk_generate: false,
            serial_key_generate: false,
            line: None,
        }
    }

    fn with_secret(id: &str, secret: &str) -> SyncEntry {
        let mut e = entry(id);
        e.principal.secret = Some(secret.into());
        e
    }

    fn with_psk(id: &str, psk: &str) -> SyncEntry {
        let mut e = entry(id);
        e.principal.psk = Some(psk.into());
        e
    }

    fn sync(
        state: &AdminState,
        entries: Vec<SyncEntry>,
        dry_run: bool,
    ) -> Result<SyncPlan, AdminError> {
        SyncPrincipals {
            kind: PrincipalKind::Device,
            entries,
            dry_run,
        }
        .run(state)
    }

    fn record(state: &AdminState, id: &str) -> PrincipalRecord {
        (**state
            .registry
            .snapshot()
            .get(PrincipalKind::Device, &PrincipalId::parse(id).unwrap())
            .unwrap())
        .clone()
    }

    #[test]
    fn the_same_secret_again_is_no_change_and_another_one_replaces_it() {
        let (_dir, state) = offline();
        let before = record(&state, "sensor-2");
        let plan = sync(
            &state,
            vec![
                with_secret("sensor-1", SECRET),
                with_secret("sensor-2", "another-secret-0123456789"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(plan.unchanged, 1);
        assert_eq!(
            plan.update,
            [SyncUpdate {
                id: "sensor-2".into(),
                changes: vec!["secret: replaced".into()],
                kept: vec![],
            }]
        );
        let after = record(&state, "sensor-2");
        assert_ne!(after.secret_hash, before.secret_hash);
        assert_eq!(after.generation, before.generation + 1);
    }

    #[test]
    fn a_psk_is_compared_opened_kept_when_left_out_and_never_generated_over() {
        let (_dir, state) = offline();
        let psk = "sensor-1-pre-shared-key";
        sync(
            &state,
            vec![with_psk("sensor-1", psk), entry("sensor-2")],
            false,
        )
        .unwrap();
        let sealed = record(&state, "sensor-1").psk;
        assert!(sealed.is_some());
        // The same key, the key left out, a key to generate: nothing changes.
        let mut generate = entry("sensor-1");
        generate.psk_generate = true;
        for first in [with_psk("sensor-1", psk), entry("sensor-1"), generate] {
            let plan = sync(&state, vec![first, entry("sensor-2")], false).unwrap();
            assert_eq!((plan.unchanged, plan.applied), (2, false), "{plan:?}");
            assert!(plan.generated.is_empty());
        }
        assert_eq!(record(&state, "sensor-1").psk, sealed);
        // A different key replaces it; a change elsewhere tells that the psk is kept.
        let mut disabled = entry("sensor-1");
        disabled.enabled = Some(false);
        let plan = sync(
            &state,
            vec![disabled, with_psk("sensor-2", "sensor-2-pre-shared-key")],
            false,
        )
        .unwrap();
        assert_eq!(
            plan.update,
            [
                SyncUpdate {
                    id: "sensor-1".into(),
                    changes: vec!["enabled: true -> false".into()],
                    kept: vec!["secret".into(), "psk".into()],
                },
                SyncUpdate {
                    id: "sensor-2".into(),
                    changes: vec!["psk: added".into()],
                    kept: vec!["secret".into()],
                },
            ]
        );
    }

    #[test]
    fn a_group_move_is_a_new_registration_for_sessions_and_a_new_generation() {
        let config = {
            let mut c = crate::admin::testing::config();
            let other = c.device_groups["default"].clone();
            c.device_groups.insert("narrow".into(), other);
            c
        };
        let (_dir, state) = crate::admin::testing::state(&config, |_| None);
        // Registered long ago, with a certificate credential.
        state
            .registry
            .add(PrincipalRecord {
                kind: PrincipalKind::Device,
                id: PrincipalId::parse("cam-1").unwrap(),
                group: GroupName::parse("default").unwrap(),
                enabled: true,
                cert: Some(CertCredential { fingerprint: None }),
                secret_hash: None,
                psk: None,
                frame_key: None,
                generation: 4,
                created_unix: 1,
                updated_unix: 1,
            })
            .unwrap();
        let mut moved = entry("cam-1");
        moved.principal.group = Some("narrow".into());
        moved.principal.cert_any = true;
        let plan = sync(
            &state,
            vec![moved, entry("sensor-1"), entry("sensor-2")],
            false,
        )
        .unwrap();
        assert_eq!(plan.update[0].changes, ["group: default -> narrow"]);
        assert_eq!(plan.unchanged, 2);
        let after = record(&state, "cam-1");
        assert_eq!(after.group.as_str(), "narrow");
        assert_eq!(after.generation, 5);
        assert_ne!(after.created_unix, 1, "not the old registration");
        assert_eq!(after.cert, Some(CertCredential { fingerprint: None }));
    }

    #[test]
    fn a_dry_run_plans_what_the_sync_then_does_and_changes_nothing() {
        let (dir, state) = offline();
        let entries = || {
            vec![
                with_secret("sensor-9", "sensor-9-secret-0123456789"),
                entry("sensor-1"),
            ]
        };
        let dry = sync(&state, entries(), true).unwrap();
        assert!(!dry.applied);
        assert_eq!(dry.remove, ["sensor-2"]);
        assert!(
            state
                .registry
                .snapshot()
                .get(
                    PrincipalKind::Device,
                    &PrincipalId::parse("sensor-2").unwrap()
                )
                .is_some()
        );
        assert!(!crate::admin::testing::audit_log(&dir).contains("sync:"));
        let done = sync(&state, entries(), false).unwrap();
        assert!(done.applied);
        assert_eq!(
            (done.add, done.update, done.remove),
            (dry.add, dry.update, dry.remove)
        );
        let log = crate::admin::testing::audit_log(&dir);
        assert!(
            log.contains("sync: add") && log.contains("sync: remove"),
            "{log}"
        );
    }

    #[test]
    fn a_generate_flag_beside_the_credential_itself_is_an_error_and_services_get_no_device_keys() {
        let (_dir, state) = offline();
        let mut both = with_secret("sensor-1", SECRET);
        both.generate_secret = true;
        both.line = Some(7);
        let m = usage(sync(&state, vec![both, entry("sensor-2")], false));
        assert_eq!(
            m,
            "1 error(s), nothing changed:\n  line 7: entry 1 (\"sensor-1\"): secret and generate_secret: give one or the other"
        );
        let mut psk = entry("ingest");
        psk.psk_generate = true;
        psk.principal.cert_any = true;
        let m = usage(
            SyncPrincipals {
                kind: PrincipalKind::Service,
                entries: vec![psk],
                dry_run: false,
            }
            .run(&state),
        );
        assert!(m.contains("device credential"), "{m}");
    }
}
