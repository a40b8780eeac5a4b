//! `portcullis-sim serial-device`: one simulated device on the device end of a bus (a
//! pty socat made, or a tty already set raw), as firmware would run: telemetry DATA
//! frames at a rate, each sent again if unanswered, commands acknowledged (one sent
//! again is recognised and not run twice), and what the gateway says printed line by
//! line.
//!
//! Its "flash" is a state file: the up counter's bound, written before any counter
//! above the old bound goes on the wire, and the last command's counter, written
//! before the command is acknowledged. A second run therefore continues above
//! everything the gateway has seen, without a RESYNC, and a recorded command replayed
//! to it is not run again. The key is read from a file, never from the command line.

use super::{Heard, SerialDevice};
use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Counters reserved per write of the state file.
const RESERVE: u64 = 100;
/// How long a frame waits for its ACK or NAK before it is sent again.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Times a frame is sent again before it is given up.
const RESENDS: u32 = 3;

/// What `serial-device` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub port: PathBuf,
    pub id: String,
    pub key_file: PathBuf,
    /// Telemetry frames per second.
    pub rate: f64,
    /// Stop after this many frames acknowledged; none: run until stopped.
    pub count: Option<u64>,
    /// The topic suffix of telemetry (`devices/{id}/{suffix}`).
    pub suffix: String,
    /// The state file ("flash"); none: counters start at 1 and are forgotten.
    pub state: Option<PathBuf>,
}

/// A frame key from a file: 64 hex digits, as `portcullis device add ID
/// --serial-key-generate` prints them (its `serial key: ` prefix may be kept).
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key file {}", path.display()))?;
    let line = text.trim();
    let hex_digits = line.strip_prefix("serial key:").unwrap_or(line).trim();
    if hex_digits.len() != 64 {
        bail!(
            "{}: a serial key is 64 hex digits on one line (as `portcullis device add ID \
             --serial-key-generate` prints it), not {} characters",
            path.display(),
            hex_digits.chars().count()
        );
    }
    hex::decode(hex_digits).with_context(|| {
        format!(
            "{}: a serial key is 64 hex digits (0-9, a-f), and this is not hex",
            path.display()
        )
    })
}

/// What the device keeps in flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flash {
    /// Every up counter up to it may have been used.
    pub bound: u64,
    /// The last command's counter.
    #[serde(default)]
    pub down: u64,
}

impl Flash {
    /// The state in `path`, or a new one written there if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Flash> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a serial-device state file (bound = N, down = N): {e}",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let flash = Flash::default();
                flash.store(path)?;
                Ok(flash)
            }
            Err(e) => Err(e).with_context(|| format!("reading the state file {}", path.display())),
        }
    }

    /// Written whole and synced, then renamed over the old file: a crash leaves the
    /// old state or the new, never half of one.
    pub fn store(&self, path: &Path) -> Result<()> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".new");
        let new = path.with_file_name(name);
        let text = format!("bound = {}\ndown = {}\n", self.bound, self.down);
        let written = File::create(&new)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&new, path));
        written.with_context(|| format!("writing the state file {}", path.display()))
    }
}

/// A frame waiting for its answer.
struct Waiting {
    counter: u64,
    bytes: Vec<u8>,
    at: Instant,
    resent: u32,
}

/// The device and where its flash lives.
struct Firmware {
    device: SerialDevice,
    state: Option<PathBuf>,
    flash: Flash,
}

impl Firmware {
    /// Persist a new up bound (before the frame that needs it is written to the
    /// port), or with `command` the last command's counter (before it is
    /// acknowledged): one write per reserved range and per command, not per frame.
    fn keep(&mut self, command: bool) -> Result<()> {
        let now = Flash {
            bound: self.device.flash_bound,
            down: self.device.down_floor(),
        };
        if now.bound != self.flash.bound || (command && now.down != self.flash.down) {
            if let Some(path) = &self.state {
                now.store(path)?;
            }
            self.flash = now;
        }
        Ok(())
    }
}

