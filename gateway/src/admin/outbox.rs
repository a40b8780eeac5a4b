//! The outbox of upstream mode: what it holds, its dead letters, and sending them again
//! (`portcullis outbox list|show|retry|purge`).

use super::protocol::{
    DeadLetterRow, DeadLetterShown, ListOutbox, OutboxChanged, OutboxListed, PurgeDeadLetters,
    RetryDeadLetters, ShowDeadLetter,
};
use super::{AdminError, AdminState, Handler};
use portcullis_core::audit::AuditEntry;
use portcullis_upstream::outbox::{OutboxAdmin, unix_ms};
use portcullis_upstream::store::{DeadLetter, Stored};

/// Dead letters listed at most.
const LIST_MAX: usize = 10_000;

impl AdminState {
    fn outbox(&self) -> Result<&OutboxAdmin, AdminError> {
        self.outbox.as_deref().ok_or_else(|| {
            AdminError::Usage(
                "there is no outbox: it belongs to upstream mode ([broker] mode = \"upstream\")"
                    .into(),
            )
        })
    }

    fn audit_outbox(&self, action: String) {
        self.write_audit(
            AuditEntry::new("outbox", "allow")
                .protocol("admin")
                .reason(action),
        );
    }
}

fn runtime(e: impl std::fmt::Display) -> AdminError {
    AdminError::Runtime(e.to_string())
}

fn row(l: &DeadLetter) -> DeadLetterRow {
    let (topic, qos, payload_bytes) = match &l.stored {
        Stored::Entry(e) => (
            e.message.topic.as_str().to_string(),
            e.message.qos as u8,
            e.message.payload.len() as u64,
        ),
        Stored::Corrupt { raw, .. } => (String::new(), 0, raw.len() as u64),
    };
    DeadLetterRow {
        seq: l.seq,
        topic,
        qos,
        payload_bytes,
        reason: l.note.reason.clone(),
        attempts: l.note.attempts,
        dead_unix_ms: l.note.dead_ms,
    }
}

impl Handler for ListOutbox {
    fn run(self, state: &AdminState) -> Result<OutboxListed, AdminError> {
        let store = state.outbox()?.store();
        let oldest = store.oldest_ms().map_err(runtime)?;
        Ok(OutboxListed {
            messages: store.depth().map_err(runtime)?,
            oldest_age_secs: oldest.map_or(0, |t| unix_ms().saturating_sub(t) / 1000),
            dead_letters: store
                .dead_letters(0, LIST_MAX)
                .map_err(runtime)?
                .iter()
                .map(row)
                .collect(),
        })
    }
}

impl Handler for ShowDeadLetter {
    fn run(self, state: &AdminState) -> Result<DeadLetterShown, AdminError> {
        let letter = state
            .outbox()?
            .store()
            .dead_letters(self.seq, 1)
            .map_err(runtime)?
            .into_iter()
            .find(|l| l.seq == self.seq)
            .ok_or_else(|| AdminError::Usage(format!("no dead letter {}", self.seq)))?;
        let (retain, enqueued, bytes) = match &letter.stored {
            Stored::Entry(e) => (e.message.retain, e.enqueued_ms, e.message.payload.to_vec()),
            Stored::Corrupt { raw, .. } => (false, 0, raw.clone()),
        };
        let (payload, payload_hex) = match String::from_utf8(bytes) {
            Ok(text) => (text, false),
            Err(e) => (hex::encode(e.as_bytes()), true),
        };
        Ok(DeadLetterShown {
            letter: row(&letter),
            retain,
            enqueued_unix_ms: enqueued,
            payload,
            payload_hex,
        })
    }
}

fn which(seqs: Vec<u64>, all: bool) -> Result<Option<Vec<u64>>, AdminError> {
    match (all, seqs.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(seqs)),
        (true, false) => Err(AdminError::Usage(
            "name dead letters or --all, not both".into(),
        )),
        (false, true) => Err(AdminError::Usage(
            "name the dead letters (their numbers, from `portcullis outbox list`) or --all".into(),
        )),
    }
}

impl Handler for RetryDeadLetters {
    fn run(self, state: &AdminState) -> Result<OutboxChanged, AdminError> {
        let which = which(self.seqs, self.all)?;
        let count = state.outbox()?.retry(which).map_err(runtime)?;
        state.audit_outbox(format!("{count} dead letter(s) put back in the outbox"));
        Ok(OutboxChanged { count })
    }
}

impl Handler for PurgeDeadLetters {
    fn run(self, state: &AdminState) -> Result<OutboxChanged, AdminError> {
        let which = which(self.seqs, self.all)?;
        let count = state.outbox()?.purge(which).map_err(runtime)?;
        state.audit_outbox(format!("{count} dead letter(s) purged"));
        Ok(OutboxChanged { count })
    }
}
