//! The admin API: registry and session management for the `portcullis` CLI.
//!
//! JSON lines over a Unix socket in the data dir (mode 0600, and the peer's uid must
//! be ours or root): [`protocol`] holds the request and reply types, [`socket`] the
//! listener, and one file per resource runs its requests. The same handlers run
//! in-process when no gateway is running, on a registry opened directly; then there
//! are no live sessions to end.
//! Secrets travel only over this socket (never argv) and are hashed on arrival.
//!
//! Quarantine goes through the running gateway's behaviour table, so a release or a
//! quarantine takes effect on the next message; offline, the persisted record is
//! rewritten and the gateway starts in that state.

mod audit;
mod bans;
mod clients;
mod config;
pub mod dashboard;
mod events;
pub mod http;
mod outbox;
mod principals;
pub mod protocol;
mod quarantine;
mod registry;
mod socket;
mod stats;
mod sync;

pub use audit::AuditSink;
pub use config::reload_audit;
pub use protocol::AdminError;
use protocol::{Op, Reply, Request};
pub use socket::{bind, serve};

use portcullis_core::auth::{Authenticator, Policies};
use portcullis_core::device_key::MasterKeys;
use portcullis_core::principal::{PrincipalId, PrincipalKind};
use portcullis_core::quarantine::Behaviours;
use portcullis_core::registry::{Registry, RegistryError};
use portcullis_core::retained::RetainedCommands;
use portcullis_core::secret::SecretHasher;
use portcullis_core::sessions::{KickReason, Sessions};
use portcullis_upstream::outbox::OutboxAdmin;
use std::sync::Arc;

/// Reloads the running gateway's configuration: a summary, or why it was refused.
pub type Reloader = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub hasher: SecretHasher,
    /// The master keys device keys (PSKs, frame keys) are sealed under.
    pub master: Arc<MasterKeys>,
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
    /// Upstream mode: the outbox (the running gateway's, or the file opened directly).
    pub outbox: Option<Arc<OutboxAdmin>>,
    /// Replicas: bans made here are told to the other replicas.
    pub control: Option<tokio::sync::mpsc::UnboundedSender<portcullis_core::control::Action>>,
    pub audit: AuditSink,
    /// Over HTTP: the caller's address, which the audit of each change names.
    pub caller: Option<std::net::SocketAddr>,
}

/// Runs one request type. Errors are messages for the operator.
pub trait Handler: Op {
    fn run(self, state: &AdminState) -> Result<Self::Reply, AdminError>;
}

impl AdminState {
    /// Run a request read from the socket: the line that answers it.
    pub fn answer(&self, req: Request) -> String {
        match req {
            Request::Add(op) => self.reply(op),
            Request::Import(op) => self.reply(op),
            Request::Sync(op) => self.reply(op),
            Request::List(op) => self.reply(op),
            Request::Show(op) => self.reply(op),
            Request::Enable(op) => self.reply(op),
            Request::Disable(op) => self.reply(op),
            Request::Remove(op) => self.reply(op),
            Request::Rotate(op) => self.reply(op),
            Request::BanAdd(op) => self.reply(op),
            Request::BanList(op) => self.reply(op),
            Request::BanRemove(op) => self.reply(op),
            Request::Reload(op) => self.reply(op),
            Request::ClientsList(op) => self.reply(op),
            Request::ClientsKick(op) => self.reply(op),
            Request::QuarantineList(op) => self.reply(op),
            Request::QuarantineShow(op) => self.reply(op),
            Request::QuarantineRelease(op) => self.reply(op),
            Request::QuarantineAdd(op) => self.reply(op),
            Request::RegistryCheck(op) => self.reply(op),
            Request::RegistryBackup(op) => self.reply(op),
            Request::MasterKeyRotate(op) => self.reply(op),
            Request::OutboxList(op) => self.reply(op),
            Request::OutboxShow(op) => self.reply(op),
            Request::OutboxRetry(op) => self.reply(op),
            Request::OutboxPurge(op) => self.reply(op),
            Request::EventsRecent(op) => self.reply(op),
        }
    }

