//! Replays the registry record fuzz corpus (fuzz/corpus/registry_record) on stable:
//! every stored value the fuzzer kept decodes or is refused, never a panic.

#[test]
fn every_registry_record_fuzz_input_is_decoded_or_refused() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/corpus/registry_record"
    );
    let mut replayed = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz corpus checked in") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        portcullis_core::registry::decode_any(&bytes);
        replayed += 1;
    }
    assert!(replayed > 0, "empty corpus at {dir}");
}
