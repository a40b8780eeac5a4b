//! The upstream forwarder: clean traffic goes to an external broker cluster (EMQX,
//! HiveMQ, VerneMQ, Mosquitto) through a durable outbox.

pub mod entry;
pub mod store;
