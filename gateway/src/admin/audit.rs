//! Where admin changes are recorded: every registry change, ban and operator's
//! quarantine is an audit entry with protocol `admin`.

use super::AdminState;
use portcullis_core::audit::{Audit, AuditEntry, AuditSettings, append_blocking};
use portcullis_core::principal::PrincipalKind;

/// Where registry changes are audited: the running gateway's writer, or (with no
/// gateway running) the audit file directly.
#[derive(Clone)]
pub enum AuditSink {
    /// The writer, and the file it writes (read back for recent events).
    Live(Audit, std::path::PathBuf),
    File(Box<AuditSettings>),
}

impl AuditSink {
    /// The current audit file.
    pub fn path(&self) -> &std::path::Path {
        match self {
            AuditSink::Live(_, path) => path,
            AuditSink::File(settings) => &settings.path,
        }
    }
}

impl AdminState {
    /// Record `entry`; a change made over HTTP names the way in and the caller's
    /// address (as the source, or in the reason when the source is what changed).
    pub(super) fn write_audit(&self, mut entry: AuditEntry) {
        if let Some(caller) = self.caller {
            entry = entry.protocol("admin-http");
            entry = match entry.source {
                None => entry.source(caller.ip()),
                Some(_) => {
                    let reason = entry.reason.take().unwrap_or_default();
                    entry.reason(format!("{reason} (by {})", caller.ip()))
                }
            };
        }
        match &self.audit {
            AuditSink::Live(audit, _) => audit.record(entry),
            AuditSink::File(settings) => {
                // The same keyed chain the gateway writes, continued from its last line.
                if let Err(e) = append_blocking(settings, &[entry]) {
                    tracing::warn!(error = %e, path = %settings.path.display(), "audit log not written");
                }
            }
        }
    }

    /// A control message from another replica: taken or refused.
    pub(crate) fn audit_control(&self, decision: &'static str, reason: String) {
        self.write_audit(
            AuditEntry::new("control", decision)
                .protocol("replica")
                .reason(reason),
        );
    }

    /// A registry change: `action` on a principal.
    pub(super) fn audit(&self, action: &str, kind: PrincipalKind, id: &str) {
        self.write_audit(
            AuditEntry::new("registry", "allow")
                .principal(kind.as_str(), id.to_string())
                .protocol("admin")
                .reason(action.to_string()),
        );
    }
}
