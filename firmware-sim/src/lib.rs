//! portcullis-sim: fleets of simulated devices and services, well-behaved and hostile,
//! run against a Portcullis gateway (or straight against a broker), and the benchmark
//! suite that compares Portcullis with rumqttd and Mosquitto; and the behaviour model's
//! false-positive / true-positive evaluation on a simulated clock.

pub mod bench;
pub mod broker;
pub mod fleet;
pub mod model;
pub mod mqtt;
pub mod provision;
pub mod report;
pub mod scenario;
pub mod serial;
pub mod timing;
pub mod transport;

pub use report::Report;
pub use scenario::Scenario;