/// Run one device until `count` frames are acknowledged (or forever); what it hears is
/// written to `out`.
pub fn run(o: &Options, out: &mut dyn Write) -> Result<()> {
    if !(o.rate.is_finite() && o.rate > 0.0 && o.rate <= 10_000.0) {
        bail!(
            "--rate must be more than 0 and at most 10000 frames a second (got {})",
            o.rate
        );
    }
    let key = read_key(&o.key_file)?;
    // An id or a suffix the format refuses, refused here rather than in a frame.
    let probe = portcullis_serial_frame::Outgoing {
        direction: portcullis_serial_frame::Direction::Up,
        id: &o.id,
        counter: 1,
        body: portcullis_serial_frame::Body::Data {
            suffix: &o.suffix,
            payload: b"{}",
        },
    };
    let mut scratch = vec![0u8; portcullis_serial_frame::MAX_WIRE_LEN];
    let signer = portcullis_serial_frame::Key::new(&key).expect("32 bytes");
    if let Err(e) = portcullis_serial_frame::encode(&signer, &probe, &mut scratch) {
        bail!(
            "--id {:?} / --suffix {:?}: {e} (ids are 1-64 of [A-Za-z0-9._-]; a suffix is \
             topic levels such as telemetry/temp)",
            o.id,
            o.suffix
        );
    }
    let flash = match &o.state {
        Some(path) => Flash::load_or_create(path)?,
        None => Flash::default(),
    };
    let mut port = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&o.port)
        .with_context(|| {
            format!(
                "opening the port {} (for a pty pair: socat -d -d pty,raw,echo=0,link=GW \
                 pty,raw,echo=0,link={} must be running)",
                o.port.display(),
                o.port.display()
            )
        })?;
    let reader = port
        .try_clone()
        .with_context(|| format!("{}: cannot read and write it", o.port.display()))?;
    let heard = spawn_reader(reader);
    let device = SerialDevice::new(&o.id, &key, flash.bound, RESERVE).with_down_floor(flash.down);
    let mut fw = Firmware {
        device,
        state: o.state.clone(),
        flash,
    };
    let say = |out: &mut dyn Write, line: String| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say(
        out,
        format!(
            "{} on {}: up counter from {}{}",
            o.id,
            o.port.display(),
            fw.flash.bound + 1,
            match &o.state {
                Some(p) => format!(" (state {})", p.display()),
                None => " (no --state: counters are not kept)".into(),
            }
        ),
    );
    let mut write = |bytes: &[u8]| -> Result<()> {
        port.write_all(bytes)
            .and_then(|()| port.flush())
            .with_context(|| format!("writing to {}", o.port.display()))
    };
    let period = Duration::from_secs_f64(1.0 / o.rate);
    let mut next = Instant::now();
    let mut waiting: Option<Waiting> = None;
    let (mut seq, mut acknowledged) = (0u64, 0u64);
    loop {
        if o.count.is_some_and(|n| acknowledged >= n) {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(w) = waiting.as_mut()
            && now >= w.at + ANSWER_WAIT
        {
            if w.resent < RESENDS {
                w.resent += 1;
                w.at = now;
                say(out, format!("no answer to {}: sending it again", w.counter));
                write(&w.bytes)?;
            } else {
                say(out, format!("no answer to {}: given up", w.counter));
                waiting = None;
            }
        }
        if waiting.is_none() && now >= next {
            seq += 1;
            let payload = telemetry(seq);
            let (counter, bytes) = fw.device.data(&o.suffix, payload.as_bytes());
            fw.keep(false)?;
            say(out, format!("DATA {counter} {} {payload}", o.suffix));
            write(&bytes)?;
            waiting = Some(Waiting {
                counter,
                bytes,
                at: now,
                resent: 0,
            });
            // Late (a frame given up, a slow answer): the next one is a period on.
            next = (next + period).max(now);
        }
        let wake = match &waiting {
            Some(w) => w.at + ANSWER_WAIT,
            None => next,
        };
        let chunk = match heard.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(chunk) => chunk,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!(
                    "{}: the port closed (the pty pair ended?)",
                    o.port.display()
                )
            }
        };
        for h in fw.device.read(&chunk) {
            let ours = |c: u64| waiting.as_ref().is_some_and(|w| w.counter == c);
            match h {
                Heard::Ack(c) => {
                    say(out, format!("ACK {c}"));
                    if ours(c) {
                        waiting = None;
                        acknowledged += 1;
                    }
                }
                Heard::Nak(c, reason) => {
                    say(out, format!("NAK {c} {reason}"));
                    if ours(c) {
                        waiting = None;
                    }
                }
                Heard::Resync(floor) => {
                    say(out, format!("RESYNC {floor}: continuing above it"));
                    // The frame waiting was refused as stale: it is not sent again.
                    if waiting.as_ref().is_some_and(|w| w.counter <= floor) {
                        waiting = None;
                    }
                }
                Heard::Command {
                    counter,
                    suffix,
                    payload,
                    again,
                } => {
                    let shown = String::from_utf8_lossy(&payload);
                    if again {
                        say(
                            out,
                            format!(
                                "command {counter} {suffix} {shown} again: already run, acknowledged again"
                            ),
                        );
                    } else {
                        say(
                            out,
                            format!("command {counter} {suffix} {shown}: acknowledged"),
                        );
                    }
                    let ack = fw.device.ack(counter);
                    // Its counter in flash before it is acknowledged (and so run).
                    fw.keep(true)?;
                    write(&ack)?;
                }
            }
        }
    }
}

