//! The MQTT adapter: turns MQTT 3.1.1 and 5 connections into the core's model
//! (peer session, message, verdict) and the core's verdicts back into MQTT answers.
//! No policy lives here.

pub mod codec;
mod incoming;
pub mod listener;
mod proxy;
pub mod session;
pub mod state;
pub mod strict;
