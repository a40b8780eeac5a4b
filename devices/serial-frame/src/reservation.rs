//! The device's up counter across reboots, with one flash write per range of frames.
//!
//! Flash stores a *bound*: every counter up to it may have been used. At boot the
//! device continues above the bound, so a crash at any moment never reuses a counter;
//! it only skips the unused rest of the range. Before handing out a counter above the
//! bound, the reservation asks the caller to persist a new one.

use core::num::NonZeroU64;

/// What [`CounterReservation::next_counter`] has for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Use this counter for the next frame.
    Counter(u64),
    /// Persist this bound first, then call [`CounterReservation::reserved`] with it
    /// and ask again. No counter was handed out.
    NeedsReserve(u64),
    /// Every counter is used (after 2^64 - 1 frames, or a RESYNC floor at the top).
    /// The device needs a new key.
    Exhausted,
}

/// Hands out counters within the persisted bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterReservation {
    /// The last counter handed out (or treated as used).
    last: u64,
    /// The persisted bound: counters up to it may be handed out.
    bound: u64,
    range: u64,
}

impl CounterReservation {
    /// Starts from the bound loaded from flash (0 on a new device), which counts as
    /// used. `range` is how many counters each flash write reserves.
    pub fn new(persisted_bound: u64, range: NonZeroU64) -> Self {
        Self {
            last: persisted_bound,
            bound: persisted_bound,
            range: range.get(),
        }
    }

    /// The counter for the next frame, or the bound to persist first.
    pub fn next_counter(&mut self) -> Next {
        let Some(counter) = self.last.checked_add(1) else {
            return Next::Exhausted;
        };
        if counter <= self.bound {
            self.last = counter;
            Next::Counter(counter)
        } else {
            Next::NeedsReserve(self.last.saturating_add(self.range))
        }
    }

    /// The caller has persisted `bound`: counters up to it may be handed out. A bound
    /// below the current one changes nothing.
    pub fn reserved(&mut self, bound: u64) {
        self.bound = self.bound.max(bound);
    }

    /// After a verified, fresh RESYNC: continue strictly above `floor`. Never moves
    /// back. A floor at or above the persisted bound makes the next call to
    /// [`next_counter`](Self::next_counter) ask for a reservation above it.
    pub fn jump_above(&mut self, floor: u64) {
        self.last = self.last.max(floor);
    }

    /// The last counter handed out.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The bound the caller last confirmed as persisted.
    pub fn bound(&self) -> u64 {
        self.bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const RANGE: NonZeroU64 = NonZeroU64::new(100).unwrap();

    /// Runs `n` frames, persisting whenever asked; returns the counters and the number
    /// of flash writes.
    fn send(reservation: &mut CounterReservation, flash: &mut u64, n: usize) -> (Vec<u64>, usize) {
        let (mut counters, mut writes) = (Vec::new(), 0);
        while counters.len() < n {
            match reservation.next_counter() {
                Next::Counter(c) => counters.push(c),
                Next::NeedsReserve(bound) => {
                    *flash = bound;
                    writes += 1;
                    reservation.reserved(bound);
                }
                Next::Exhausted => panic!("exhausted"),
            }
        }
        (counters, writes)
    }

    #[test]
    fn a_new_device_reserves_before_its_first_frame_and_starts_at_1() {
        let mut r = CounterReservation::new(0, RANGE);
        assert_eq!(r.next_counter(), Next::NeedsReserve(100));
        assert_eq!(
            r.next_counter(),
            Next::NeedsReserve(100),
            "nothing handed out yet"
        );
        r.reserved(100);
        assert_eq!(r.next_counter(), Next::Counter(1));
    }

    #[test]
    fn one_flash_write_per_range() {
        let mut flash = 0;
        let mut r = CounterReservation::new(flash, RANGE);
        let (counters, writes) = send(&mut r, &mut flash, 1000);
        assert_eq!(counters, (1..=1000).collect::<Vec<_>>());
        assert_eq!(writes, 10);
        assert_eq!(flash, 1000);
    }

    #[test]
    fn a_crash_never_reuses_a_counter() {
        let mut flash = 0;
        let mut r = CounterReservation::new(flash, RANGE);
        let (before, _) = send(&mut r, &mut flash, 150);
        // Power lost: RAM state gone, flash has the bound.
        let mut r = CounterReservation::new(flash, RANGE);
        let (after, _) = send(&mut r, &mut flash, 10);
        assert!(after[0] > *before.last().unwrap());
        assert_eq!(after[0], 201);
    }

    #[test]
    fn a_crash_between_persisting_and_confirming_is_safe() {
        let mut r = CounterReservation::new(0, RANGE);
        let Next::NeedsReserve(bound) = r.next_counter() else {
            panic!()
        };
        // Persisted, then power lost before `reserved`.
        let mut r = CounterReservation::new(bound, RANGE);
        assert_eq!(r.next_counter(), Next::NeedsReserve(200));
        r.reserved(200);
        assert_eq!(r.next_counter(), Next::Counter(101));
    }

    #[test]
    fn resync_above_the_bound_forces_a_new_reservation() {
        let mut flash = 0;
        let mut r = CounterReservation::new(flash, RANGE);
        send(&mut r, &mut flash, 5);
        r.jump_above(5000);
        assert_eq!(r.next_counter(), Next::NeedsReserve(5100));
        r.reserved(5100);
        assert_eq!(r.next_counter(), Next::Counter(5001));
    }

    #[test]
    fn resync_within_the_reserved_range_needs_no_write() {
        let mut flash = 0;
        let mut r = CounterReservation::new(flash, RANGE);
        send(&mut r, &mut flash, 5);
        r.jump_above(50);
        assert_eq!(r.next_counter(), Next::Counter(51));
    }

    #[test]
    fn resync_never_moves_the_counter_down() {
        let mut flash = 0;
        let mut r = CounterReservation::new(flash, RANGE);
        send(&mut r, &mut flash, 50);
        r.jump_above(10);
        assert_eq!(r.next_counter(), Next::Counter(51));
    }

    #[test]
    fn a_smaller_confirmed_bound_is_ignored() {
        let mut r = CounterReservation::new(500, RANGE);
        r.reserved(100);
        assert_eq!(r.bound(), 500);
        assert_eq!(r.next_counter(), Next::NeedsReserve(600));
    }

    #[test]
    fn the_top_of_the_counter_space_is_exhausted_not_wrapped() {
        let mut r = CounterReservation::new(u64::MAX - 2, RANGE);
        assert_eq!(r.next_counter(), Next::NeedsReserve(u64::MAX));
        r.reserved(u64::MAX);
        assert_eq!(r.next_counter(), Next::Counter(u64::MAX - 1));
        assert_eq!(r.next_counter(), Next::Counter(u64::MAX));
        assert_eq!(r.next_counter(), Next::Exhausted);
    }
}
