//! Replays the serial_frame fuzz corpus (fuzz/corpus/serial_frame) on stable, as the
//! fuzz target reads each input: the first byte sets the chunk size, the rest is a
//! stream for the Deframer, and also one frame whole. An error, never a panic; the
//! seed frames (the specification's vectors) verify under the vectors' key.

use portcullis_serial_frame::{Deframed, Deframer, Key, MAX_ENCODED_LEN, decode};

fn verifies(encoded: &mut [u8], key: &Key) -> bool {
    decode(encoded).is_ok_and(|unverified| unverified.verify(key).is_ok())
}

#[test]
fn every_serial_frame_fuzz_input_is_read_or_refused() {
    let key = Key::new(&core::array::from_fn::<u8, 32, _>(|i| i as u8)).unwrap();
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/corpus/serial_frame"
    );
    let (mut replayed, mut verified) = (0, 0);
    for entry in std::fs::read_dir(dir).expect("fuzz corpus checked in") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let Some((&chunk, stream)) = bytes.split_first() else {
            continue;
        };
        let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
        for piece in stream.chunks(usize::from(chunk) + 1) {
            deframer.feed(piece, |event| {
                if let Deframed::Frame(encoded) = event {
                    verified += usize::from(verifies(encoded, &key));
                }
            });
        }
        verifies(
            &mut stream.strip_suffix(&[0]).unwrap_or(stream).to_vec(),
            &key,
        );
        replayed += 1;
    }
    assert!(replayed > 0, "empty corpus at {dir}");
    assert!(
        verified > 0,
        "no input in {dir} verifies under the vectors' key"
    );
}
