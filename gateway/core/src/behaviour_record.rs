//! A device's behaviour state as kept across restarts: the state, since when, and its
//! last transitions with their reasons. The registry stores it (sealed, by device
//! id) and the quarantine keeps it up to date; it is plain data, so the storage does
//! not depend on the quarantine that writes it.

use crate::behaviour::State;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Transitions kept per device (the oldest are dropped).
pub const HISTORY: usize = 32;

/// One transition, as kept and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_unix: u64,
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// A device's state, since when, and its recent transitions: what persists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub state: State,
    pub since_unix: u64,
    pub history: VecDeque<HistoryEntry>,
}

impl Record {
    /// A device with no transition yet.
    pub fn new(at_unix: u64) -> Record {
        Record {
            state: State::Normal,
            since_unix: at_unix,
            history: VecDeque::new(),
        }
    }

    /// Enter `to` at `at_unix`, keeping the last `HISTORY` transitions; the state
    /// it left.
    pub fn push(&mut self, at_unix: u64, to: State, reason: String) -> State {
        let from = self.state;
        self.state = to;
        self.since_unix = at_unix;
        while self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(HistoryEntry {
            at_unix,
            from,
            to,
            reason,
        });
        from
    }
}
