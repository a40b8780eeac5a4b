//! The files of the log: appending, rotating by size with the chain running on
//! across files, one writer per log (a lock file), and at open, finding where the
//! chain on disk stopped and what is amiss at its end. A spare descriptor is held so
//! that a process short of descriptors can still rotate.

use super::chain::parse_line;
use super::settings::AuditSettings;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    sibling(path, &format!(".{n}"))
}

/// The files of the log at `path`, oldest first: `{path}.N` … `{path}.1`, `{path}`.
/// What `portcullis audit verify` checks when given no file.
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let name = path.file_name().and_then(|n| n.to_str());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let (Some(name), Ok(entries)) = (name, std::fs::read_dir(dir)) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let n = file_name
                .to_str()
                .and_then(|f| f.strip_prefix(name))
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(n) = n {
                found.push((n, path.with_file_name(&file_name)));
            }
        }
    }
    found.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut files: Vec<PathBuf> = found.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Renames must survive a crash too.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(dir) = File::open(dir)
    {
        let _ = dir.sync_all();
    }
}

/// One writer per log: a second one would fork the chain.
pub(super) fn lock(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(sibling(path, ".lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another writer (a running gateway?)",
                path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The last chain line of a file, and what follows it.
#[derive(Default)]
struct TailScan {
    /// seq, MAC, and whether the MAC verifies with our key.
    last: Option<(u64, [u8; 32], bool)>,
    /// Bytes of an incomplete final line.
    torn: usize,
    /// Complete lines after the last chain line that are not chain lines.
    skipped: usize,
    /// The file does not end with a newline.
    needs_newline: bool,
}

fn scan_tail(file: &mut File, key: &[u8; 32]) -> io::Result<TailScan> {
    let len = file.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start))?;
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        // Unless the window reaches the start of the file, its first line may be cut.
        let text = if start == 0 {
            Some(&buf[..])
        } else {
            buf.iter().position(|&b| b == b'\n').map(|i| &buf[i + 1..])
        };
        if let Some(text) = text {
            let scan = scan_lines_backwards(text, key);
            if scan.last.is_some() || start == 0 {
                return Ok(scan);
            }
        }
        window = window.saturating_mul(4);
    }
}

fn scan_lines_backwards(text: &[u8], key: &[u8; 32]) -> TailScan {
    let mut scan = TailScan::default();
    let newline = text.iter().rposition(|&b| b == b'\n');
    let (complete, trailing) = match newline {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (&text[..0], text),
    };
    if !trailing.is_empty() {
        scan.needs_newline = true;
        match parse_line(trailing) {
            Ok(line) => {
                scan.last = Some((line.seq, line.mac, line.mac_ok(key)));
                return scan;
            }
            Err(_) => scan.torn = trailing.len(),
        }
    }
    if newline.is_none() {
        return scan;
    }
    for line in complete.split(|&b| b == b'\n').rev() {
        match parse_line(line) {
            Ok(line) => {
                scan.last = Some((line.seq, line.mac, line.mac_ok(key)));
                break;
            }
            Err(_) => scan.skipped += 1,
        }
    }
    scan
}

/// Where the chain on disk stopped, and what was found amiss on the way.
pub(super) struct Resume {
    pub(super) last: Option<(u64, [u8; 32])>,
    pub(super) notes: Vec<String>,
}

/// The files on disk: appending, rotating, finding where the chain stopped.
pub(super) struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    _lock: File,
    /// A descriptor held in reserve, given up for the next file if the process has
    /// no other to give (see `rotate`).
    spare: Option<File>,
    /// Opens the next file; replaced in tests to fail like descriptor exhaustion.
    open_next: fn(&Path) -> io::Result<File>,
    /// Rotations that failed since the writer last counted them.
    pub(super) rotation_failures: u64,
}

/// The process (or system) has no descriptor left.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

