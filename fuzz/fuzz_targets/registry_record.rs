//! Registry record decoding on arbitrary stored values: sealed and legacy forms of
//! every table's records. An error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_core::registry::decode_any(data);
});
