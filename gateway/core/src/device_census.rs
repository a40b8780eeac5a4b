//! How many registered devices are in each behaviour state, for
//! `portcullis_devices{state}`. Counted when `/metrics` is read, not kept on the hot
//! path: the devices not normal are few, and every other registered device is normal,
//! whether it ever connected or its group models behaviour at all.

use crate::behaviour::State;
use crate::metrics::DeviceCensus;
use crate::principal::PrincipalKind;
use crate::quarantine::Behaviours;
use crate::registry::Registry;
use std::sync::Arc;

/// The registry's devices and the behaviour table's states, counted together.
pub struct DeviceStates {
    registry: Arc<Registry>,
    behaviours: Arc<Behaviours>,
}

impl DeviceStates {
    pub fn new(registry: Arc<Registry>, behaviours: Arc<Behaviours>) -> DeviceStates {
        DeviceStates {
            registry,
            behaviours,
        }
    }
}

impl DeviceCensus for DeviceStates {
    fn devices_by_state(&self) -> [u64; State::ALL.len()] {
        let snapshot = self.registry.snapshot();
        let mut counts = [0u64; State::ALL.len()];
        // A device removed a moment ago may still be tracked: only registered ones
        // count, so the states add up to the registered devices.
        for (id, state) in self.behaviours.held() {
            if snapshot.get(PrincipalKind::Device, &id).is_some() {
                counts[state.to_u8() as usize] += 1;
            }
        }
        let held: u64 = counts.iter().sum();
        counts[State::Normal.to_u8() as usize] =
            (snapshot.count(PrincipalKind::Device) as u64).saturating_sub(held);
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Exposition, Metrics};
    use crate::principal::{GroupName, PrincipalId};
    use crate::quarantine::Policies;
    use crate::registry::tests::record as device;
    use portcullis_config::Config;
    use std::time::Instant;

    fn gauge(page: &str, state: &str) -> u64 {
        let line = format!("portcullis_devices{{state=\"{state}\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in {page}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn devices_are_counted_by_state_and_add_up_to_the_registered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(
            Registry::open(
                &dir.path().join("registry.redb"),
                crate::record::RecordSealer::derive(&[5; 32]),
            )
            .unwrap(),
        );
        for id in ["d1", "d2", "d3", "d4", "d5"] {
            registry.add(device(id)).unwrap();
        }
        let (behaviours, _rx) = Behaviours::new(Policies::from_config(&Config::default()));
        let metrics = Arc::new(Metrics::default());
        // Before the gateway sets the census, every state is there at 0.
        let page = metrics.render(Exposition::Prometheus);
        for state in State::ALL {
            assert_eq!(gauge(&page, state.as_str()), 0, "{page}");
        }
        metrics.set_device_census(Arc::new(DeviceStates::new(
            registry.clone(),
            behaviours.clone(),
        )));
        let group = GroupName::parse("default").unwrap();
        let id = |s: &str| PrincipalId::parse(s).unwrap();
        let now = Instant::now();
        behaviours.restore(&id("d1"), &group, State::Quarantined, now, now);
        behaviours.restore(&id("d2"), &group, State::Quarantined, now, now);
        behaviours.restore(&id("d3"), &group, State::Probation, now, now);
        // Tracked but normal, and tracked but no longer registered: neither is held.
        behaviours.track(&id("d4"), &group);
        behaviours.restore(&id("gone"), &group, State::Quarantined, now, now);
        for format in [Exposition::Prometheus, Exposition::OpenMetrics] {
            let page = metrics.render(format);
            assert_eq!(gauge(&page, "quarantined"), 2, "{page}");
            assert_eq!(gauge(&page, "probation"), 1, "{page}");
            assert_eq!(gauge(&page, "released"), 0, "{page}");
            assert_eq!(gauge(&page, "normal"), 2, "{page}");
        }
        // An operator's release moves one device from quarantined to released.
        assert_eq!(
            behaviours.release(&id("d1"), &group, "operator"),
            Some(State::Released)
        );
        let page = metrics.render(Exposition::Prometheus);
        assert_eq!(gauge(&page, "quarantined"), 1, "{page}");
        assert_eq!(gauge(&page, "released"), 1, "{page}");
        assert_eq!(gauge(&page, "normal"), 2, "{page}");
    }
}
