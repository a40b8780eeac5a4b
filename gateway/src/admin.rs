//! The admin API: registry and session management for the `portcullis` CLI.
//!
//! JSON lines over a Unix socket in the data dir (mode 0600, and the peer's uid must
//! be ours or root). The same `handle` runs in-process when no gateway is running, on
//! a registry opened directly; then there are no live sessions to end.
//! Secrets travel only over this socket (never argv) and are hashed on arrival.
//!
//! Quarantine goes through the running gateway's behaviour table, so a release or a
//! quarantine takes effect on the next message; offline, the persisted record is
//! rewritten and the gateway starts in that state.

use portcullis_core::audit::{Audit, AuditEntry, AuditSettings, append_blocking};
use portcullis_core::auth::{Authenticator, Policies};
use portcullis_core::bans::{Ban, BanTarget, Cidr};
use portcullis_core::behaviour::State;
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
use portcullis_core::quarantine::{Behaviours, HistoryEntry, Record};
use portcullis_core::registry::{
    CertCredential, PrincipalRecord, Registry, RegistryError, now_unix,
};
use portcullis_core::retained::RetainedCommands;
use portcullis_core::secret::{MIN_SECRET_LEN, SecretHasher};
use portcullis_core::sessions::{KickReason, Sessions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Largest request line accepted on the socket (an import of ~500k principals).
pub const MAX_REQUEST: usize = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPrincipal {
    pub id: String,
    #[serde(default)]
    pub group: Option<String>,
    /// SHA-256 fingerprint to pin.
    #[serde(default)]
    pub cert_fingerprint: Option<String>,
    /// Accept any certificate from the group's CA whose identity is the id.
    #[serde(default)]
    pub cert_any: bool,
    #[serde(default)]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Add {
        kind: PrincipalKind,
        principal: NewPrincipal,
    },
    Import {
        kind: PrincipalKind,
        principals: Vec<NewPrincipal>,
    },
    List {
        kind: PrincipalKind,
    },
    Show {
        kind: PrincipalKind,
        id: String,
    },
    Enable {
        kind: PrincipalKind,
        id: String,
    },
    Disable {
        kind: PrincipalKind,
        id: String,
    },
    Remove {
        kind: PrincipalKind,
        id: String,
    },
    Rotate {
        kind: PrincipalKind,
        id: String,
        #[serde(default)]
        cert_fingerprint: Option<String>,
        /// Switch to "any certificate from the group's CA" (drops a pin).
        #[serde(default)]
        cert_any: bool,
        #[serde(default)]
        secret: Option<String>,
    },
    BanAdd {
        /// `device/ID`, `service/ID`, an address or a CIDR block.
        target: String,
        #[serde(default)]
        ttl_secs: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    },
    BanList,
    BanRemove {
        target: String,
    },
    /// Reload the configuration file of the running gateway.
    Reload,
    ClientsList,
    ClientsKick {
        kind: PrincipalKind,
        id: String,
    },
    /// Devices quarantined, on probation or released (every record with `all`).
    QuarantineList {
        #[serde(default)]
        all: bool,
    },
    QuarantineShow {
        id: String,
    },
    /// Quarantined → released (and watched); probation → normal.
    QuarantineRelease {
        id: String,
    },
    QuarantineAdd {
        id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Verify every registry record.
    RegistryCheck,
    /// Copy the registry, consistently, to a new file (an absolute path).
    RegistryBackup {
        path: PathBuf,
    },
}

/// Reloads the running gateway's configuration: a summary, or why it was refused.
pub type Reloader = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

pub struct AdminState {
    pub registry: Arc<Registry>,
    pub hasher: SecretHasher,
    /// The policies at start (used with no gateway running).
    pub policies: Arc<Policies>,
    /// The running gateway's authenticator, whose policies follow reloads.
    pub auth: Option<Arc<Authenticator>>,
    pub reload: Option<Reloader>,
    pub sessions: Option<Arc<Sessions>>,
    /// Retained commands held for devices (running gateway only).
    pub retained: Option<Arc<RetainedCommands>>,
    /// The running gateway's behaviour models and quarantine records.
    pub behaviours: Option<Arc<Behaviours>>,
    pub audit: AuditSink,
}

/// Where registry changes are audited: the running gateway's writer, or (with no
/// gateway running) the audit file directly.
pub enum AuditSink {
    Live(Audit),
    File(Box<AuditSettings>),
}

/// An admin failure: the operator's mistake (exit 2) or the gateway's (exit 1).
#[derive(Debug)]
pub enum AdminError {
    Usage(String),
    Runtime(String),
}

impl AdminError {
    pub fn message(&self) -> &str {
        match self {
            AdminError::Usage(m) | AdminError::Runtime(m) => m,
        }
    }
}

impl From<String> for AdminError {
    fn from(m: String) -> Self {
        AdminError::Usage(m)
    }
}

impl From<&str> for AdminError {
    fn from(m: &str) -> Self {
        AdminError::Usage(m.to_string())
    }
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Exists { .. } | RegistryError::NotFound { .. } => {
                AdminError::Usage(e.to_string())
            }
            other => AdminError::Runtime(other.to_string()),
        }
    }
}

