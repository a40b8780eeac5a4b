//! Serial devices, end to end: the real gateway with `[[serial.ports]]` naming one end
//! of a socat pseudo-terminal pair, simulated devices (the `portcullis-serial-frame`
//! crate, as firmware would use it) on the other end, a frame made by the spec's
//! Python implementation, and mosquitto clients as the services.

mod common;

use common::*;
use portcullis_serial_frame::{Body, NakReason};
use portcullis_sim::serial::{Heard, PtyPair, SerialDevice};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(15);

/// The device's side of a bus: what it writes, and what it reads as it comes.
struct Line {
    file: File,
    rx: mpsc::Receiver<Vec<u8>>,
    /// Every byte the device wrote (a recording of the bus, for replays).
    pub written: Vec<u8>,
}

impl Line {
    fn open(pair: &PtyPair) -> Line {
        let file = pair.open_device().expect("the device end of the pty pair");
        let mut reader = file.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Line {
            file,
            rx,
            written: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.file.write_all(bytes).unwrap();
        self.file.flush().unwrap();
        self.written.extend_from_slice(bytes);
    }

    /// Bytes read within `window`, fed to each of `devices`: what each heard.
    fn hear(&self, devices: &mut [&mut SerialDevice], window: Duration) -> Vec<Vec<Heard>> {
        let mut heard = vec![Vec::new(); devices.len()];
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(chunk) = self.rx.recv_timeout(left) else {
                break;
            };
            for (i, d) in devices.iter_mut().enumerate() {
                heard[i].extend(d.read(&chunk));
            }
        }
        heard
    }

    /// Read until `device` hears something `want` accepts; everything it heard.
    fn expect(
        &self,
        device: &mut SerialDevice,
        what: &str,
        want: impl Fn(&Heard) -> bool,
    ) -> Vec<Heard> {
        let mut heard = Vec::new();
        let deadline = Instant::now() + T;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("{} did not hear {what}; heard {heard:?}", device.id));
            let Ok(chunk) = self.rx.recv_timeout(left) else {
                panic!("{} did not hear {what}; heard {heard:?}", device.id);
            };
            let new = device.read(&chunk);
            let done = new.iter().any(&want);
            heard.extend(new);
            if done {
                return heard;
            }
        }
    }
}

/// The gateway's configuration for `ports`: each a pty pair and the devices on it.
fn serial_config(ports: &[(&PtyPair, &[&str])], serial: &str) -> String {
    // The tests' quick defaults, unless `serial` sets the key itself.
    let mut text = String::from("[serial]\n");
    for (key, value) in [
        ("ack_timeout", "300ms"),
        ("resync_interval", "200ms"),
        ("reopen_backoff", "100ms"),
        ("reopen_backoff_max", "500ms"),
    ] {
        if !serial.contains(key) {
            text.push_str(&format!("{key} = \"{value}\"\n"));
        }
    }
    text.push_str(serial);
    text.push('\n');
    for (pair, devices) in ports {
        let list: Vec<String> = devices.iter().map(|d| format!("{d:?}")).collect();
        text.push_str(&format!(
            "[[serial.ports]]\npath = {:?}\ndevices = [{}]\n",
            pair.gateway.display().to_string(),
            list.join(", ")
        ));
    }
    text
}

/// Register a device with a generated serial key; the key, as printed once.
fn add_serial_device(gw: &Gateway, id: &str) -> Vec<u8> {
    let out = gw.cli_ok(&["device", "add", id, "--serial-key-generate"]);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("serial key: "))
        .unwrap_or_else(|| panic!("no serial key line in {out:?}"));
    hex::decode(key.trim()).expect("the key in hex")
}

/// A service subscribed to `filter`.
fn service_sub(gw: &Gateway, filter: &str) -> Sub {
    gw.add_service_cert("analytics");
    let sub = Sub::start(&gw.client(
        gw.service_tls,
        "analytics",
        &["-t", filter, "-v", "-q", "1"],
    ));
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));
    sub
}

