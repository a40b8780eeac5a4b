//! `portcullis`: the gateway binary and its command line.

mod admin;
mod cli;
mod coap;
mod descriptors;
mod http_listener;
mod observability;
mod pki;
mod registry_file;
mod replicas;
mod serial;
mod serve;
mod sync_file;
mod usage;

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;

/// Logs are coloured only on a terminal, and never when `NO_COLOR` is set to anything
/// but the empty string (no-color.org): a log file or a journal gets plain text.
fn log_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Freed memory goes back to the system: glibc's allocator otherwise raises its
/// mmap threshold after each large free, serves later large messages from its heaps,
/// and keeps what a burst of them used (a slow consumer's queue of 256 KiB messages
/// stayed resident after it was gone). With a fixed threshold every allocation from
/// 128 KiB up is its own mapping, unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_frees_to_the_system() {
    // SAFETY: mallopt takes two integers and only changes glibc's allocator
    // parameters under its own lock; no pointer or Rust invariant is involved.
    // M_MMAP_THRESHOLD with 128 KiB (glibc's default value, within its limits) cannot
    // fail in a way that matters: on failure the default dynamic threshold stays.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_frees_to_the_system() {}

fn main() -> ExitCode {
    return_large_frees_to_the_system();
    let args = cli::Cli::parse();
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(log_colour(
                    std::io::stderr().is_terminal(),
                    std::env::var_os("NO_COLOR"),
                )),
        )
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
            match e.downcast_ref::<usage::UsageError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::from(1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_colour;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(!log_colour(false, None), "a pipe or a file gets plain text");
        assert!(!log_colour(true, Some("1".into())));
        assert!(
            log_colour(true, Some("".into())),
            "an empty NO_COLOR does not count"
        );
    }
}
