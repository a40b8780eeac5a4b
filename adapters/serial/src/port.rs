//! One configured serial port, owned by the gateway alone: opened with the line
//! settings its `[[serial.ports]]` entry gives, exclusively (TIOCEXCL and an exclusive
//! flock on Unix), so that no other program reads the frames meant for the gateway or
//! writes into its bus, and with no flow control. Nothing is enumerated: the only path
//! this module ever opens is the one it was handed.
//!
//! The port is read and written on the runtime, not on threads of its own: its
//! descriptor is non-blocking and registered with the runtime's poller, so a frame
//! that arrives wakes only the task that serves the bus, and an answer is written by
//! that task as soon as it is made. (With a reader and a writer thread, every frame
//! on a paced line woke both and crossed two channels, which cost more than the
//! frame's own work.) When the port vanishes (an adapter unplugged, the far side of a
//! pty gone), it is let go, reported, and the same path is opened again with doubling
//! back-off.

use portcullis_config::{Parity, Serial, SerialPort};
use serialport::{DataBits, FlowControl, StopBits, TTYPort};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Most bytes taken from the port in one read.
const READ_CHUNK: usize = 4096;
/// Most bytes written to the port and not yet taken by it (the far side reads slower
/// than they come); a write beyond this is refused until the port has taken some.
pub const MAX_UNSENT: usize = 64 * 1024;

/// A port's line settings, from its `[[serial.ports]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSettings {
    pub path: PathBuf,
    pub baud: u32,
    /// 5 to 8.
    pub data_bits: u8,
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
}

impl From<&SerialPort> for PortSettings {
    fn from(port: &SerialPort) -> Self {
        PortSettings {
            path: port.path.clone(),
            baud: port.baud,
            data_bits: port.data_bits,
            parity: port.parity,
            stop_bits: port.stop_bits,
        }
    }
}

/// Waits between attempts to reopen a port: `first` after it vanished, doubled after
/// every failed attempt up to `max`, back to `first` once it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl From<&Serial> for Backoff {
    fn from(serial: &Serial) -> Self {
        Backoff {
            first: *serial.reopen_backoff,
            max: *serial.reopen_backoff_max,
        }
    }
}

impl Backoff {
    fn after(&self, failed: Duration) -> Duration {
        failed.saturating_mul(2).min(self.max).max(self.first)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("serial port {}: the path is not valid UTF-8", path.display())]
    PathNotUtf8 { path: PathBuf },
    #[error("serial port {}: {setting} = {value} is not supported", path.display())]
    Unsupported {
        path: PathBuf,
        setting: &'static str,
        value: u8,
    },
    #[error("serial port {}: cannot open: {source}", path.display())]
    Open {
        path: PathBuf,
        source: serialport::Error,
    },
    #[error("serial port {}: cannot read back {setting} after setting it: {source}", path.display())]
    ReadBack {
        path: PathBuf,
        setting: &'static str,
        source: serialport::Error,
    },
    #[error("serial port {}: the port did not keep {setting} = {wanted} (it has {got})", path.display())]
    NotApplied {
        path: PathBuf,
        setting: &'static str,
        wanted: String,
        got: String,
    },
    #[error("serial port {}: cannot be polled: {source}", path.display())]
    Poll { path: PathBuf, source: io::Error },
}

/// What happened on the port, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortEvent {
    /// The port is open with its settings; writes are taken from now on.
    Opened,
    /// Bytes read from the port, as they came (frames may be split or joined).
    Bytes(Vec<u8>),
    /// The port failed and was let go; bytes written and not yet taken were dropped.
    Vanished { error: String },
    /// An attempt to open the port failed; the next one is in `retry_in`.
    OpenFailed { error: String, retry_in: Duration },
}

