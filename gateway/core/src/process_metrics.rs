//! The process's own resources on `/metrics`, under the names every Prometheus client
//! library gives them (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! …), so stock dashboards and alerts work unchanged.
//!
//! Read from `/proc/self` at each scrape, on Linux only: elsewhere the series are left
//! out rather than written as a made-up 0. A file that cannot be read or parsed leaves
//! out its own series (logged at debug) and nothing else.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use thiserror::Error;

/// A `/proc` file that did not say what it should.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}: {what}")]
pub struct ProcError {
    pub file: &'static str,
    pub what: String,
}

impl ProcError {
    fn new(file: &'static str, what: impl Into<String>) -> ProcError {
        ProcError {
            file,
            what: what.into(),
        }
    }
}

/// What `/proc/self/stat` says of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User and system CPU time of every thread, in clock ticks.
    pub cpu_ticks: u64,
    /// When the process started, in clock ticks since boot.
    pub start_ticks: u64,
    pub virtual_bytes: u64,
    pub resident_pages: u64,
}

const STAT: &str = "/proc/self/stat";
const PROC_STAT: &str = "/proc/stat";
const LIMITS: &str = "/proc/self/limits";

/// Parse `/proc/self/stat` (proc(5)). The command name, field 2, is in parentheses
/// and may itself hold spaces and parentheses, so the fields are counted from the
/// last `)`.
pub fn parse_stat(text: &str) -> Result<Stat, ProcError> {
    let (_, rest) = text
        .rsplit_once(')')
        .ok_or_else(|| ProcError::new(STAT, "no command name in parentheses"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state): field n is at n - 3.
    let field = |n: usize, name: &str| -> Result<u64, ProcError> {
        let raw = fields.get(n - 3).ok_or_else(|| {
            ProcError::new(
                STAT,
                format!(
                    "field {n} ({name}) missing: only {} fields",
                    fields.len() + 2
                ),
            )
        })?;
        raw.parse().map_err(|_| {
            ProcError::new(STAT, format!("field {n} ({name}) is not a count: {raw:?}"))
        })
    };
    Ok(Stat {
        cpu_ticks: field(14, "utime")?.saturating_add(field(15, "stime")?),
        start_ticks: field(22, "starttime")?,
        virtual_bytes: field(23, "vsize")?,
        resident_pages: field(24, "rss")?,
    })
}

/// The boot time in Unix seconds, the `btime` line of `/proc/stat`.
pub fn parse_boot_time(text: &str) -> Result<u64, ProcError> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .ok_or_else(|| ProcError::new(PROC_STAT, "no btime line"))?;
    line.trim()
        .parse()
        .map_err(|_| ProcError::new(PROC_STAT, format!("btime is not a count: {line:?}")))
}

/// The soft limit on open files from `/proc/self/limits`; `None` when unlimited.
pub fn parse_max_open_files(text: &str) -> Result<Option<u64>, ProcError> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or_else(|| ProcError::new(LIMITS, "no \"Max open files\" line"))?;
    match line.split_whitespace().next() {
        Some("unlimited") => Ok(None),
        Some(soft) => soft.parse().map(Some).map_err(|_| {
            ProcError::new(
                LIMITS,
                format!("Max open files soft limit is not a count: {soft:?}"),
            )
        }),
        None => Err(ProcError::new(LIMITS, "Max open files has no soft limit")),
    }
}

