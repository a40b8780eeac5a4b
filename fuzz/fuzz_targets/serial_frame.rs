//! The serial wire format's receive path on arbitrary bytes: the first byte sets the
//! chunk size, the rest is a line's byte stream fed to a Deframer, and every frame is
//! decoded and verified; the stream is also decoded whole, as one frame. An error,
//! never a panic, and never a frame that verifies under two keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_serial_frame::{Deframed, Deframer, Key, MAX_ENCODED_LEN, decode};
use std::sync::LazyLock;

/// The key of the specification's test vectors (the bytes 0 to 31), so that the
/// seed corpus verifies, and one bit away from it.
static KEYS: LazyLock<(Key, Key)> = LazyLock::new(|| {
    let mut bytes: [u8; 32] = core::array::from_fn(|i| i as u8);
    let key = Key::new(&bytes).unwrap();
    bytes[31] ^= 1;
    (key, Key::new(&bytes).unwrap())
});

fn receive(encoded: &mut [u8]) {
    let Ok(unverified) = decode(encoded) else {
        return;
    };
    let _ = (unverified.id(), unverified.direction());
    let (key, other) = &*KEYS;
    let verified = unverified.verify(key);
    assert!(
        verified.is_err() || unverified.verify(other).is_err(),
        "{unverified:?} verified under two keys"
    );
    if let Ok(frame) = verified {
        let _ = (frame.frame_type(), frame.counter(), frame.suffix());
        let _ = (frame.payload(), frame.body(), frame.raw());
        let _ = (frame.ack(), frame.nak(), frame.resync_floor());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
    for piece in stream.chunks(usize::from(chunk) + 1) {
        deframer.feed(piece, |event| {
            if let Deframed::Frame(encoded) = event {
                receive(encoded);
            }
        });
    }
    // The stream as one frame, its last delimiter dropped as a Deframer would.
    let mut whole = stream.strip_suffix(&[0]).unwrap_or(stream).to_vec();
    receive(&mut whole);
});
