//! The serial workload: `DEVICES` devices on one bus, a socat pty pair whose gateway
//! end the gateway's `[[serial.ports]]` names, each sending DATA frames (64 bytes of
//! JSON to `telemetry/bench`) with up to `WINDOW` of them unanswered, counting the
//! gateway's ACKs and NAKs as they come.
//!
//! A pty carries bytes as fast as it can whatever baud rate it is set to, so the line
//! is simulated here: in the `115200` and `921600` cases a frame is written only once
//! a UART at that rate (8N1: 10 bits a byte) would have sent the ones before it, and in
//! `unthrottled` frames go as fast as the pty takes them.
//!
//! The baseline, [`Target::PtyReader`](super::Target::PtyReader), runs the same paced
//! frames through a pair of its own to a thread that only counts the bytes, pinned
//! where the gateway runs: what the pty carries, beside what the gateway acknowledges.

use super::{Bench, PAYLOAD, Server, Sink, payload, process_cpu, sink_thread_on, thread_cpu};
use crate::serial::{Heard, PtyPair, SerialDevice};
use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::time::sleep;

/// Devices on the bench's bus (group `bench`).
pub(super) const DEVICES: usize = 4;
/// Frames a device sends before it waits for an answer; below the gateway's 16 a
/// device may have with the forwarder at once, beyond which it answers NAK busy.
const WINDOW: usize = 8;
const SUFFIX: &str = "telemetry/bench";
/// What the pty pair's links are called in the work dir.
const BUS: &str = "serial-bench";
/// The subscriber's filter: the devices' topics are `devices/{id}/telemetry/bench`.
const FILTER: &str = "devices/+/telemetry/#";
/// A frame unanswered for this long is given up (its window slot freed) and counted.
const GIVE_UP: Duration = Duration::from_secs(2);
/// How late a paced frame may go and still count as on time (a thread's sleep
/// overshoots by tens of microseconds); a line idle for longer starts afresh, so idle
/// time is never banked into a burst above the line rate.
const JITTER: Duration = Duration::from_micros(200);
/// Frames written in one system call when unthrottled.
const BATCH: usize = 32;
/// Waiting for the gateway to open its end of the bus.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Each device's counter range "in flash": large, the bench has no flash to wear.
const DEVICE_RESERVE: u64 = 1 << 20;

pub(super) fn device_id(n: usize) -> String {
    format!("serial-bench-{n}")
}

/// The bench's devices with their keys, counters kept from run to run (a restarted
/// gateway answers the first frame of each with RESYNC, as it would a device that
/// rebooted: that happens in the warm-up).
pub(super) fn devices(keys: &BTreeMap<String, [u8; 32]>) -> Vec<SerialDevice> {
    keys.iter()
        .map(|(id, key)| SerialDevice::new(id, key, 0, DEVICE_RESERVE))
        .collect()
}

/// A new 32-byte frame key.
pub(super) fn new_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    // The system's random source failing is not something a bench can go on from.
    getrandom::fill(&mut key).expect("the system's random source");
    key
}

/// The gateway's end of the bench's bus, as its configuration names it.
fn gateway_end(dir: &Path) -> PathBuf {
    dir.join(format!("{BUS}-gw"))
}

/// `config` with the bench's bus: a `[[serial.ports]]` entry naming the pty pair's
/// gateway end with the bench's devices on it, and the port's frame cap
/// (`[serial] max_frames_per_second`, 200 by default) raised to its maximum unless the
/// policy sets it, so that the cap is not what is measured. Between serial runs the
/// path does not exist; the gateway tries it again with back-off meanwhile.
pub(super) fn with_bus(config: &str, policy: &Path, dir: &Path) -> Result<String> {
    let mut table: toml::Table =
        toml::from_str(config).with_context(|| format!("{}: not valid TOML", policy.display()))?;
    let serial = table
        .entry("serial")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(serial) = serial else {
        bail!("{}: serial is not a table", policy.display());
    };
    if serial.contains_key("ports") {
        bail!(
            "{}: names serial.ports; the serial workload adds its own bus: remove them from \
             the policy, or leave the workload out",
            policy.display()
        );
    }
    serial
        .entry("max_frames_per_second")
        .or_insert(toml::Value::Integer(100_000));
    let mut port = toml::Table::new();
    port.insert("path".into(), gateway_end(dir).display().to_string().into());
    port.insert(
        "devices".into(),
        toml::Value::Array((1..=DEVICES).map(|n| device_id(n).into()).collect()),
    );
    serial.insert(
        "ports".into(),
        toml::Value::Array(vec![toml::Value::Table(port)]),
    );
    Ok(toml::to_string(&table)?)
}

