//! `portcullis-sim`: run simulated fleets, benchmarks, and the rumqttd baseline.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use portcullis_sim::{Scenario, bench, broker, fleet, model, serial, timing};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "portcullis-sim",
    version,
    about = "Simulated device fleets and benchmarks for Portcullis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file and report per group.
    Run {
        scenario: PathBuf,
        /// Also write the report as JSON to this file ("-" for standard output).
        #[arg(long)]
        json: Option<PathBuf>,
        /// No live progress line.
        #[arg(long)]
        quiet: bool,
        /// Worker threads (default: the CPUs this process may run on).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The benchmark suite: Portcullis (full pipeline) against rumqttd and Mosquitto,
    /// interleaved, server and load generator pinned to their own CPUs.
    Bench {
        /// Repetitions of every case on every target (the report gives the median).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Time measured per run (after one second of warm-up): seconds, or a
        /// duration such as 500ms, 3s, 1m.
        #[arg(long, default_value = "5", value_parser = seconds)]
        secs: f64,
        /// Targets, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "portcullis,rumqttd,mosquitto"
        )]
        targets: Vec<bench::Target>,
        /// Workloads, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "throughput,latency,idle,isolation,coap"
        )]
        workloads: Vec<bench::Workload>,
        /// The gateway binary (build it with `cargo build --release`).
        #[arg(long, default_value = "target/release/portcullis")]
        portcullis: PathBuf,
        /// The policy Portcullis runs under.
        #[arg(long, default_value = "firmware-sim/bench/portcullis-bench.toml")]
        policy: PathBuf,
        /// Idle connections per idle run.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Idle DTLS sessions per CoAP idle run.
        #[arg(long, default_value_t = 2_000)]
        coap_idle: usize,
        /// Do not pin the server and the generator to CPUs (figures then measure the
        /// split of the CPUs as much as the servers).
        #[arg(long)]
        no_pin: bool,
        /// The CPU the server under test runs on.
        #[arg(long, default_value_t = 0)]
        server_cpu: usize,
        /// The CPU the load generator runs on.
        #[arg(long, default_value_t = 1)]
        load_cpu: usize,
        /// The CPU the `portcullis-upstream` target's own Mosquitto runs on (default:
        /// the server's, beside the gateway; the load CPU puts it with the generator,
        /// as a broker cluster on other machines would be off the gateway's).
        #[arg(long)]
        upstream_cpu: Option<usize>,
        /// Also write every sample as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The behaviour model's false positives (a well-behaved fleet) and detection of
    /// each hostile behaviour, on a simulated clock: no gateway, no network.
    Model {
        /// Well-behaved devices.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Simulated days per well-behaved device.
        #[arg(long, default_value_t = 7.0)]
        days: f64,
        /// Seed of every random draw: the same seed gives the same report.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Devices per hostile behaviour.
        #[arg(long, default_value_t = 50)]
        hostile: usize,
        /// Also write the report as JSON to this file ("-" for standard output).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Worker threads (default: the CPUs this process may run on).
        #[arg(long)]
        threads: Option<usize>,
        /// Instead of the report, what one device did, event by event (all but single
        /// messages), with its transitions: `wb-N` (well-behaved) or `h-BEHAVIOUR-N`.
        #[arg(long, value_name = "DEVICE")]
        trace: Option<String>,
    },
    /// Can ids be enumerated by timing? Against a running gateway, CONNECTs naming
    /// unknown ids and a registered id with wrong secrets, interleaved, each from its
    /// own loopback source: medians, difference and a Mann-Whitney U p-value. Exit
    /// status 1 when the two are distinguishable at --alpha.
    Timing {
        /// The gateway's plain device listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        addr: SocketAddr,
        /// A registered device id (wrong secrets are sent for it).
        #[arg(long)]
        known: String,
        /// Samples of each kind.
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        /// Samples of each kind discarded first.
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        #[arg(long, default_value_t = 0.001)]
        alpha: f64,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One simulated serial device on the device end of a bus (a socat pty, or a tty
    /// set raw): telemetry DATA frames, each ACK, NAK and RESYNC it hears printed, and
    /// commands acknowledged. Its counters are kept in --state so that the next run
    /// goes on above them.
    SerialDevice {
        /// The device end of the bus (the gateway's `[[serial.ports]]` names the other).
        #[arg(long)]
        port: PathBuf,
        /// The device's id, as registered and listed on the port.
        #[arg(long)]
        id: String,
        /// A file holding its frame key: 64 hex digits, as `portcullis device add ID
        /// --serial-key-generate` prints them.
        #[arg(long)]
        key_file: PathBuf,
        /// Telemetry frames per second.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Exit after this many frames acknowledged (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// Telemetry goes to devices/{id}/{suffix}.
        #[arg(long, default_value = "telemetry")]
        suffix: String,
        /// The device's "flash": its counters, created if missing.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Run rumqttd alone with a plain MQTT 3.1.1 listener (the benchmarks' baseline).
    Broker {
        #[arg(long, default_value = "127.0.0.1:1885")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Run {
            scenario,
            json,
            quiet,
            threads,
        } => {
            let s = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("portcullis-sim: {e:#}");
                    return ExitCode::from(2);
                }
            };
            report_exit(run(&s, json, quiet, threads))
        }
        Command::Broker { listen } => report_exit(broker::serve(listen)),
        Command::SerialDevice {
            port,
            id,
            key_file,
            rate,
            count,
            suffix,
            state,
        } => {
            let o = serial::standalone::Options {
                port,
                id,
                key_file,
                rate,
                count,
                suffix,
                state,
            };
            report_exit(serial::standalone::run(&o, &mut std::io::stdout().lock()))
        }
        Command::Timing {
            addr,
            known,
            samples,
            warmup,
            alpha,
            json,
        } => {
            let o = timing::Options {
                addr,
                known,
                samples,
                warmup,
                alpha,
            };
            let report = match runtime(Some(1)).and_then(|rt| rt.block_on(timing::run(&o))) {
                Ok(r) => r,
                Err(e) => return report_exit(Err(e)),
            };
            print!("{}", report.text());
            if let Some(p) = json {
                let written = serde_json::to_string_pretty(&report)
                    .map_err(anyhow::Error::from)
                    .and_then(|t| {
                        std::fs::write(&p, t + "\n")
                            .with_context(|| format!("writing {}", p.display()))
                    });
                if let Err(e) = written {
                    return report_exit(Err(e));
                }
            }
            if report.distinguishable {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Model {
            devices,
            days,
            seed,
            hostile,
            json,
            threads,
            trace,
        } => {
            if !(days.is_finite() && days > 0.0 && days <= 3650.0) {
                eprintln!(
                    "portcullis-sim: --days must be more than 0 and at most 3650 (got {days})"
                );
                return ExitCode::from(2);
            }
            let o = model::Options {
                devices,
                days,
                seed,
                hostile,
                threads,
            };
            if let Some(device) = trace {
                return match model::trace(&o, &device) {
                    Some(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    None => {
                        eprintln!(
                            "portcullis-sim: --trace {device:?}: no such device (wb-1 to \
                             wb-{devices}, or h-BEHAVIOUR-1 to h-BEHAVIOUR-{hostile})"
                        );
                        ExitCode::from(2)
                    }
                };
            }
            report_exit(run_model(&o, json))
        }
        Command::Bench {
            reps,
            secs,
            targets,
            workloads,
            portcullis,
            policy,
            idle,
            coap_idle,
            no_pin,
            server_cpu,
            load_cpu,
            upstream_cpu,
            json,
        } => report_exit(
            bench::run(bench::Options {
                reps: reps.max(1),
                secs,
                targets,
                workloads,
                portcullis,
                sim: match std::env::current_exe() {
                    Ok(exe) => exe,
                    Err(e) => return report_exit(Err(e.into())),
                },
                policy,
                idle,
                coap_idle: coap_idle.max(1),
                pin: !no_pin,
                server_cpu,
                load_cpu,
                upstream_cpu,
                json,
            })
            .map(|_| ()),
        ),
    }
}

fn report_exit(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-sim: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.max(1));
    }
    b.enable_all().build().context("starting the runtime")
}

