//! Live sessions: list them, end a principal's (`clients kick`).

use super::protocol::{KickClient, ListClients, LiveSession, SessionsEnded};
use super::{AdminError, AdminState, Handler, existing_id};
use portcullis_core::sessions::KickReason;

impl Handler for ListClients {
    fn run(self, state: &AdminState) -> Result<Vec<LiveSession>, AdminError> {
        Ok(state
            .live_sessions()?
            .list()
            .into_iter()
            .map(LiveSession::from)
            .collect())
    }
}

impl Handler for KickClient {
    fn run(self, state: &AdminState) -> Result<SessionsEnded, AdminError> {
        let pid = existing_id(&self.id)?;
        state.live_sessions()?;
        let ended = state.kick(self.kind, &pid, u64::MAX, KickReason::Operator);
        state.audit("kick", self.kind, &self.id);
        Ok(SessionsEnded {
            sessions_ended: ended,
        })
    }
}
