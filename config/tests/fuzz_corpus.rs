//! Replays the config loader's fuzz corpus (fuzz/corpus/config_loader) on stable:
//! every input the fuzzer kept gives a value or an error, never a panic.

#[test]
fn every_config_fuzz_input_loads_or_is_refused() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/config_loader");
    let mut replayed = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz corpus checked in") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = portcullis_config::Config::parse(text, "fuzz.toml");
        }
        replayed += 1;
    }
    assert!(replayed > 0, "empty corpus at {dir}");
}