fn parse_id(id: &str) -> Result<PrincipalId, String> {
    PrincipalId::parse(id).map_err(|e| format!("{id:?}: {e}"))
}

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

/// `device/ID`, `service/ID`, an address or a CIDR block.
fn parse_ban_target(s: &str) -> Result<BanTarget, String> {
    if let Some((kind, id)) = s.split_once('/') {
        let kind = match kind {
            "device" => Some(PrincipalKind::Device),
            "service" => Some(PrincipalKind::Service),
            _ => None,
        };
        if let Some(kind) = kind {
            return Ok(BanTarget::Principal(kind, parse_id(id)?));
        }
    }
    s.parse::<Cidr>()
        .map(BanTarget::Source)
        .map_err(|e| format!("{e}, or device/ID or service/ID"))
}

fn ban_view(b: &Ban) -> Value {
    json!({
        "target": b.target.to_string(),
        "reason": b.reason,
        "created_unix": b.created_unix,
        "expires_unix": b.expires_unix,
    })
}

fn history_view(h: &HistoryEntry) -> Value {
    json!({
        "at_unix": h.at_unix,
        "from": h.from.as_str(),
        "to": h.to.as_str(),
        "reason": h.reason,
    })
}

/// A quarantine reason given by an operator: shown in one table row, so one line.
fn check_reason(reason: &str) -> Result<(), String> {
    if reason.chars().count() > 200 {
        return Err("the reason is limited to 200 characters".into());
    }
    if reason.chars().any(char::is_control) {
        return Err("the reason must be one line without control characters".into());
    }
    Ok(())
}

/// Public view of a record: never the secret hash.
fn view(r: &PrincipalRecord) -> Value {
    json!({
        "id": r.id.as_str(),
        "kind": r.kind,
        "group": r.group.as_str(),
        "enabled": r.enabled,
        "certificate": r.cert.as_ref().map(|c| match &c.fingerprint {
            Some(fp) => format!("pinned sha256:{fp}"),
            None => "any from the group's CA".to_string(),
        }),
        "secret": r.secret_hash.is_some(),
        "generation": r.generation,
        "created_unix": r.created_unix,
        "updated_unix": r.updated_unix,
    })
}

impl AdminState {
    fn record_for(&self, kind: PrincipalKind, p: &NewPrincipal) -> Result<PrincipalRecord, String> {
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
        let cert = match (&p.cert_fingerprint, p.cert_any) {
            (Some(fp), _) => Some(CertCredential {
                fingerprint: Some(check_fingerprint(fp)?),
            }),
            (None, true) => Some(CertCredential { fingerprint: None }),
            (None, false) => None,
        };
        let secret_hash = match &p.secret {
            Some(s) => {
                check_secret(s)?;
                Some(hex::encode(self.hasher.hash(s.as_bytes())))
            }
            None => None,
        };
        if cert.is_none() && secret_hash.is_none() {
            return Err(format!(
                "{id}: no credential (give a certificate, --cert-any, or a secret)"
            ));
        }
        let now = now_unix();
        Ok(PrincipalRecord {
            kind,
            id,
            group,
            enabled: true,
            cert,
            secret_hash,
            generation: 0,
            created_unix: now,
            updated_unix: now,
        })
    }

    fn kick(&self, kind: PrincipalKind, id: &PrincipalId, below: u64, reason: KickReason) -> usize {
        self.sessions
            .as_ref()
            .map(|s| s.kick(kind, id, below, reason))
            .unwrap_or(0)
    }

    fn write_audit(&self, entry: AuditEntry) {
        match &self.audit {
            AuditSink::Live(audit) => audit.record(entry),
            AuditSink::File(settings) => {
                // The same keyed chain the gateway writes, continued from its last line.
                if let Err(e) = append_blocking(settings, &[entry]) {
                    tracing::warn!(error = %e, path = %settings.path.display(), "audit log not written");
                }
            }
        }
    }

    fn audit(&self, action: &str, kind: PrincipalKind, id: &str) {
        self.write_audit(
            AuditEntry::new("registry", "allow")
                .principal(kind.as_str(), id.to_string())
                .protocol("admin")
                .reason(action.to_string()),
        );
    }

    /// An operator's quarantine or release: `from → to: reason`.
    fn audit_quarantine(
        &self,
        event: &'static str,
        id: &PrincipalId,
        from: State,
        to: State,
        reason: &str,
    ) {
        self.write_audit(
            AuditEntry::new(event, "allow")
                .principal(PrincipalKind::Device.as_str(), id.to_string())
                .protocol("admin")
                .reason(format!("{} → {}: {reason}", from.as_str(), to.as_str())),
        );
    }

