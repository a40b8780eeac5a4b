//! The admin API: registry and session management for the `portcullis` CLI.
//!
//! JSON lines over a Unix socket in the data dir (mode 0600, and the peer's uid must
//! be ours or root). The same `handle` runs in-process when no gateway is running, on
//! a registry opened directly; then there are no live sessions to end.
//! Secrets travel only over this socket (never argv) and are hashed on arrival.

use portcullis_core::audit::{Audit, AuditEntry, AuditSettings, append_blocking};
use portcullis_core::auth::{Authenticator, Policies};
use portcullis_core::bans::{Ban, BanTarget, Cidr};
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
use portcullis_core::registry::{
    CertCredential, PrincipalRecord, Registry, RegistryError, now_unix,
};
use portcullis_core::retained::RetainedCommands;
use portcullis_core::secret::{MIN_SECRET_LEN, SecretHasher};
use portcullis_core::sessions::{KickReason, Sessions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;
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

    fn audit(&self, action: &str, kind: PrincipalKind, id: &str) {
        let entry = AuditEntry::new("registry", "allow")
            .principal(kind.as_str(), id.to_string())
            .protocol("admin")
            .reason(action.to_string());
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

    fn audit_ban(&self, action: &str, target: &BanTarget) {
        let entry = AuditEntry::new("ban", "allow")
            .protocol("admin")
            .reason(format!("{action} {target}"));
        let entry = match target {
            BanTarget::Principal(kind, id) => entry.principal(kind.as_str(), id.to_string()),
            BanTarget::Source(cidr) => entry.source(cidr),
        };
        match &self.audit {
            AuditSink::Live(audit) => audit.record(entry),
            AuditSink::File(settings) => {
                if let Err(e) = append_blocking(settings, &[entry]) {
                    tracing::warn!(error = %e, "audit log not written");
                }
            }
        }
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