/// Opens the port with every line setting, exclusively and without flow control, then
/// checks that the port kept the framing it was given (some drivers silently refuse a
/// setting). The descriptor is blocking, as serialport leaves it.
pub fn open(settings: &PortSettings) -> Result<TTYPort, PortError> {
    let path = &settings.path;
    let unsupported = |setting, value| PortError::Unsupported {
        path: path.clone(),
        setting,
        value,
    };
    let name = path
        .to_str()
        .ok_or_else(|| PortError::PathNotUtf8 { path: path.clone() })?;
    let data_bits = match settings.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        8 => DataBits::Eight,
        other => return Err(unsupported("data_bits", other)),
    };
    let stop_bits = match settings.stop_bits {
        1 => StopBits::One,
        2 => StopBits::Two,
        other => return Err(unsupported("stop_bits", other)),
    };
    let parity = match settings.parity {
        Parity::None => serialport::Parity::None,
        Parity::Even => serialport::Parity::Even,
        Parity::Odd => serialport::Parity::Odd,
    };
    // Exclusive access is serialport's default on Unix, kept by not touching it.
    let port = serialport::new(name, settings.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(FlowControl::None)
        .open_native()
        .map_err(|source| PortError::Open {
            path: path.clone(),
            source,
        })?;
    // Baud is not compared: a driver rounds it to what its clock can make, which the
    // far end tolerates. Framing it either keeps or silently ignores.
    use serialport::SerialPort as _;
    let bits = |b: DataBits| u8::from(b).to_string();
    check(path, "data_bits", port.data_bits(), data_bits, bits)?;
    check(path, "parity", port.parity(), parity, parity_word)?;
    let stops = |s: StopBits| u8::from(s).to_string();
    check(path, "stop_bits", port.stop_bits(), stop_bits, stops)?;
    check(
        path,
        "flow_control",
        port.flow_control(),
        FlowControl::None,
        |f| f.to_string().to_lowercase(),
    )?;
    Ok(port)
}

/// That the port reports `wanted` for `setting`, shown as the configuration writes it.
fn check<T: PartialEq + Copy>(
    path: &Path,
    setting: &'static str,
    got: serialport::Result<T>,
    wanted: T,
    show: impl Fn(T) -> String,
) -> Result<(), PortError> {
    let got = got.map_err(|source| PortError::ReadBack {
        path: path.to_owned(),
        setting,
        source,
    })?;
    if got == wanted {
        return Ok(());
    }
    Err(PortError::NotApplied {
        path: path.to_owned(),
        setting,
        wanted: show(wanted),
        got: show(got),
    })
}

fn parity_word(p: serialport::Parity) -> String {
    match p {
        serialport::Parity::None => "none",
        serialport::Parity::Even => "even",
        serialport::Parity::Odd => "odd",
    }
    .into()
}

/// An open port's descriptor, lent for reads and writes. Dropping it closes the port
/// the way serialport does (exclusive access given up, then the descriptor closed).
struct Tty(TTYPort);

impl AsRawFd for Tty {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for Tty {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is the TTYPort's own, open from the port's opening
        // until the TTYPort is dropped, and nothing else closes it: serialport closes
        // it only in Drop and `into_raw_fd`, and the TTYPort is owned by `self` and
        // never given out. The borrow lives no longer than `&self`, so it cannot
        // outlive the TTYPort, and the descriptor stays open for all of it.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

/// Opens the port for the runtime: non-blocking, registered with its poller.
fn open_async(settings: &PortSettings) -> Result<AsyncFd<Tty>, PortError> {
    let tty = Tty(open(settings)?);
    let poll = |source: io::Error| PortError::Poll {
        path: settings.path.clone(),
        source,
    };
    rustix::io::ioctl_fionbio(&tty, true).map_err(|e| poll(e.into()))?;
    let interest = Interest::READABLE | Interest::WRITABLE;
    // SAFETY: `tty.as_raw_fd()` is the TTYPort's descriptor, open until the TTYPort is
    // dropped (see `AsFd for Tty`). The AsyncFd owns the Tty, so the TTYPort is dropped
    // only with the AsyncFd, and the TTYPort's descriptor never changes.
    unsafe { AsyncFd::register_with_interest(tty, interest) }.map_err(|e| poll(e.into()))
}

enum State {
    /// Not opened yet, or waiting to open again: the next attempt at `at`, after
    /// `waited` since the last one (`None`: the first attempt after a loss).
    Closed {
        at: Instant,
        waited: Option<Duration>,
    },
    Open(AsyncFd<Tty>),
}

/// A configured port, opened, read, written and reopened by the task that owns it:
/// [`Port::event`] drives all of it, so that task must keep calling it.
pub struct Port {
    settings: PortSettings,
    backoff: Backoff,
    state: State,
    /// Bytes written and not yet taken by the port.
    unsent: Vec<u8>,
    /// Why a write found the port gone; reported by the next [`Port::event`].
    failed: Option<String>,
    buf: Box<[u8; READ_CHUNK]>,
}

impl Port {
    /// A port opened at the first [`Port::event`], and again after each time it
    /// vanishes or cannot be opened, with `backoff`.
    pub fn new(settings: PortSettings, backoff: Backoff) -> Port {
        Port {
            settings,
            backoff,
            state: State::Closed {
                at: Instant::now(),
                waited: None,
            },
            unsent: Vec::new(),
            failed: None,
            buf: Box::new([0; READ_CHUNK]),
        }
    }

    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Whether the port is open now.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Bytes written and not yet taken by the port.
    pub fn unsent(&self) -> usize {
        self.unsent.len()
    }