/// One gateway with one bus, its port open.
fn one_bus(dir: &Path, devices: &[&str], serial: &str) -> (PtyPair, Gateway) {
    let pair = PtyPair::start(dir, "bus").expect("socat");
    let gw = Gateway::start_with(&serial_config(&[(&pair, devices)], serial));
    gw.wait_audit(&["\"port\"", "serial port open"]);
    (pair, gw)
}

fn is_ack(counter: u64) -> impl Fn(&Heard) -> bool {
    move |h| *h == Heard::Ack(counter)
}

#[test]
fn telemetry_from_a_serial_device_reaches_a_service_and_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path(), "bus").expect("socat");
    // A group that may publish telemetry only.
    let gw = Gateway::start_with(&format!(
        "{}\n[device_groups.pumps]\npublish = [\"devices/{{id}}/telemetry/#\"]\n",
        serial_config(&[(&pair, &["pump-1"])], "")
    ));
    gw.wait_audit(&["\"port\"", "serial port open"]);
    let out = gw.cli_ok(&[
        "device",
        "add",
        "pump-1",
        "--serial-key-generate",
        "--group",
        "pumps",
    ]);
    let key = hex::decode(
        out.lines()
            .find_map(|l| l.strip_prefix("serial key: "))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let mut line = Line::open(&pair);
    let mut pump = SerialDevice::new("pump-1", &key, 0, 100);
    let (counter, frame) = pump.data("telemetry/flow", b"12.5");
    line.write(&frame);
    line.expect(&mut pump, "the ACK of its frame", is_ack(counter));
    sub.expect("devices/pump-1/telemetry/flow 12.5", T)
        .expect("the service got the telemetry");
    let audit = gw.wait_audit(&["\"connect\"", "pump-1", "frame_key on"]);
    assert!(audit.contains("\"serial\""), "{audit}");
    assert_eq!(gw.metric("portcullis_serial_frames_in_total"), 1);
    assert!(
        gw.metrics()
            .contains("portcullis_sessions{protocol=\"serial\",kind=\"device\"} 1")
    );

    // A topic its ACL refuses: NAK "not authorized", nothing published.
    let (counter, frame) = pump.data("config/secret", b"x");
    line.write(&frame);
    line.expect(&mut pump, "a NAK", |h| {
        *h == Heard::Nak(counter, NakReason::NotAuthorized)
    });
    // Two in a row without waiting: both taken, in order.
    let (c1, f1) = pump.data("telemetry/flow", b"13.0");
    let (c2, f2) = pump.data("telemetry/flow", b"13.5");
    line.write(&[f1, f2].concat());
    line.expect(&mut pump, "both ACKs", is_ack(c2));
    assert!(c1 < c2);
    sub.expect("devices/pump-1/telemetry/flow 13.5", T).unwrap();
    let seen = sub.drain(Duration::from_millis(300));
    assert!(
        !seen.iter().any(|l| l.contains("config/secret")),
        "{seen:?}"
    );
}

#[test]
fn a_frame_made_by_the_spec_s_python_implementation_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, gw) = one_bus(dir.path(), &["thermo-7"], "");
    let key = add_serial_device(&gw, "thermo-7");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let mut line = Line::open(&pair);
    let python = std::env::var("PORTCULLIS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/serial/frame.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([
            "encode",
            &hex::encode(&key),
            "up",
            "DATA",
            "thermo-7",
            "5",
            &hex::encode("telemetry/temp"),
            &hex::encode("21.5"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    assert!(out.status.success(), "{}", text(&out));
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let wire = answer
        .trim()
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("frame.py said {answer}"));
    line.write(&hex::decode(wire).unwrap());
    // The device continues above the counter the Python side used.
    let mut device = SerialDevice::new("thermo-7", &key, 5, 100);
    line.expect(&mut device, "the ACK of counter 5", is_ack(5));
    sub.expect("devices/thermo-7/telemetry/temp 21.5", T)
        .expect("the service got the frame Python made");
}

