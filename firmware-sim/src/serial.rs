//! Simulated serial devices: what a device's firmware does with the
//! `portcullis-serial-frame` crate (docs/serial-protocol.md), on a pseudo-terminal
//! pair made by socat, for the simulator's scenarios, the benchmark and the tests.
//!
//! A [`SerialDevice`] is one device on a bus: it keeps its up counter the way firmware
//! does (a bound "in flash" reserved ahead, [`CounterReservation`]), checks the
//! gateway's frames (tag, direction, id, a fresh down counter), jumps when told to
//! RESYNC, and recognises a command sent again (the same counter as the last one it
//! took) so that it acknowledges it again without running it twice.
//!
//! `standalone` is one such device on a port, as `portcullis-sim serial-device` runs
//! it, its counters kept in a state file.

pub mod standalone;

use portcullis_serial_frame::{
    Body, CounterReservation, Deframed, Deframer, Direction, Key, MAX_ENCODED_LEN, MAX_WIRE_LEN,
    NakReason, Next, Outgoing, ReplayGuard, decode, encode,
};
use std::fs::{File, OpenOptions};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a device heard from the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The gateway took the device's frame `counter`.
    Ack(u64),
    /// The gateway refused it.
    Nak(u64, NakReason),
    /// The device's counter was behind: it now continues above `floor`.
    Resync(u64),
    /// A command. `again`: the same frame as the last command (its ACK was lost); it
    /// is acknowledged again, not run again.
    Command {
        counter: u64,
        suffix: String,
        payload: Vec<u8>,
        again: bool,
    },
}

/// One simulated device: its key, its counters and its receiver.
pub struct SerialDevice {
    pub id: String,
    key: Key,
    up: CounterReservation,
    /// The up counter's bound as persisted "in flash".
    pub flash_bound: u64,
    /// Flash writes so far (one per reserved range).
    pub flash_writes: u64,
    down: ReplayGuard,
    last_command: Option<u64>,
    deframer: Box<Deframer<MAX_ENCODED_LEN>>,
    /// Frames refused by the device: not for it, bad tag, stale counter.
    pub ignored: u64,
}

impl SerialDevice {
    /// A device with a 32-byte (or at least 16-byte) key, booting with `bound` in flash
    /// and reserving `reserve` counters per flash write.
    pub fn new(id: &str, key: &[u8], bound: u64, reserve: u64) -> SerialDevice {
        SerialDevice {
            id: id.to_string(),
            key: Key::new(key).expect("a serial key of at least 16 bytes"),
            up: CounterReservation::new(
                bound,
                NonZeroU64::new(reserve.max(1)).unwrap_or(NonZeroU64::MIN),
            ),
            flash_bound: bound,
            flash_writes: 0,
            down: ReplayGuard::new(0),
            last_command: None,
            deframer: Box::new(Deframer::new()),
            ignored: 0,
        }
    }

    /// Continue from the last down counter kept "in flash": a command at or below it
    /// is not run again (the one at it, sent again, is acknowledged again).
    pub fn with_down_floor(mut self, last: u64) -> SerialDevice {
        self.down = ReplayGuard::new(last);
        self.last_command = (last > 0).then_some(last);
        self
    }

    /// The last down counter accepted: what firmware keeps before it acts on a command.
    pub fn down_floor(&self) -> u64 {
        self.down.last()
    }

    /// The next up counter, reserving a range "in flash" first when it needs one.
    pub fn next_counter(&mut self) -> u64 {
        loop {
            match self.up.next_counter() {
                Next::Counter(c) => return c,
                Next::NeedsReserve(bound) => {
                    self.flash_bound = bound;
                    self.flash_writes += 1;
                    self.up.reserved(bound);
                }
                Next::Exhausted => panic!("device {}: up counter exhausted", self.id),
            }
        }
    }

    /// A frame up (a leading delimiter, then the frame and its own delimiter).
    pub fn frame(&self, counter: u64, body: Body<'_>) -> Vec<u8> {
        frame_with(&self.key, &self.id, Direction::Up, counter, body)
    }

    /// Telemetry: its counter and the bytes to write.
    pub fn data(&mut self, suffix: &str, payload: &[u8]) -> (u64, Vec<u8>) {
        let counter = self.next_counter();
        (counter, self.frame(counter, Body::Data { suffix, payload }))
    }

