//! Test harness: runs the real `portcullis` binary in its own temp dir on port-0
//! listeners, and drives it with real clients (mosquitto_pub/sub) and raw MQTT.
#![allow(dead_code)]

pub mod admin;
pub mod raw;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    pub device_tls: SocketAddr,
    pub device_plain: SocketAddr,
    pub service_tls: SocketAddr,
    pub service_plain: SocketAddr,
    pub observability: SocketAddr,
    /// The CoAP over DTLS listener (UDP).
    pub coap_dtls: SocketAddr,
    /// The plain CoAP listener (UDP, loopback).
    pub coap_plain: SocketAddr,
    pub banner: Vec<String>,
    stdout_rest: Option<mpsc::Receiver<String>>,
    extra: String,
    /// `prlimit --nofile=N:N`, if the gateway runs with a descriptor limit.
    nofile: Option<u64>,
}

fn config_text(dir: &Path, extra: &str, limits: &str, rates: &str) -> String {
    let d = dir.display();
    // Tests connect often from 127.0.0.1: a generous connection rate unless a test
    // sets its own.
    let rates = if rates.contains("connections_per_second_per_source") {
        rates.to_string()
    } else {
        format!(
            "connections_per_second_per_source = 1000.0\nconnection_burst_per_source = 1000.0\n{rates}"
        )
    };
    // A test that brings its own [auth] table gets only that.
    let auth = if extra.contains("[auth]") {
        ""
    } else {
        "[auth]\nmax_failures = 3\nbackoff_initial_secs = 30\nbackoff_max_secs = 120"
    };
    format!(
        r#"data_dir = "{d}/data"
[listeners]
device_tls = "127.0.0.1:0"
device_plain = "127.0.0.1:0"
service_tls = "127.0.0.1:0"
service_plain = "127.0.0.1:0"
coap_dtls = "127.0.0.1:0"
coap = "127.0.0.1:0"
[observability]
listen = "127.0.0.1:0"
[tls]
handshake_timeout_secs = 2
[limits]
connect_timeout_secs = 2
drain_timeout_secs = 3
write_timeout_secs = 2
{limits}
[rate_limits]
{rates}
{auth}
[device_groups.default]
trust = ["{d}/data/pki/ca.pem"]
[device_groups.other]
trust = ["{d}/other/pki/ca.pem"]
[service_groups.default]
trust = ["{d}/data/pki/ca.pem"]
publish = ["devices/+/commands/#"]
subscribe = ["devices/+/telemetry/#"]
{extra}
"#
    )
}

impl Gateway {
    pub fn start() -> Gateway {
        Gateway::start_with("")
    }

    /// Start with extra TOML appended to the test configuration.
    pub fn start_with(extra: &str) -> Gateway {
        Gateway::start_full(extra, "")
    }

    /// Start with extra TOML appended, and extra keys in the [limits] table.
    pub fn start_full(extra: &str, limits: &str) -> Gateway {
        Gateway::start_all(extra, limits, "")
    }

    /// Start with extra TOML appended, extra [limits] keys and extra [rate_limits] keys.
    pub fn start_all(extra: &str, limits: &str, rates: &str) -> Gateway {
        Gateway::start_limited(None, extra, limits, rates)
    }

    /// Like `start_all`, run under `prlimit --nofile=N:N` when `nofile` is given.
    pub fn start_limited(nofile: Option<u64>, extra: &str, limits: &str, rates: &str) -> Gateway {
        Gateway::start_on(None, nofile, extra, limits, rates)
    }

    /// Start on a copy of `seed`: its files are copied into the gateway's directory
    /// (`data/…` into the data dir, the audit key beside it) before the first start,
    /// with owner-only modes as the gateway writes them.
    pub fn start_seeded(seed: &Path) -> Gateway {
        Gateway::start_on(Some(seed), None, "", "", "")
    }

