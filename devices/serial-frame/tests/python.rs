//! Cross-checks with tests/serial/frame.py, the independent Python implementation of
//! docs/serial-protocol.md: it passes the document's vectors; frames Rust encodes,
//! Python decodes to the same fields; frames Python encodes are byte-for-byte the ones
//! Rust encodes and decode in Rust; and both refuse the same mutated frames with the
//! same error code.
//!
//! The interpreter is `$PORTCULLIS_PYTHON`, else `python3`. Without one these tests
//! fail: the cross-check is the point, not an extra.

mod common;

use common::{Fields, Rng, hex, random_fields, repo_root, spec_path, unhex};
use portcullis_serial_frame::{Key, cobs, decode};
use std::io::Write;
use std::process::{Command, Stdio};

fn python() -> String {
    std::env::var("PORTCULLIS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn frame_py() -> std::path::PathBuf {
    repo_root().join("tests/serial/frame.py")
}

fn spawn_failed(err: std::io::Error) -> ! {
    panic!(
        "cannot run the Python interpreter `{}` ({err}): the serial format's cross-check \
         needs Python 3 (standard library only); install python3 or set PORTCULLIS_PYTHON",
        python()
    )
}

/// Runs frame.py's batch mode: one answer line per command line.
fn batch(commands: &[String]) -> Vec<String> {
    let mut child = Command::new(python())
        .arg(frame_py())
        .arg("batch")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| spawn_failed(e));
    let mut stdin = child.stdin.take().unwrap();
    let input = commands.join("\n") + "\n";
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "frame.py batch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(answers.len(), commands.len(), "one answer per command");
    answers
}

/// What Rust makes of one encoded frame, in frame.py's answer format.
fn rust_answer(key: &[u8], encoded: &[u8]) -> String {
    let mut buf = encoded.to_vec();
    let unverified = match decode(&mut buf) {
        Ok(u) => u,
        Err(e) => return format!("error {}", e.label()),
    };
    match unverified.verify(&Key::new(key).unwrap()) {
        Ok(frame) => Fields::of_frame(key, &frame).decoded_answer(),
        Err(e) => format!("error {}", e.label()),
    }
}

/// Field sets covering every type and direction, lengths across COBS blocks.
fn corpus(seed: u64, n: usize) -> Vec<Fields> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| random_fields(&mut rng, i % 2 == 0))
        .collect()
}

#[test]
fn python_passes_the_spec_vectors() {
    let output = Command::new(python())
        .arg(frame_py())
        .arg("check-vectors")
        .arg(spec_path())
        .output()
        .unwrap_or_else(|e| spawn_failed(e));
    assert!(
        output.status.success(),
        "frame.py check-vectors failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("vectors ok"), "{said}");
}

#[test]
fn rust_encoded_frames_decode_identically_in_python() {
    let frames = corpus(0xC0FFEE, 400);
    let commands: Vec<String> = frames
        .iter()
        .map(|f| {
            let wire = f.wire();
            format!("decode {} {}", hex(&f.key), hex(&wire[..wire.len() - 1]))
        })
        .collect();
    let crossed = frames.iter().filter(|f| f.wire().len() > 256).count();
    assert!(crossed > 50, "only {crossed} frames cross a COBS block");
    for ((f, answer), command) in frames.iter().zip(batch(&commands)).zip(&commands) {
        assert_eq!(answer, f.decoded_answer(), "{command}");
    }
}

#[test]
fn python_encoded_frames_are_rusts_bytes_and_decode_in_rust() {
    let frames = corpus(0xBEEF, 400);
    let commands: Vec<String> = frames.iter().map(Fields::encode_command).collect();
    for (f, answer) in frames.iter().zip(batch(&commands)) {
        let wire = unhex(
            answer
                .strip_prefix("ok ")
                .unwrap_or_else(|| panic!("{answer} for {f:?}")),
        );
        assert_eq!(wire, f.wire(), "{f:?}");
        assert_eq!(
            rust_answer(&f.key, &wire[..wire.len() - 1]),
            f.decoded_answer()
        );
    }
}

#[test]
fn both_refuse_the_same_mutated_frames_with_the_same_code() {
    let mut rng = Rng(0xD1FF);
    let frames = corpus(0xFACE, 200);
    let mut cases: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for _ in 0..4000 {
        let f = &frames[rng.below(frames.len())];
        let wire = f.wire();
        let mut raw = wire[..wire.len() - 1].to_vec();
        let len = cobs::decode_in_place(&mut raw).unwrap();
        raw.truncate(len);
        // Mutate the decoded frame, so every field rule is reached, then re-encode.
        match rng.below(5) {
            0 => {
                let at = rng.below(raw.len());
                raw[at] ^= 1 << rng.below(8);
            }
            1 => raw.truncate(rng.below(raw.len())),
            2 => {
                let at = rng.below(raw.len() + 1);
                raw.insert(at, rng.byte());
            }
            3 => {
                // The flags or a length: the rules, not just the tag.
                let at = [1, 2, 3 + usize::from(raw[2]) + 8][rng.below(3)];
                if let Some(b) = raw.get_mut(at) {
                    *b = rng.byte();
                }
            }
            _ => {
                let at = rng.below(raw.len());
                raw[at] = rng.byte();
            }
        }
        let mut encoded = vec![0u8; cobs::max_encoded_len(raw.len())];
        let n = cobs::encode(&raw, &mut encoded).unwrap();
        encoded.truncate(n);
        // Now and then, raw line damage instead: COBS itself broken.
        if rng.chance(10) {
            let at = rng.below(encoded.len());
            encoded[at] = rng.byte().max(1);
        }
        cases.push((f.key.clone(), encoded));
    }
    let commands: Vec<String> = cases
        .iter()
        .map(|(key, encoded)| format!("decode {} {}", hex(key), hex(encoded)))
        .collect();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for (((key, encoded), answer), command) in cases.iter().zip(batch(&commands)).zip(&commands) {
        assert_eq!(rust_answer(key, encoded), answer, "{command}");
        *codes
            .entry(answer.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .or_default() += 1;
    }
    // The mutations must reach the rules, not only the tag.
    for code in [
        "tag",
        "truncated",
        "reserved_flags",
        "id_length",
        "trailing_bytes",
    ] {
        assert!(
            codes.contains_key(&format!("error {code}")),
            "no {code} case: {codes:?}"
        );
    }
    eprintln!("{codes:?}");
}