    /// Acknowledge the gateway's frame `counter`.
    pub fn ack(&mut self, counter: u64) -> Vec<u8> {
        let c = self.next_counter();
        self.frame(c, Body::Ack { counter })
    }

    /// Refuse the gateway's frame `counter`.
    pub fn nak(&mut self, counter: u64, reason: NakReason) -> Vec<u8> {
        let c = self.next_counter();
        self.frame(c, Body::Nak { counter, reason })
    }

    /// Read bytes from the bus: what the gateway said to this device.
    pub fn read(&mut self, bytes: &[u8]) -> Vec<Heard> {
        let mut heard = Vec::new();
        let (key, id) = (&self.key, self.id.as_str());
        let (down, up, last_command, ignored) = (
            &mut self.down,
            &mut self.up,
            &mut self.last_command,
            &mut self.ignored,
        );
        self.deframer.feed(bytes, |event| {
            let Deframed::Frame(encoded) = event else {
                *ignored += 1;
                return;
            };
            if encoded.is_empty() {
                return;
            }
            let Ok(unverified) = decode(encoded) else {
                *ignored += 1;
                return;
            };
            if unverified.id() != id || unverified.direction() != Direction::Down {
                return;
            }
            let Ok(frame) = unverified.verify(key) else {
                *ignored += 1;
                return;
            };
            let again = *last_command == Some(frame.counter());
            if !again && down.admit(&frame).is_err() {
                *ignored += 1;
                return;
            }
            match frame.body() {
                Body::Ack { counter } => heard.push(Heard::Ack(counter)),
                Body::Nak { counter, reason } => heard.push(Heard::Nak(counter, reason)),
                Body::Resync { floor } => {
                    up.jump_above(floor);
                    heard.push(Heard::Resync(floor));
                }
                Body::Data { suffix, payload } => {
                    *last_command = Some(frame.counter());
                    heard.push(Heard::Command {
                        counter: frame.counter(),
                        suffix: suffix.to_string(),
                        payload: payload.to_vec(),
                        again,
                    });
                }
            }
        });
        heard
    }
}

/// One frame, encoded under `key`, with a leading delimiter.
pub fn frame_with(
    key: &Key,
    id: &str,
    direction: Direction,
    counter: u64,
    body: Body<'_>,
) -> Vec<u8> {
    let mut wire = vec![0u8; MAX_WIRE_LEN + 1];
    let n = encode(
        key,
        &Outgoing {
            direction,
            id,
            counter,
            body,
        },
        &mut wire[1..],
    )
    .expect("a frame within the format's bounds");
    wire.truncate(n + 1);
    wire
}

/// A pair of pseudo-terminals joined by socat: `gateway` is the path the gateway's
/// `[[serial.ports]]` names, `device` the bus's other end. Stopped with SIGTERM so
/// that socat removes its links.
pub struct PtyPair {
    child: Option<Child>,
    pub gateway: PathBuf,
    pub device: PathBuf,
    dir: PathBuf,
}

impl PtyPair {
    /// Start socat, making `gw` and `dev` links in `dir`.
    pub fn start(dir: &Path, name: &str) -> std::io::Result<PtyPair> {
        let gateway = dir.join(format!("{name}-gw"));
        let device = dir.join(format!("{name}-dev"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}-socat.log")))?;
        let end = |link: &Path| format!("pty,raw,echo=0,link={}", link.display());
        let child = Command::new("socat")
            .args(["-d", "-d", &end(&gateway), &end(&device)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("socat is needed for serial buses (apt-get install socat): {e}"),
                )
            })?;
        let mut pair = PtyPair {
            child: Some(child),
            gateway,
            device,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pair.gateway.exists() && pair.device.exists()) {
            if let Some(child) = pair.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(std::io::Error::other(format!(
                    "socat exited ({status}) before making its ptys; see {}",
                    pair.dir.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("socat made no ptys in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(pair)
    }

    /// socat's process id, while it runs (its CPU time is the bus's cost).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The device's end, opened for reading and writing.
    pub fn open_device(&self) -> std::io::Result<File> {
        OpenOptions::new().read(true).write(true).open(&self.device)
    }

    /// SIGTERM, then wait for socat to exit (it removes both links first): the port
    /// vanishes under the gateway.
    pub fn stop(&mut self) {
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
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.stop();
    }
}
