//! The operator's mistake, told apart from the gateway's: bad usage or bad
//! configuration ends the process with exit code 2, anything else with 1.

/// Bad usage or bad configuration: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
