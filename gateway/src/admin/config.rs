//! Reloading the running gateway's configuration file (what SIGHUP does).

use super::protocol::{Reload, Reloaded};
use super::{AdminError, AdminState, Handler};

impl Handler for Reload {
    fn run(self, state: &AdminState) -> Result<Reloaded, AdminError> {
        match &state.reload {
            Some(reload) => reload()
                .map(|summary| Reloaded { reloaded: summary })
                .map_err(AdminError::Usage),
            None => Err(AdminError::Runtime("the gateway is not running".into())),
        }
    }
}
