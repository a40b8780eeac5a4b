//! The serial adapter (SPEC §7, docs/serial-protocol.md): devices on UART and RS-485
//! buses whose every frame is authenticated under the device's own key.
//!
//! - `counters`: the replay floors and the gateway's own counters, kept by reserving
//!   ranges ahead in redb (one write per range), so that neither side ever accepts or
//!   reuses a counter after a crash.
//! - `floors`: every device's replay floor and the gateway's own counters over the
//!   store, a reservation written on the blocking pool before a range is used.
//! - `keys`: the devices' frame keys, from the registry, opened with the master key.
//! - `link`: a bus's bytes read into frames whose tags verified, from devices the port
//!   allows (pure).
//! - `port`: a configured port opened with its line settings, read and written off
//!   the async runtime, and reopened with back-off when it vanishes.

pub mod counters;
pub mod floors;
pub mod keys;
pub mod link;
pub mod port;