    /// The next thing that happens on the port. Bytes written and not yet taken are
    /// written as the port takes them while this waits. Cancel-safe: nothing is lost
    /// when the future is dropped before it is ready.
    pub async fn event(&mut self) -> PortEvent {
        loop {
            let fd = match &mut self.state {
                State::Closed { at, waited } => {
                    let (at, waited) = (*at, *waited);
                    tokio::time::sleep_until(at).await;
                    return self.try_open(waited);
                }
                State::Open(fd) => fd,
            };
            if let Some(error) = self.failed.take() {
                return self.vanished(error);
            }
            let interest = if self.unsent.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let mut ready = match fd.ready_mut(interest).await {
                Ok(ready) => ready,
                Err(e) => return self.vanished(format!("polling: {e}")),
            };
            let readiness = ready.ready();
            if readiness.is_writable() && !self.unsent.is_empty() {
                match rustix::io::write(ready.get_inner(), &self.unsent) {
                    Ok(0) => return self.vanished("writing: the port took no bytes".into()),
                    Ok(n) => {
                        self.unsent.drain(..n);
                    }
                    Err(e) if e == rustix::io::Errno::AGAIN => {
                        ready.clear_ready_matching(tokio::io::Ready::WRITABLE)
                    }
                    Err(e) if e == rustix::io::Errno::INTR => {}
                    Err(e) => return self.vanished(format!("writing: {}", io::Error::from(e))),
                }
            }
            if readiness.is_readable() || readiness.is_read_closed() || readiness.is_error() {
                match rustix::io::read(ready.get_inner(), &mut self.buf[..]) {
                    Ok(0) => return self.vanished("reading: end of file".into()),
                    Ok(n) => return PortEvent::Bytes(self.buf[..n].to_vec()),
                    // Hung up with nothing left to read: the readiness would stay set
                    // and the loop spin, so the port is let go.
                    Err(e) if e == rustix::io::Errno::AGAIN && readiness.is_read_closed() => {
                        return self.vanished("reading: the far end hung up".into());
                    }
                    Err(e) if e == rustix::io::Errno::AGAIN => {
                        ready.clear_ready_matching(tokio::io::Ready::READABLE)
                    }
                    Err(e) if e == rustix::io::Errno::INTR => {}
                    Err(e) => return self.vanished(format!("reading: {}", io::Error::from(e))),
                }
            }
        }
    }

    /// Writes `bytes`, whole or not at all: what the port does not take at once goes
    /// out as it takes it, while [`Port::event`] is awaited. False when the port is not
    /// open (before `Opened`, after `Vanished`), when more than [`MAX_UNSENT`] would
    /// be waiting, or when the port failed (reported by the next event).
    pub fn write(&mut self, bytes: &[u8]) -> bool {
        let State::Open(fd) = &self.state else {
            return false;
        };
        if self.failed.is_some() {
            return false;
        }
        if bytes.is_empty() {
            return true;
        }
        if !self.unsent.is_empty() {
            if self.unsent.len() + bytes.len() > MAX_UNSENT {
                return false;
            }
            self.unsent.extend_from_slice(bytes);
            return true;
        }
        if bytes.len() > MAX_UNSENT {
            return false;
        }
        let mut sent = 0;
        while sent < bytes.len() {
            match rustix::io::write(fd.get_ref(), &bytes[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) if e == rustix::io::Errno::AGAIN => break,
                Err(e) => {
                    self.failed = Some(format!("writing: {}", io::Error::from(e)));
                    return false;
                }
            }
        }
        self.unsent.extend_from_slice(&bytes[sent..]);
        true
    }