#[test]
fn a_command_reaches_the_device_and_is_sent_again_until_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, gw) = one_bus(dir.path(), &["valve-1"], "");
    let key = add_serial_device(&gw, "valve-1");
    gw.add_service_cert("ops");
    let mut line = Line::open(&pair);
    let mut valve = SerialDevice::new("valve-1", &key, 0, 100);
    // The device is heard first (its session starts at its first frame).
    let (counter, frame) = valve.data("telemetry/state", b"closed");
    line.write(&frame);
    line.expect(&mut valve, "its ACK", is_ack(counter));

    let publish = gw.client(
        gw.service_tls,
        "ops",
        &[
            "-t",
            "devices/valve-1/commands/open",
            "-m",
            "50%",
            "-q",
            "1",
        ],
    );
    let out = mosquitto("mosquitto_pub", &publish, T);
    assert!(out.status.success(), "{}", text(&out));
    let heard = line.expect(&mut valve, "the command", |h| {
        matches!(h, Heard::Command { again: false, .. })
    });
    let Some(Heard::Command {
        counter,
        suffix,
        payload,
        ..
    }) = heard
        .into_iter()
        .find(|h| matches!(h, Heard::Command { .. }))
    else {
        unreachable!()
    };
    assert_eq!(suffix, "commands/open");
    assert_eq!(payload, b"50%");
    // Not acknowledged: the same frame comes again (ack_timeout 300 ms).
    line.expect(
        &mut valve,
        "the command sent again",
        |h| matches!(h, Heard::Command { counter: c, again: true, .. } if *c == counter),
    );
    let ack = valve.ack(counter);
    line.write(&ack);
    wait_for(T, || {
        (gw.metric("portcullis_messages_delivered_total") >= 1).then_some(())
    })
    .expect("the command counted as delivered");
    assert!(gw.metric("portcullis_serial_retransmissions_total") >= 1);
    // Acknowledged: it is not sent again.
    let later = line.hear(&mut [&mut valve], Duration::from_millis(900));
    assert!(
        !later[0].iter().any(|h| matches!(h, Heard::Command { .. })),
        "{later:?}"
    );
}

#[test]
fn three_devices_on_one_bus_each_hear_only_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ["node-a", "node-b", "node-c"];
    let (pair, gw) = one_bus(dir.path(), &ids, "");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let mut devices: Vec<SerialDevice> = ids
        .iter()
        .map(|id| SerialDevice::new(id, &add_serial_device(&gw, id), 0, 100))
        .collect();
    let mut line = Line::open(&pair);
    let mut frames = Vec::new();
    for d in devices.iter_mut() {
        let (_, f) = d.data("telemetry/t", d.id.clone().as_bytes());
        frames.extend(f);
    }
    line.write(&frames);
    let mut refs: Vec<&mut SerialDevice> = devices.iter_mut().collect();
    let heard = line.hear(&mut refs, Duration::from_secs(2));
    for (i, h) in heard.iter().enumerate() {
        assert_eq!(h, &vec![Heard::Ack(1)], "{}: {heard:?}", ids[i]);
    }
    for id in ids {
        sub.expect(&format!("devices/{id}/telemetry/t {id}"), T)
            .unwrap_or_else(|seen| panic!("{id}: {seen:?}"));
    }
    // A device that is not on this bus is refused unanswered, however well it signs.
    let mut stranger = SerialDevice::new("stranger", &[9; 32], 0, 100);
    let (_, f) = stranger.data("telemetry/t", b"hi");
    line.write(&f);
    wait_for(T, || {
        (gw.refusals("connect", "frame_not_on_bus") == 1).then_some(())
    })
    .expect("counted");
    let heard = line.hear(&mut [&mut stranger], Duration::from_millis(500));
    assert!(heard[0].is_empty(), "{heard:?}");
}

