//! The `portcullis-sim` binary: the shipped scenarios load, a bad scenario is refused
//! with exit 2 and the reason, and a small fleet runs end to end against
//! `portcullis-sim broker` (rumqttd on a free loopback port, no gateway).

use portcullis_sim::Scenario;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SIM: &str = env!("CARGO_BIN_EXE_portcullis-sim");

/// Every hostile behaviour a scenario can name; `hostile.toml` shows each one.
const HOSTILE: &[&str] = &[
    "flood",
    "oversized",
    "schema-breaking",
    "topic-scan",
    "credential-stuffing",
    "cloned-identity",
    "reconnect-storm",
    "slowloris",
    "malformed",
    "slow-ramp",
    "replay",
];

fn shipped() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn total(map: &Value) -> u64 {
    map.as_object()
        .map(|m| m.values().map(count).sum())
        .unwrap_or(0)
}

fn group<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name} in {report:#}"))
}

#[test]
fn every_shipped_scenario_loads_and_says_how_to_run_it() {
    let files = shipped();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["well-behaved.toml", "hostile.toml", "mixed.toml"] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    for (path, name) in files.iter().zip(&names) {
        let s = Scenario::load(path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let text = std::fs::read_to_string(path).unwrap();
        let command = format!("target/release/portcullis-sim run firmware-sim/scenarios/{name}");
        assert!(
            text.starts_with('#') && text.contains(&command),
            "{name}: the header comment must give `{command}`"
        );
        // Against the gateway's embedded default, principals are registered through
        // its CLI with the development CA.
        assert!(
            s.provision
                .portcullis
                .ends_with("target/release/portcullis"),
            "{name}: {:?}",
            s.provision.portcullis
        );
        assert!(s.provision.ca_key.is_some(), "{name}: [provision] ca_key");
    }
    let hostile = Scenario::load(&files[names.iter().position(|n| n == "hostile.toml").unwrap()])
        .expect("hostile.toml");
    for b in HOSTILE {
        assert!(
            hostile.groups.iter().any(|g| g.behaviour.name() == *b),
            "hostile.toml has no {b} group"
        );
    }
    assert!(
        hostile
            .groups
            .iter()
            .any(|g| g.behaviour.name() == "well-behaved"),
        "hostile.toml needs a well-behaved control group"
    );
}

/// Run the binary with a deadline; kill it if it overstays.
fn sim(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(SIM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis-sim");
    finish_within(child, limit, &format!("portcullis-sim {args:?}"))
}

/// The child's output once it exits; killed (and the test failed) past `limit`.
fn finish_within(child: Child, limit: Duration, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("child output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

#[test]
fn a_bad_scenario_exits_2_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let head = "name = \"bad\"\nduration_secs = 1\n[target]\ndevice_plain = \"127.0.0.1:1\"\n\
                [provision]\nmode = \"none\"\n";
    let group =
        "[[group]]\nname = \"g\"\ncount = 1\ntransport = \"plain\"\ncredential = \"none\"\n";
    let cases = [
        (
            "unknown-field.toml",
            format!(
                "{head}{group}behaviour = {{ kind = \"well-behaved\", rate = 1.0, speed = 3 }}\n"
            ),
            "unknown field `speed`",
        ),
        (
            "unknown-behaviour.toml",
            format!("{head}{group}behaviour = {{ kind = \"teleport\" }}\n"),
            "unknown variant `teleport`",
        ),
        (
            "no-listener.toml",
            format!("{head}{group}kind = \"service\"\nbehaviour = {{ kind = \"service\" }}\n"),
            "[target] has no service_plain address",
        ),
        (
            "bad-value.toml",
            format!("{head}{group}behaviour = {{ kind = \"flood\", inflight = 0 }}\n"),
            "inflight must be at least 1",
        ),
    ];
    for (file, text, want) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = sim(&["run", path.to_str().unwrap()], Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(want), "{file}: wanted {want:?} in {err}");
        assert!(
            err.contains(file),
            "{file}: stderr should name the file: {err}"
        );
        assert!(out.stdout.is_empty(), "{file}: nothing on stdout");
    }
    let missing = dir.path().join("missing.toml");
    let out = sim(&["run", missing.to_str().unwrap()], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("reading") && err.contains("missing.toml"),
        "{err}"
    );
}

/// `portcullis-sim broker` on a free loopback port; killed on drop.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    fn start() -> Broker {
        // Another test may take the port between our probe and the broker's bind:
        // the broker then exits at once, and we try another.
        for _ in 0..5 {
            let addr = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let mut child = Command::new(SIM)
                .args(["broker", "--listen", &addr.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn portcullis-sim broker");
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut up = false;
            while Instant::now() < deadline {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) if line.contains("rumqttd listening") => {
                        up = true;
                        break;
                    }
                    Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if TcpStream::connect(addr).is_ok() && child.try_wait().unwrap().is_none() {
                    up = true;
                    break;
                }
            }
            if up {
                return Broker { child, addr };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("portcullis-sim broker did not start");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `groups` as a plain MQTT 3.1.1 scenario against `addr`, run it, and return
/// the JSON report and the text report.
fn run_against(addr: SocketAddr, name: &str, groups: &str) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.toml"));
    let scenario = format!(
        "name = \"{name}\"\nduration_secs = 3\ngrace_secs = 2\n\
         [target]\ndevice_plain = \"{addr}\"\nservice_plain = \"{addr}\"\n\
         [provision]\nmode = \"none\"\n{groups}"
    );
    std::fs::write(&path, scenario).unwrap();
    let json = dir.path().join("report.json");
    let out = sim(
        &[
            "run",
            path.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--quiet",
        ],
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {:?}\n{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap())
        .unwrap_or_else(|e| panic!("{name}: report.json: {e}"));
    (report, text)
}

const PLAIN_311: &str = "transport = \"plain\"\ncredential = \"none\"\nprotocol = \"mqtt311\"\n";

#[test]
fn a_well_behaved_fleet_and_a_service_against_rumqttd_lose_nothing() {
    let broker = Broker::start();
    let groups = format!(
        "[[group]]\nname = \"ops\"\nkind = \"service\"\ncount = 1\n{PLAIN_311}\
         behaviour = {{ kind = \"service\", commands_per_second = 5.0, command_groups = [\"sensors\"] }}\n\
         [[group]]\nname = \"sensors\"\ncount = 5\n{PLAIN_311}\
         behaviour = {{ kind = \"well-behaved\", rate = 5.0, boot_burst = 2 }}\n"
    );
    let (report, text) = run_against(broker.addr, "fleet", &groups);

    assert_eq!(report["scenario"], "fleet", "{text}");
    assert!(text.starts_with("scenario \"fleet\""), "{text}");
    assert!(text.contains("\nops (service, 1 members)\n"), "{text}");
    assert!(
        text.contains("\nsensors (well-behaved, 5 members)\n"),
        "{text}"
    );

    let s = group(&report, "sensors");
    assert_eq!(s["behaviour"], "well-behaved", "{text}");
    assert_eq!(count(&s["connected"]), 5, "{text}");
    // 5 devices, 2 at boot then 5 per second for 3 s: about 85 in all.
    assert!(count(&s["sent"]) >= 40, "{text}");
    assert_eq!(s["acknowledged"], s["sent"], "{text}");
    assert_eq!(s["delivered"], s["sent"], "{text}");
    assert_eq!(total(&s["refused"]), 0, "{text}");
    assert_eq!(total(&s["connect_refused"]), 0, "{text}");
    assert_eq!(total(&s["disconnected"]), 0, "{text}");
    assert_eq!(count(&s["accepted"]), 0, "{text}");
    assert_eq!(
        count(&s["latency_us"]["count"]),
        count(&s["sent"]),
        "{text}"
    );

    // Commands: every one the service sent reached a device and came back acknowledged.
    let ops = group(&report, "ops");
    assert_eq!(count(&ops["connected"]), 1, "{text}");
    let commands = count(&ops["commands_sent"]);
    assert!(commands >= 5, "{text}");
    assert_eq!(count(&s["commands_received"]), commands, "{text}");
    assert_eq!(count(&s["commands_acknowledged"]), commands, "{text}");
    assert!(
        text.contains(&format!("commands sent {commands}  received 0")),
        "{text}"
    );
}

#[test]
fn rumqttd_accepts_what_the_gateway_would_refuse_and_the_report_says_so() {
    let broker = Broker::start();
    // Low rates: the scanner's subscription to `#` is granted here, and everything the
    // others publish is delivered to it as well.
    let groups = format!(
        "[[group]]\nname = \"schema\"\ncount = 1\n{PLAIN_311}\
         behaviour = {{ kind = \"schema-breaking\", rate = 5.0 }}\n\
         [[group]]\nname = \"scanner\"\ncount = 1\n{PLAIN_311}\
         behaviour = {{ kind = \"topic-scan\", rate = 5.0 }}\n"
    );
    let (report, text) = run_against(broker.addr, "baseline", &groups);
    for name in ["schema", "scanner"] {
        let g = group(&report, name);
        assert!(count(&g["sent"]) >= 10, "{name}: {text}");
        assert_eq!(g["accepted"], g["sent"], "{name}: {text}");
        assert_eq!(g["acknowledged"], g["sent"], "{name}: {text}");
        assert_eq!(total(&g["refused"]), 0, "{name}: {text}");
    }
    assert!(
        text.contains("\nschema (schema-breaking, 1 members)\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "accepted-hostile {}",
            count(&group(&report, "scanner")["accepted"])
        )),
        "{text}"
    );
}

/// Run `portcullis-sim ARGS` on a pseudo-terminal 80 columns wide (script(1), from
/// util-linux): what it drew, as the terminal received it.
fn on_terminal(args: &str, limit: Duration) -> String {
    let cmd = format!("stty cols 80 rows 24; exec {SIM} {args}");
    let child = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) (util-linux) runs a command on a pseudo-terminal");
    let out = finish_within(
        child,
        limit,
        &format!("portcullis-sim {args} (on a terminal)"),
    );
    assert!(out.status.success(), "{args}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines a terminal shows one after another (each `\r` or `\n` starts over),
/// without ANSI escape sequences.
fn screen_lines(raw: &str) -> Vec<String> {
    let mut plain = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, then a final byte in @..~.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        plain.push(c);
    }
    plain
        .split(['\r', '\n'])
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn model_shows_its_progress_on_one_line_that_fits_the_terminal() {
    let lines = screen_lines(&on_terminal(
        "model --devices 30 --days 1 --hostile 1",
        Duration::from_secs(120),
    ));
    let is_progress = |l: &String| l.contains("] ") && l.contains(" devices");
    let progress: Vec<&String> = lines.iter().filter(|l| is_progress(l)).collect();
    assert!(!progress.is_empty(), "no progress line in {lines:?}");
    // `done/total devices`: it counts up to all of them (30 well-behaved, then the
    // hostile ones).
    let counts: Vec<(u64, u64)> = progress
        .iter()
        .filter_map(|l| {
            let field = l.split_whitespace().find(|w| w.contains('/'))?;
            let (done, total) = field.split_once('/')?;
            Some((done.parse().ok()?, total.parse().ok()?))
        })
        .collect();
    assert!(
        counts
            .iter()
            .any(|&(done, total)| done == total && total > 30),
        "{progress:?}"
    );
    for l in &progress {
        assert!(l.chars().count() <= 80, "wider than the terminal: {l:?}");
    }
    // The progress comes first, then the report.
    let first_report = lines
        .iter()
        .position(|l| l.starts_with("Behaviour model evaluation"))
        .expect("the report");
    let first_progress = lines.iter().position(is_progress).unwrap();
    assert!(first_progress < first_report);
}

#[test]
fn a_run_shows_one_line_that_fits_the_terminal_and_says_when_it_waits_out_the_grace() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress.toml");
    let addr = broker.addr;
    std::fs::write(
        &path,
        format!(
            "name = \"progress\"\nduration_secs = 2\ngrace_secs = 2\n\
             [target]\ndevice_plain = \"{addr}\"\nservice_plain = \"{addr}\"\n\
             [provision]\nmode = \"none\"\n\
             [[group]]\nname = \"a-group-with-a-rather-long-name-to-test-the-width\"\ncount = 3\n{PLAIN_311}\
             behaviour = {{ kind = \"well-behaved\", rate = 5.0 }}\n"
        ),
    )
    .unwrap();
    let lines = screen_lines(&on_terminal(
        &format!("run {}", path.display()),
        Duration::from_secs(60),
    ));
    let progress: Vec<&String> = lines.iter().filter(|l| l.contains(" sent ")).collect();
    assert!(!progress.is_empty(), "no progress line in {lines:?}");
    for l in &progress {
        assert!(l.chars().count() <= 80, "wider than the terminal: {l:?}");
    }
    assert!(
        progress.iter().any(|l| l.contains("grace")),
        "the grace period is not shown: {progress:?}"
    );
}
