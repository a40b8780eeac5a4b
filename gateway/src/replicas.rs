//! Control messages from the other replicas (upstream mode): checked (MAC, sender,
//! sequence, time window), then applied as an operator's change here would be, but not
//! told on again. A refused one is counted and audited.

use crate::admin::protocol::{AddBan, RemoveBan};
use crate::admin::{AdminError, AdminState, Handler};
use bytes::Bytes;
use portcullis_core::control::{Action, ControlKey, ControlMessage, ReplayGuard};
use portcullis_core::metrics::Metrics;
use portcullis_core::registry::now_unix;
use portcullis_upstream::outbox::unix_ms;
use std::sync::Arc;
use tokio::sync::mpsc;

pub async fn take(
    key: ControlKey,
    me: String,
    mut incoming: mpsc::Receiver<Bytes>,
    state: AdminState,
    metrics: Arc<Metrics>,
) {
    let state = Arc::new(state);
    let mut guard = ReplayGuard::default();
    while let Some(payload) = incoming.recv().await {
        let m = &metrics.outbox;
        let msg = match guard.admit(&key, &payload, &me, unix_ms()) {
            Ok(msg) => msg,
            Err(why) => {
                Metrics::inc(&m.control_refused);
                tracing::warn!(reason = %why, "control message refused");
                state.audit_control(
                    "refuse",
                    format!("control message refused ({}): {why}", why.label()),
                );
                continue;
            }
        };
        let from = msg.from.clone();
        let st = state.clone();
        let applied = tokio::task::spawn_blocking(move || apply(&st, msg))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match applied {
            Ok(what) => {
                Metrics::inc(&m.control_applied);
                state.audit_control("allow", format!("from replica {from}: {what}"));
            }
            // Authentic, but nothing to do here (a device this replica does not know,
            // a ban already lifted): said, not counted as a refusal.
            Err(why) => state.audit_control(
                "allow",
                format!("from replica {from}: nothing applied ({why})"),
            ),
        }
    }
}

fn message(e: AdminError) -> String {
    e.message()
}

fn apply(state: &AdminState, msg: ControlMessage) -> Result<String, String> {
    let from = &msg.from;
    match msg.action {
        Action::Quarantine { device, reason } => {
            let (id, group) = state.device(&device)?;
            let behaviours = state.behaviours.as_ref().ok_or("no behaviour table")?;
            behaviours.quarantine_as(&id, &group, format!("replica {from}: {reason}"), true);
            Ok(format!("quarantine device {device}"))
        }
        Action::Release { device, .. } => {
            let (id, group) = state.device(&device)?;
            let behaviours = state.behaviours.as_ref().ok_or("no behaviour table")?;
            behaviours.release_as(&id, &group, &format!("replica {from}"), true);
            Ok(format!("release device {device}"))
        }
        Action::BanAdd {
            target,
            until_unix,
            reason,
        } => {
            let ttl_secs = match until_unix {
                None => None,
                Some(until) => match until.checked_sub(now_unix()) {
                    Some(left) if left > 0 => Some(left),
                    _ => return Err(format!("the ban on {target} has expired")),
                },
            };
            let reason = Some(format!(
                "replica {from}: {}",
                reason.unwrap_or_else(|| "banned".into())
            ));
            let added = AddBan {
                target: target.clone(),
                ttl_secs,
                reason,
            }
            .run(state)
            .map_err(message)?;
            Ok(format!(
                "ban {target} ({} session(s) ended)",
                added.sessions_ended
            ))
        }
        Action::BanRemove { target } => {
            RemoveBan {
                target: target.clone(),
            }
            .run(state)
            .map_err(message)?;
            Ok(format!("unban {target}"))
        }
    }
}