impl LogFile {
    pub(super) fn open(settings: &AuditSettings) -> io::Result<(LogFile, Resume)> {
        let path = &settings.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let lock = lock(path)?;
        let mut file = open_append(path)?;
        let tail = scan_tail(&mut file, &settings.key)?;
        let name = path.display();
        let mut notes = Vec::new();
        if tail.torn > 0 {
            notes.push(format!(
                "{name} ended with an incomplete line ({} bytes): the previous run stopped mid-write",
                tail.torn
            ));
        }
        if tail.needs_newline {
            file.write_all(b"\n")?;
        }
        let mut last = None;
        match tail.last {
            Some((seq, mac, mac_ok)) => {
                last = Some((seq, mac));
                if tail.skipped > 0 {
                    notes.push(format!(
                        "{} unreadable line(s) in {name} after seq {seq}",
                        tail.skipped
                    ));
                }
                if !mac_ok {
                    notes.push(format!(
                        "the last line (seq {seq}) does not verify with this key: the key changed or the line was altered"
                    ));
                }
            }
            None => {
                if tail.skipped > 0 {
                    notes.push(format!(
                        "{name} holds {} line(s) that are not chain lines (an older format?)",
                        tail.skipped
                    ));
                }
                // A fresh file after a rotation: the chain goes on from the newest rotated one.
                let older = rotated(path, 1);
                match File::open(&older) {
                    Ok(mut f) => match scan_tail(&mut f, &settings.key)?.last {
                        Some((seq, mac, mac_ok)) => {
                            last = Some((seq, mac));
                            if !mac_ok {
                                notes.push(format!(
                                    "the last line of {} (seq {seq}) does not verify with this key",
                                    older.display()
                                ));
                            }
                        }
                        None => notes.push(format!("{} holds no chain line", older.display())),
                    },
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                if last.is_none() && !notes.is_empty() {
                    notes.push("a new chain starts here".to_string());
                }
            }
        }
        let size = file.metadata()?.len();
        let log = LogFile {
            path: path.clone(),
            file,
            size,
            max_bytes: settings.max_file_bytes,
            keep: settings.keep_files.max(1),
            _lock: lock,
            spare: File::open("/dev/null").ok(),
            open_next: open_append,
            rotation_failures: 0,
        };
        Ok((log, Resume { last, notes }))
    }

    /// Append the lines, rotating first whenever one would take the file past its size.
    /// A rotation that fails (no descriptor for the next file, say) loses nothing: the
    /// lines go on into the current file, the failure is logged and counted, and the
    /// next batch tries again.
    pub(super) fn write_lines(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut rotation_failed = false;
        for line in lines {
            let size = self.size + buf.len() as u64;
            if !rotation_failed && size > 0 && size + line.len() as u64 > self.max_bytes {
                self.file.write_all(&buf)?;
                self.size += buf.len() as u64;
                buf.clear();
                if let Err(e) = self.rotate() {
                    rotation_failed = true;
                    self.rotation_failures += 1;
                    let path = self.path.display();
                    tracing::error!(error = %e, path = %path, "audit log rotation failed; writing on in the current file");
                }
            }
            buf.extend_from_slice(line);
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// `{path}` becomes `{path}.1`, `.1` becomes `.2`, …; the one past `keep` goes.
    /// The next file is opened before anything is renamed, so that without a
    /// descriptor for it the log stays as it was; the spare descriptor is given up
    /// for it when the process has no other.
    fn rotate(&mut self) -> io::Result<()> {
        // A rotation that failed after giving the spare up has left it to take back.
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
        self.file.sync_all()?;
        let next_path = sibling(&self.path, ".next");
        // Left by a crash mid-rotation: empty, or lines also in the current file.
        let _ = std::fs::remove_file(&next_path);
        let next = match (self.open_next)(&next_path) {
            Err(e) if out_of_descriptors(&e) && self.spare.is_some() => {
                self.spare = None;
                (self.open_next)(&next_path)?
            }
            other => other?,
        };
        for n in (1..self.keep).rev() {
            match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    let _ = std::fs::remove_file(&next_path);
                    return Err(e);
                }
                _ => {}
            }
        }
        if let Err(e) = std::fs::rename(&self.path, rotated(&self.path, 1)) {
            let _ = std::fs::remove_file(&next_path);
            return Err(e);
        }
        std::fs::rename(&next_path, &self.path)?;
        // The old file's descriptor is free now: take the spare back with it (at
        // once, before another thread's accept can), for the next rotation.
        self.file = next;
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
        self.size = 0;
        sync_dir(&self.path);
        Ok(())
    }

    pub(super) fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::*;
    use crate::audit::{ProblemKind, verify};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    fn no_descriptor(_: &Path) -> io::Result<File> {
        Err(io::Error::from_raw_os_error(24))
    }

    #[test]
    fn a_rotation_without_a_descriptor_loses_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_files(dir.path());
        let now = Instant::now();
        let mut engine = engine(&s, now);
        engine.log.as_mut().unwrap().open_next = no_descriptor;
        log_connects(&mut engine, 0..12, now);
        // Every entry went on into the one file; each failed rotation was counted.
        assert_eq!(log_files(&s.path), vec![s.path.clone()]);
        assert_eq!(engine.metrics.audit_dropped.load(Ordering::Relaxed), 0);
        assert!(
            engine
                .metrics
                .audit_rotation_failures
                .load(Ordering::Relaxed)
                > 0
        );
        // Descriptors again: the next batch rotates, and the chain runs on.
        engine.log.as_mut().unwrap().open_next = open_append;
        engine.step(vec![connect("sensor-12")], now, 1_000, true);
        drop(engine);
        let files = log_files(&s.path);
        assert_eq!(files.len(), 2, "{files:?}");
        let report = verify(&files, &KEY, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        let text: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        for i in 0..=12 {
            assert!(text.contains(&format!("\"sensor-{i}\"")), "sensor-{i} lost");
        }
    }

    #[test]
    fn a_rotation_short_of_descriptors_uses_the_spare_one() {
        fn only_without_spare(path: &Path) -> io::Result<File> {
            // Succeeds only once the spare was given up (stands for EMFILE until then).
            static GIVEN_UP: AtomicU64 = AtomicU64::new(0);
            if GIVEN_UP.fetch_add(1, Ordering::Relaxed) == 0 {
                return Err(io::Error::from_raw_os_error(24));
            }
            open_append(path)
        }
        let dir = tempfile::tempdir().unwrap();
        let s = small_files(dir.path());
        let now = Instant::now();
        let mut engine = engine(&s, now);
        engine.log.as_mut().unwrap().open_next = only_without_spare;
        log_connects(&mut engine, 0..8, now);
        assert_eq!(
            engine
                .metrics
                .audit_rotation_failures
                .load(Ordering::Relaxed),
            0
        );
        assert!(log_files(&s.path).len() >= 2);
        assert!(
            engine.log.as_ref().unwrap().spare.is_some(),
            "the spare is taken back for the next rotation"
        );
    }

    #[test]
    fn rotation_keeps_the_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_files(dir.path());
        let now = Instant::now();
        let mut engine = engine(&s, now);
        log_connects(&mut engine, 0..12, now);
        engine.step(Vec::new(), now, 1_000, true);
        drop(engine);
        let files = log_files(&s.path);
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(files.last(), Some(&s.path));
        for file in &files {
            assert!(std::fs::metadata(file).unwrap().len() <= 1_000);
        }
        let report = verify(&files, &KEY, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.lines, 14);

        // A middle file alone is consistent, and says it starts mid-chain.
        let middle = verify(&files[1..2], &KEY, None);
        assert!(middle.is_clean(), "{:?}", middle.problems);
        assert_eq!(middle.notes[0].kind, ProblemKind::StartsMidChain);

        // Swapping two rotated files is seen where the second one starts.
        let (a, b) = (files[0].clone(), files[1].clone());
        let swap = dir.path().join("swap");
        std::fs::rename(&a, &swap).unwrap();
        std::fs::rename(&b, &a).unwrap();
        std::fs::rename(&swap, &b).unwrap();
        let report = verify(&files, &KEY, None);
        assert_eq!(report.problems[0].kind, ProblemKind::BrokenLink);
        assert_eq!((&report.problems[0].file, report.problems[0].line), (&b, 1));
        assert!(report.problems[0].detail.contains("out of order"));
    }

