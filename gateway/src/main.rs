//! `portcullis`: the gateway binary and its command line.

mod admin;
mod cli;
mod observability;
mod pki;
mod serve;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,rustls=error".into()),
        )
        // rumqttd opens an error-level span per publish (its topic formatted with
        // Debug): a third of the router's time under load. Its events still pass.
        .with(tracing_subscriber::filter::filter_fn(|m| {
            !(m.is_span() && m.target().starts_with("rumqttd"))
        }))
        .init();
    // One crypto provider for the whole process, chosen once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            match e.downcast_ref::<cli::UsageError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::from(1),
            }
        }
    }
}
