//! The strict MQTT decoder on arbitrary bytes: framing, CONNECT, then every later
//! frame under both protocol versions. It must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_mqtt::strict;

fuzz_target!(|data: &[u8]| {
    strict::replay(data);
});
