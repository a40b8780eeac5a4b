//! The admin protocol as types: what the CLI asks and what the gateway answers.
//!
//! One JSON line per request, a [`Request`] tagged by `op`; one line back, a [`Reply`]
//! around the op's own result type ([`Op::Reply`]). The CLI and the socket server both
//! go through these types, so neither side can drift from the other, and each op
//! names its answer in the table below.
//!
//! Ids, groups and ban targets travel as the operator typed them and are parsed by
//! the gateway: a bad one is the operator's mistake (exit 2) with a message naming it,
//! not an unreadable request line.

use portcullis_core::behaviour::State;
use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
use portcullis_core::quarantine::HistoryEntry;
use portcullis_core::registry::CheckSummary;
use portcullis_core::sessions::SessionInfo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest request line accepted on the socket (an import of ~500k principals).
pub const MAX_REQUEST: usize = 64 << 20;

/// A request type and the result it is answered with.
pub trait Op: Into<Request> {
    type Reply: Serialize + DeserializeOwned;
}

/// The protocol: `Variant(Request type) -> reply type`. The variant, in snake case, is
/// the `op` on the wire.
macro_rules! protocol {
    ($($(#[$doc:meta])* $variant:ident($op:ident) -> $reply:ty;)*) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "op", rename_all = "snake_case")]
        pub enum Request {
            $($(#[$doc])* $variant($op),)*
        }

        $(
            impl From<$op> for Request {
                fn from(op: $op) -> Self {
                    Request::$variant(op)
                }
            }

            impl Op for $op {
                type Reply = $reply;
            }
        )*
    };
}

protocol! {
    Add(AddPrincipal) -> Principal;
    /// All or nothing.
    Import(ImportPrincipals) -> Imported;
    /// Reconcile one kind of principal to a list: the plan, applied in one commit
    /// unless `dry_run` (see `admin/sync.rs`).
    Sync(SyncPrincipals) -> SyncPlan;
    List(ListPrincipals) -> Vec<Principal>;
    Show(ShowPrincipal) -> PrincipalShown;
    Enable(EnablePrincipal) -> Principal;
    /// Ends the principal's live sessions.
    Disable(DisablePrincipal) -> PrincipalChanged;
    /// Ends the principal's live sessions.
    Remove(RemovePrincipal) -> PrincipalRemoved;
    /// Sessions that used the old credentials end.
    Rotate(RotateCredentials) -> PrincipalChanged;
    /// Open sessions the ban covers end at once.
    BanAdd(AddBan) -> BanAdded;
    BanList(ListBans) -> Vec<BanShown>;
    BanRemove(RemoveBan) -> BanRemoved;
    /// Reload the configuration file of the running gateway.
    Reload(Reload) -> Reloaded;
    ClientsList(ListClients) -> Vec<LiveSession>;
    ClientsKick(KickClient) -> SessionsEnded;
    /// Devices quarantined, on probation or released (every record with `all`).
    QuarantineList(ListQuarantine) -> Vec<QuarantineRow>;
    QuarantineShow(ShowQuarantine) -> QuarantineShown;
    /// Quarantined → released (and watched); probation → normal.
    QuarantineRelease(ReleaseDevice) -> DeviceState;
    QuarantineAdd(QuarantineDevice) -> DeviceState;
    /// Verify every registry record.
    RegistryCheck(CheckRegistry) -> CheckSummary;
    /// Copy the registry, consistently, to a new file.
    RegistryBackup(BackupRegistry) -> CheckSummary;
    /// A new master key; every device key sealed again under it; the old one dropped.
    MasterKeyRotate(RotateMasterKey) -> MasterKeyRotated;
    /// Upstream mode: what the outbox holds, and its dead letters.
    OutboxList(ListOutbox) -> OutboxListed;
    OutboxShow(ShowDeadLetter) -> DeadLetterShown;
    /// Dead letters back at the end of the outbox, to be sent again.
    OutboxRetry(RetryDeadLetters) -> OutboxChanged;
    /// Dead letters removed for good.
    OutboxPurge(PurgeDeadLetters) -> OutboxChanged;
    /// The newest lines of the audit log, newest last.
    EventsRecent(RecentEvents) -> Vec<RecentEvent>;
}

/// The newest audit lines: `limit` of them (default 100, at most 1000).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecentEvents {
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One line of the audit log as shown (its chain fields left out); absent fields are
/// left out, as in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentEvent {
    pub seq: u64,
    pub time_ms: u64,
    pub event: String,
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An `aggregate` line: the event it counts and how many times it was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeated: Option<u64>,
    /// An `audit-dropped` line: entries that were lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
}

/// The outbox's summary and its dead letters (upstream mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOutbox {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxListed {
    /// Messages waiting for the broker's acknowledgement.
    pub messages: u64,
    pub oldest_age_secs: u64,
    pub dead_letters: Vec<DeadLetterRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterRow {
    pub seq: u64,
    /// Empty when the entry itself is unreadable.
    pub topic: String,
    pub qos: u8,
    pub payload_bytes: u64,
    pub reason: String,
    pub attempts: u32,
    pub dead_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowDeadLetter {
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterShown {
    pub letter: DeadLetterRow,
    pub retain: bool,
    pub enqueued_unix_ms: u64,
    /// The payload as text when it is UTF-8, else in hex.
    pub payload: String,
    pub payload_hex: bool,
}

/// Which dead letters: these sequence numbers, or all of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDeadLetters {
    pub seqs: Vec<u64>,
    pub all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeDeadLetters {
    pub seqs: Vec<u64>,
    pub all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxChanged {
    pub count: u64,
}

// Requests. Optional fields are sent as `null` when absent, as they always were.

/// A principal to register, with at least one credential.
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
    /// A DTLS pre-shared key (devices only), kept encrypted under the master key.
    #[serde(default)]
    pub psk: Option<String>,
    /// A serial frame key (devices only): 32 bytes as 64 hex digits, kept encrypted
    /// under the master key. Left out when absent, so that a request without one reads
    /// as it always did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPrincipal {
    pub kind: PrincipalKind,
    pub principal: NewPrincipal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportPrincipals {
    pub kind: PrincipalKind,
    pub principals: Vec<NewPrincipal>,
}

/// The principals of `kind` the registry should hold, exactly: those missing are
/// added, those that differ updated, the others removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncPrincipals {
    pub kind: PrincipalKind,
    pub entries: Vec<SyncEntry>,
    /// Make the plan and change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One principal of a sync. A secret left out keeps the one the registry holds; a
/// `*_generate` makes a credential only for a principal that has none of that kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncEntry {
    pub principal: NewPrincipal,
    /// Absent: enabled.
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub generate_secret: bool,
    #[serde(default)]
    pub psk_generate: bool,
    #[serde(default)]
    pub serial_key_generate: bool,
    /// Where the entry is in the operator's file (1-based line), for error messages.
    #[serde(default)]
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListPrincipals {
    pub kind: PrincipalKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowPrincipal {
    pub kind: PrincipalKind,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnablePrincipal {
    pub kind: PrincipalKind,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisablePrincipal {
    pub kind: PrincipalKind,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovePrincipal {
    pub kind: PrincipalKind,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateCredentials {
    pub kind: PrincipalKind,
    pub id: String,
    #[serde(default)]
    pub cert_fingerprint: Option<String>,
    /// Switch to "any certificate from the group's CA" (drops a pin).
    #[serde(default)]
    pub cert_any: bool,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub psk: Option<String>,
    /// 64 hex digits, as in `NewPrincipal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBan {
    /// `device/ID`, `service/ID`, an address or a CIDR block.
    pub target: String,
    /// Absent: until lifted.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListBans {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveBan {
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListClients {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickClient {
    pub kind: PrincipalKind,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuarantine {
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuarantine {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseDevice {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineDevice {
    pub id: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRegistry {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateMasterKey {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterKeyRotated {
    /// The current master key's id (an HMAC of a label under it; not the key).
    pub master: String,
    /// Device keys sealed again under it.
    pub resealed: usize,
    /// Old master keys dropped from the file (0 from the environment: drop them there).
    pub retired: usize,
    /// Where the master keys come from.
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRegistry {
    /// A new file, by its absolute path (the gateway's working directory is not ours).
    pub path: PathBuf,
}

// Results.

/// A registry record as shown: never the secret hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    pub id: PrincipalId,
    pub kind: PrincipalKind,
    pub group: GroupName,
    pub enabled: bool,
    /// `pinned sha256:…` or `any from the group's CA`; `null` without a certificate.
    pub certificate: Option<String>,
    /// Whether a secret is set.
    pub secret: bool,
    /// Whether a DTLS pre-shared key is set (never the key).
    #[serde(default)]
    pub psk: bool,
    /// Whether a serial frame key is set (never the key).
    #[serde(default)]
    pub serial_key: bool,
    pub generation: u64,
    pub created_unix: u64,
    pub updated_unix: u64,
}

/// A record and its live sessions (absent with no gateway running).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalShown {
    #[serde(flatten)]
    pub principal: Principal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<LiveSession>>,
}

/// A record after a change that ends sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalChanged {
    #[serde(flatten)]
    pub principal: Principal,
    pub sessions_ended: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalRemoved {
    pub removed: PrincipalId,
    pub sessions_ended: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Imported {
    pub imported: usize,
}

/// What a sync does (or, with `dry_run`, would do), each list sorted by id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncPlan {
    pub add: Vec<SyncAdd>,
    pub update: Vec<SyncUpdate>,
    pub remove: Vec<String>,
    /// Principals the file lists exactly as the registry holds them.
    pub unchanged: usize,
    /// False for a dry run (and when there was nothing to do).
    pub applied: bool,
    pub sessions_ended: usize,
    /// Credentials made by the gateway, shown once (never in a dry run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generated: Vec<GeneratedCredential>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAdd {
    pub id: String,
    pub group: String,
    pub enabled: bool,
    /// The credentials it gets, by name (never a value).
    pub credentials: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncUpdate {
    pub id: String,
    /// `field: old -> new`, or `secret: replaced` (never a value).
    pub changes: Vec<String>,
    /// Secrets the file leaves out, kept as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratedCredential {
    pub id: String,
    /// `secret`, `psk` or `serial key`.
    pub credential: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionsEnded {
    pub sessions_ended: usize,
}

/// A live session, as `clients list` and `show` give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveSession {
    pub id: String,
    pub kind: PrincipalKind,
    pub group: String,
    pub protocol: String,
    pub source: String,
    pub since_unix: u64,
    pub auth: String,
    /// Messages accepted from the peer and delivered to it since it connected.
    pub messages_in: u64,
    pub messages_out: u64,
    /// Average messages per second from the peer since it connected.
    pub rate_in: f64,
}

impl From<SessionInfo> for LiveSession {
    fn from(s: SessionInfo) -> Self {
        LiveSession {
            id: s.id,
            kind: s.kind,
            group: s.group,
            protocol: s.protocol.to_string(),
            source: s.source,
            since_unix: s.since_unix,
            auth: s.auth.to_string(),
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            rate_in: s.rate_in,
        }
    }
}

/// A ban in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanShown {
    /// `device ID`, `service ID` or `source CIDR`.
    pub target: String,
    pub reason: String,
    pub created_unix: u64,
    /// `null`: until lifted.
    pub expires_unix: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BanAdded {
    #[serde(flatten)]
    pub ban: BanShown,
    pub sessions_ended: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BanRemoved {
    pub removed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reloaded {
    /// What is now in force.
    pub reloaded: String,
}

/// One row of `quarantine list`: the state and the reason of the last transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRow {
    pub id: PrincipalId,
    pub state: State,
    pub since_unix: u64,
    pub reason: Option<String>,
}

/// A device's state and transitions, and what its model learned (gateway running).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineShown {
    pub id: PrincipalId,
    pub group: GroupName,
    pub state: State,
    /// `null`: no transition recorded.
    pub since_unix: Option<u64>,
    pub history: Vec<HistoryEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
}

/// The learned message and byte rates, means and standard deviations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub messages_per_second: f64,
    pub messages_sd: f64,
    pub bytes_per_second: f64,
    pub bytes_sd: f64,
    pub learned_secs: u64,
}

/// A device's state after an operator's quarantine or release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: PrincipalId,
    pub state: State,
}

/// An admin failure: the operator's mistake (exit 2) or the gateway's (exit 1).
/// `NotFound` is the operator's mistake too (a usage error on the socket), kept apart
/// so the HTTP API can answer 404.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    Usage(String),
    NotFound(String),
    Runtime(String),
}

impl AdminError {
    /// What the operator is told.
    pub fn message(self) -> String {
        match self {
            AdminError::Usage(m) | AdminError::NotFound(m) | AdminError::Runtime(m) => m,
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

/// The line answering a request: `{"ok":true,"result":…}`, or
/// `{"ok":false,"error":…,"usage":…}` (no `usage` where no request was run: a line
/// that does not parse, a peer not allowed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply<T> {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<bool>,
}

impl<T> Reply<T> {
    /// The answer to a request that was run.
    pub fn answer(result: Result<T, AdminError>) -> Self {
        match result {
            Ok(v) => Reply {
                ok: true,
                result: Some(v),
                error: None,
                usage: None,
            },
            Err(e) => Reply {
                ok: false,
                result: None,
                usage: Some(!matches!(e, AdminError::Runtime(_))),
                error: Some(e.message()),
            },
        }
    }

    /// A refusal before any request ran.
    pub fn refused(error: String) -> Self {
        Reply {
            ok: false,
            result: None,
            error: Some(error),
            usage: None,
        }
    }

    /// What the operator is told: the result, or whose mistake it was.
    pub fn into_result(self) -> Result<T, AdminError> {
        match (self.ok, self.result) {
            (true, Some(v)) => Ok(v),
            (true, None) => Err(AdminError::Runtime("the reply carries no result".into())),
            (false, _) => {
                let message = self.error.unwrap_or_else(|| "request failed".into());
                Err(match self.usage {
                    Some(true) => AdminError::Usage(message),
                    _ => AdminError::Runtime(message),
                })
            }
        }
    }
}

impl<T: Serialize> Reply<T> {
    /// One line of JSON with its keys sorted, as the documented examples show.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_value(self)
            .map(|v| v.to_string())
            .unwrap_or_else(|e| {
                let failed = Reply::<()>::refused(format!("reply not encodable: {e}"));
                serde_json::to_string(&failed).unwrap_or_default()
            });
        line.push('\n');
        line
    }
}

/// A request as it is sent: one line.
pub fn request_line(req: impl Into<Request>) -> serde_json::Result<String> {
    let mut line = serde_json::to_string(&req.into())?;
    line.push('\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn wire(req: impl Into<Request>) -> Value {
        serde_json::to_value(req.into()).unwrap()
    }

    #[test]
    fn requests_go_on_the_wire_as_documented() {
        assert_eq!(wire(ListBans {}), json!({ "op": "ban_list" }));
        assert_eq!(wire(Reload {}), json!({ "op": "reload" }));
        assert_eq!(
            wire(ListQuarantine { all: false }),
            json!({ "op": "quarantine_list", "all": false })
        );
        assert_eq!(
            wire(KickClient {
                kind: PrincipalKind::Service,
                id: "billing".into()
            }),
            json!({ "op": "clients_kick", "kind": "service", "id": "billing" })
        );
        assert_eq!(
            wire(AddBan {
                target: "10.0.0.0/8".into(),
                ttl_secs: None,
                reason: None
            }),
            json!({ "op": "ban_add", "target": "10.0.0.0/8", "ttl_secs": null, "reason": null })
        );
        assert_eq!(
            wire(AddPrincipal {
                kind: PrincipalKind::Device,
                principal: NewPrincipal {
                    id: "sensor-1".into(),
                    group: Some("default".into()),
                    cert_fingerprint: None,
                    cert_any: true,
                    secret: None,
                    psk: None,
                    serial_key: None,
                },
            }),
            json!({
                "op": "add",
                "kind": "device",
                "principal": {
                    "id": "sensor-1",
                    "group": "default",
                    "cert_fingerprint": null,
                    "cert_any": true,
                    "secret": null,
                    "psk": null,
                },
            })
        );
    }

    #[test]
    fn requests_parse_from_json_lines_with_defaults() {
        let parse = |line: &str| serde_json::from_str::<Request>(line).unwrap();
        assert!(matches!(
            parse(r#"{"op":"quarantine_list"}"#),
            Request::QuarantineList(ListQuarantine { all: false })
        ));
        assert!(matches!(
            parse(r#"{"op":"quarantine_add","id":"sensor-1"}"#),
            Request::QuarantineAdd(QuarantineDevice { reason: None, .. })
        ));
        assert!(matches!(
            parse(r#"{"op":"registry_check"}"#),
            Request::RegistryCheck(_)
        ));
        assert!(matches!(
            parse(r#"{"op":"rotate","kind":"device","id":"m-1","secret":"s"}"#),
            Request::Rotate(RotateCredentials {
                cert_any: false,
                cert_fingerprint: None,
                ..
            })
        ));
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        for line in [
            r#"{"op":"list","kind":"device","colour":"red"}"#,
            r#"{"op":"ban_list","all":true}"#,
            r#"{"op":"add","kind":"device","principal":{"id":"a","secret_hash":"x"}}"#,
            r#"{"op":"format_disk"}"#,
            r#"{"kind":"device"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
        }
    }

    #[test]
    fn a_result_is_sent_with_ok_and_read_back_typed() {
        let line = Reply::answer(Ok(SessionsEnded { sessions_ended: 2 })).to_line();
        assert_eq!(line, "{\"ok\":true,\"result\":{\"sessions_ended\":2}}\n");
        let back: Reply<SessionsEnded> = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_result().unwrap().sessions_ended, 2);
    }

    #[test]
    fn a_failure_says_whose_mistake_it_was() {
        let usage = Reply::<Imported>::answer(Err(AdminError::Usage("no such device: x".into())));
        assert_eq!(
            usage.to_line(),
            "{\"error\":\"no such device: x\",\"ok\":false,\"usage\":true}\n"
        );
        let runtime = Reply::<Imported>::answer(Err(AdminError::Runtime("disk full".into())));
        assert_eq!(
            runtime.to_line(),
            "{\"error\":\"disk full\",\"ok\":false,\"usage\":false}\n"
        );
        let missing =
            Reply::<Imported>::answer(Err(AdminError::NotFound("no such device: x".into())));
        assert_eq!(
            missing.to_line(),
            usage.to_line(),
            "on the socket, a usage error"
        );
        let read = |line: &str| {
            serde_json::from_str::<Reply<Imported>>(line)
                .unwrap()
                .into_result()
                .unwrap_err()
        };
        assert_eq!(
            read(&usage.to_line()),
            AdminError::Usage("no such device: x".into())
        );
        assert_eq!(
            read(&runtime.to_line()),
            AdminError::Runtime("disk full".into())
        );
        // No `usage`: nothing ran, so it is not the request's fault.
        assert_eq!(
            read(r#"{"ok":false,"error":"permission denied"}"#),
            AdminError::Runtime("permission denied".into())
        );
    }

    #[test]
    fn optional_parts_of_a_result_are_left_out_not_null() {
        let principal = Principal {
            id: PrincipalId::parse("sensor-1").unwrap(),
            kind: PrincipalKind::Device,
            group: GroupName::parse("default").unwrap(),
            enabled: true,
            certificate: None,
            secret: true,
            psk: false,
            serial_key: false,
            generation: 0,
            created_unix: 10,
            updated_unix: 10,
        };
        let shown = serde_json::to_value(PrincipalShown {
            principal: principal.clone(),
            sessions: None,
        })
        .unwrap();
        assert_eq!(shown.get("sessions"), None);
        assert_eq!(shown["certificate"], Value::Null);
        let changed = serde_json::to_value(PrincipalChanged {
            principal,
            sessions_ended: 1,
        })
        .unwrap();
        assert_eq!(changed["id"], "sensor-1");
        assert_eq!(changed["sessions_ended"], 1);
    }
}
