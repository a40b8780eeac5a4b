//! The serial adapter (SPEC §7, docs/serial-protocol.md): devices on UART and RS-485
//! buses whose every frame is authenticated under the device's own key.
//!
//! - `bus`: one task per configured port: frames read, counters checked, fresh frames
//!   handed to their device's session, and what sessions ask for written.
//! - `session`: a device's session through the core's pipeline (uplink DATA answered
//!   ACK or NAK, commands down with retransmission).
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

pub mod bus;
pub mod counters;
pub mod floors;
pub mod keys;
pub mod link;
pub mod port;
pub mod session;
