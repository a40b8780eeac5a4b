//! Recent events: the newest lines of the audit log, read back from its files.

use super::protocol::{RecentEvent, RecentEvents};
use super::{AdminError, AdminState, Handler};
use portcullis_core::audit::log_files;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Lines given when the request names no limit, and the most it may name.
pub const DEFAULT_EVENTS: usize = 100;
pub const MAX_EVENTS: usize = 1000;
/// How much of the end of each file is read: lines are short (a reason is at most a
/// few hundred bytes), so this holds well over `MAX_EVENTS` of them.
const TAIL_BYTES: u64 = 1 << 20;

impl Handler for RecentEvents {
    fn run(self, state: &AdminState) -> Result<Vec<RecentEvent>, AdminError> {
        let limit = self.limit.unwrap_or(DEFAULT_EVENTS);
        if !(1..=MAX_EVENTS).contains(&limit) {
            return Err(format!("limit must be between 1 and {MAX_EVENTS} (got {limit})").into());
        }
        let mut newest_first = Vec::with_capacity(limit);
        // Newest file first; a rotation just done leaves few lines in the current one.
        for file in log_files(state.audit.path()).iter().rev() {
            let text = tail(file)
                .map_err(|e| AdminError::Runtime(format!("audit log {}: {e}", file.display())))?;
            for line in text.lines().rev() {
                // A torn or foreign line is not an event; `audit verify` reports it.
                if let Ok(event) = serde_json::from_str::<RecentEvent>(line) {
                    newest_first.push(event);
                    if newest_first.len() == limit {
                        break;
                    }
                }
            }
            if newest_first.len() == limit {
                break;
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }
}

/// The last `TAIL_BYTES` of a file, from its first whole line; nothing if it is gone.
fn tail(path: &Path) -> std::io::Result<String> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.take(len - start).read_to_end(&mut buf)?;
    let whole = if start == 0 {
        &buf[..]
    } else {
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => &buf[i + 1..],
            None => &buf[..0],
        }
    };
    Ok(String::from_utf8_lossy(whole).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::testing::{audit_log, offline, usage};

    #[test]
    fn the_newest_lines_come_back_oldest_first_without_their_chain_fields() {
        let (dir, state) = offline();
        // The two devices `offline` registered were audited.
        let all = RecentEvents { limit: None }.run(&state).unwrap();
        let added: Vec<_> = all
            .iter()
            .filter(|e| e.event == "registry")
            .map(|e| e.principal.clone().unwrap())
            .collect();
        assert_eq!(added, ["sensor-1", "sensor-2"]);
        let last = RecentEvents { limit: Some(1) }.run(&state).unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].principal.as_deref(), Some("sensor-2"));
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
        let wire = serde_json::to_value(&last[0]).unwrap();
        assert!(
            wire.get("mac").is_none() && wire.get("prev").is_none(),
            "{wire}"
        );
        assert!(audit_log(&dir).contains("\"mac\""));
    }

    #[test]
    fn a_limit_out_of_bounds_is_refused_by_name() {
        let (_dir, state) = offline();
        for limit in [0, MAX_EVENTS + 1] {
            let m = usage(RecentEvents { limit: Some(limit) }.run(&state));
            assert!(m.starts_with("limit must be between 1 and 1000"), "{m}");
        }
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let (dir, state) = offline();
        let path = dir.path().join("audit.log");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":99,\"time_");
        std::fs::write(&path, text).unwrap();
        let events = RecentEvents { limit: Some(1) }.run(&state).unwrap();
        assert_eq!(events[0].principal.as_deref(), Some("sensor-2"));
    }
}