#[test]
fn forged_truncated_noisy_and_replayed_frames_are_refused_and_the_next_good_frame_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, gw) = one_bus(dir.path(), &["meter-1"], "");
    let key = add_serial_device(&gw, "meter-1");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let mut line = Line::open(&pair);
    let mut meter = SerialDevice::new("meter-1", &key, 0, 100);

    // Signed under another key: refused unanswered, nothing published.
    let mut forger = SerialDevice::new("meter-1", &[7; 32], 0, 100);
    let (_, forged) = forger.data("telemetry/kwh", b"forged");
    line.write(&forged);
    // Cut short, then line noise (no delimiter for longer than any frame, and
    // stray bytes), then a good frame: the good frame is heard.
    let (_, cut) = meter.data("telemetry/kwh", b"cut");
    line.write(&cut[..cut.len() - 9]);
    line.write(&[0x55; 1300]);
    line.write(b"\x00\x13\x37garbage\x00");
    let (good, frame) = meter.data("telemetry/kwh", b"41");
    line.write(&frame);
    line.expect(&mut meter, "the good frame's ACK", is_ack(good));
    sub.expect("devices/meter-1/telemetry/kwh 41", T).unwrap();
    assert_eq!(gw.refusals("decode", "frame_tag"), 1);
    assert!(gw.refusals("decode", "frame_noise") >= 1);
    assert!(gw.refusals("decode", "malformed_packet") >= 1);
    let seen = sub.drain(Duration::from_millis(300));
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("forged") || l.contains("cut")),
        "{seen:?}"
    );

    // Its last frame sent again (our ACK lost): answered again, published once.
    line.write(&frame);
    line.expect(&mut meter, "the same ACK again", is_ack(good));
    // An older frame replayed: refused, and the device told to RESYNC above the floor.
    let (older, older_frame) = (
        1u64,
        meter.frame(
            1,
            Body::Data {
                suffix: "telemetry/kwh",
                payload: b"old",
            },
        ),
    );
    assert!(older < good);
    std::thread::sleep(Duration::from_millis(250));
    line.write(&older_frame);
    line.expect(&mut meter, "a RESYNC", |h| *h == Heard::Resync(good));
    let seen = sub.drain(Duration::from_millis(300));
    assert!(
        !seen
            .iter()
            .any(|l| l.contains(" old") || l.ends_with(" 41")),
        "a replay publishes nothing: {seen:?}"
    );
    assert_eq!(gw.refusals("decode", "frame_replay"), 1);
    assert_eq!(gw.metric("portcullis_serial_duplicates_total"), 1);
    let audit = gw.audit();
    assert!(
        audit.contains("frame_replay") || audit.contains("a replayed or stale frame"),
        "{audit}"
    );
}

#[test]
fn a_device_whose_frames_keep_failing_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path(), "bus").expect("socat");
    let gw = Gateway::start_with(&format!(
        "{}\n[behaviour]\nmax_validation_failures = 3\n",
        serial_config(&[(&pair, &["meter-2"])], "")
    ));
    gw.wait_audit(&["\"port\"", "serial port open"]);
    add_serial_device(&gw, "meter-2");
    let mut line = Line::open(&pair);
    // Frames naming meter-2 whose tags do not verify (a forger on the bus, or the
    // device with a wrong key).
    let mut forger = SerialDevice::new("meter-2", &[7; 32], 0, 100);
    for _ in 0..6 {
        let (_, f) = forger.data("telemetry/kwh", b"forged");
        line.write(&f);
    }
    wait_for(T, || {
        let shown = gw.cli_ok(&["quarantine", "show", "meter-2"]);
        shown.contains("quarantined").then_some(shown)
    })
    .unwrap_or_else(|| panic!("{}", gw.cli_ok(&["quarantine", "show", "meter-2"])));
    assert_eq!(gw.refusals("decode", "frame_tag"), 6);
}