/// A serial run's bus: started before the gateway opens it, stopped after the gateway.
pub(super) fn start_bus(dir: &Path) -> Result<PtyPair> {
    let pair = PtyPair::start(dir, BUS).context("the serial bench's bus (a socat pty pair)")?;
    if pair.gateway != gateway_end(dir) {
        bail!(
            "the pty pair's gateway end is {}, not {} as configured",
            pair.gateway.display(),
            gateway_end(dir).display()
        );
    }
    Ok(pair)
}

/// Bytes per second a UART carries at a case's baud rate (8N1: 10 bits a byte);
/// `None` for `unthrottled`.
fn line_bytes_per_s(case: &str) -> Result<Option<f64>> {
    if case == "unthrottled" {
        return Ok(None);
    }
    let baud: f64 = case
        .parse()
        .map_err(|_| anyhow!("serial case {case:?}: a baud rate or \"unthrottled\""))?;
    Ok(Some(baud / 10.0))
}

/// What the load's threads share: the devices and their unanswered frames.
struct Load {
    bus: Mutex<Bus>,
    /// Rung when answers free window slots.
    answered: Condvar,
    stop: AtomicBool,
}

struct Bus {
    devices: Vec<SerialDevice>,
    /// Per device: each unanswered frame's counter and when it was written.
    sent: Vec<BTreeMap<u64, Instant>>,
    frames_sent: u64,
    bytes_sent: u64,
    /// Bytes of one frame on the wire, its delimiters included.
    frame_bytes: u64,
    acked: u64,
    naks: u64,
    resyncs: u64,
    given_up: u64,
    latency: Histogram<u64>,
}

/// The counts of a run at one moment.
#[derive(Clone, Copy)]
struct Counts {
    at: Instant,
    frames_sent: u64,
    acked: u64,
    naks: u64,
    resyncs: u64,
    given_up: u64,
}

