//! Every device's counters on one gateway, over the counter store: an uplink frame's
//! counter checked against the device's replay floor, and the gateway's own next
//! counter towards it, each range reserved on disk before it is used.
//!
//! The store is synchronous (redb, one durable write per range): a reservation runs on
//! the blocking pool, so a bus's task never waits on the disk between reservations.

use crate::counters::{Check, CounterError, CounterStore, DownlinkCounter, Next, UplinkFloor};
use portcullis_core::principal::PrincipalId;
use portcullis_serial_frame::Direction;
use std::collections::HashMap;
use std::sync::Arc;

/// Why a counter was not taken.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// Not above the last counter accepted: a replay. `floor` is what a RESYNC says.
    #[error("counter {counter} is not above {floor}: a replayed or stale frame")]
    Replay { counter: u64, floor: u64 },
    /// The reservation could not be written: the frame is refused (never accepted past
    /// what is on disk).
    #[error(transparent)]
    Store(#[from] CounterError),
    /// The gateway's counter towards the device is used up: the device needs a new key.
    #[error("the counter towards device {0} is used up: give it a new serial key")]
    Exhausted(PrincipalId),
    #[error("the counter store's worker stopped")]
    Worker,
}

/// The counters of every device the gateway has heard or written to.
pub struct Floors {
    store: Arc<CounterStore>,
    /// Counters reserved per write (`serial.counter_reserve`).
    reserve: u64,
    up: HashMap<PrincipalId, UplinkFloor>,
    down: HashMap<PrincipalId, DownlinkCounter>,
}

impl Floors {
    pub fn new(store: Arc<CounterStore>, reserve: u64) -> Floors {
        Floors {
            store,
            reserve: reserve.max(1),
            up: HashMap::new(),
            down: HashMap::new(),
        }
    }

    /// Whether `counter` from `id` is fresh. `Ok` reserves on disk first if it lies past
    /// the reserved range; the caller calls `accept` once the frame is verified and
    /// taken (a frame refused later leaves the floor where it was).
    pub async fn check(&mut self, id: &PrincipalId, counter: u64) -> Result<(), FloorError> {
        let store = &self.store;
        let floor = self
            .up
            .entry(id.clone())
            .or_insert_with(|| UplinkFloor::from_bound(store.bound(id, Direction::Up)));
        match floor.check(counter, self.reserve) {
            Check::Replay { floor } => Err(FloorError::Replay { counter, floor }),
            Check::Accept => Ok(()),
            Check::NeedsReserve { bound } => {
                reserve(self.store.clone(), id.clone(), Direction::Up, bound).await?;
                if let Some(f) = self.up.get_mut(id) {
                    f.reserved(bound);
                }
                Ok(())
            }
        }
    }

    /// The frame with `counter` from `id` was taken: the floor moves up to it.
    pub fn accept(&mut self, id: &PrincipalId, counter: u64) {
        if let Some(f) = self.up.get_mut(id) {
            f.accept(counter);
        }
    }

    /// The last counter accepted from `id` (what a RESYNC carries).
    pub fn floor(&self, id: &PrincipalId) -> u64 {
        self.up
            .get(id)
            .map_or_else(|| self.store.bound(id, Direction::Up), |f| f.last())
    }

    /// The gateway's next counter towards `id`, never one used before (a crash
    /// included).
    pub async fn next_down(&mut self, id: &PrincipalId) -> Result<u64, FloorError> {
        let store = &self.store;
        let counter = self
            .down
            .entry(id.clone())
            .or_insert_with(|| DownlinkCounter::from_bound(store.bound(id, Direction::Down)));
        loop {
            match counter
                .next(self.reserve)
                .map_err(|_| FloorError::Exhausted(id.clone()))?
            {
                Next::Counter(c) => return Ok(c),
                Next::NeedsReserve(bound) => {
                    reserve(self.store.clone(), id.clone(), Direction::Down, bound).await?;
                    counter.reserved(bound);
                }
            }
        }
    }
}

/// One durable write, on the blocking pool.
async fn reserve(
    store: Arc<CounterStore>,
    id: PrincipalId,
    direction: Direction,
    bound: u64,
) -> Result<(), FloorError> {
    tokio::task::spawn_blocking(move || store.reserve(&id, direction, bound))
        .await
        .map_err(|_| FloorError::Worker)?
        .map_err(FloorError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    fn open(dir: &std::path::Path) -> Arc<CounterStore> {
        Arc::new(CounterStore::open(&dir.join("serial-counters.redb")).unwrap())
    }

    #[tokio::test]
    async fn a_replayed_frame_is_refused_with_the_floor_a_resync_carries() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Floors::new(open(dir.path()), 100);
        let d = id("pump-1");
        for c in [1, 2, 5] {
            f.check(&d, c).await.unwrap();
            f.accept(&d, c);
        }
        match f.check(&d, 5).await {
            Err(FloorError::Replay {
                counter: 5,
                floor: 5,
            }) => {}
            other => panic!("expected a replay, got {other:?}"),
        }
        assert!(matches!(
            f.check(&d, 3).await,
            Err(FloorError::Replay { .. })
        ));
        assert_eq!(f.floor(&d), 5);
    }

    #[tokio::test]
    async fn a_frame_checked_but_not_taken_leaves_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Floors::new(open(dir.path()), 100);
        let d = id("pump-1");
        f.check(&d, 7).await.unwrap();
        // Refused later (a bad payload, say): not accepted.
        f.check(&d, 7).await.unwrap();
        f.accept(&d, 7);
        assert!(f.check(&d, 7).await.is_err());
    }

    #[tokio::test]
    async fn after_a_restart_nothing_accepted_before_is_fresh_and_down_counters_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let d = id("pump-1");
        let mut sent = Vec::new();
        {
            let mut f = Floors::new(open(dir.path()), 10);
            for c in 1..=25 {
                f.check(&d, c).await.unwrap();
                f.accept(&d, c);
            }
            for _ in 0..15 {
                sent.push(f.next_down(&d).await.unwrap());
            }
            // Dropped without any further write, as a crash would leave it.
        }
        let mut f = Floors::new(open(dir.path()), 10);
        for c in 1..=25 {
            assert!(f.check(&d, c).await.is_err(), "counter {c} accepted again");
        }
        let next = f.next_down(&d).await.unwrap();
        assert!(sent.iter().all(|s| *s < next), "{next} not above {sent:?}");
    }

    #[tokio::test]
    async fn devices_have_floors_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Floors::new(open(dir.path()), 100);
        f.check(&id("pump-1"), 50).await.unwrap();
        f.accept(&id("pump-1"), 50);
        f.check(&id("pump-2"), 1).await.unwrap();
        assert_eq!(f.floor(&id("pump-2")), 0);
    }
}