    /// Lets go of the port now.
    pub async fn close(self) {
        drop(self);
    }

    fn try_open(&mut self, waited: Option<Duration>) -> PortEvent {
        let path = self.settings.path.display().to_string();
        match open_async(&self.settings) {
            Ok(fd) => {
                tracing::info!(path, "serial port opened");
                self.state = State::Open(fd);
                PortEvent::Opened
            }
            Err(e) => {
                let retry_in = match waited {
                    None => self.backoff.first.min(self.backoff.max),
                    Some(d) => self.backoff.after(d),
                };
                let error = e.to_string();
                tracing::warn!(path, error, ?retry_in, "serial port did not open");
                self.state = State::Closed {
                    at: Instant::now() + retry_in,
                    waited: Some(retry_in),
                };
                PortEvent::OpenFailed { error, retry_in }
            }
        }
    }

    /// Lets go of the port after it failed; it is opened again `backoff.first` later.
    fn vanished(&mut self, error: String) -> PortEvent {
        let unsent = self.unsent.len();
        self.unsent.clear();
        self.failed = None;
        self.state = State::Closed {
            at: Instant::now() + self.backoff.first,
            waited: Some(self.backoff.first),
        };
        tracing::warn!(
            path = %self.settings.path.display(),
            error,
            unsent,
            "serial port vanished; reopening"
        );
        PortEvent::Vanished { error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serialport::SerialPort as _;
    use std::fs::{File, OpenOptions};
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    /// Long enough for a loaded CI machine; the tests never wait this long when they pass.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// A pair of pseudo-terminals joined by socat: `gw` for the gateway, `dev` for the
    /// device. Stopped with SIGTERM so that socat removes its links (a dangling link
    /// could name another test's pty once the number is reused).
    struct Socat {
        child: Option<Child>,
        gw: PathBuf,
        dev: PathBuf,
    }

    impl Socat {
        fn start(dir: &Path) -> Socat {
            let (gw, dev) = (dir.join("gw"), dir.join("dev"));
            let log = File::options()
                .create(true)
                .append(true)
                .open(dir.join("socat.log"))
                .expect("socat log");
            let end = |link: &Path| format!("pty,raw,echo=0,link={}", link.display());
            let mut child = Command::new("socat")
                .args(["-d", "-d", &end(&gw), &end(&dev)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("these tests need socat on the PATH (apt-get install socat): {e}")
                });
            let deadline = Instant::now() + PATIENCE;
            // `exists` follows the link: true once the pty behind it is there.
            while !(gw.exists() && dev.exists()) {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("socat exited ({status}) before making its ptys; see {dir:?}/socat.log");
                }
                assert!(
                    Instant::now() < deadline,
                    "socat made no ptys in {PATIENCE:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Socat {
                child: Some(child),
                gw,
                dev,
            }
        }

        /// SIGTERM, then wait for it to exit (it removes both links first).
        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let term = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                if !term.is_ok_and(|s| s.success()) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }

        fn device(&self) -> File {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.dev)
                .expect("device side of the pty pair")
        }
    }

    impl Drop for Socat {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn settings(path: &Path) -> PortSettings {
        PortSettings::from(&SerialPort {
            path: path.to_owned(),
            baud: 115_200,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            devices: vec!["pump-1".into()],
        })
    }

    const QUICK: Backoff = Backoff {
        first: Duration::from_millis(20),
        max: Duration::from_millis(160),
    };

    async fn next_event(port: &mut Port) -> PortEvent {
        match tokio::time::timeout(PATIENCE, port.event()).await {
            Ok(event) => event,
            Err(_) => panic!("no event from the port in {PATIENCE:?}"),
        }
    }

    async fn expect_opened(port: &mut Port) {
        let event = next_event(port).await;
        assert_eq!(event, PortEvent::Opened);
    }