    fn start_on(
        seed: Option<&Path>,
        nofile: Option<u64>,
        extra: &str,
        limits: &str,
        rates: &str,
    ) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(seed) = seed {
            copy_tree(seed, dir.path());
        }
        // A second CA, trusted only by the "other" device group.
        let other_cfg = dir.path().join("other.toml");
        std::fs::write(
            &other_cfg,
            format!("data_dir = \"{}/other\"\n", dir.path().display()),
        )
        .unwrap();
        run_ok(&["pki", "init", "--config", other_cfg.to_str().unwrap()]);
        let config = dir.path().join("portcullis.toml");
        std::fs::write(&config, config_text(dir.path(), extra, limits, rates)).unwrap();
        let mut gw = Gateway {
            dir,
            config,
            child: None,
            device_tls: "0.0.0.0:0".parse().unwrap(),
            device_plain: "0.0.0.0:0".parse().unwrap(),
            service_tls: "0.0.0.0:0".parse().unwrap(),
            service_plain: "0.0.0.0:0".parse().unwrap(),
            observability: "0.0.0.0:0".parse().unwrap(),
            coap_dtls: "0.0.0.0:0".parse().unwrap(),
            coap_plain: "0.0.0.0:0".parse().unwrap(),
            banner: Vec::new(),
            stdout_rest: None,
            extra: extra.to_string(),
            nofile,
        };
        gw.spawn();
        gw
    }

    fn spawn(&mut self) {
        // Appended to across restarts: what the gateway logged, as a log file gets it.
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .expect("stderr log");
        let mut command = match self.nofile {
            None => Command::new(BIN),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.args([format!("--nofile={n}:{n}").as_str(), "--", BIN]);
                c
            }
        };
        let mut child = command
            .args(["serve", "--config", self.config.to_str().unwrap()])
            .current_dir(self.dir.path())
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn portcullis");
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
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("gateway did not start; stdout so far: {banner:?}"));
            banner.push(line.clone());
            if line.contains("development CA:") {
                break;
            }
        }
        let addr = |label: &str| -> SocketAddr {
            banner
                .iter()
                .find(|l| l.contains(label))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {label} in {banner:?}"))
        };
        // Upstream mode opens no service listener.
        let upstream = banner.iter().any(|l| l.contains("serving (upstream"));
        let service = |label: &str| -> SocketAddr {
            if upstream {
                "0.0.0.0:0".parse().unwrap()
            } else {
                addr(label)
            }
        };
        self.device_tls = addr("device listener (MQTT over TLS):");
        self.device_plain = addr("device listener (plain MQTT):");
        self.service_tls = service("service listener (MQTT over TLS):");
        self.service_plain = service("service listener (plain MQTT):");
        self.observability = addr("observability");
        self.coap_dtls = addr("device listener (CoAP over DTLS, UDP):");
        self.coap_plain = addr("device listener (plain CoAP, UDP, loopback):");
        self.banner = banner;
        self.stdout_rest = Some(rx);
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, wait for exit; returns the status and the rest of stdout.
    pub fn terminate(&mut self) -> (ExitStatus, Vec<String>) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gateway did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rest = self
            .stdout_rest
            .take()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default();
        (status, rest)
    }

    /// SIGKILL: no drain, nothing flushed, as a power cut would leave it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
        self.stdout_rest = None;
    }

    /// Stop (SIGTERM) and start again on the same data dir.
    pub fn restart(&mut self) {
        let (status, _) = self.terminate();
        assert!(status.success(), "exit status {status:?}");
        self.spawn();
    }

    /// Start again after `terminate`.
    pub fn restart_after_stop(&mut self) {
        self.spawn();
    }

    /// What the gateway wrote to stderr (its log), across restarts.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn ca(&self) -> PathBuf {
        self.data().join("pki/ca.pem")
    }

    /// Run the CLI against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .args(["--config", self.config.to_str().unwrap()])
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cli");
        {
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Issue a client certificate from the gateway's development CA.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        self.cli_ok(&["pki", "issue", name]);
        let dir = self.data().join("pki/clients");
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        )
    }

    /// Issue a certificate from the second CA (trusted by device group "other" only).
    pub fn issue_other(&self, name: &str) -> (PathBuf, PathBuf) {
        let cfg = self.dir.path().join("other.toml");
        run_ok(&["pki", "issue", name, "--config", cfg.to_str().unwrap()]);
        let dir = self.dir.path().join("other/pki/clients");
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        )
    }

    pub fn add_device_cert(&self, id: &str) -> (PathBuf, PathBuf) {
        let paths = self.issue(id);
        self.cli_ok(&["device", "add", id, "--cert-any"]);
        paths
    }

    pub fn add_service_cert(&self, id: &str) -> (PathBuf, PathBuf) {
        let paths = self.issue(id);
        self.cli_ok(&["service", "add", id, "--cert-any"]);
        paths
    }

    /// Register a device with a generated pre-shared key: the key, as printed once.
    pub fn add_device_psk(&self, id: &str) -> String {
        let out = self.cli_ok(&["device", "add", id, "--psk-generate"]);
        out.lines()
            .find_map(|l| l.strip_prefix("psk: "))
            .unwrap_or_else(|| panic!("no psk line in {out:?}"))
            .trim()
            .to_string()
    }

    pub fn add_device_secret(&self, id: &str, secret: &str) {
        let out = self.cli_stdin(&["device", "add", id, "--secret-stdin"], Some(secret));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// mosquitto TLS arguments for a client with this identity's certificate.
    pub fn tls_args(&self, name: &str) -> Vec<String> {
        let dir = self.data().join("pki/clients");
        self.cert_args(
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}.key")),
        )
    }

    /// mosquitto TLS arguments: the development CA, this certificate and key.
    fn cert_args(&self, cert: &Path, key: &Path) -> Vec<String> {
        vec![
            "--cafile".into(),
            self.ca().display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
    }

    /// mosquitto arguments for client `id` on `listener`: `-h 127.0.0.1 -p PORT -i ID`,
    /// the id's own TLS material (`tls_args`) on the TLS listeners, then `extra`.
    pub fn client(&self, listener: SocketAddr, id: &str, extra: &[&str]) -> Vec<String> {
        let tls = if listener == self.device_tls || listener == self.service_tls {
            self.tls_args(id)
        } else {
            Vec::new()
        };
        client_args(listener, id, tls, extra)
    }

    /// Like `client` on a TLS listener, but presenting this certificate and key (with
    /// the development CA as `--cafile`) instead of the id's own.
    pub fn client_cert(
        &self,
        listener: SocketAddr,
        id: &str,
        cert: &Path,
        key: &Path,
        extra: &[&str],
    ) -> Vec<String> {
        client_args(listener, id, self.cert_args(cert, key), extra)
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.observability, path)
    }

    pub fn metrics(&self) -> String {
        self.http_get("/metrics").1
    }

    /// The value of a metric line (exact name with labels), 0 if absent.
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    pub fn refusals(&self, stage: &str, reason: &str) -> u64 {
        self.metric(&format!(
            "portcullis_refusals_total{{stage=\"{stage}\",reason=\"{reason}\"}} "
        ))
    }

    pub fn audit(&self) -> String {
        std::fs::read_to_string(self.data().join("audit.log")).unwrap_or_default()
    }

    /// Wait until an audit line contains every needle.
    pub fn wait_audit(&self, needles: &[&str]) -> String {
        wait_for(Duration::from_secs(15), || {
            self.audit()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no audit line with {needles:?} in:\n{}", self.audit()))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `-h 127.0.0.1 -p PORT -i ID`, then `tls`, then `extra`.
fn client_args(listener: SocketAddr, id: &str, tls: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        s("-h"),
        s("127.0.0.1"),
        s("-p"),
        listener.port().to_string(),
        s("-i"),
        s(id),
    ];
    a.extend(tls);
    a.extend(extra.iter().map(|x| s(x)));
    a
}

pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_raw(addr, path, "");
    (status, body)
}

/// One HTTP/1.0 request, with an `Authorization` header and a JSON body if given:
/// status, head, body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    if let Some(a) = authorization {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    read_response(s)
}