#[test]
fn a_port_that_vanishes_is_reopened_and_its_devices_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pair, gw) = one_bus(dir.path(), &["probe-1"], "");
    let key = add_serial_device(&gw, "probe-1");
    let mut probe = SerialDevice::new("probe-1", &key, 0, 100);
    {
        let mut line = Line::open(&pair);
        let (c, f) = probe.data("telemetry/t", b"1");
        line.write(&f);
        line.expect(&mut probe, "its ACK", is_ack(c));
    }
    // Unplugged: the gateway says so, and the device's session ends.
    pair.stop();
    gw.wait_audit(&["\"port\"", "serial port vanished"]);
    gw.wait_audit(&["\"disconnect\"", "probe-1", "serial port closed"]);
    // Plugged in again at the same path: reopened with back-off, audited, served.
    let pair = PtyPair::start(dir.path(), "bus").expect("socat again");
    gw.wait_audit(&["\"port\"", "serial port open again"]);
    let mut line = Line::open(&pair);
    let (c, f) = probe.data("telemetry/t", b"2");
    line.write(&f);
    line.expect(&mut probe, "its ACK after the port came back", is_ack(c));
    assert_eq!(gw.metric("portcullis_serial_port_reopens_total"), 1);
}

#[test]
fn after_a_crash_no_frame_the_gateway_saw_is_accepted_again() {
    let dir = tempfile::tempdir().unwrap();
    // Small ranges: the crash lands after several reservations.
    let (pair, mut gw) = one_bus(dir.path(), &["flow-1"], "counter_reserve = 5");
    let key = add_serial_device(&gw, "flow-1");
    let mut line = Line::open(&pair);
    let mut flow = SerialDevice::new("flow-1", &key, 0, 5);
    let mut last = 0;
    for i in 0..12 {
        let (c, f) = flow.data("telemetry/n", format!("{i}").as_bytes());
        line.write(&f);
        line.expect(&mut flow, "its ACK", is_ack(c));
        last = c;
    }
    // Frames in flight when it dies.
    for i in 12..15 {
        let (_, f) = flow.data("telemetry/n", format!("{i}").as_bytes());
        line.write(&f);
    }
    gw.kill9();
    gw.restart_after_stop();
    wait_for(T, || {
        (gw.audit().matches("\"serial port open\"").count() == 2).then_some(())
    })
    .expect("the port opened by the restarted gateway");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    // The same line (a second reader on the device's end would take bytes meant for
    // this one): what the first gateway answered before it died is read first.
    let _ = line.hear(&mut [&mut flow], Duration::from_millis(300));
    // Every frame the device ever sent, replayed onto the bus.
    let recording = {
        let mut r = Vec::new();
        let mut replayer = SerialDevice::new("flow-1", &key, 0, 5);
        for i in 0..15 {
            let (_, f) = replayer.data("telemetry/n", format!("{i}").as_bytes());
            r.extend(f);
        }
        r
    };
    line.write(&recording);
    let heard = line.hear(&mut [&mut flow], Duration::from_secs(2));
    assert!(
        !heard[0].iter().any(|h| matches!(h, Heard::Ack(_))),
        "no replayed frame is acknowledged: {heard:?}"
    );
    let seen = sub.drain(Duration::from_millis(500));
    assert!(seen.is_empty(), "nothing replayed is published: {seen:?}");
    assert!(
        gw.refusals("decode", "frame_replay") >= 15,
        "{}",
        gw.metrics()
    );
    // The device was told where to continue, and its next frame is taken.
    assert!(
        heard[0]
            .iter()
            .any(|h| matches!(h, Heard::Resync(f) if *f >= last)),
        "{heard:?}"
    );
    let (c, f) = flow.data("telemetry/n", b"fresh");
    assert!(c > last);
    line.write(&f);
    line.expect(&mut flow, "its ACK", is_ack(c));
    sub.expect("devices/flow-1/telemetry/n fresh", T).unwrap();
}