    fn audit_ban(&self, action: &str, target: &BanTarget) {
        let entry = AuditEntry::new("ban", "allow")
            .protocol("admin")
            .reason(format!("{action} {target}"));
        self.write_audit(match target {
            BanTarget::Principal(kind, id) => entry.principal(kind.as_str(), id.to_string()),
            BanTarget::Source(cidr) => entry.source(cidr),
        });
    }

    /// A registered device and its group: only devices have behaviour models.
    fn device(&self, id: &str) -> Result<(PrincipalId, GroupName), String> {
        let pid = parse_id(id)?;
        match self.registry.snapshot().get(PrincipalKind::Device, &pid) {
            Some(r) => Ok((pid, r.group.clone())),
            None => Err(format!("device {id} is not registered")),
        }
    }

    /// The behaviour records: the running gateway's, or those persisted. Records of
    /// devices removed since are left out (the gateway drops them on start).
    fn behaviour_records(&self, all: bool) -> Result<Vec<(PrincipalId, Record)>, AdminError> {
        let snapshot = self.registry.snapshot();
        let mut out = match &self.behaviours {
            Some(b) => b.records(true),
            None => self
                .registry
                .behaviour_records()?
                .into_iter()
                .filter_map(|(id, r)| Some((PrincipalId::parse(&id).ok()?, r)))
                .collect(),
        };
        out.retain_mut(|(id, r)| {
            r.state = self.current_state(id, r.state);
            snapshot.get(PrincipalKind::Device, id).is_some() && (all || r.state != State::Normal)
        });
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(out)
    }

    fn behaviour_record(&self, id: &PrincipalId) -> Result<Option<Record>, AdminError> {
        let mut record = match &self.behaviours {
            Some(b) => b.record(id),
            None => self
                .registry
                .behaviour_records()?
                .into_iter()
                .find(|(k, _)| k == id.as_str())
                .map(|(_, r)| r),
        };
        if let Some(r) = &mut record {
            r.state = self.current_state(id, r.state);
        }
        Ok(record)
    }

    /// The state the pipeline acts on: the running model's, which a record catches
    /// up with once the transition task has noted it.
    fn current_state(&self, id: &PrincipalId, recorded: State) -> State {
        self.behaviours
            .as_ref()
            .and_then(|b| b.get(id))
            .map_or(recorded, |(_, t)| t.state())
    }

    /// With no gateway running: write a transition into the persisted record; the
    /// gateway starts in that state.
    fn store_transition(
        &self,
        id: &PrincipalId,
        record: Option<Record>,
        to: State,
        reason: &str,
    ) -> Result<State, AdminError> {
        let now = now_unix();
        let mut record = record.unwrap_or_else(|| Record::new(now));
        let from = record.push(now, to, reason.to_string());
        self.registry
            .put_behaviour_records(&[(id.to_string(), record)])?;
        Ok(from)
    }