impl Load {
    fn new(devices: Vec<SerialDevice>) -> Result<Arc<Load>> {
        let n = devices.len();
        Ok(Arc::new(Load {
            bus: Mutex::new(Bus {
                devices,
                sent: vec![BTreeMap::new(); n],
                frames_sent: 0,
                bytes_sent: 0,
                frame_bytes: 0,
                acked: 0,
                naks: 0,
                resyncs: 0,
                given_up: 0,
                latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            }),
            answered: Condvar::new(),
            stop: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Bus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counts(&self) -> Counts {
        let b = self.lock();
        Counts {
            at: Instant::now(),
            frames_sent: b.frames_sent,
            acked: b.acked,
            naks: b.naks,
            resyncs: b.resyncs,
            given_up: b.given_up,
        }
    }

    /// Stop the writer; the devices back (a reader still running then reads for none).
    fn finish(&self, writer: std::thread::JoinHandle<()>) -> Vec<SerialDevice> {
        self.stop.store(true, Relaxed);
        self.answered.notify_all();
        let _ = writer.join();
        std::mem::take(&mut self.lock().devices)
    }
}

/// The devices' writer: frames round robin over the devices whose window has room
/// (`window`: `None` writes without waiting for answers), paced to `line` bytes per
/// second or as fast as the pty takes them.
fn write_frames(load: Arc<Load>, mut out: File, line: Option<f64>, window: Option<usize>) {
    let mut body = Vec::with_capacity(PAYLOAD);
    payload(&mut body, 0);
    let mut batch = Vec::with_capacity(BATCH * 160);
    let mut next = 0usize;
    // When the simulated line has sent the last frame written.
    let mut line_free = Instant::now();
    while !load.stop.load(Relaxed) {
        if line.is_some() {
            let now = Instant::now();
            if line_free > now {
                std::thread::sleep(line_free - now);
            }
        }
        batch.clear();
        let mut frames = 0u64;
        {
            let mut bus = load.lock();
            let n = bus.devices.len();
            if n == 0 {
                return;
            }
            while let Some(i) = (0..n)
                .map(|k| (next + k) % n)
                .find(|&i| window.is_none_or(|w| bus.sent[i].len() < w))
            {
                next = i + 1;
                let (counter, bytes) = bus.devices[i].data(SUFFIX, &body);
                bus.sent[i].insert(counter, Instant::now());
                bus.frame_bytes = bytes.len() as u64;
                batch.extend_from_slice(&bytes);
                frames += 1;
                if line.is_some() || frames as usize == BATCH {
                    break;
                }
            }
            if frames == 0 {
                // Every window full: wait for answers, giving up on frames never answered.
                let (mut bus, _) = load
                    .answered
                    .wait_timeout(bus, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let mut gone = 0;
                for sent in bus.sent.iter_mut() {
                    let before = sent.len();
                    sent.retain(|_, at| now.duration_since(*at) < GIVE_UP);
                    gone += (before - sent.len()) as u64;
                }
                bus.given_up += gone;
                continue;
            }
            bus.frames_sent += frames;
            bus.bytes_sent += batch.len() as u64;
        }
        if out.write_all(&batch).is_err() {
            return;
        }
        if let Some(rate) = line {
            // A UART sends the frame from when the line is free, or now if it was idle.
            let now = Instant::now();
            let start = match now.checked_sub(JITTER) {
                Some(early) => line_free.max(early),
                None => now,
            };
            line_free = start + Duration::from_secs_f64(batch.len() as f64 / rate);
        }
    }
}

/// The devices' receiver: what the gateway answered, each device reading the whole
/// bus as firmware does. Ends when the pty pair does.
fn read_answers(load: Arc<Load>, mut input: File) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        let mut bus = load.lock();
        let bus = &mut *bus;
        for (device, sent) in bus.devices.iter_mut().zip(bus.sent.iter_mut()) {
            for heard in device.read(&buf[..n]) {
                match heard {
                    Heard::Ack(counter) => {
                        if let Some(at) = sent.remove(&counter) {
                            bus.acked += 1;
                            let us = now.duration_since(at).as_micros() as u64;
                            bus.latency.saturating_record(us.max(1));
                        }
                    }
                    Heard::Nak(counter, _) => {
                        if sent.remove(&counter).is_some() {
                            bus.naks += 1;
                        }
                    }
                    // Frames below the floor are never answered: their slots are free.
                    Heard::Resync(floor) => {
                        sent.retain(|c, _| *c > floor);
                        bus.resyncs += 1;
                    }
                    Heard::Command { .. } => {}
                }
            }
        }
        load.answered.notify_all();
    }
}

/// The plain reader at the gateway's end: counts bytes, on the server's CPU when
/// pinned. Sends its thread id first; ends when the pty pair does.
fn count_bytes(
    mut input: File,
    carried: Arc<AtomicU64>,
    cpu: Option<usize>,
    tid: std::sync::mpsc::Sender<Result<u32>>,
) {
    let me = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok())
        .ok_or_else(|| anyhow!("no /proc/thread-self"));
    let me = me.and_then(|t| {
        if let Some(cpu) = cpu {
            let ok = std::process::Command::new("taskset")
                .args(["-p", "-c", &cpu.to_string(), &t.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("could not pin the pty reader to CPU {cpu} (taskset)");
            }
        }
        Ok(t)
    });
    let failed = me.is_err();
    let _ = tid.send(me);
    if failed {
        return;
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                carried.fetch_add(n as u64, Relaxed);
            }
        }
    }
}

/// The figures every serial run gives: frames per second (`frames`: acknowledged by
/// the gateway, or carried to the plain reader), against the case's line.
fn line_figures(
    f: &mut BTreeMap<String, f64>,
    line: Option<f64>,
    frame_bytes: u64,
    frames: f64,
    elapsed: f64,
) {
    f.insert("frames_per_s".into(), frames / elapsed);
    f.insert("wire_bytes_per_frame".into(), frame_bytes as f64);
    if let Some(rate) = line
        && frame_bytes > 0
    {
        let ceiling = rate / frame_bytes as f64;
        f.insert("line_rate_frames_per_s".into(), ceiling);
        f.insert("line_rate_pct".into(), 100.0 * frames / elapsed / ceiling);
    }
}

impl Bench {
    fn take_devices(&self) -> Vec<SerialDevice> {
        std::mem::take(
            &mut *self
                .serial_devices
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    fn put_devices(&self, devices: Vec<SerialDevice>) {
        *self
            .serial_devices
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = devices;
    }

    fn socat_cpu(bus: &PtyPair) -> f64 {
        bus.pid()
            .and_then(|pid| process_cpu(pid).ok())
            .unwrap_or(0.0)
    }

    /// The gateway serving the bench's devices on `bus`: frames acknowledged per
    /// second, NAKs, the case's line-rate ceiling, the gateway's CPU per frame, and the
    /// frame → ACK latency.
    pub(super) async fn serial_frames(
        &self,
        s: &Server,
        bus: &PtyPair,
        case: &str,
    ) -> Result<BTreeMap<String, f64>> {
        let line = line_bytes_per_s(case)?;
        let start = tokio::time::Instant::now();
        let sub = self.client(s, "bench-sub", false, true)?;
        let sink_state = Sink::new(None);
        sink_thread_on(sub, FILTER, 1, sink_state.clone(), start, false).await?;
        let deadline = Instant::now() + OPEN_WAIT;
        while s.metric("portcullis_serial_ports_open") != Some(1.0) {
            if Instant::now() > deadline {
                bail!("the gateway did not open the bench's bus in {OPEN_WAIT:?}");
            }
            sleep(Duration::from_millis(20)).await;
        }
        let end = bus.open_device().context("the device end of the bus")?;
        let input = end.try_clone()?;
        let load = Load::new(self.take_devices())?;
        let reader = load.clone();
        std::thread::spawn(move || read_answers(reader, input));
        let writer_load = load.clone();
        let writer = std::thread::spawn(move || write_frames(writer_load, end, line, Some(WINDOW)));
        let w = self.window();
        sleep(w.warm).await;
        let (cpu0, gateway0, socat0) = (s.cpu()?, process_cpu(s.pid())?, Self::socat_cpu(bus));
        let busy0 = s.metric("portcullis_serial_dropped_busy");
        let refused0 = frame_refusals(s);
        load.lock().latency.reset();
        let c0 = load.counts();
        sink_state.counting.store(true, Relaxed);
        sleep(w.secs).await;
        sink_state.counting.store(false, Relaxed);
        let c1 = load.counts();
        let elapsed = c1.at.duration_since(c0.at).as_secs_f64();
        let cpu = s.cpu()? - cpu0;
        let gateway = process_cpu(s.pid())? - gateway0;
        let socat = Self::socat_cpu(bus) - socat0;
        let (busy1, refused1) = (
            s.metric("portcullis_serial_dropped_busy"),
            frame_refusals(s),
        );
        let (h, frame_bytes) = {
            let b = load.lock();
            (b.latency.clone(), b.frame_bytes)
        };
        self.put_devices(load.finish(writer));
        let acked = (c1.acked - c0.acked) as f64;
        if acked == 0.0 {
            bail!(
                "no frame acknowledged ({} NAKs, {} unanswered, {} RESYNCs)",
                c1.naks - c0.naks,
                c1.given_up - c0.given_up,
                c1.resyncs - c0.resyncs
            );
        }
        let mut f = BTreeMap::new();
        line_figures(&mut f, line, frame_bytes, acked, elapsed);
        f.insert(
            "offered_frames_per_s".into(),
            (c1.frames_sent - c0.frames_sent) as f64 / elapsed,
        );
        f.insert("naks".into(), (c1.naks - c0.naks) as f64);
        f.insert("unanswered".into(), (c1.given_up - c0.given_up) as f64);
        f.insert("resyncs".into(), (c1.resyncs - c0.resyncs) as f64);
        f.insert(
            "delivered_per_s".into(),
            sink_state.received.load(Relaxed) as f64 / elapsed,
        );
        f.insert("p50_us".into(), h.value_at_quantile(0.5) as f64);
        f.insert("p99_us".into(), h.value_at_quantile(0.99) as f64);
        f.insert("server_cpu_us_per_frame".into(), cpu * 1e6 / acked);
        f.insert("server_cpu_pct".into(), 100.0 * cpu / elapsed);
        if s.upstream.is_some() {
            f.insert("gateway_cpu_us_per_frame".into(), gateway * 1e6 / acked);
        }
        f.insert("socat_cpu_pct".into(), 100.0 * socat / elapsed);
        if let (Some(a), Some(b)) = (busy0, busy1) {
            f.insert("gateway_dropped_busy".into(), b - a);
        }
        if let (Some(a), Some(b)) = (refused0, refused1) {
            f.insert("gateway_frames_refused".into(), b - a);
        }
        Ok(f)
    }

    /// The baseline: the same frames, paced the same, through `bus` to a thread that
    /// only counts bytes (no gateway): frames carried per second, and the reader's CPU.
    pub(super) async fn serial_pty(
        &self,
        bus: &PtyPair,
        case: &str,
    ) -> Result<BTreeMap<String, f64>> {
        let line = line_bytes_per_s(case)?;
        let gw = std::fs::OpenOptions::new()
            .read(true)
            .open(&bus.gateway)
            .context("the gateway end of the bus")?;
        let carried = Arc::new(AtomicU64::new(0));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let counter = carried.clone();
        let cpu = self.opts.pin.then_some(self.opts.server_cpu);
        std::thread::spawn(move || count_bytes(gw, counter, cpu, tid_tx));
        let tid = tid_rx
            .recv()
            .map_err(|_| anyhow!("the pty reader ended"))??;
        let end = bus.open_device().context("the device end of the bus")?;
        let load = Load::new(self.take_devices())?;
        let writer_load = load.clone();
        let writer = std::thread::spawn(move || write_frames(writer_load, end, line, None));
        let w = self.window();
        sleep(w.warm).await;
        let (reader0, socat0) = (thread_cpu(tid)?, Self::socat_cpu(bus));
        let (c0, b0) = (load.counts(), carried.load(Relaxed));
        sleep(w.secs).await;
        let (c1, b1) = (load.counts(), carried.load(Relaxed));
        let elapsed = c1.at.duration_since(c0.at).as_secs_f64();
        let reader = thread_cpu(tid)? - reader0;
        let socat = Self::socat_cpu(bus) - socat0;
        let frame_bytes = load.lock().frame_bytes;
        self.put_devices(load.finish(writer));
        if frame_bytes == 0 || b1 == b0 {
            bail!("the pty carried nothing");
        }
        let frames = (b1 - b0) as f64 / frame_bytes as f64;
        let mut f = BTreeMap::new();
        line_figures(&mut f, line, frame_bytes, frames, elapsed);
        f.insert(
            "offered_frames_per_s".into(),
            (c1.frames_sent - c0.frames_sent) as f64 / elapsed,
        );
        f.insert("server_cpu_us_per_frame".into(), reader * 1e6 / frames);
        f.insert("server_cpu_pct".into(), 100.0 * reader / elapsed);
        f.insert("socat_cpu_pct".into(), 100.0 * socat / elapsed);
        Ok(f)
    }
}

/// Frames the gateway refused unanswered (`portcullis_refusals_total`, reasons
/// `frame_*`): noise, a device not on the bus, a bad tag, a replay, the port's cap.
fn frame_refusals(s: &Server) -> Option<f64> {
    let text = s.metrics_text()?;
    Some(
        text.lines()
            .filter(|l| {
                l.starts_with("portcullis_refusals_total{") && l.contains("reason=\"frame_")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_baud_rate_is_a_tenth_of_it_in_bytes_per_second() {
        assert_eq!(line_bytes_per_s("115200").unwrap(), Some(11_520.0));
        assert_eq!(line_bytes_per_s("921600").unwrap(), Some(92_160.0));
        assert_eq!(line_bytes_per_s("unthrottled").unwrap(), None);
        assert!(line_bytes_per_s("fast").is_err());
    }

    #[test]
    fn the_bus_is_added_to_the_config_with_the_frame_cap_raised() {
        let dir = Path::new("/tmp/bench");
        let text = with_bus("[limits]\nmax_connections = 10\n", Path::new("p.toml"), dir).unwrap();
        let c = portcullis_config::Config::parse(&text, "bench").unwrap();
        assert_eq!(c.serial.max_frames_per_second, 100_000);
        assert_eq!(c.serial.ports.len(), 1);
        assert_eq!(c.serial.ports[0].path, gateway_end(dir));
        assert_eq!(c.serial.ports[0].devices.len(), DEVICES);
        // A cap the policy sets is kept; ports of its own are refused.
        let own = with_bus(
            "[serial]\nmax_frames_per_second = 50\n",
            Path::new("p"),
            dir,
        );
        let c = portcullis_config::Config::parse(&own.unwrap(), "bench").unwrap();
        assert_eq!(c.serial.max_frames_per_second, 50);
        let ports = "[[serial.ports]]\npath = \"/dev/ttyS0\"\ndevices = [\"a\"]\n";
        let err = with_bus(ports, Path::new("p.toml"), dir).unwrap_err();
        assert!(err.to_string().contains("serial.ports"), "{err}");
    }
}
