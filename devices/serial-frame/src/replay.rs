//! Replay protection for one stream (one device, one direction): a counter is fresh
//! only if it is above every counter accepted before.
//!
//! The guard moves only for a frame whose tag verified (it takes a [`Frame`], which
//! only [`Unverified::verify`](crate::Unverified::verify) makes), so a forged frame
//! with a huge counter cannot lock the real sender out.

use crate::decode::Frame;
use core::fmt;

/// The last counter accepted on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayGuard {
    last: u64,
}

/// The counter is not above the last one accepted. `floor` is what a gateway puts in
/// its RESYNC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub counter: u64,
    pub floor: u64,
}

impl Replay {
    /// Stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        "replay"
    }
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serial frame refused: counter {} is not above {}, the last accepted (a replay, or the sender lost its counter)",
            self.counter, self.floor
        )
    }
}

impl core::error::Error for Replay {}

impl ReplayGuard {
    /// A guard that has accepted up to `last` (0 for a new stream; the stored value
    /// after a restart).
    pub const fn new(last: u64) -> Self {
        Self { last }
    }

    /// The last counter accepted, to persist.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether `counter` is fresh. Changes nothing.
    pub fn check(&self, counter: u64) -> Result<(), Replay> {
        if counter > self.last {
            Ok(())
        } else {
            Err(Replay {
                counter,
                floor: self.last,
            })
        }
    }

    /// Records a verified frame's counter. Never moves back.
    pub fn accept(&mut self, frame: &Frame<'_>) {
        self.last = self.last.max(frame.counter());
    }

    /// [`check`](Self::check), then [`accept`](Self::accept) if fresh.
    pub fn admit(&mut self, frame: &Frame<'_>) -> Result<(), Replay> {
        self.check(frame.counter())?;
        self.accept(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{data_up, key, wire};

    fn admit(guard: &mut ReplayGuard, counter: u64) -> Result<(), Replay> {
        let mut bytes = wire(&data_up(counter, "t", b"x"));
        bytes.pop();
        let frame = crate::decode(&mut bytes).unwrap().verify(&key()).unwrap();
        guard.admit(&frame)
    }

    #[test]
    fn rising_counters_are_fresh() {
        let mut guard = ReplayGuard::default();
        assert_eq!(admit(&mut guard, 1), Ok(()));
        assert_eq!(admit(&mut guard, 2), Ok(()));
        assert_eq!(admit(&mut guard, 10), Ok(()));
        assert_eq!(guard.last(), 10);
    }

    #[test]
    fn replayed_counter_is_refused() {
        let mut guard = ReplayGuard::new(0);
        admit(&mut guard, 5).unwrap();
        assert_eq!(
            admit(&mut guard, 5),
            Err(Replay {
                counter: 5,
                floor: 5
            })
        );
        assert_eq!(
            admit(&mut guard, 4),
            Err(Replay {
                counter: 4,
                floor: 5
            })
        );
        assert_eq!(guard.last(), 5);
    }

    #[test]
    fn check_changes_nothing() {
        let guard = ReplayGuard::new(3);
        assert_eq!(guard.check(4), Ok(()));
        assert_eq!(guard.check(4), Ok(()));
        assert_eq!(guard.last(), 3);
    }

    #[test]
    fn a_badly_signed_frame_never_advances_the_guard() {
        // The only way to advance is a `Frame`, which only a verified tag makes; a
        // forged frame stops at `verify`.
        let mut guard = ReplayGuard::new(5);
        let mut bytes = wire(&data_up(u64::MAX, "t", b"x"));
        bytes.pop();
        let unverified = crate::decode(&mut bytes).unwrap();
        let other = crate::Key::new(&[1; 32]).unwrap();
        assert!(unverified.verify(&other).is_err());
        assert_eq!(guard.last(), 5);
        assert_eq!(admit(&mut guard, 6), Ok(()));
    }
}
