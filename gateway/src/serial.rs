//! The serial ports of `serve`: each `[[serial.ports]]` entry opened by its own thread
//! and served by its own bus task, over one counter store in the data dir. With no
//! ports configured nothing is opened, not even the store.

use crate::usage::UsageError;
use anyhow::Result;
use portcullis_config::Config;
use portcullis_core::parking::ParkedSessions;
use portcullis_core::principal::PrincipalId;
use portcullis_serial::bus::{self, Context};
use portcullis_serial::counters::CounterStore;
use portcullis_serial::port::{Backoff, Port, PortSettings};
use portcullis_serial::session::SerialState;
use std::sync::Arc;

/// The running serial buses.
pub struct SerialBuses {
    /// The ports' paths, for the banner.
    pub paths: Vec<String>,
    pub parked: Arc<ParkedSessions<SerialState>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The counter store, when serial ports are configured.
pub fn open_store(config: &Config) -> Result<Option<Arc<CounterStore>>> {
    if config.serial.ports.is_empty() {
        return Ok(None);
    }
    let store = CounterStore::open(&config.serial_counters_file())
        .map_err(|e| UsageError(e.to_string()))?;
    Ok(Some(Arc::new(store)))
}

/// Open every configured port (each reopens itself with back-off when it vanishes or
/// is not there yet) and serve its bus.
pub fn start(config: &Config, ctx: Arc<Context>) -> Result<SerialBuses> {
    let backoff = Backoff::from(&config.serial);
    let mut tasks = Vec::new();
    let mut paths = Vec::new();
    for (index, p) in config.serial.ports.iter().enumerate() {
        let devices = p
            .devices
            .iter()
            .map(|d| {
                PrincipalId::parse(d).map_err(|e| UsageError(format!("serial.ports: {d}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let port = Port::new(PortSettings::from(p), backoff);
        paths.push(p.path.display().to_string());
        let index = u16::try_from(index).unwrap_or(u16::MAX);
        tasks.push(tokio::spawn(bus::serve(ctx.clone(), index, port, devices)));
    }
    Ok(SerialBuses {
        paths,
        parked: ctx.parked.clone(),
        tasks,
    })
}
