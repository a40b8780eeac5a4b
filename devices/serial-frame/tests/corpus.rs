//! A generated corpus of hostile input, fed through the whole receive path (Deframer,
//! decode, verify): random bytes and valid frames mutated every way a wire or an
//! attacker could (bit flips, truncations, insertions, deletions, splices, length
//! fields changed). Nothing may panic, and nothing whose decoded bytes differ from a
//! genuine frame's may verify under the key.

mod common;

use common::{Fields, Rng, random_fields};
use portcullis_serial_frame::{Deframed, Deframer, Key, MAX_ENCODED_LEN, cobs, decode};

const CASES: usize = 120_000;

struct Genuine {
    fields: Fields,
    key: Key,
    wire: Vec<u8>,
    /// The decoded frame, tag included.
    raw: Vec<u8>,
}

fn genuine(rng: &mut Rng, big: bool) -> Genuine {
    let fields = random_fields(rng, big);
    let wire = fields.wire();
    let mut raw = wire[..wire.len() - 1].to_vec();
    let len = cobs::decode_in_place(&mut raw).unwrap();
    raw.truncate(len);
    Genuine {
        key: Key::new(&fields.key).unwrap(),
        fields,
        wire,
        raw,
    }
}

/// Offsets of the length fields in a decoded frame.
fn length_fields(raw: &[u8]) -> [usize; 3] {
    let id_len = usize::from(raw[2]);
    let suffix_len_at = 3 + id_len + 8;
    let suffix_len = usize::from(raw[suffix_len_at]);
    [2, suffix_len_at, suffix_len_at + 1 + suffix_len]
}

fn re_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; cobs::max_encoded_len(raw.len())];
    let len = cobs::encode(raw, &mut out).unwrap();
    out.truncate(len);
    out
}

/// One mutation of a genuine frame's encoding (without its delimiter).
fn mutate(rng: &mut Rng, g: &Genuine, other: &Genuine) -> Vec<u8> {
    let mut w = g.wire[..g.wire.len() - 1].to_vec();
    match rng.below(9) {
        0 => {
            for _ in 0..=rng.below(3) {
                let at = rng.below(w.len());
                w[at] ^= 1 << rng.below(8);
            }
        }
        1 => w.truncate(rng.below(w.len())),
        2 => {
            let at = rng.below(w.len() + 1);
            let n = 1 + rng.below(4);
            let bytes = rng.bytes(n);
            w.splice(at..at, bytes);
        }
        3 => {
            let at = rng.below(w.len());
            let n = (1 + rng.below(4)).min(w.len() - at);
            w.drain(at..at + n);
        }
        4 => {
            let at = rng.below(w.len());
            w[at] = rng.byte();
        }
        5 => {
            // A length field changed in the decoded frame, the tag left as it was.
            let mut raw = g.raw.clone();
            let at = length_fields(&raw)[rng.below(3)];
            let delta = [1u8, 2, 0x80, 0xFF][rng.below(4)];
            raw[at] = raw[at].wrapping_add(delta);
            w = re_encode(&raw);
        }
        6 => {
            // The head of one frame with the tail of another.
            let cut_a = rng.below(g.raw.len());
            let cut_b = rng.below(other.raw.len());
            let raw = [&g.raw[..cut_a], &other.raw[cut_b..]].concat();
            w = re_encode(&raw);
        }
        7 => {
            // Any decoded byte changed (reaches fields COBS flips would not).
            let mut raw = g.raw.clone();
            let at = rng.below(raw.len());
            raw[at] ^= 1 + (rng.byte() % 255);
            w = re_encode(&raw);
        }
        _ => {
            // A delimiter inserted: the frame split in two.
            let at = rng.below(w.len());
            w.insert(at, 0);
        }
    }
    w
}

#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    decoded: usize,
    verified_genuine: usize,
    oversize: usize,
}

/// Runs `stream` through the receive path, verifying every decoded frame under
/// `key`. Verified frames must be byte-for-byte genuine.
fn receive(stream: &[u8], key: &Key, genuine_raw: &[u8], tally: &mut Tally) {
    let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
    deframer.feed(stream, |event| match event {
        Deframed::Oversize => tally.oversize += 1,
        Deframed::Frame(encoded) => {
            tally.frames += 1;
            let Ok(unverified) = decode(encoded) else {
                return;
            };
            tally.decoded += 1;
            let _ = unverified.id();
            if let Ok(frame) = unverified.verify(key) {
                assert_eq!(
                    frame.raw(),
                    genuine_raw,
                    "a frame that is not the genuine one verified"
                );
                tally.verified_genuine += 1;
            }
        }
    });
}

#[test]
fn hostile_input_never_panics_and_never_verifies() {
    let started = std::time::Instant::now();
    let mut rng = Rng(0x5eed_0f5e_71a1);
    let pool: Vec<Genuine> = (0..256).map(|i| genuine(&mut rng, i % 8 == 0)).collect();
    let mut tally = Tally::default();
    let mut mutated = 0;
    for case in 0..CASES {
        let g = &pool[rng.below(pool.len())];
        if case % 10 == 0 {
            // Random bytes, delimiters sprinkled, sometimes over-long runs.
            let len = if rng.chance(20) {
                1200 + rng.below(400)
            } else {
                rng.below(96)
            };
            let mut noise = rng.bytes(len);
            if rng.chance(2) {
                noise.iter_mut().for_each(|b| *b |= 1);
            }
            receive(&noise, &g.key, &g.raw, &mut tally);
            continue;
        }
        let other = &pool[rng.below(pool.len())];
        let encoded = mutate(&mut rng, g, other);
        if encoded == g.wire[..g.wire.len() - 1] {
            continue;
        }
        mutated += 1;
        // A flush delimiter first, as a careful sender does.
        let mut stream = vec![0];
        stream.extend(&encoded);
        stream.push(0);
        receive(&stream, &g.key, &g.raw, &mut tally);
    }
    // `receive` asserted that whatever verified was byte-for-byte the genuine frame
    // (a delimiter inserted at either end leaves it whole, for instance).
    assert!(
        tally.decoded > 1000,
        "mutations should often get past parsing: {tally:?}"
    );
    assert!(tally.oversize > 0, "{tally:?}");
    eprintln!(
        "{CASES} cases ({mutated} mutated frames) in {:?}: {tally:?}",
        started.elapsed()
    );
}

#[test]
fn noise_before_a_flushed_frame_never_costs_that_frame() {
    let mut rng = Rng(0xfeed_beef);
    let pool: Vec<Genuine> = (0..64).map(|i| genuine(&mut rng, i % 4 == 0)).collect();
    for _ in 0..5_000 {
        let g = &pool[rng.below(pool.len())];
        let noise_len = if rng.chance(10) {
            1300 + rng.below(200)
        } else {
            rng.below(64)
        };
        let mut stream = rng.bytes(noise_len);
        stream.push(0);
        stream.extend(&g.wire);
        let mut tally = Tally::default();
        receive(&stream, &g.key, &g.raw, &mut tally);
        assert_eq!(tally.verified_genuine, 1, "{tally:?}");
    }
}

#[test]
fn every_genuine_frame_in_the_pool_verifies() {
    let mut rng = Rng(0x1234);
    for i in 0..512 {
        let g = genuine(&mut rng, i % 2 == 0);
        let mut tally = Tally::default();
        receive(&g.wire, &g.key, &g.raw, &mut tally);
        assert_eq!(tally.verified_genuine, 1, "{:?}", g.fields);
    }
}