    #[test]
    fn rotation_deletes_the_oldest_file_beyond_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            max_file_bytes: 600,
            keep_files: 2,
            ..settings(dir.path())
        };
        let now = Instant::now();
        let mut engine = engine(&s, now);
        let entries = (0..20).map(|i| connect(&format!("sensor-{i}"))).collect();
        engine.step(entries, now, 1_000, true);
        drop(engine);
        let files = log_files(&s.path);
        assert_eq!(
            files,
            vec![rotated(&s.path, 2), rotated(&s.path, 1), s.path.clone()]
        );
        let report = verify(&files, &KEY, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.notes.len(), 1);
    }

    #[test]
    fn a_restart_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 2);
        let before = json(lines(&s.path).last().unwrap());
        write_log(&s, 2);
        let text = lines(&s.path);
        let resumed = json(&text[before["seq"].as_u64().unwrap() as usize + 1]);
        assert_eq!(resumed["seq"], before["seq"].as_u64().unwrap() + 1);
        assert_eq!(resumed["prev"], before["mac"]);
        assert_eq!(resumed["event"], "connect");
        assert!(check(&s, None).is_clean());
    }

    #[test]
    fn a_restart_after_rotation_continues_from_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 2);
        std::fs::rename(&s.path, rotated(&s.path, 1)).unwrap();
        write_log(&s, 1);
        let first = json(&lines(&s.path)[0]);
        assert_eq!(first["seq"], checkpoint.seq + 1);
        assert_eq!(first["prev"], checkpoint.mac.as_str());
        assert!(verify(&log_files(&s.path), &KEY, None).is_clean());
    }

    #[test]
    fn a_torn_line_is_recorded_at_restart_and_verify_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 3);
        let mut file = OpenOptions::new().append(true).open(&s.path).unwrap();
        file.write_all(br#"{"seq":4,"time_ms":17"#).unwrap();
        drop(file);
        write_log(&s, 1);
        let text = lines(&s.path);
        let recovery = json(&text[5]);
        assert_eq!(recovery["event"], "chain-recovery");
        assert!(
            recovery["reason"]
                .as_str()
                .unwrap()
                .contains("incomplete line")
        );
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(5, ProblemKind::Torn)]);
    }

    #[test]
    fn an_older_unchained_log_gets_a_new_chain_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        std::fs::write(
            &s.path,
            "{\"time_ms\":1,\"event\":\"start\",\"decision\":\"allow\"}\n",
        )
        .unwrap();
        write_log(&s, 1);
        let text = lines(&s.path);
        assert_eq!(json(&text[1])["event"], "chain-recovery");
        assert_eq!(json(&text[1])["seq"], 0);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(1, ProblemKind::Unchained)]);
    }
}