    fn reply<O: Handler>(&self, op: O) -> String {
        Reply::answer(op.run(self)).to_line()
    }

    /// The live sessions, which only a running gateway has.
    fn live_sessions(&self) -> Result<&Sessions, AdminError> {
        self.sessions
            .as_deref()
            .ok_or_else(|| AdminError::Runtime("the gateway is not running".into()))
    }

    /// End a principal's sessions older than generation `below`; how many ended.
    fn kick(&self, kind: PrincipalKind, id: &PrincipalId, below: u64, reason: KickReason) -> usize {
        self.sessions
            .as_ref()
            .map(|s| s.kick(kind, id, below, reason))
            .unwrap_or(0)
    }
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Exists { .. } => AdminError::Usage(e.to_string()),
            RegistryError::NotFound { .. } => AdminError::NotFound(e.to_string()),
            other => AdminError::Runtime(other.to_string()),
        }
    }
}

/// The id of a principal to be created.
fn parse_id(id: &str) -> Result<PrincipalId, String> {
    PrincipalId::parse(id).map_err(|e| format!("{id:?}: {e}"))
}

/// The id of a principal that may exist (shown, changed, removed, kicked, banned,
/// quarantined): one stored before dot-only ids were refused can still be named.
fn existing_id(id: &str) -> Result<PrincipalId, String> {
    PrincipalId::existing(id).map_err(|e| format!("{id:?}: {e}"))
}

#[cfg(test)]
pub(crate) mod testing {
    //! An admin state on a registry in a temporary dir, for the handlers' tests.

    use super::*;
    use crate::admin::protocol::{AddPrincipal, NewPrincipal};
    use portcullis_core::audit::AuditSettings;
    use serde::Serialize;

    /// No CA to read: the devices authenticate with secrets.
    pub fn config() -> portcullis_config::Config {
        let mut config = portcullis_config::Config::default();
        for g in config.device_groups.values_mut() {
            g.trust.clear();
        }
        for g in config.service_groups.values_mut() {
            g.trust.clear();
        }
        config
    }

    /// `sensor-1` and `sensor-2` registered.
    pub fn state(
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
            master: Arc::new(MasterKeys::from_keys(&[[8; 32]])),
            policies: Arc::new(Policies::from_config(config).unwrap()),
            auth: None,
            reload: None,
            sessions: None,
            retained: None,
            behaviours,
            outbox: None,
            control: None,
            audit: AuditSink::File(Box::new(AuditSettings::new(
                dir.path().join("audit.log"),
                [9; 32],
            ))),
            caller: None,
        };
        for id in ["sensor-1", "sensor-2"] {
            add_device(id).run(&state).unwrap();
        }
        (dir, state)
    }

    /// No gateway running.
    pub fn offline() -> (tempfile::TempDir, AdminState) {
        state(&config(), |_| None)
    }

    /// With a gateway's behaviour table (its transitions go nowhere: no task runs).
    pub fn running(config: portcullis_config::Config) -> (tempfile::TempDir, AdminState) {
        state(&config.clone(), move |registry| {
            let policies = portcullis_core::quarantine::Policies::from_config(&config);
            Some(Behaviours::load(registry, policies).unwrap().0)
        })
    }

    pub fn add_device(id: &str) -> AddPrincipal {
        AddPrincipal {
            kind: PrincipalKind::Device,
            principal: NewPrincipal {
                id: id.into(),
                group: None,
                cert_fingerprint: None,
                cert_any: false,
                secret: Some("0123456789abcdef0123456789abcdef".into()),
                psk: None,
                serial_key: None,
            },
        }
    }

    pub fn usage<T: std::fmt::Debug>(r: Result<T, AdminError>) -> String {
        match r {
            Err(AdminError::Usage(m) | AdminError::NotFound(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    /// A result as it goes on the wire.
    pub fn wire(v: impl Serialize) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    pub fn audit_log(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default()
    }
}