fn run(s: &Scenario, json: Option<PathBuf>, quiet: bool, threads: Option<usize>) -> Result<()> {
    let progress = !quiet && std::io::stderr().is_terminal();
    let report = runtime(threads)?.block_on(fleet::run(s, progress))?;
    match json.as_deref() {
        Some(p) if p.as_os_str() == "-" => {
            use std::io::Write;
            // A closed pipe (`| head`) is the reader's choice, not an error.
            let _ = writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&report)?
            );
        }
        Some(p) => {
            std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
            print!("{}", report.text());
        }
        None => print!("{}", report.text()),
    }
    Ok(())
}

fn run_model(o: &model::Options, json: Option<PathBuf>) -> Result<()> {
    use std::io::Write;
    let started = std::time::Instant::now();
    // A progress line on a terminal (indicatif draws nothing elsewhere), cut to its
    // width: the evaluation takes tens of seconds before it can print anything.
    let bar = indicatif::ProgressBar::new(model::devices_simulated(o) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed:>4} [{bar:30}] {pos}/{len} devices {wide_msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let evaluation = model::evaluate_reporting(o, &Default::default(), &|p| {
        bar.set_position(p.done as u64);
        if p.hostile {
            bar.set_message("hostile");
        } else {
            bar.set_message(format!("well-behaved, {} days each", o.days));
        }
    });
    // The last line says it is all done (drawn whatever the redraw rate skipped), and
    // stays above the report.
    bar.finish_with_message("done");
    if !bar.is_hidden() {
        eprintln!();
    }
    let took = started.elapsed().as_secs_f64();
    let mut value = serde_json::to_value(&evaluation)?;
    value["run_secs"] = serde_json::json!(took);
    let text = format!(
        "{}\nRun time: {took:.1} s (wall clock; the model ran on the simulated clock)\n",
        evaluation.text()
    );
    // A closed pipe (`| head`) is the reader's choice, not an error.
    match json.as_deref() {
        Some(p) if p.as_os_str() == "-" => {
            let _ = writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&value)?
            );
        }
        Some(p) => {
            std::fs::write(p, serde_json::to_string_pretty(&value)? + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
            let _ = write!(std::io::stdout().lock(), "{text}");
        }
        None => {
            let _ = write!(std::io::stdout().lock(), "{text}");
        }
    }
    Ok(())
}

/// A number of seconds (`3`, `2.5`) or a duration as humantime reads it (`500ms`,
/// `3s`, `1m 30s`), in seconds.
fn seconds(text: &str) -> Result<f64, String> {
    let secs = match text.parse::<f64>() {
        Ok(secs) => secs,
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("{e}; write e.g. 3, 2.5, 500ms, 3s or 1m"))?
            .as_secs_f64(),
    };
    if secs.is_finite() && secs > 0.0 {
        Ok(secs)
    } else {
        Err(format!("must be a time > 0 (got {text})"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_times_read_as_seconds_or_durations() {
        for (text, secs) in [("3", 3.0), ("2.5", 2.5), ("500ms", 0.5), ("1m 30s", 90.0)] {
            assert_eq!(super::seconds(text), Ok(secs), "{text}");
        }
        for bad in ["0", "-1", "soon", "nan"] {
            assert!(super::seconds(bad).is_err(), "{bad}");
        }
    }
}
