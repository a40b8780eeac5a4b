//! The verifier (`portcullis audit verify`): reads the files oldest first, checks each
//! line's MAC, its link to the line before and its sequence number, and, given a
//! checkpoint kept off the box, that the log still holds it. Every finding says
//! which file and line, and why it matters. Never panics, whatever the files hold.

use super::chain::{GENESIS, Parsed, Unreadable, decode32, parse_line};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Longest line `verify` reads; the writer's lines are far shorter.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The MAC does not match the line: it was edited, or written with another key.
    BadMac,
    /// `prev` is not the MAC of the line before: a line removed, inserted or moved,
    /// or files given out of order or missing.
    BrokenLink,
    /// The link holds but `seq` does not follow on.
    SeqGap,
    /// An incomplete line: the file was cut, or the writer stopped mid-write.
    Torn,
    /// Not JSON.
    NotJson,
    /// JSON without `seq`, `prev` and `mac`: inserted, or older than the chain.
    Unchained,
    /// The expected checkpoint is not in the files: truncated or rewritten since.
    MissingCheckpoint,
    /// The file could not be read.
    Unreadable,
    /// A note, not a problem: the first file continues lines that were not given.
    StartsMidChain,
}

/// One finding, with where it is (`line` is 1-based; 0 when it is about a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub kind: ProblemKind,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.detail),
            n => write!(f, "{}: line {n}: {}", self.file.display(), self.detail),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines read, in all files.
    pub lines: u64,
    /// Files read.
    pub files: usize,
    pub problems: Vec<Problem>,
    /// Worth knowing, not wrong (`StartsMidChain`).
    pub notes: Vec<Problem>,
    /// seq and hex MAC of the last chain line.
    pub last: Option<(u64, String)>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the log files, given oldest first, against `key`; with `expect`, also that
/// the line with that seq carries that MAC (a checkpoint kept off the box). Never
/// panics, whatever the files hold.
pub fn verify(paths: &[PathBuf], key: &[u8; 32], expect: Option<(u64, String)>) -> VerifyReport {
    let mut verifier = Verifier {
        key,
        report: VerifyReport::default(),
        last: None,
        file_index: 0,
        expect: None,
        found: false,
        differs: None,
    };
    if let Some((seq, mac)) = expect {
        match decode32(&mac) {
            Some(mac) => verifier.expect = Some((seq, mac)),
            None => verifier.problem(
                Path::new(""),
                0,
                ProblemKind::MissingCheckpoint,
                "the expected checkpoint's MAC is not 64 hex digits".to_string(),
            ),
        }
    }
    for (index, path) in paths.iter().enumerate() {
        verifier.file_index = index;
        verifier.file(path);
    }
    verifier.finish(paths.last().map(PathBuf::as_path).unwrap_or(Path::new("")))
}

/// The last chain line read.
struct Link {
    seq: u64,
    mac: [u8; 32],
    /// When this line's MAC is bad, the line before it: the next line may link to
    /// either (this one edited, or inserted), and it has been reported already.
    before: Option<(u64, [u8; 32])>,
    file: PathBuf,
    file_index: usize,
    line: usize,
}

struct Verifier<'k> {
    key: &'k [u8; 32],
    report: VerifyReport,
    last: Option<Link>,
    file_index: usize,
    expect: Option<(u64, [u8; 32])>,
    found: bool,
    /// A line with the expected seq but another MAC.
    differs: Option<(PathBuf, usize)>,
}