    /// Collects `Bytes` until they make `want` (a read may split or join writes).
    async fn expect_bytes(port: &mut Port, want: &[u8]) {
        let mut got = Vec::new();
        while got.len() < want.len() {
            match next_event(port).await {
                PortEvent::Bytes(b) => got.extend_from_slice(&b),
                other => panic!("expected bytes, got {other:?}"),
            }
        }
        assert_eq!(got, want);
    }

    /// Reads `n` bytes from the device side on a thread of its own (a pty read has no
    /// timeout), waiting for them at most `PATIENCE`.
    fn device_reads(device: &File, n: usize) -> Vec<u8> {
        let mut device = device.try_clone().expect("clone of the device side");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            let _ = tx.send(device.read_exact(&mut got).map(|()| got));
        });
        match rx.recv_timeout(PATIENCE) {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => panic!("device side read failed: {e}"),
            Err(_) => panic!("device side read nothing in {PATIENCE:?}"),
        }
    }

    #[tokio::test]
    async fn bytes_written_by_the_device_reach_the_gateway_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let socat = Socat::start(dir.path());
        let mut port = Port::new(settings(&socat.gw), QUICK);
        expect_opened(&mut port).await;
        assert!(port.is_open());

        let mut device = socat.device();
        device.write_all(b"\x7epump-1 hello\x7e").unwrap();
        expect_bytes(&mut port, b"\x7epump-1 hello\x7e").await;

        assert!(port.write(b"downlink \x00\xff"));
        assert_eq!(device_reads(&device, 11), b"downlink \x00\xff");
        assert_eq!(port.unsent(), 0, "a short write is taken at once");
        port.close().await;
    }

    #[tokio::test]
    async fn line_settings_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let socat = Socat::start(dir.path());
        let eight_n_two = PortSettings {
            baud: 9600,
            stop_bits: 2,
            ..settings(&socat.gw)
        };
        let port = open(&eight_n_two).unwrap();
        assert_eq!(port.baud_rate().unwrap(), 9600);
        assert_eq!(port.data_bits().unwrap(), DataBits::Eight);
        assert_eq!(port.parity().unwrap(), serialport::Parity::None);
        assert_eq!(port.stop_bits().unwrap(), StopBits::Two);
        assert_eq!(port.flow_control().unwrap(), FlowControl::None);
        drop(port);
        // The framing as the kernel keeps it, read by another program (which shows the
        // speed, set as BOTHER with a number, as 0: the getter above read it instead).
        let stty = stty_of(&socat.gw);
        for flag in ["cs8", "-parenb", "cstopb", "-crtscts", "-ixon", "-ixoff"] {
            assert!(
                stty.split_whitespace().any(|w| w == flag),
                "no {flag} in {stty}"
            );
        }

