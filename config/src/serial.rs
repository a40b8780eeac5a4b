//! `[serial]`: devices on UART / RS-485 buses (docs/serial-protocol.md). It names the
//! only ports the gateway may open and, for each, the only devices that may speak on
//! it; with no `[[serial.ports]]` no port is opened. The scalar keys bound the link for
//! every port: counter reservation, retransmission of downlinks, reopening a port that
//! vanished, RESYNC pacing and the read rate.
//!
//! Everything is checked at load, each rule naming its key and the value it refused,
//! so that the adapter is handed a configuration it can use as it is.

use crate::duration::Millis;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Bounds of the scalar keys (inclusive).
const COUNTER_RESERVE: (u64, u64) = (1, 1_000_000);
const MAX_RETRANSMITS: (u32, u32) = (0, 10);
const MAX_FRAMES_PER_SECOND: (u32, u32) = (1, 100_000);
const ACK_TIMEOUT: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(60));
const REOPEN_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(600));
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(3600);
const RESYNC_INTERVAL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(600));
/// Bounds of a port's line settings.
const BAUD: (u32, u32) = (300, 4_000_000);
const DATA_BITS: (u8, u8) = (5, 8);
/// Longest device id (as registry ids: `[A-Za-z0-9._-]{1,64}`).
const MAX_DEVICE_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Serial {
    /// Counters reserved ahead per device and direction: the registry is written once
    /// per range, not once per frame (a restart skips at most this many).
    pub counter_reserve: u64,
    /// Wait for a device's ACK of a downlink frame before sending it again.
    pub ack_timeout: Millis,
    /// Retransmissions of an unacknowledged downlink frame before it is given up.
    pub max_retransmits: u32,
    /// First wait before reopening a port that vanished; doubles on every failed
    /// reopen, up to `reopen_backoff_max`.
    pub reopen_backoff: Millis,
    pub reopen_backoff_max: Millis,
    /// At most one RESYNC sent to a device per interval.
    pub resync_interval: Millis,
    /// Frames read per second from one port at most; frames beyond it are dropped and
    /// counted.
    pub max_frames_per_second: u32,
    /// The ports the gateway opens (no other), and who may speak on each.
    pub ports: Vec<SerialPort>,
}

impl Default for Serial {
    fn default() -> Self {
        Serial {
            counter_reserve: 1000,
            ack_timeout: Millis::from_millis(500),
            max_retransmits: 3,
            reopen_backoff: Millis::from_millis(1000),
            reopen_backoff_max: Millis::from_millis(60_000),
            resync_interval: Millis::from_millis(1000),
            max_frames_per_second: 200,
            ports: Vec::new(),
        }
    }
}

/// One bus: `[[serial.ports]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// The device file, by its absolute path (e.g. `/dev/ttyUSB0`, or a stable
    /// `/dev/serial/by-id/…` link).
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5 to 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Ids of the devices allowed on this bus: a frame naming any other is refused.
    /// Each device is on one port at most.
    #[serde(default)]
    pub devices: Vec<String>,
}

fn default_baud() -> u32 {
    115_200
}

fn default_data_bits() -> u8 {
    8
}

fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// `10ms`, `1m`, as the configuration is written.
fn shown(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn within<T: PartialOrd + std::fmt::Display>(
    key: String,
    value: T,
    (lo, hi): (T, T),
) -> Result<(), (String, String)> {
    if lo <= value && value <= hi {
        Ok(())
    } else {
        Err((key, format!("must be between {lo} and {hi} (got {value})")))
    }
}

fn within_duration(
    key: &str,
    value: Duration,
    (lo, hi): (Duration, Duration),
) -> Result<(), (String, String)> {
    if lo <= value && value <= hi {
        Ok(())
    } else {
        Err((
            format!("serial.{key}"),
            format!(
                "must be between {} and {} (got {})",
                shown(lo),
                shown(hi),
                shown(value)
            ),
        ))
    }
}

/// Why `id` cannot be a device id, if it cannot.
fn device_id_problem(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    (!ok).then(|| {
        format!("device ids are 1-{MAX_DEVICE_ID_LEN} characters of [A-Za-z0-9._-] (got {id:?})")
    })
}

impl Serial {
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let key = |k: &str| format!("serial.{k}");
        within(
            key("counter_reserve"),
            self.counter_reserve,
            COUNTER_RESERVE,
        )?;
        within_duration("ack_timeout", *self.ack_timeout, ACK_TIMEOUT)?;
        within(
            key("max_retransmits"),
            self.max_retransmits,
            MAX_RETRANSMITS,
        )?;
        within_duration("reopen_backoff", *self.reopen_backoff, REOPEN_BACKOFF)?;
        let (first, max) = (*self.reopen_backoff, *self.reopen_backoff_max);
        if max < first || max > REOPEN_BACKOFF_MAX {
            return Err((
                key("reopen_backoff_max"),
                format!(
                    "must be at least serial.reopen_backoff ({}) and at most {} (got {})",
                    shown(first),
                    shown(REOPEN_BACKOFF_MAX),
                    shown(max)
                ),
            ));
        }
        within_duration("resync_interval", *self.resync_interval, RESYNC_INTERVAL)?;
        within(
            key("max_frames_per_second"),
            self.max_frames_per_second,
            MAX_FRAMES_PER_SECOND,
        )?;
        // Where each path and each device was first seen.
        let mut paths: HashMap<PathBuf, usize> = HashMap::new();
        let mut devices: HashMap<&str, usize> = HashMap::new();
        for (i, port) in self.ports.iter().enumerate() {
            let key = |k: &str| format!("serial.ports[{i}].{k}");
            if !port.path.is_absolute() {
                return Err((
                    key("path"),
                    format!(
                        "must be an absolute path such as \"/dev/ttyUSB0\" (got {:?})",
                        port.path.display().to_string()
                    ),
                ));
            }
            if let Some(first) = paths.insert(crate::lexical(&port.path), i) {
                return Err((
                    key("path"),
                    format!(
                        "{:?} is serial.ports[{first}] already; each port is listed once",
                        port.path.display().to_string()
                    ),
                ));
            }
            within(key("baud"), port.baud, BAUD)?;
            within(key("data_bits"), port.data_bits, DATA_BITS)?;
            if !matches!(port.stop_bits, 1 | 2) {
                return Err((
                    key("stop_bits"),
                    format!("must be 1 or 2 (got {})", port.stop_bits),
                ));
            }
            if port.devices.is_empty() {
                return Err((
                    key("devices"),
                    "must name at least one device allowed on this port".into(),
                ));
            }
            for (j, id) in port.devices.iter().enumerate() {
                let key = format!("serial.ports[{i}].devices[{j}]");
                if let Some(why) = device_id_problem(id) {
                    return Err((key, why));
                }
                match devices.insert(id, i) {
                    Some(p) if p == i => {
                        return Err((key, format!("{id:?} is listed twice on this port")));
                    }
                    Some(p) => {
                        return Err((
                            key,
                            format!(
                                "{id:?} is on serial.ports[{p}] already; a device is on one port at most"
                            ),
                        ));
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    /// The error a configuration text gets, as `(key, reason)`.
    fn refused(text: &str) -> (String, String) {
        let e = Config::parse(text, "x.toml").expect_err(text);
        (e.key, e.reason)
    }

    fn with_port(port: &str) -> String {
        format!("[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"pump-1\"]\n{port}\n")
    }

    #[test]
    fn no_serial_section_opens_no_port_and_keeps_the_defaults() {
        let c = Config::parse("", "x.toml").unwrap();
        assert!(c.serial.ports.is_empty());
        let s = &c.serial;
        assert_eq!(s.counter_reserve, 1000);
        assert_eq!(s.ack_timeout.as_millis(), 500);
        assert_eq!(s.max_retransmits, 3);
        assert_eq!(s.reopen_backoff.as_secs(), 1);
        assert_eq!(s.reopen_backoff_max.as_secs(), 60);
        assert_eq!(s.resync_interval.as_secs(), 1);
        assert_eq!(s.max_frames_per_second, 200);
    }

    #[test]
    fn a_port_reads_with_its_line_settings_and_defaults_to_115200_8n1() {
        let text = "[serial]\nack_timeout = \"250ms\"\n\
                    [[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"pump-1\", \"pump-2\"]\n\
                    [[serial.ports]]\npath = \"/dev/ttyS1\"\nbaud = 9600\ndata_bits = 7\n\
                    parity = \"even\"\nstop_bits = 2\ndevices = [\"valve.3\"]\n";
        let c = Config::parse(text, "x.toml").unwrap();
        assert_eq!(c.serial.ack_timeout.as_millis(), 250);
        let [a, b] = &c.serial.ports[..] else {
            panic!("{:?}", c.serial.ports)
        };
        assert_eq!(a.path, std::path::Path::new("/dev/ttyUSB0"));
        assert_eq!(
            (a.baud, a.data_bits, a.parity, a.stop_bits),
            (115_200, 8, super::Parity::None, 1)
        );
        assert_eq!(a.devices, ["pump-1", "pump-2"]);
        assert_eq!(
            (b.baud, b.data_bits, b.parity, b.stop_bits),
            (9600, 7, super::Parity::Even, 2)
        );
    }

    #[test]
    fn counter_reserve_is_bounded() {
        for bad in ["0", "1000001"] {
            let got = refused(&format!("[serial]\ncounter_reserve = {bad}\n"));
            assert_eq!(
                got,
                (
                    "serial.counter_reserve".into(),
                    format!("must be between 1 and 1000000 (got {bad})")
                )
            );
        }
        for ok in [1, 1_000_000] {
            Config::parse(&format!("[serial]\ncounter_reserve = {ok}\n"), "x.toml").unwrap();
        }
    }

    #[test]
    fn ack_timeout_is_between_10ms_and_60s() {
        let got = refused("[serial]\nack_timeout = \"9ms\"\n");
        assert_eq!(
            got,
            (
                "serial.ack_timeout".into(),
                "must be between 10ms and 1m (got 9ms)".into()
            )
        );
        let got = refused("[serial]\nack_timeout = \"61s\"\n");
        assert_eq!(got.0, "serial.ack_timeout");
        assert!(got.1.ends_with("(got 1m 1s)"), "{}", got.1);
        for ok in ["10ms", "60s"] {
            Config::parse(&format!("[serial]\nack_timeout = \"{ok}\"\n"), "x.toml").unwrap();
        }
    }

    #[test]
    fn durations_are_written_as_the_crate_reads_them() {
        // A bare number is milliseconds, like every other millisecond key.
        let c = Config::parse("[serial]\nresync_interval = 250\n", "x.toml").unwrap();
        assert_eq!(c.serial.resync_interval.as_millis(), 250);
        let e = Config::parse("[serial]\nack_timeout = \"soon\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("write e.g."), "{e}");
    }

    #[test]
    fn max_retransmits_is_at_most_ten() {
        let got = refused("[serial]\nmax_retransmits = 11\n");
        assert_eq!(
            got,
            (
                "serial.max_retransmits".into(),
                "must be between 0 and 10 (got 11)".into()
            )
        );
        let c = Config::parse("[serial]\nmax_retransmits = 0\n", "x.toml").unwrap();
        assert_eq!(c.serial.max_retransmits, 0);
    }

    #[test]
    fn reopen_backoff_is_bounded_and_its_maximum_is_not_below_it() {
        let got = refused("[serial]\nreopen_backoff = \"5ms\"\n");
        assert_eq!(
            got,
            (
                "serial.reopen_backoff".into(),
                "must be between 10ms and 10m (got 5ms)".into()
            )
        );
        let got = refused("[serial]\nreopen_backoff = \"10s\"\nreopen_backoff_max = \"5s\"\n");
        assert_eq!(
            got,
            (
                "serial.reopen_backoff_max".into(),
                "must be at least serial.reopen_backoff (10s) and at most 1h (got 5s)".into()
            )
        );
        let got = refused("[serial]\nreopen_backoff_max = \"2h\"\n");
        assert_eq!(got.0, "serial.reopen_backoff_max");
        let c = Config::parse(
            "[serial]\nreopen_backoff = \"2s\"\nreopen_backoff_max = \"2s\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.serial.reopen_backoff, c.serial.reopen_backoff_max);
    }

    #[test]
    fn resync_interval_is_bounded() {
        let got = refused("[serial]\nresync_interval = \"0s\"\n");
        assert_eq!(
            got,
            (
                "serial.resync_interval".into(),
                "must be between 10ms and 10m (got 0s)".into()
            )
        );
    }

    #[test]
    fn max_frames_per_second_is_bounded() {
        for bad in ["0", "100001"] {
            let got = refused(&format!("[serial]\nmax_frames_per_second = {bad}\n"));
            assert_eq!(
                got,
                (
                    "serial.max_frames_per_second".into(),
                    format!("must be between 1 and 100000 (got {bad})")
                )
            );
        }
    }

    #[test]
    fn a_port_path_must_be_absolute() {
        let text = "[[serial.ports]]\npath = \"ttyUSB0\"\ndevices = [\"pump-1\"]\n";
        assert_eq!(
            refused(text),
            (
                "serial.ports[0].path".into(),
                "must be an absolute path such as \"/dev/ttyUSB0\" (got \"ttyUSB0\")".into()
            )
        );
    }

    #[test]
    fn a_port_is_listed_once_however_its_path_is_spelled() {
        let text = "[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"pump-1\"]\n\
                    [[serial.ports]]\npath = \"/dev/./ttyUSB0\"\ndevices = [\"pump-2\"]\n";
        assert_eq!(
            refused(text),
            (
                "serial.ports[1].path".into(),
                "\"/dev/./ttyUSB0\" is serial.ports[0] already; each port is listed once".into()
            )
        );
        let text = text.replace("/dev/./ttyUSB0", "/dev/x/../ttyUSB0");
        assert_eq!(refused(&text).0, "serial.ports[1].path");
    }

    #[test]
    fn baud_is_between_300_and_4000000() {
        let text = format!(
            "{}[[serial.ports]]\npath = \"/dev/ttyUSB1\"\nbaud = 12\ndevices = [\"pump-2\"]\n",
            with_port("")
        );
        let e = Config::parse(&text, "x.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.toml: serial.ports[1].baud: must be between 300 and 4000000 (got 12)"
        );
        assert_eq!(
            refused(&with_port("baud = 4000001")).0,
            "serial.ports[0].baud"
        );
        for ok in [300, 4_000_000] {
            Config::parse(&with_port(&format!("baud = {ok}")), "x.toml").unwrap();
        }
    }

    #[test]
    fn data_bits_are_5_to_8() {
        for bad in [4, 9] {
            assert_eq!(
                refused(&with_port(&format!("data_bits = {bad}"))),
                (
                    "serial.ports[0].data_bits".into(),
                    format!("must be between 5 and 8 (got {bad})")
                )
            );
        }
        for ok in 5..=8 {
            Config::parse(&with_port(&format!("data_bits = {ok}")), "x.toml").unwrap();
        }
    }

    #[test]
    fn stop_bits_are_1_or_2() {
        for bad in [0, 3] {
            assert_eq!(
                refused(&with_port(&format!("stop_bits = {bad}"))),
                (
                    "serial.ports[0].stop_bits".into(),
                    format!("must be 1 or 2 (got {bad})")
                )
            );
        }
    }

    #[test]
    fn parity_is_none_even_or_odd() {
        let c = Config::parse(&with_port("parity = \"odd\""), "x.toml").unwrap();
        assert_eq!(c.serial.ports[0].parity, super::Parity::Odd);
        let e = Config::parse(&with_port("parity = \"mark\""), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4") && e.contains("mark") && e.contains("`none`, `even`, `odd`"),
            "{e}"
        );
    }

    #[test]
    fn a_port_needs_a_path_and_at_least_one_device() {
        let e = Config::parse("[[serial.ports]]\ndevices = [\"pump-1\"]\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `path`"), "{e}");
        assert_eq!(
            refused("[[serial.ports]]\npath = \"/dev/ttyUSB0\"\n"),
            (
                "serial.ports[0].devices".into(),
                "must name at least one device allowed on this port".into()
            )
        );
        let empty = "[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = []\n";
        assert_eq!(refused(empty).0, "serial.ports[0].devices");
    }

    #[test]
    fn device_ids_on_a_port_are_valid_ids() {
        let long = "d".repeat(65);
        for bad in ["", "pump 1", "pump/1", "pümp", long.as_str()] {
            let text = format!(
                "[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"ok-1\", \"{bad}\"]\n"
            );
            assert_eq!(
                refused(&text),
                (
                    "serial.ports[0].devices[1]".into(),
                    format!("device ids are 1-64 characters of [A-Za-z0-9._-] (got {bad:?})")
                ),
            );
        }
        let longest = "d".repeat(64);
        let text =
            format!("[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"{longest}\"]\n");
        Config::parse(&text, "x.toml").unwrap();
    }

    #[test]
    fn a_device_is_listed_once_on_one_port_at_most() {
        let twice =
            "[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"pump-1\", \"pump-1\"]\n";
        assert_eq!(
            refused(twice),
            (
                "serial.ports[0].devices[1]".into(),
                "\"pump-1\" is listed twice on this port".into()
            )
        );
        let two_ports = "[[serial.ports]]\npath = \"/dev/ttyUSB0\"\ndevices = [\"pump-1\"]\n\
                         [[serial.ports]]\npath = \"/dev/ttyUSB1\"\ndevices = [\"pump-2\", \"pump-1\"]\n";
        assert_eq!(
            refused(two_ports),
            (
                "serial.ports[1].devices[1]".into(),
                "\"pump-1\" is on serial.ports[0] already; a device is on one port at most".into()
            )
        );
    }

    #[test]
    fn the_shipped_port_example_loads_once_uncommented() {
        let start = crate::SHIPPED
            .find("# [[serial.ports]]")
            .expect("the shipped file has a port example");
        let commented: Vec<&str> = crate::SHIPPED[start..]
            .lines()
            .take_while(|l| l.starts_with("# "))
            .collect();
        let uncommented: Vec<&str> = commented.iter().map(|l| &l[2..]).collect();
        let text = crate::SHIPPED.replacen(&commented.join("\n"), &uncommented.join("\n"), 1);
        let c = Config::parse(&text, "shipped.toml").unwrap();
        assert_eq!(c.serial.ports.len(), 1, "{}", uncommented.join("\n"));
        assert_eq!(c.serial.ports[0].devices, ["pump-1", "pump-2"]);
    }

    #[test]
    fn unknown_keys_are_refused_in_the_section_and_in_a_port() {
        let e = Config::parse("[serial]\nack_timeout_ms = 500\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `ack_timeout_ms`"), "{e}");
        let e = Config::parse(&with_port("flow_control = \"rts\""), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `flow_control`"), "{e}");
    }
}