#[test]
fn a_disabled_device_is_ended_and_refused_until_it_is_enabled_again() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, gw) = one_bus(dir.path(), &["gate-1"], "");
    let key = add_serial_device(&gw, "gate-1");
    let mut line = Line::open(&pair);
    let mut gate = SerialDevice::new("gate-1", &key, 0, 100);
    let (c, f) = gate.data("telemetry/open", b"1");
    line.write(&f);
    line.expect(&mut gate, "its ACK", is_ack(c));

    gw.cli_ok(&["device", "disable", "gate-1"]);
    gw.wait_audit(&["\"disconnect\"", "gate-1", "disabled"]);
    // Its frames are refused, and it is told so.
    let (c, f) = gate.data("telemetry/open", b"2");
    line.write(&f);
    line.expect(&mut gate, "NAK not authorized", |h| {
        *h == Heard::Nak(c, NakReason::NotAuthorized)
    });
    gw.wait_audit(&["\"connect\"", "\"refuse\"", "gate-1", "disabled"]);

    gw.cli_ok(&["device", "enable", "gate-1"]);
    // Asked again at most once a second: within a few seconds it is taken again.
    let taken = wait_for(T, || {
        let (c, f) = gate.data("telemetry/open", b"3");
        line.write(&f);
        let heard = line.hear(&mut [&mut gate], Duration::from_millis(400));
        heard[0].contains(&Heard::Ack(c)).then_some(())
    });
    assert!(taken.is_some(), "{}", gw.audit());
}

#[test]
fn a_command_never_acknowledged_waits_until_the_device_is_heard_again() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, gw) = one_bus(dir.path(), &["lamp-1"], "max_retransmits = 1");
    let key = add_serial_device(&gw, "lamp-1");
    gw.add_service_cert("ops");
    let mut line = Line::open(&pair);
    let mut lamp = SerialDevice::new("lamp-1", &key, 0, 100);
    let (c, f) = lamp.data("telemetry/on", b"0");
    line.write(&f);
    line.expect(&mut lamp, "its ACK", is_ack(c));
    let publish = gw.client(
        gw.service_tls,
        "ops",
        &["-t", "devices/lamp-1/commands/on", "-m", "1", "-q", "1"],
    );
    assert!(mosquitto("mosquitto_pub", &publish, T).status.success());
    // Sent, sent once more (max_retransmits = 1), then given up on: the device is not
    // written to while it says nothing.
    let heard = line.hear(&mut [&mut lamp], Duration::from_millis(2000));
    let sends = heard[0]
        .iter()
        .filter(|h| matches!(h, Heard::Command { .. }))
        .count();
    assert_eq!(sends, 2, "{heard:?}");
    assert_eq!(gw.metric("portcullis_serial_commands_timed_out_total"), 1);
    // Heard again: the command comes again, and this time it is acknowledged.
    let (c, f) = lamp.data("telemetry/on", b"0");
    line.write(&f);
    let mut heard = line.expect(
        &mut lamp,
        "the command again",
        |h| matches!(h, Heard::Command { suffix, .. } if suffix == "commands/on"),
    );
    // Its frame's ACK comes too, before or after the command.
    if !heard.contains(&Heard::Ack(c)) {
        heard.extend(line.expect(&mut lamp, "its ACK", is_ack(c)));
    }
    let Some(Heard::Command { counter, .. }) = heard
        .iter()
        .find(|h| matches!(h, Heard::Command { .. }))
        .cloned()
    else {
        unreachable!()
    };
    let ack = lamp.ack(counter);
    line.write(&ack);
    wait_for(T, || {
        (gw.metric("portcullis_messages_delivered_total") == 1).then_some(())
    })
    .expect("delivered once acknowledged");
    // Its payload, "1".
    assert_eq!(gw.metric("portcullis_delivered_bytes_total"), 1);
}