/// Everything until the server closes: status (0 if none), head, body.
pub fn read_response(mut s: impl Read) -> (u16, String, String) {
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// GET with extra header lines (each ending in `\r\n`): status, head, body.
pub fn http_get_raw(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n").unwrap();
    read_response(s)
}

/// Run a mosquitto client to completion with a time limit (killed past it).
pub fn mosquitto(bin: &str, args: &[String], timeout: Duration) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (install mosquitto-clients)"));
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Copy the files under `from` into `to`, directories 0700 and files 0600.
pub fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)
        .unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `mosquitto_sub` running in the background, its stdout read line by line.
pub struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sub {
    pub fn start(args: &[String]) -> Sub {
        // Line-buffered, so debug lines (-d) arrive as they happen.
        let mut cmd = Command::new("stdbuf");
        cmd.arg("-oL").arg("mosquitto_sub").args(args);
        Sub::spawn(cmd, "mosquitto_sub (install mosquitto-clients)")
    }

    /// Any client printing what it receives line by line (stdin stays open until the
    /// `Sub` is dropped).
    pub fn spawn(mut cmd: Command, what: &str) -> Sub {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Sub { child, lines: rx }
    }

    /// Wait for a line containing `needle`.
    pub fn expect(&self, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => return Err(seen),
            }
        }
    }

    /// Lines received within `window`.
    pub fn drain(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(line);
        }
        out
    }

    /// End the client abruptly (no DISCONNECT), like a device losing power.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn s(v: &str) -> String {
    v.to_string()
}