        // A UART keeps 7E2; a pty keeps it on older kernels, while newer ones hold a
        // pty at cs8 -parenb. Then the port is refused, not run with other framing.
        let seven_e_two = PortSettings {
            data_bits: 7,
            parity: Parity::Even,
            ..eight_n_two
        };
        match open(&seven_e_two) {
            Ok(port) => {
                assert_eq!(port.data_bits().unwrap(), DataBits::Seven);
                assert_eq!(port.parity().unwrap(), serialport::Parity::Even);
                assert_eq!(port.stop_bits().unwrap(), StopBits::Two);
                drop(port);
                let stty = stty_of(&socat.gw);
                for flag in ["cs7", "parenb", "-parodd", "cstopb"] {
                    assert!(
                        stty.split_whitespace().any(|w| w == flag),
                        "no {flag} in {stty}"
                    );
                }
            }
            Err(e) => {
                eprintln!("7E2 on this kernel's pty: {e}");
                assert_eq!(
                    e.to_string(),
                    format!(
                        "serial port {}: the port did not keep data_bits = 7 (it has 8)",
                        socat.gw.display()
                    )
                );
            }
        }
    }

    /// `stty -a` of a port nobody holds.
    fn stty_of(path: &Path) -> String {
        let out = Command::new("stty")
            .arg("-F")
            .arg(path)
            .arg("-a")
            .output()
            .expect("stty");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "stty -F {path:?}: {text}");
        text
    }

    #[tokio::test]
    async fn a_vanished_port_is_reported_and_reopened_with_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut socat = Socat::start(dir.path());
        let gw = socat.gw.clone();
        let mut port = Port::new(settings(&gw), QUICK);
        expect_opened(&mut port).await;

        socat.stop();
        let PortEvent::Vanished { error } = next_event(&mut port).await else {
            panic!("expected Vanished");
        };
        eprintln!("a pty whose far side went away: {error}");
        assert!(!port.is_open());
        assert!(!port.write(b"lost"), "a closed port takes no writes");

        // The first reopen comes `first` after the loss; each failure doubles the wait.
        let mut waits = Vec::new();
        while waits.len() < 4 {
            match next_event(&mut port).await {
                PortEvent::OpenFailed { error, retry_in } => {
                    assert!(error.contains(&gw.display().to_string()), "{error}");
                    waits.push(retry_in.as_millis());
                }
                other => panic!("expected OpenFailed, got {other:?}"),
            }
        }
        assert_eq!(waits, [40, 80, 160, 160]);

        let socat = Socat::start(dir.path());
        loop {
            match next_event(&mut port).await {
                PortEvent::Opened => break,
                PortEvent::OpenFailed { retry_in, .. } => assert_eq!(retry_in, QUICK.max),
                other => panic!("expected Opened, got {other:?}"),
            }
        }
        let mut device = socat.device();
        device.write_all(b"back").unwrap();
        expect_bytes(&mut port, b"back").await;
        assert!(port.write(b"again"));
        assert_eq!(device_reads(&device, 5), b"again");
        port.close().await;
    }

    #[tokio::test]
    async fn a_path_that_does_not_exist_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ttyUSB9");
        let Err(e) = open(&settings(&missing)) else {
            panic!("opened a path that does not exist");
        };
        let message = e.to_string();
        assert_eq!(
            message,
            format!(
                "serial port {}: cannot open: No such file or directory",
                missing.display()
            )
        );

        let mut port = Port::new(settings(&missing), QUICK);
        assert_eq!(
            next_event(&mut port).await,
            PortEvent::OpenFailed {
                error: message,
                retry_in: QUICK.first
            }
        );
        port.close().await;
    }

    #[tokio::test]
    async fn closing_a_port_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let socat = Socat::start(dir.path());
        let mut port = Port::new(settings(&socat.gw), QUICK);
        expect_opened(&mut port).await;
        assert!(
            open(&settings(&socat.gw)).is_err(),
            "the port is the gateway's alone while open"
        );
        port.close().await;
        open(&settings(&socat.gw)).expect("the port is free again after close");
    }

    /// Drives the port until it has nothing left to write, failing on any event.
    async fn drain(port: &mut Port) {
        let deadline = Instant::now() + PATIENCE;
        while port.unsent() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} bytes never written",
                port.unsent()
            );
            tokio::select! {
                event = port.event() => panic!("unexpected {event:?}"),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }

    #[tokio::test]
    async fn a_write_the_port_cannot_take_at_once_goes_out_whole_as_the_device_reads() {
        let dir = tempfile::tempdir().unwrap();
        let socat = Socat::start(dir.path());
        let mut port = Port::new(settings(&socat.gw), QUICK);
        expect_opened(&mut port).await;

        // Far more than a pty holds, written while the device reads nothing.
        let big: Vec<u8> = (0..MAX_UNSENT).map(|i| (i % 251) as u8).collect();
        assert!(port.write(&big));
        let waiting = port.unsent();
        assert!(waiting > 0, "the pty took {MAX_UNSENT} bytes at once");
        // What waits is bounded: another as much is refused whole, not cut.
        assert!(!port.write(&big), "more than MAX_UNSENT waiting");
        assert_eq!(port.unsent(), waiting);

        // The rest goes out as the device reads, in order, with nothing lost.
        let device = socat.device();
        let reader = {
            let mut device = device.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut got = vec![0u8; MAX_UNSENT + 5];
                device.read_exact(&mut got).map(|()| got)
            })
        };
        drain(&mut port).await;
        assert!(port.write(b"after"));
        drain(&mut port).await;
        let got = tokio::task::spawn_blocking(move || reader.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&got[..MAX_UNSENT], &big[..]);
        assert_eq!(&got[MAX_UNSENT..], b"after");
        port.close().await;
    }
}