/// One reading of the process, each part absent if its source failed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl Reading {
    /// The process now (Linux); nothing elsewhere.
    pub fn now() -> Reading {
        #[cfg(target_os = "linux")]
        {
            linux::read()
        }
        #[cfg(not(target_os = "linux"))]
        {
            Reading::default()
        }
    }

    /// Write the series this reading has.
    pub fn encode(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(v) = self.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        if let Some(v) = self.start_time_seconds {
            let m = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(v).encode(m)?;
        }
        let counts: [(&str, &str, Option<u64>); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                self.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                self.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                self.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
                self.max_fds,
            ),
        ];
        for (name, help, value) in counts {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::{
        LIMITS, PROC_STAT, ProcError, Reading, STAT, parse_boot_time, parse_max_open_files,
        parse_stat,
    };

    fn read_file(path: &'static str) -> Result<String, ProcError> {
        std::fs::read_to_string(path).map_err(|e| ProcError::new(path, e.to_string()))
    }

    /// Note a part that could not be read; scrapes come every few seconds, so at debug.
    fn ok<T>(r: Result<T, ProcError>) -> Option<T> {
        r.inspect_err(|e| tracing::debug!(error = %e, "process metric left out"))
            .ok()
    }

    /// The boot time in Unix seconds from the clocks: now, less CLOCK_BOOTTIME (the
    /// clock the process's start ticks count on).
    pub(super) fn boot_time() -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        let since_boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        now.checked_sub(u64::try_from(since_boot.tv_sec).ok()?)
    }

    pub(super) fn read() -> Reading {
        let ticks = rustix::param::clock_ticks_per_second().max(1) as f64;
        let page = rustix::param::page_size() as u64;
        let stat = ok(read_file(STAT).and_then(|t| parse_stat(&t)));
        // A hardened unit hides /proc/stat (systemd's ProcSubset=pid): then the boot
        // time is the wall clock less the time since boot.
        let boot = ok(read_file(PROC_STAT).and_then(|t| parse_boot_time(&t))).or_else(boot_time);
        let open_fds = ok(std::fs::read_dir("/proc/self/fd")
            .map_err(|e| ProcError::new("/proc/self/fd", e.to_string()))
            // Less the descriptor the listing itself holds open.
            .map(|dir| (dir.count() as u64).saturating_sub(1)));
        let max_fds = ok(read_file(LIMITS).and_then(|t| parse_max_open_files(&t))).flatten();
        Reading {
            cpu_seconds: stat.map(|s| s.cpu_ticks as f64 / ticks),
            resident_bytes: stat.map(|s| s.resident_pages.saturating_mul(page)),
            virtual_bytes: stat.map(|s| s.virtual_bytes),
            start_time_seconds: stat
                .zip(boot)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / ticks),
            open_fds,
            max_fds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line of /proc/PID/stat, its command name changed to one with spaces and
    /// parentheses.
    const LINE: &str = "4242 (evil) (name) x) S 1 4242 4242 0 -1 4194560 1867 0 0 0 150 25 0 0 20 0 9 0 190793 3133440000 5120 18446744073709551615 1 1 0 0 0 0 0 4096 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = parse_stat(LINE).unwrap();
        assert_eq!(
            stat,
            Stat {
                cpu_ticks: 175,
                start_ticks: 190793,
                virtual_bytes: 3133440000,
                resident_pages: 5120,
            }
        );
    }

    #[test]
    fn a_short_or_garbled_stat_names_the_field() {
        let short = "1 (x) S 1 2 3";
        assert_eq!(
            parse_stat(short).unwrap_err().to_string(),
            "/proc/self/stat: field 14 (utime) missing: only 6 fields"
        );
        let garbled = LINE.replace(" 150 25 ", " 150 -5 ");
        assert_eq!(
            parse_stat(&garbled).unwrap_err().to_string(),
            "/proc/self/stat: field 15 (stime) is not a count: \"-5\""
        );
        assert_eq!(
            parse_stat("").unwrap_err().to_string(),
            "/proc/self/stat: no command name in parentheses"
        );
    }

    #[test]
    fn boot_time_and_the_open_files_limit_are_found_by_their_lines() {
        let stat = "cpu  1 2 3\nintr 5\nbtime 1796555804\nprocesses 9\n";
        assert_eq!(parse_boot_time(stat), Ok(1796555804));
        assert!(parse_boot_time("cpu 1\n").is_err());
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             96367                96367                processes \n\
                      Max open files            20000                524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Ok(Some(20000)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unlimited), Ok(None));
        assert_eq!(
            parse_max_open_files("Max open files  lots  lots files\n")
                .unwrap_err()
                .to_string(),
            "/proc/self/limits: Max open files soft limit is not a count: \"lots\""
        );
    }

    /// Where /proc/stat is hidden (a unit with ProcSubset=pid), the start time comes
    /// from the clocks, and they give the boot time /proc/stat gives.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_boot_time_from_the_clocks_is_the_one_proc_stat_gives() {
        let btime = parse_boot_time(&std::fs::read_to_string(PROC_STAT).unwrap()).unwrap();
        let clocks = linux::boot_time().unwrap();
        assert!(
            clocks.abs_diff(btime) <= 2,
            "{clocks} against btime {btime}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_as_itself() {
        let r = Reading::now();
        assert!(r.resident_bytes.unwrap() > 0, "{r:?}");
        assert!(
            r.virtual_bytes.unwrap() >= r.resident_bytes.unwrap(),
            "{r:?}"
        );
        assert!(r.cpu_seconds.unwrap() >= 0.0, "{r:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = r.start_time_seconds.unwrap();
        // Ticks are 1/100 s or finer.
        assert!(started <= now + 0.01, "started {started}, now {now}");
        assert!(started > 1.0e9, "started {started}");
        assert!(r.open_fds.unwrap() >= 1, "{r:?}");
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(r.max_fds, limit.current, "{r:?}");
    }
}
