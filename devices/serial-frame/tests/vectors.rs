//! The test vectors of docs/serial-protocol.md, read from the document itself so it
//! cannot drift from the code: every positive vector encodes to exactly its bytes and
//! decodes to exactly its fields; every negative vector is refused with its code.

mod common;

use common::{Fields, Vector, parse_vectors, spec_path, unhex};
use portcullis_serial_frame::{Deframed, Deframer, Key, MAX_ENCODED_LEN, decode};

fn vectors() -> Vec<Vector> {
    let path = spec_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_vectors(&text)
}

fn wire(v: &Vector) -> Vec<u8> {
    let wire = unhex(&v["wire"]);
    assert_eq!(
        wire.last(),
        Some(&0),
        "{}: wire must end in its delimiter",
        v["vector"]
    );
    assert!(
        !wire[..wire.len() - 1].contains(&0),
        "{}: one frame",
        v["vector"]
    );
    wire
}

/// Decodes and verifies one encoded frame: the fields, or the error code.
fn read(key: &[u8], encoded: &[u8]) -> Result<Fields, &'static str> {
    let mut buf = encoded.to_vec();
    let unverified = decode(&mut buf).map_err(|e| e.label())?;
    let frame = unverified
        .verify(&Key::new(key).unwrap())
        .map_err(|e| e.label())?;
    Ok(Fields::of_frame(key, &frame))
}

#[test]
fn the_spec_has_the_required_vectors() {
    let vectors = vectors();
    let positive = vectors.iter().filter(|v| !v.contains_key("error")).count();
    let negative = vectors.iter().filter(|v| v.contains_key("error")).count();
    assert!(positive >= 6, "{positive} positive vectors");
    assert!(negative >= 3, "{negative} negative vectors");
    let names: Vec<&str> = vectors.iter().map(|v| v["vector"].as_str()).collect();
    for required in [
        "data-up",
        "data-down",
        "ack-down",
        "nak-down",
        "resync-down",
        "data-up-crosses-cobs-block",
        "bad-tag",
        "reserved-flag-bit",
        "truncated",
    ] {
        assert!(names.contains(&required), "vector {required} missing");
    }
}

#[test]
fn positive_vectors_encode_to_their_exact_bytes() {
    for v in vectors().iter().filter(|v| !v.contains_key("error")) {
        let fields = Fields::from_vector(v);
        assert_eq!(fields.wire(), wire(v), "vector {}", v["vector"]);
    }
}

#[test]
fn positive_vectors_decode_to_their_exact_fields() {
    for v in vectors().iter().filter(|v| !v.contains_key("error")) {
        let expected = Fields::from_vector(v);
        let wire = wire(v);
        let got = read(&expected.key, &wire[..wire.len() - 1]);
        assert_eq!(got.as_ref(), Ok(&expected), "vector {}", v["vector"]);
        if let Some(also) = v.get("also") {
            assert_eq!(
                read(&expected.key, &unhex(also)),
                Ok(expected),
                "vector {} (also)",
                v["vector"]
            );
        }
    }
}

#[test]
fn negative_vectors_are_refused_with_their_code() {
    for v in vectors().iter().filter(|v| v.contains_key("error")) {
        let wire = wire(v);
        let got = read(&unhex(&v["key"]), &wire[..wire.len() - 1]);
        assert_eq!(
            got.map(|_| ()),
            Err(v["error"].as_str()),
            "vector {}",
            v["vector"]
        );
    }
}

#[test]
fn the_crossing_and_largest_vectors_exercise_what_they_claim() {
    let vectors = vectors();
    let by_name = |name: &str| vectors.iter().find(|v| v["vector"] == name).unwrap();
    let crossing = wire(by_name("data-up-crosses-cobs-block"));
    assert!(crossing.len() > 255 && crossing.contains(&0xFF));
    let largest = by_name("data-up-largest");
    let fields = Fields::from_vector(largest);
    assert_eq!(fields.id.len(), 64);
    assert_eq!(fields.suffix.len(), 128);
    assert_eq!(fields.payload.len(), 1024);
    assert!(wire(largest).len() - 1 <= MAX_ENCODED_LEN);
    let full = wire(by_name("data-up-ends-in-full-cobs-block"));
    let also = unhex(&by_name("data-up-ends-in-full-cobs-block")["also"]);
    // The longer form: the same blocks, then an empty 0x01 block.
    assert_eq!(also[..also.len() - 1], full[..full.len() - 1]);
    assert_eq!(also.last(), Some(&0x01));
}

#[test]
fn all_positive_vectors_in_one_stream_come_out_of_the_deframer() {
    let positives: Vec<Vector> = vectors()
        .into_iter()
        .filter(|v| !v.contains_key("error"))
        .collect();
    let mut stream = vec![0x55, 0xAA, 0x00]; // line noise, then a flush
    for v in &positives {
        stream.extend(wire(v));
    }
    let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
    let mut got = Vec::new();
    deframer.feed(&stream, |event| match event {
        Deframed::Frame(frame) => got.push(frame.to_vec()),
        Deframed::Oversize => panic!("oversize"),
    });
    assert_eq!(
        got.len(),
        positives.len() + 1,
        "the noise, then every frame"
    );
    for (v, encoded) in positives.iter().zip(&got[1..]) {
        let expected = Fields::from_vector(v);
        assert_eq!(
            read(&expected.key, encoded),
            Ok(expected),
            "vector {}",
            v["vector"]
        );
    }
}