/// A telemetry payload that changes: `{"seq":N,"temp":T}`.
fn telemetry(seq: u64) -> String {
    let tenths = 200 + (seq * 7 % 40) as i64 - 20;
    format!("{{\"seq\":{seq},\"temp\":{}.{}}}", tenths / 10, tenths % 10)
}

/// The port's bytes, as they come, on a channel (closed when the port is).
fn spawn_reader(mut port: File) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match port.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_64_hex_digits_with_or_without_the_gateway_s_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let hex = "00".repeat(31) + "1f";
        for text in [
            hex.clone(),
            format!("{hex}\n"),
            format!("serial key: {hex}\n"),
        ] {
            std::fs::write(&path, text).unwrap();
            let key = read_key(&path).unwrap();
            assert_eq!(key.len(), 32);
            assert_eq!(key[31], 0x1f);
        }
        for (text, want) in [
            ("abcd".to_string(), "64 hex digits on one line"),
            ("zz".repeat(32), "this is not hex"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", read_key(&path).unwrap_err());
            assert!(err.contains(want) && err.contains("/k"), "{err}");
        }
        let err = format!("{:#}", read_key(&dir.path().join("none")).unwrap_err());
        assert!(
            err.contains("reading the key file") && err.contains("none"),
            "{err}"
        );
    }

    #[test]
    fn the_state_file_is_created_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flash");
        assert_eq!(Flash::load_or_create(&path).unwrap(), Flash::default());
        assert!(path.exists());
        let kept = Flash {
            bound: 300,
            down: 4,
        };
        kept.store(&path).unwrap();
        assert_eq!(Flash::load_or_create(&path).unwrap(), kept);
        std::fs::write(&path, "bound = -1\n").unwrap();
        let err = format!("{:#}", Flash::load_or_create(&path).unwrap_err());
        assert!(err.contains("not a serial-device state file"), "{err}");
    }

    #[test]
    fn a_device_resumed_from_flash_continues_above_its_bound_and_runs_no_command_twice() {
        let key = [5u8; 32];
        let mut d = SerialDevice::new("pump-1", &key, 0, RESERVE);
        let (first, _) = d.data("telemetry", b"1");
        assert_eq!((first, d.flash_bound), (1, RESERVE));
        // Rebooted with what was in flash.
        let mut d = SerialDevice::new("pump-1", &key, d.flash_bound, RESERVE).with_down_floor(7);
        let (next, _) = d.data("telemetry", b"2");
        assert_eq!(next, RESERVE + 1);
        // The gateway's command 7, sent again after the reboot: acknowledged, not run.
        let gateway = super::super::frame_with(
            &portcullis_serial_frame::Key::new(&key).unwrap(),
            "pump-1",
            portcullis_serial_frame::Direction::Down,
            7,
            portcullis_serial_frame::Body::Data {
                suffix: "commands/open",
                payload: b"1",
            },
        );
        let heard = d.read(&gateway);
        assert!(
            matches!(
                heard.as_slice(),
                [Heard::Command {
                    counter: 7,
                    again: true,
                    ..
                }]
            ),
            "{heard:?}"
        );
        assert_eq!(d.down_floor(), 7);
    }

    #[test]
    fn telemetry_changes_and_is_json() {
        let a: serde_json::Value = serde_json::from_str(&telemetry(1)).unwrap();
        let b: serde_json::Value = serde_json::from_str(&telemetry(2)).unwrap();
        assert_ne!(a, b);
        assert_eq!(b["seq"], 2);
    }
}