impl Verifier<'_> {
    fn problem(&mut self, file: &Path, line: usize, kind: ProblemKind, detail: String) {
        let problem = Problem {
            file: file.to_path_buf(),
            line,
            kind,
            detail,
        };
        match kind {
            ProblemKind::StartsMidChain => self.report.notes.push(problem),
            _ => self.report.problems.push(problem),
        }
    }

    fn file(&mut self, path: &Path) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                self.problem(
                    path,
                    0,
                    ProblemKind::Unreadable,
                    format!("cannot be read: {e}"),
                );
                return;
            }
        };
        self.report.files += 1;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut n = 0;
        loop {
            match read_line_capped(&mut reader, &mut buf) {
                Ok(None) => break,
                Ok(Some(shape)) => {
                    n += 1;
                    self.report.lines += 1;
                    self.line(path, n, &buf, shape);
                }
                Err(e) => {
                    self.problem(
                        path,
                        n + 1,
                        ProblemKind::Unreadable,
                        format!("cannot be read: {e}"),
                    );
                    break;
                }
            }
        }
    }

    fn line(&mut self, file: &Path, n: usize, text: &[u8], shape: Shape) {
        if shape.overlong {
            let detail = format!("longer than {MAX_LINE} bytes: not a line this log writes");
            return self.problem(file, n, ProblemKind::NotJson, detail);
        }
        let parsed = match parse_line(text) {
            Ok(parsed) => parsed,
            Err(Unreadable::Torn) => {
                let detail = if shape.newline {
                    "incomplete line: the writer stopped mid-write (a chain-recovery line \
                     after it says so) or the line was cut"
                } else {
                    "incomplete last line: the file was truncated, or the writer stopped mid-write"
                };
                return self.problem(file, n, ProblemKind::Torn, detail.to_string());
            }
            Err(Unreadable::NotJson) => {
                let detail = "not JSON: not a line this log writes (inserted or damaged)";
                return self.problem(file, n, ProblemKind::NotJson, detail.to_string());
            }
            Err(Unreadable::Unchained) => {
                let detail = "JSON without seq, prev and mac: inserted, or written before the log was chained";
                return self.problem(file, n, ProblemKind::Unchained, detail.to_string());
            }
        };
        let mac_ok = parsed.mac_ok(self.key);
        if mac_ok {
            self.check_link(file, n, &parsed);
        } else {
            let detail = if parsed.body.is_none() {
                "not in the form the writer produces (mac moved or reformatted): the entry was edited"
            } else {
                "MAC does not match its content: the entry was edited (or written with another key)"
            };
            self.problem(file, n, ProblemKind::BadMac, detail.to_string());
        }
        if let Some((seq, mac)) = self.expect
            && parsed.seq == seq
        {
            if parsed.mac == mac {
                self.found = true;
            } else if self.differs.is_none() {
                self.differs = Some((file.to_path_buf(), n));
            }
        }
        self.report.last = Some((parsed.seq, hex::encode(parsed.mac)));
        let before = match &self.last {
            Some(last) if !mac_ok => Some((last.seq, last.mac)),
            _ => None,
        };
        self.last = Some(Link {
            seq: parsed.seq,
            mac: parsed.mac,
            before,
            file: file.to_path_buf(),
            file_index: self.file_index,
            line: n,
        });
    }

    fn check_link(&mut self, file: &Path, n: usize, parsed: &Parsed<'_>) {
        let seq = parsed.seq;
        let Some(last) = &self.last else {
            if parsed.prev != GENESIS {
                let detail = format!(
                    "the chain starts at seq {seq}, after lines not given here (rotated away or \
                     not listed): those are not checked"
                );
                self.problem(file, n, ProblemKind::StartsMidChain, detail);
            } else if seq != 0 {
                let detail = format!("the chain starts at seq {seq} instead of 0");
                self.problem(file, n, ProblemKind::SeqGap, detail);
            }
            return;
        };
        // After a line with a bad MAC, linking to the line before it is fine too.
        let (last_seq, last_mac) = match last.before {
            Some((seq, mac)) if parsed.prev == mac => (seq, mac),
            _ => (last.seq, last.mac),
        };
        let expected = last_seq.saturating_add(1);
        if parsed.prev != last_mac {
            let detail = if last.file_index != self.file_index {
                format!(
                    "does not continue {} (which ends at seq {}): the files are out of order or \
                     one is missing (give them oldest first)",
                    last.file.display(),
                    last.seq
                )
            } else if parsed.prev == GENESIS {
                format!(
                    "the chain starts over here (seq {seq}) after seq {} on line {}: the log \
                     was emptied and restarted, or another log was joined on",
                    last.seq, last.line
                )
            } else if seq > expected {
                format!(
                    "prev is not the MAC of the line before: {} line(s) removed here (seq jumps \
                     from {} to {seq})",
                    seq - expected,
                    last_seq
                )
            } else if seq < expected {
                format!(
                    "prev is not the MAC of the line before: lines reordered or repeated (seq \
                     goes back from {} to {seq})",
                    last_seq
                )
            } else {
                "prev is not the MAC of the line before: that line was replaced, or lines reordered"
                    .to_string()
            };
            self.problem(file, n, ProblemKind::BrokenLink, detail);
        } else if seq != expected {
            let detail = format!("seq is {seq}, but {expected} follows {last_seq}");
            self.problem(file, n, ProblemKind::SeqGap, detail);
        }
    }

    fn finish(mut self, last_path: &Path) -> VerifyReport {
        if let Some((seq, mac)) = self.expect
            && !self.found
        {
            let short = &hex::encode(mac)[..16];
            let (file, line, detail) = if let Some((file, line)) = self.differs.take() {
                let detail = format!(
                    "the checkpoint says seq {seq} has MAC {short}…, this line has another: the \
                     log was rewritten"
                );
                (file, line, detail)
            } else {
                match &self.last {
                    None => {
                        let detail = format!(
                            "no chain line at all, but a checkpoint for seq {seq} was published: \
                             the log was emptied or replaced"
                        );
                        (last_path.to_path_buf(), 0, detail)
                    }
                    Some(last) if last.seq < seq => {
                        let detail = format!(
                            "the log ends at seq {}, before the checkpoint at seq {seq}: it was \
                             truncated (or rewritten)",
                            last.seq
                        );
                        (last.file.clone(), last.line, detail)
                    }
                    Some(_) => {
                        let detail = format!(
                            "seq {seq} of the checkpoint is not in these files: give the file \
                             that holds it, or the log was rewritten"
                        );
                        (last_path.to_path_buf(), 0, detail)
                    }
                }
            };
            self.problem(&file, line, ProblemKind::MissingCheckpoint, detail);
        }
        self.report
    }
}

