//! The CoAP adapter (SPEC §3, §4): constrained devices on UDP, authenticated by a DTLS
//! pre-shared key whose identity is the device id.
//!
//! - `dtls`: one task owns the UDP socket and every peer's DTLS state (dimpl, sans-IO),
//!   with a cap on handshakes in progress (overall and per source), a handshake
//!   deadline and an idle timeout. It hands the CoAP layer whole datagrams of
//!   application data from peers that proved their key.
//! - `plain`: plain CoAP on loopback (off by default), a device proving its identity
//!   with its secret in its first request.
//! - `keys`: the pre-shared keys, from the registry, opened with the master key.
//! - `message`: a datagram read into a typed CoAP message; `reply`: every answer and
//!   message the gateway sends, encoded in one place.
//! - `session`: one CoAP session per DTLS session, through the core's pipeline.
//! - `client`: what a device does (DTLS PSK client, confirmable requests), for the
//!   simulator, the benchmark and the tests.

pub mod client;
pub mod dtls;
pub mod keys;
pub mod message;
pub mod plain;
pub(crate) mod reply;
pub mod session;
