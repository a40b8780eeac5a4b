//! Replays the strict decoder's fuzz corpus (fuzz/corpus/strict_decoder) on stable:
//! every input the fuzzer kept is decoded to an answer, never a panic.

#[test]
fn every_strict_decoder_fuzz_input_is_answered() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/corpus/strict_decoder"
    );
    let mut replayed = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz corpus checked in") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        portcullis_mqtt::strict::replay(&bytes);
        replayed += 1;
    }
    assert!(replayed > 0, "empty corpus at {dir}");
}
