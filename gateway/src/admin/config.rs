//! Reloading the running gateway's configuration file (what SIGHUP does).

use super::protocol::{Reload, Reloaded};
use super::{AdminError, AdminState, Handler};
use portcullis_core::audit::AuditEntry;

/// A reload's audit entry: what was put in force, or why nothing was.
pub fn reload_audit(result: &Result<String, String>) -> AuditEntry {
    let entry = AuditEntry::new("config", if result.is_ok() { "allow" } else { "refuse" })
        .protocol("admin");
    match result {
        Ok(summary) => entry.reason(format!("reloaded: {summary}")),
        Err(why) => entry.reason(format!("reload refused: {why}")),
    }
}

impl Handler for Reload {
    fn run(self, state: &AdminState) -> Result<Reloaded, AdminError> {
        let Some(reload) = &state.reload else {
            return Err(AdminError::Runtime("the gateway is not running".into()));
        };
        let result = reload();
        state.write_audit(reload_audit(&result));
        result
            .map(|summary| Reloaded { reloaded: summary })
            .map_err(AdminError::Usage)
    }
}