    /// Run one request. Errors are messages for the operator.
    pub fn handle(&self, req: Request) -> Result<Value, AdminError> {
        match req {
            Request::Add { kind, principal } => {
                let record = self.record_for(kind, &principal)?;
                let out = view(&record);
                self.registry.add(record)?;
                self.audit("add", kind, &principal.id);
                Ok(out)
            }
            Request::Import { kind, principals } => {
                // Check everything first: an import is applied whole or not at all.
                let snapshot = self.registry.snapshot();
                let mut records = Vec::with_capacity(principals.len());
                let mut seen = std::collections::HashSet::new();
                for (i, p) in principals.iter().enumerate() {
                    let record = self
                        .record_for(kind, p)
                        .map_err(|e| format!("entry {}: {e}", i + 1))?;
                    if snapshot.get(kind, &record.id).is_some() || !seen.insert(record.id.clone()) {
                        return Err(format!(
                            "entry {}: {kind} {} already exists",
                            i + 1,
                            record.id
                        )
                        .into());
                    }
                    records.push(record);
                }
                let n = records.len();
                let ids: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
                // One commit for the whole import.
                self.registry.add_all(records)?;
                for id in ids {
                    self.audit("import", kind, &id);
                }
                Ok(json!({ "imported": n }))
            }
            Request::List { kind } => Ok(Value::Array(
                self.registry
                    .snapshot()
                    .list(kind)
                    .iter()
                    .map(|r| view(r))
                    .collect(),
            )),
            Request::Show { kind, id } => {
                let id = parse_id(&id)?;
                let snapshot = self.registry.snapshot();
                let record = snapshot
                    .get(kind, &id)
                    .ok_or_else(|| format!("no such {kind}: {id}"))?;
                let mut v = view(record);
                if let Some(sessions) = &self.sessions {
                    let live: Vec<_> = sessions
                        .list()
                        .into_iter()
                        .filter(|s| s.kind == kind && s.id == id.as_str())
                        .collect();
                    v["sessions"] = serde_json::to_value(live).unwrap_or(Value::Null);
                }
                Ok(v)
            }
            Request::Enable { kind, id } => {
                let pid = parse_id(&id)?;
                let r = self.registry.set_enabled(kind, &pid, true)?;
                self.audit("enable", kind, &id);
                Ok(view(&r))
            }
            Request::Disable { kind, id } => {
                let pid = parse_id(&id)?;
                let r = self.registry.set_enabled(kind, &pid, false)?;
                let kicked = self.kick(kind, &pid, u64::MAX, KickReason::Disabled);
                self.audit("disable", kind, &id);
                let mut v = view(&r);
                v["sessions_ended"] = kicked.into();
                Ok(v)
            }
            Request::Remove { kind, id } => {
                let pid = parse_id(&id)?;
                self.registry.remove(kind, &pid)?;
                let kicked = self.kick(kind, &pid, u64::MAX, KickReason::Removed);
                // A removed device's desired state goes with it.
                if let (PrincipalKind::Device, Some(retained)) = (kind, &self.retained) {
                    retained.purge(&pid);
                }
                // And so does its behaviour: a device registered again starts afresh.
                if kind == PrincipalKind::Device {
                    if let Some(behaviours) = &self.behaviours {
                        behaviours.forget(&pid);
                    }
                    // The device is gone already; a stray record is ignored on start.
                    if let Err(e) = self.registry.remove_behaviour_record(&pid) {
                        tracing::warn!(error = %e, device = %pid, "behaviour record not removed");
                    }
                }
                self.audit("remove", kind, &id);
                Ok(json!({ "removed": id, "sessions_ended": kicked }))
            }
            Request::Rotate {
                kind,
                id,
                cert_fingerprint,
                cert_any,
                secret,
            } => {
                let pid = parse_id(&id)?;
                if cert_fingerprint.is_none() && !cert_any && secret.is_none() {
                    return Err("rotate needs a new certificate, --cert-any or a new secret".into());
                }
                let cert = match (cert_fingerprint, cert_any) {
                    (Some(fp), _) => Some(CertCredential {
                        fingerprint: Some(check_fingerprint(&fp)?),
                    }),
                    (None, true) => Some(CertCredential { fingerprint: None }),
                    (None, false) => None,
                };
                let secret_hash = match secret {
                    Some(s) => {
                        check_secret(&s)?;
                        Some(hex::encode(self.hasher.hash(s.as_bytes())))
                    }
                    None => None,
                };
                let r = self.registry.rotate(kind, &pid, cert, secret_hash)?;
                let kicked = self.kick(kind, &pid, r.generation, KickReason::CredentialRotated);
                self.audit("rotate", kind, &id);
                let mut v = view(&r);
                v["sessions_ended"] = kicked.into();
                Ok(v)
            }
            Request::BanAdd {
                target,
                ttl_secs,
                reason,
            } => {
                let target = parse_ban_target(&target)?;
                if ttl_secs == Some(0) {
                    return Err("a ban's TTL must be at least 1 second".into());
                }
                let now = now_unix();
                let reason = reason.unwrap_or_else(|| "banned by operator".into());
                if reason.len() > 200 {
                    return Err("the reason is limited to 200 characters".into());
                }
                let ban = Ban {
                    target: target.clone(),
                    reason,
                    created_unix: now,
                    expires_unix: ttl_secs.map(|t| now.saturating_add(t)),
                };
                self.registry.add_ban(ban.clone())?;
                // Sessions already open under the ban end now.
                let ended = match (&target, &self.sessions) {
                    (BanTarget::Principal(kind, id), Some(s)) => {
                        s.kick(*kind, id, u64::MAX, KickReason::Banned)
                    }
                    (BanTarget::Source(cidr), Some(s)) => {
                        s.kick_sources(|ip| cidr.contains(ip), KickReason::Banned)
                    }
                    _ => 0,
                };
                let ttl = ttl_secs.map_or("until lifted".to_string(), |t| format!("for {t} s"));
                self.audit_ban(&format!("ban ({}, {ttl}):", ban.reason), &target);
                let mut v = ban_view(&ban);
                v["sessions_ended"] = ended.into();
                Ok(v)
            }
            Request::BanList => Ok(Value::Array(
                self.registry
                    .bans()
                    .all()
                    .iter()
                    .filter(|b| b.active(now_unix()))
                    .map(ban_view)
                    .collect(),
            )),
            Request::BanRemove { target } => {
                let target = parse_ban_target(&target)?;
                if !self.registry.remove_ban(&target)? {
                    return Err(format!("no ban on {target}").into());
                }
                self.audit_ban("unban", &target);
                Ok(json!({ "removed": target.to_string() }))
            }
            Request::Reload => match &self.reload {
                Some(reload) => reload()
                    .map(|summary| json!({ "reloaded": summary }))
                    .map_err(AdminError::Usage),
                None => Err(AdminError::Runtime("the gateway is not running".into())),
            },
            Request::ClientsList => match &self.sessions {
                Some(s) => {
                    serde_json::to_value(s.list()).map_err(|e| AdminError::Runtime(e.to_string()))
                }
                None => Err(AdminError::Runtime("the gateway is not running".into())),
            },
            Request::ClientsKick { kind, id } => {
                let pid = parse_id(&id)?;
                if self.sessions.is_none() {
                    return Err(AdminError::Runtime("the gateway is not running".into()));
                }
                let kicked = self.kick(kind, &pid, u64::MAX, KickReason::Operator);
                self.audit("kick", kind, &id);
                Ok(json!({ "sessions_ended": kicked }))
            }
            Request::QuarantineList { all } => Ok(Value::Array(
                self.behaviour_records(all)?
                    .iter()
                    .map(|(id, r)| {
                        json!({
                            "id": id.as_str(),
                            "state": r.state.as_str(),
                            "since_unix": r.since_unix,
                            "reason": r.history.back().map(|h| h.reason.as_str()),
                        })
                    })
                    .collect(),
            )),
            Request::QuarantineShow { id } => {
                let (id, group) = self.device(&id)?;
                let record = self.behaviour_record(&id)?;
                let mut v = json!({
                    "id": id.as_str(),
                    "group": group.as_str(),
                    "state": self
                        .current_state(&id, record.as_ref().map_or(State::Normal, |r| r.state))
                        .as_str(),
                    "since_unix": record.as_ref().map(|r| r.since_unix),
                    "history": record
                        .as_ref()
                        .map(|r| r.history.iter().map(history_view).collect::<Vec<_>>())
                        .unwrap_or_default(),
                });
                // The learned baseline lives only in the running gateway's model.
                let tracked = self
                    .behaviours
                    .as_ref()
                    .and_then(|b| Some((b.get(&id)?.1, b.policy(&group))));
                if let Some((tracked, policy)) = tracked {
                    let ((mps, msd), (bps, bsd), learned) = tracked.baselines(&policy.settings);
                    v["baseline"] = json!({
                        "messages_per_second": mps,
                        "messages_sd": msd,
                        "bytes_per_second": bps,
                        "bytes_sd": bsd,
                        "learned_secs": learned.as_secs(),
                    });
                }
                Ok(v)
            }
            Request::QuarantineRelease { id } => {
                let (pid, group) = self.device(&id)?;
                let not_held = || format!("device {id} is not quarantined or on probation");
                let (from, to, reason) = match &self.behaviours {
                    Some(b) => {
                        let to = b.release(&pid, &group, "operator").ok_or_else(not_held)?;
                        let from = match to {
                            State::Normal => State::Probation,
                            _ => State::Quarantined,
                        };
                        (from, to, "released by operator")
                    }
                    None => {
                        let record = self.behaviour_record(&pid)?;
                        let to = match record.as_ref().map(|r| r.state) {
                            Some(State::Quarantined) => State::Released,
                            Some(State::Probation) => State::Normal,
                            _ => return Err(not_held().into()),
                        };
                        let reason = "released by operator (gateway not running)";
                        (self.store_transition(&pid, record, to, reason)?, to, reason)
                    }
                };
                self.audit_quarantine("quarantine_release", &pid, from, to, reason);
                Ok(json!({ "id": pid.as_str(), "state": to.as_str() }))
            }
            Request::RegistryCheck => Ok(json!(self.registry.check()?)),
            Request::RegistryBackup { path } => {
                if !path.is_absolute() {
                    return Err(format!("backup path {} must be absolute", path.display()).into());
                }
                Ok(json!(self.registry.backup(&path)?))
            }
            Request::QuarantineAdd { id, reason } => {
                let (pid, group) = self.device(&id)?;
                if let Some(r) = &reason {
                    check_reason(r)?;
                }
                let reason = format!(
                    "quarantined by operator{}",
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                );
                let already = || format!("device {id} is already quarantined");
                let from = match &self.behaviours {
                    Some(b) => {
                        // Sessions of such a group are not modelled: nothing would enforce it.
                        if !b.policy(&group).enabled {
                            return Err(format!(
                                "device {id}: the behaviour model is off for its group {} \
                                 (behaviour.enabled = false), so a quarantine would not be \
                                 enforced; disable or ban the device instead",
                                group.as_str()
                            )
                            .into());
                        }
                        let from = self.current_state(&pid, State::Normal);
                        b.quarantine(&pid, &group, reason.clone())
                            .ok_or_else(already)?;
                        from
                    }
                    None => {
                        let record = self.behaviour_record(&pid)?;
                        if record.as_ref().map(|r| r.state) == Some(State::Quarantined) {
                            return Err(already().into());
                        }
                        self.store_transition(&pid, record, State::Quarantined, &reason)?
                    }
                };
                self.audit_quarantine("quarantine_add", &pid, from, State::Quarantined, &reason);
                Ok(json!({ "id": pid.as_str(), "state": State::Quarantined.as_str() }))
            }
        }
    }
}