/// How a line ended.
struct Shape {
    newline: bool,
    overlong: bool,
}

/// The next line into `buf` (without its newline), keeping at most `MAX_LINE` bytes
/// of it, so a hostile file cannot take the memory. None at the end of the file.
fn read_line_capped<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<Shape>> {
    buf.clear();
    let mut overlong = false;
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(any.then_some(Shape {
                newline: false,
                overlong,
            }));
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        let room = MAX_LINE.saturating_sub(buf.len());
        if chunk.len() > room {
            overlong = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(Shape {
                newline: true,
                overlong,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditSettings;
    use crate::audit::fixtures::*;
    use std::time::Instant;

    #[test]
    fn a_clean_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 5);
        let report = check(&s, Some(checkpoint.expectation()));
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!((report.lines, report.files), (6, 1));
        assert_eq!(report.last, Some((5, checkpoint.mac.clone())));
        let first = json(&lines(&s.path)[0]);
        assert_eq!(first["seq"], 0);
        assert_eq!(first["prev"], "0".repeat(64));
        assert_eq!(first["principal"], "sensor-0");
        assert_eq!(json(&lines(&s.path)[5])["event"], "checkpoint");
    }

    #[test]
    fn an_edited_field_is_reported_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        text[2] = text[2].replace("sensor-2", "sensor-9");
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(3, ProblemKind::BadMac)]);
        let shown = report.problems[0].to_string();
        assert!(shown.ends_with("line 3: MAC does not match its content: the entry was edited (or written with another key)"), "{shown}");
    }

    #[test]
    fn a_removed_line_is_reported_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        text.remove(2);
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(3, ProblemKind::BrokenLink)]);
        assert!(
            report.problems[0].detail.contains("1 line(s) removed"),
            "{}",
            report.problems[0]
        );
    }

    #[test]
    fn an_inserted_line_is_one_problem_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        let real_mac = json(&text[2])["mac"].as_str().unwrap().to_string();
        let forged = text[2]
            .replace("sensor-2", "sensor-x")
            .replace(&real_mac, &"ab".repeat(32));
        text.insert(3, forged);
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(4, ProblemKind::BadMac)]);
    }

    #[test]
    fn reordered_lines_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let mut text = lines(&s.path);
        text.swap(1, 2);
        rewrite(&s.path, &text);
        let report = check(&s, None);
        assert_eq!(
            kinds(&report),
            vec![
                (2, ProblemKind::BrokenLink),
                (3, ProblemKind::BrokenLink),
                (4, ProblemKind::BrokenLink)
            ]
        );
    }

    #[test]
    fn a_cut_last_line_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_log(&s, 5);
        let text = std::fs::read(&s.path).unwrap();
        std::fs::write(&s.path, &text[..text.len() - 40]).unwrap();
        let report = check(&s, None);
        assert_eq!(kinds(&report), vec![(6, ProblemKind::Torn)]);
        assert!(report.problems[0].detail.contains("truncated"));
    }

    #[test]
    fn a_truncated_log_misses_the_checkpoint_kept_off_the_box() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 5);
        let text = lines(&s.path);
        rewrite(&s.path, &text[..3]);
        // On its own, the shorter chain is consistent: that is what checkpoints are for.
        assert!(check(&s, None).is_clean());
        let report = check(&s, Some(checkpoint.expectation()));
        assert_eq!(kinds(&report), vec![(3, ProblemKind::MissingCheckpoint)]);
        assert!(report.problems[0].detail.contains("truncated"));
    }

    #[test]
    fn a_log_rewritten_with_another_key_fails_on_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            key: [9; 32],
            ..settings(dir.path())
        };
        write_log(&s, 4);
        let report = check(&s, None);
        assert_eq!(report.problems.len(), 5);
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.kind == ProblemKind::BadMac)
        );
    }

    #[test]
    fn a_log_rewritten_with_the_key_misses_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let checkpoint = write_log(&s, 5);
        std::fs::remove_file(&s.path).unwrap();
        let now = Instant::now();
        let mut forger = engine(&s, now);
        let forged = (0..5).map(|i| connect(&format!("other-{i}"))).collect();
        forger.step(forged, now, 1_000, true);
        drop(forger);
        let report = check(&s, Some(checkpoint.expectation()));
        assert_eq!(kinds(&report), vec![(6, ProblemKind::MissingCheckpoint)]);
        assert!(report.problems[0].detail.contains("rewritten"));
    }

    #[test]
    fn verify_never_panics_on_hostile_files() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>, ProblemKind)> = vec![
            (
                "binary",
                vec![0xff, 0x00, 0xfe, b'\n'],
                ProblemKind::NotJson,
            ),
            (
                "deep",
                "[".repeat(100_000).into_bytes(),
                ProblemKind::NotJson,
            ),
            ("array", b"[1,2]\n".to_vec(), ProblemKind::Unchained),
            (
                "string seq",
                br#"{"seq":"1","prev":"00","mac":"00"}"#.to_vec(),
                ProblemKind::Unchained,
            ),
            (
                "huge seq",
                format!(
                    "{{\"seq\":18446744073709551616,\"prev\":\"{0}\",\"mac\":\"{0}\"}}\n",
                    "0".repeat(64)
                )
                .into_bytes(),
                ProblemKind::Unchained,
            ),
            (
                "forged",
                format!(
                    "{{\"seq\":18446744073709551615,\"prev\":\"{0}\",\"mac\":\"{0}\"}}\n",
                    "0".repeat(64)
                )
                .into_bytes(),
                ProblemKind::BadMac,
            ),
            ("blank", b"\n\n".to_vec(), ProblemKind::NotJson),
            ("long", vec![b'a'; MAX_LINE + 10], ProblemKind::NotJson),
            ("cut", br#"{"seq":1,"#.to_vec(), ProblemKind::Torn),
        ];
        for (name, bytes, kind) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let report = verify(&[path], &KEY, Some((3, "0".repeat(64))));
            assert_eq!(
                report.problems[0].kind, kind,
                "{name}: {:?}",
                report.problems
            );
            assert_eq!(
                report.problems.last().unwrap().kind,
                ProblemKind::MissingCheckpoint,
                "{name}"
            );
        }
        let report = verify(
            &[dir.path().to_path_buf(), dir.path().join("absent")],
            &KEY,
            None,
        );
        assert_eq!(
            kinds(&report),
            vec![(1, ProblemKind::Unreadable), (0, ProblemKind::Unreadable)]
        );
        let report = verify(&[], &KEY, Some((0, "bad".into())));
        assert_eq!(report.problems[0].kind, ProblemKind::MissingCheckpoint);
    }
}
