//! Bans on sources (address or CIDR block) and principals: sessions already open
//! under a new ban end at once.

use super::protocol::{AddBan, BanAdded, BanRemoved, BanShown, ListBans, RemoveBan};
use super::{AdminError, AdminState, Handler, existing_id};
use portcullis_core::audit::AuditEntry;
use portcullis_core::bans::{Ban, BanTarget, Cidr};
use portcullis_core::control::Action;
use portcullis_core::principal::PrincipalKind;
use portcullis_core::registry::now_unix;
use portcullis_core::sessions::KickReason;

/// `device/ID`, `service/ID`, an address or a CIDR block.
fn parse_ban_target(s: &str) -> Result<BanTarget, String> {
    if let Some((kind, id)) = s.split_once('/') {
        let kind = match kind {
            "device" => Some(PrincipalKind::Device),
            "service" => Some(PrincipalKind::Service),
            _ => None,
        };
        if let Some(kind) = kind {
            return Ok(BanTarget::Principal(kind, existing_id(id)?));
        }
    }
    s.parse::<Cidr>()
        .map(BanTarget::Source)
        .map_err(|e| format!("{e}, or device/ID or service/ID"))
}

impl From<&Ban> for BanShown {
    fn from(b: &Ban) -> Self {
        BanShown {
            target: b.target.to_string(),
            reason: b.reason.clone(),
            created_unix: b.created_unix,
            expires_unix: b.expires_unix,
        }
    }
}

impl AdminState {
    fn audit_ban(&self, action: &str, target: &BanTarget) {
        let entry = AuditEntry::new("ban", "allow")
            .protocol("admin")
            .reason(format!("{action} {target}"));
        self.write_audit(match target {
            BanTarget::Principal(kind, id) => entry.principal(kind.as_str(), id.to_string()),
            BanTarget::Source(cidr) => entry.source(cidr),
        });
    }
}

impl Handler for AddBan {
    fn run(self, state: &AdminState) -> Result<BanAdded, AdminError> {
        let target = parse_ban_target(&self.target)?;
        if self.ttl_secs == Some(0) {
            return Err("a ban's TTL must be at least 1 second".into());
        }
        let now = now_unix();
        let reason = self.reason.unwrap_or_else(|| "banned by operator".into());
        if reason.len() > 200 {
            return Err("the reason is limited to 200 characters".into());
        }
        let ban = Ban {
            target: target.clone(),
            reason,
            created_unix: now,
            expires_unix: self.ttl_secs.map(|t| now.saturating_add(t)),
        };
        state.registry.add_ban(ban.clone())?;
        // Sessions already open under the ban end now.
        let ended = match (&target, &state.sessions) {
            (BanTarget::Principal(kind, id), Some(s)) => {
                s.kick(*kind, id, u64::MAX, KickReason::Banned)
            }
            (BanTarget::Source(cidr), Some(s)) => {
                s.kick_sources(|ip| cidr.contains(ip), KickReason::Banned)
            }
            _ => 0,
        };
        let ttl = self
            .ttl_secs
            .map_or("until lifted".to_string(), |t| format!("for {t} s"));
        state.audit_ban(&format!("ban ({}, {ttl}):", ban.reason), &target);
        if let Some(control) = &state.control {
            let _ = control.send(Action::BanAdd {
                target: target.as_arg(),
                until_unix: ban.expires_unix,
                reason: Some(ban.reason.clone()),
            });
        }
        Ok(BanAdded {
            ban: BanShown::from(&ban),
            sessions_ended: ended,
        })
    }
}

impl Handler for ListBans {
    fn run(self, state: &AdminState) -> Result<Vec<BanShown>, AdminError> {
        let now = now_unix();
        Ok(state
            .registry
            .bans()
            .all()
            .iter()
            .filter(|b| b.active(now))
            .map(BanShown::from)
            .collect())
    }
}

impl Handler for RemoveBan {
    fn run(self, state: &AdminState) -> Result<BanRemoved, AdminError> {
        let target = parse_ban_target(&self.target)?;
        if !state.registry.remove_ban(&target)? {
            return Err(AdminError::NotFound(format!("no ban on {target}")));
        }
        state.audit_ban("unban", &target);
        if let Some(control) = &state.control {
            let _ = control.send(Action::BanRemove {
                target: target.as_arg(),
            });
        }
        Ok(BanRemoved {
            removed: target.to_string(),
        })
    }
}
