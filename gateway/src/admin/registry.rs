//! The registry file itself: verify every record, copy it consistently.

use super::protocol::{BackupRegistry, CheckRegistry};
use super::{AdminError, AdminState, Handler};
use portcullis_core::registry::CheckSummary;

impl Handler for CheckRegistry {
    fn run(self, state: &AdminState) -> Result<CheckSummary, AdminError> {
        Ok(state.registry.check()?)
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