#[test]
fn every_frame_of_a_burst_is_answered_even_when_the_device_s_session_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, gw) = one_bus(dir.path(), &["burst-1"], "max_frames_per_second = 1000");
    let key = add_serial_device(&gw, "burst-1");
    let mut line = Line::open(&pair);
    let mut dev = SerialDevice::new("burst-1", &key, 0, 1000);
    let (c, f) = dev.data("telemetry/n", b"0");
    line.write(&f);
    line.expect(&mut dev, "its ACK", is_ack(c));
    // Quarantined: its messages are paced, so its session falls behind a burst.
    gw.cli_ok(&["quarantine", "add", "burst-1", "--reason", "test"]);
    let mut burst = Vec::new();
    let mut counters = Vec::new();
    for i in 0..300 {
        let (c, f) = dev.data("telemetry/n", format!("{i}").as_bytes());
        counters.push(c);
        burst.extend(f);
    }
    line.write(&burst);
    let mut answered = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.len() < counters.len() && Instant::now() < deadline {
        for h in line
            .hear(&mut [&mut dev], Duration::from_millis(500))
            .remove(0)
        {
            match h {
                Heard::Ack(c) => *answered.entry(c).or_insert(0) += 1,
                Heard::Nak(c, NakReason::Busy) => *answered.entry(c).or_insert(0) += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let unanswered: Vec<_> = counters
        .iter()
        .filter(|c| !answered.contains_key(c))
        .collect();
    assert!(unanswered.is_empty(), "never answered: {unanswered:?}");
    assert!(answered.values().all(|n| *n == 1), "{answered:?}");
}

#[test]
fn a_frame_sent_again_after_the_port_came_back_is_answered_again_not_taken_for_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pair, gw) = one_bus(dir.path(), &["probe-2"], "");
    let key = add_serial_device(&gw, "probe-2");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let mut probe = SerialDevice::new("probe-2", &key, 0, 100);
    let (c, frame) = probe.data("telemetry/t", b"once");
    {
        let mut line = Line::open(&pair);
        line.write(&frame);
        line.expect(&mut probe, "its ACK", is_ack(c));
    }
    // The ACK lost with the cable: plugged in again, the device sends the same bytes.
    pair.stop();
    gw.wait_audit(&["\"port\"", "serial port vanished"]);
    let pair = PtyPair::start(dir.path(), "bus").expect("socat again");
    gw.wait_audit(&["\"port\"", "serial port open again"]);
    let mut line = Line::open(&pair);
    line.write(&frame);
    let heard = line.expect(&mut probe, "the same ACK again", is_ack(c));
    assert!(
        !heard.iter().any(|h| matches!(h, Heard::Resync(_))),
        "{heard:?}"
    );
    assert_eq!(gw.refusals("decode", "frame_replay"), 0);
    sub.expect("devices/probe-2/telemetry/t once", T).unwrap();
    let again = sub.drain(Duration::from_millis(500));
    assert!(again.is_empty(), "published once: {again:?}");
}

#[test]
fn a_run_of_replays_gets_one_resync_per_interval_and_one_audit_line() {
    let dir = tempfile::tempdir().unwrap();
    // One RESYNC per 10 s at most: the run below fits in one interval.
    let (pair, gw) = one_bus(dir.path(), &["tank-1"], "resync_interval = \"10s\"");
    let key = add_serial_device(&gw, "tank-1");
    let mut line = Line::open(&pair);
    let mut tank = SerialDevice::new("tank-1", &key, 0, 100);
    let mut recorded = Vec::new();
    for i in 0..3 {
        let (c, f) = tank.data("telemetry/level", format!("{i}").as_bytes());
        line.write(&f);
        line.expect(&mut tank, "its ACK", is_ack(c));
        recorded.push(f);
    }
    // Ten replays of the two older frames, back to back.
    let mut replays = Vec::new();
    for _ in 0..5 {
        replays.extend(&recorded[0]);
        replays.extend(&recorded[1]);
    }
    line.write(&replays);
    let heard = line.hear(&mut [&mut tank], Duration::from_secs(1));
    let resyncs = heard[0]
        .iter()
        .filter(|h| matches!(h, Heard::Resync(_)))
        .count();
    assert_eq!(resyncs, 1, "{heard:?}");
    wait_for(T, || {
        (gw.refusals("decode", "frame_replay") == 10).then_some(())
    })
    .unwrap_or_else(|| panic!("{}", gw.metrics()));
    let audited = gw
        .audit()
        .lines()
        .filter(|l| l.contains("\"frame\"") && l.contains("replayed or stale"))
        .count();
    assert_eq!(audited, 1, "{}", gw.audit());
}