/// Bind the admin socket: owner-only permissions, stale socket replaced.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live gateway holds the registry lock, so reaching here means it is stale.
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve admin requests until the listener is dropped.
pub async fn serve(listener: UnixListener, state: Arc<AdminState>) {
    let me = unsafe_free_uid();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == me || c.uid() == 0)
            .unwrap_or(false);
        let state = state.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            if !allowed {
                let _ = wr
                    .write_all(b"{\"ok\":false,\"error\":\"permission denied\"}\n")
                    .await;
                return;
            }
            let mut lines = BufReader::new(rd.take(MAX_REQUEST as u64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let state = state.clone();
                        // Registry writes are synchronous redb commits.
                        match tokio::task::spawn_blocking(move || state.handle(req)).await {
                            Ok(Ok(v)) => json!({ "ok": true, "result": v }),
                            Ok(Err(e)) => json!({
                                "ok": false,
                                "error": e.message(),
                                "usage": matches!(e, AdminError::Usage(_)),
                            }),
                            Err(e) => json!({ "ok": false, "error": e.to_string() }),
                        }
                    }
                    Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
                };
                let mut text = response.to_string();
                text.push('\n');
                if wr.write_all(text.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Our effective uid, read from /proc so no `unsafe` libc call is needed.
fn unsafe_free_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

use tokio::io::AsyncReadExt;

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::quarantine::HISTORY;
    use std::collections::VecDeque;

    /// No CA to read: the devices authenticate with secrets.
    fn config() -> portcullis_config::Config {
        let mut config = portcullis_config::Config::default();
        for g in config.device_groups.values_mut() {
            g.trust.clear();
        }
        for g in config.service_groups.values_mut() {
            g.trust.clear();
        }
        config
    }

    /// An admin state on a registry in a temporary dir, with `sensor-1` and
    /// `sensor-2` registered.
    fn state(
        config: &portcullis_config::Config,
        behaviours: impl FnOnce(&Registry) -> Option<Arc<Behaviours>>,
    ) -> (tempfile::TempDir, AdminState) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(
            &dir.path().join("registry.redb"),
            portcullis_core::record::RecordSealer::derive(&[5; 32]),
        )
        .unwrap();
        let behaviours = behaviours(&registry);
        let state = AdminState {
            registry: Arc::new(registry),
            hasher: SecretHasher::from_key([7; 32]),
            policies: Arc::new(Policies::from_config(config).unwrap()),
            auth: None,
            reload: None,
            sessions: None,
            retained: None,
            behaviours,
            audit: AuditSink::File(Box::new(AuditSettings::new(
                dir.path().join("audit.log"),
                [9; 32],
            ))),
        };
        for id in ["sensor-1", "sensor-2"] {
            state.handle(add_device(id)).unwrap();
        }
        (dir, state)
    }

    /// No gateway running.
    fn offline() -> (tempfile::TempDir, AdminState) {
        state(&config(), |_| None)
    }

    /// With a gateway's behaviour table (its transitions go nowhere: no task runs).
    fn running(config: portcullis_config::Config) -> (tempfile::TempDir, AdminState) {
        state(&config.clone(), move |registry| {
            let policies = portcullis_core::quarantine::Policies::from_config(&config);
            Some(Behaviours::load(registry, policies).unwrap().0)
        })
    }

    fn tracked_state(state: &AdminState, id: &str) -> Option<State> {
        let id = PrincipalId::parse(id).unwrap();
        Some(state.behaviours.as_ref()?.get(&id)?.1.state())
    }

    fn add_device(id: &str) -> Request {
        Request::Add {
            kind: PrincipalKind::Device,
            principal: NewPrincipal {
                id: id.into(),
                group: None,
                cert_fingerprint: None,
                cert_any: false,
                secret: Some("0123456789abcdef0123456789abcdef".into()),
            },
        }
    }

    /// Persist a record as the gateway would have: one transition into `state`.
    fn put(state: &AdminState, id: &str, to: State, at_unix: u64, reason: &str) {
        let record = Record {
            state: to,
            since_unix: at_unix,
            history: VecDeque::from([HistoryEntry {
                at_unix,
                from: State::Normal,
                to,
                reason: reason.into(),
            }]),
        };
        state
            .registry
            .put_behaviour_records(&[(id.to_string(), record)])
            .unwrap();
    }

    fn stored(state: &AdminState, id: &str) -> Option<Record> {
        state
            .registry
            .behaviour_records()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == id)
            .map(|(_, r)| r)
    }

    fn usage(r: Result<Value, AdminError>) -> String {
        match r {
            Err(AdminError::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    fn audit_log(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default()
    }

    #[test]
    fn quarantine_requests_parse_from_json_lines() {
        let list: Request = serde_json::from_str(r#"{"op":"quarantine_list"}"#).unwrap();
        assert!(matches!(list, Request::QuarantineList { all: false }));
        let add: Request =
            serde_json::from_str(r#"{"op":"quarantine_add","id":"sensor-1"}"#).unwrap();
        assert!(matches!(add, Request::QuarantineAdd { reason: None, .. }));
        let release: Request =
            serde_json::from_str(r#"{"op":"quarantine_release","id":"sensor-1"}"#).unwrap();
        assert!(matches!(release, Request::QuarantineRelease { .. }));
    }

    #[test]
    fn list_shows_only_devices_not_normal_unless_all() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Quarantined,
            1_000,
            "message rate 40/s",
        );
        put(&state, "sensor-2", State::Normal, 2_000, "probation ended");
        let list = state
            .handle(Request::QuarantineList { all: false })
            .unwrap();
        assert_eq!(
            list,
            json!([{
                "id": "sensor-1",
                "state": "quarantined",
                "since_unix": 1_000,
                "reason": "message rate 40/s",
            }])
        );
        let all = state.handle(Request::QuarantineList { all: true }).unwrap();
        let ids: Vec<_> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["sensor-1", "sensor-2"]);
    }

    #[test]
    fn list_leaves_out_records_of_devices_removed_since() {
        let (_dir, state) = offline();
        put(&state, "gone-1", State::Quarantined, 1_000, "clone");
        let list = state.handle(Request::QuarantineList { all: true }).unwrap();
        assert_eq!(list, json!([]));
    }

    #[test]
    fn show_gives_state_and_history_without_a_baseline_offline() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Probation,
            1_000,
            "topic spread 12",
        );
        let v = state
            .handle(Request::QuarantineShow {
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(
            v,
            json!({
                "id": "sensor-1",
                "group": "default",
                "state": "probation",
                "since_unix": 1_000,
                "history": [{
                    "at_unix": 1_000,
                    "from": "normal",
                    "to": "probation",
                    "reason": "topic spread 12",
                }],
            })
        );
    }

    #[test]
    fn a_device_with_no_record_shows_normal_with_no_history() {
        let (_dir, state) = offline();
        let v = state
            .handle(Request::QuarantineShow {
                id: "sensor-2".into(),
            })
            .unwrap();
        assert_eq!(v["state"], "normal");
        assert_eq!(v["since_unix"], Value::Null);
        assert_eq!(v["history"], json!([]));
    }

    #[test]
    fn releasing_a_quarantined_device_offline_leaves_it_released_and_audited() {
        let (dir, state) = offline();
        put(&state, "sensor-1", State::Quarantined, 1_000, "clone");
        let v = state
            .handle(Request::QuarantineRelease {
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(v, json!({ "id": "sensor-1", "state": "released" }));
        let r = stored(&state, "sensor-1").unwrap();
        assert_eq!(r.state, State::Released);
        assert!(r.since_unix >= now_unix() - 5);
        let last = r.history.back().unwrap();
        assert_eq!((last.from, last.to), (State::Quarantined, State::Released));
        assert_eq!(last.reason, "released by operator (gateway not running)");
        let log = audit_log(&dir);
        assert!(log.contains(r#""event":"quarantine_release""#), "{log}");
        assert!(log.contains("quarantined → released"), "{log}");
    }

    #[test]
    fn releasing_a_device_on_probation_offline_returns_it_to_normal() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Probation,
            1_000,
            "rate 3 sd above",
        );
        let v = state
            .handle(Request::QuarantineRelease {
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(v["state"], "normal");
        assert_eq!(stored(&state, "sensor-1").unwrap().state, State::Normal);
    }

    #[test]
    fn releasing_a_device_not_held_is_a_usage_error() {
        let (_dir, state) = offline();
        put(
            &state,
            "sensor-1",
            State::Released,
            1_000,
            "released by operator",
        );
        for id in ["sensor-1", "sensor-2"] {
            let m = usage(state.handle(Request::QuarantineRelease { id: id.into() }));
            assert_eq!(m, format!("device {id} is not quarantined or on probation"));
        }
        // Nothing written for the device that had no record.
        assert!(stored(&state, "sensor-2").is_none());
    }

    #[test]
    fn an_unregistered_id_is_a_usage_error() {
        let (_dir, state) = offline();
        let requests = [
            Request::QuarantineShow { id: "ghost".into() },
            Request::QuarantineRelease { id: "ghost".into() },
            Request::QuarantineAdd {
                id: "ghost".into(),
                reason: None,
            },
        ];
        for req in requests {
            assert_eq!(usage(state.handle(req)), "device ghost is not registered");
        }
        let bad = usage(state.handle(Request::QuarantineShow { id: "a/b".into() }));
        assert!(bad.starts_with("\"a/b\""), "{bad}");
    }

    #[test]
    fn adding_offline_quarantines_once_with_the_operators_reason() {
        let (dir, state) = offline();
        let v = state
            .handle(Request::QuarantineAdd {
                id: "sensor-2".into(),
                reason: Some("firmware under review".into()),
            })
            .unwrap();
        assert_eq!(v, json!({ "id": "sensor-2", "state": "quarantined" }));
        let r = stored(&state, "sensor-2").unwrap();
        assert_eq!(r.state, State::Quarantined);
        let last = r.history.back().unwrap();
        assert_eq!((last.from, last.to), (State::Normal, State::Quarantined));
        assert_eq!(
            last.reason,
            "quarantined by operator: firmware under review"
        );
        assert!(audit_log(&dir).contains(r#""event":"quarantine_add""#));
        let again = usage(state.handle(Request::QuarantineAdd {
            id: "sensor-2".into(),
            reason: None,
        }));
        assert_eq!(again, "device sensor-2 is already quarantined");
    }

    #[test]
    fn an_operators_reason_must_be_one_short_line() {
        let (_dir, state) = offline();
        for reason in ["two\nlines".to_string(), "x".repeat(201)] {
            let m = usage(state.handle(Request::QuarantineAdd {
                id: "sensor-1".into(),
                reason: Some(reason),
            }));
            assert!(m.starts_with("the reason"), "{m}");
        }
        assert!(stored(&state, "sensor-1").is_none());
    }

    #[test]
    fn history_keeps_only_the_latest_transitions() {
        let (_dir, state) = offline();
        for _ in 0..HISTORY {
            state
                .handle(Request::QuarantineAdd {
                    id: "sensor-1".into(),
                    reason: None,
                })
                .unwrap();
            state
                .handle(Request::QuarantineRelease {
                    id: "sensor-1".into(),
                })
                .unwrap();
        }
        let r = stored(&state, "sensor-1").unwrap();
        assert_eq!(r.history.len(), HISTORY);
        assert_eq!(r.history.back().unwrap().to, State::Released);
    }

    #[test]
    fn removing_a_device_forgets_its_behaviour_record() {
        let (_dir, state) = offline();
        put(&state, "sensor-1", State::Quarantined, 1_000, "clone");
        state
            .handle(Request::Remove {
                kind: PrincipalKind::Device,
                id: "sensor-1".into(),
            })
            .unwrap();
        assert!(stored(&state, "sensor-1").is_none());
        // Registered again, it starts afresh.
        state.handle(add_device("sensor-1")).unwrap();
        let v = state
            .handle(Request::QuarantineShow {
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(v["state"], "normal");
        // A device with no record is removed all the same.
        state
            .handle(Request::Remove {
                kind: PrincipalKind::Device,
                id: "sensor-2".into(),
            })
            .unwrap();
    }

    #[test]
    fn running_add_and_release_go_through_the_gateways_model() {
        let (dir, state) = running(config());
        let v = state
            .handle(Request::QuarantineAdd {
                id: "sensor-1".into(),
                reason: None,
            })
            .unwrap();
        assert_eq!(v["state"], "quarantined");
        assert_eq!(tracked_state(&state, "sensor-1"), Some(State::Quarantined));
        let again = usage(state.handle(Request::QuarantineAdd {
            id: "sensor-1".into(),
            reason: None,
        }));
        assert_eq!(again, "device sensor-1 is already quarantined");
        // The gateway's model carries the learned baseline.
        let show = state
            .handle(Request::QuarantineShow {
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(show["state"], "quarantined");
        assert!(show["baseline"]["learned_secs"].is_u64(), "{show}");
        let v = state
            .handle(Request::QuarantineRelease {
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(v, json!({ "id": "sensor-1", "state": "released" }));
        assert_eq!(tracked_state(&state, "sensor-1"), Some(State::Released));
        let log = audit_log(&dir);
        assert!(log.contains("released by operator\""), "{log}");
        let m = usage(state.handle(Request::QuarantineRelease {
            id: "sensor-2".into(),
        }));
        assert_eq!(m, "device sensor-2 is not quarantined or on probation");
    }

    #[test]
    fn running_add_is_refused_where_the_model_is_off() {
        let mut config = config();
        config.behaviour.enabled = false;
        let (_dir, state) = running(config);
        let m = usage(state.handle(Request::QuarantineAdd {
            id: "sensor-1".into(),
            reason: None,
        }));
        assert!(m.contains("behaviour model is off"), "{m}");
        assert_eq!(tracked_state(&state, "sensor-1"), None);
    }

    #[test]
    fn removing_a_device_forgets_its_model_in_the_running_gateway() {
        let (_dir, state) = running(config());
        state
            .handle(Request::QuarantineAdd {
                id: "sensor-1".into(),
                reason: None,
            })
            .unwrap();
        state
            .handle(Request::Remove {
                kind: PrincipalKind::Device,
                id: "sensor-1".into(),
            })
            .unwrap();
        assert_eq!(tracked_state(&state, "sensor-1"), None);
    }
}
