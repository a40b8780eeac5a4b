//! A generated corpus of hostile input, fed through the whole receive path (a Deframer
//! fed in chunks of random size, decode, verify): random bytes, valid frames of every
//! type mutated every way a wire or an attacker could (bit flips, truncations,
//! insertions, deletions, splices, length fields changed, the direction reflected, the
//! longer COBS form), and streams of whole frames, cut frames and noise.
//!
//! Nothing may panic; a frame verifies under its device's key only if its decoded
//! bytes are the genuine frame's, never under any other key; a genuine frame after a
//! delimiter is always recovered, whatever came before it.
//!
//! Deterministic: the PRNG starts from `SEED`, or from `SERIAL_CORPUS_SEED` (hex) to
//! explore others. Every failure names the seed and the case; the same seed replays it.

mod common;

use common::{Fields, Rng, random_fields};
use portcullis_serial_frame::{
    Deframed, Deframer, Direction, FrameType, Key, MAX_ENCODED_LEN, MAX_FRAME_LEN, MAX_ID_LEN,
    MAX_PAYLOAD_LEN, MAX_SUFFIX_LEN, Unverified, cobs, decode,
};
use std::fmt;

const SEED: u64 = 0x5eed_0f5e_71a1;
const CASES: usize = 120_000;
/// The floor: the run fails rather than shrink below it unnoticed.
const MIN_CASES: usize = 100_000;

fn seed() -> u64 {
    let seed = match std::env::var("SERIAL_CORPUS_SEED") {
        Ok(hex) => u64::from_str_radix(hex.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("SERIAL_CORPUS_SEED={hex}: not hex ({e})")),
        Err(_) => SEED,
    };
    assert_ne!(seed, 0, "xorshift never leaves 0; pick another seed");
    seed
}

/// Where a failure happened, for its message.
#[derive(Clone, Copy)]
struct At {
    seed: u64,
    case: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {:#x} (SERIAL_CORPUS_SEED), case {}",
            self.seed, self.case
        )
    }
}

struct Genuine {
    fields: Fields,
    key: Key,
    /// The key with one bit flipped: the nearest wrong key (a bit flip changes the
    /// HMAC key at any length; appending a zero byte would not, below 64 bytes).
    wrong_key: Key,
    /// The frame on the wire, delimiter included.
    wire: Vec<u8>,
    /// The decoded frame, tag included.
    raw: Vec<u8>,
}

impl Genuine {
    fn new(rng: &mut Rng, fields: Fields) -> Self {
        let wire = fields.wire();
        let mut raw = wire[..wire.len() - 1].to_vec();
        let len = cobs::decode_in_place(&mut raw).unwrap();
        raw.truncate(len);
        let mut wrong = fields.key.clone();
        let at = rng.below(wrong.len());
        wrong[at] ^= 1 << rng.below(8);
        Self {
            key: Key::new(&fields.key).unwrap(),
            wrong_key: Key::new(&wrong).unwrap(),
            fields,
            wire,
            raw,
        }
    }

    /// The encoding, without its delimiter.
    fn encoded(&self) -> &[u8] {
        &self.wire[..self.wire.len() - 1]
    }
}

const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";

fn id_of_len(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .map(|_| ID_CHARS[rng.below(ID_CHARS.len())] as char)
        .collect()
}

/// A valid suffix of exactly `len` bytes: levels of id characters and a three-byte
/// character, no empty level.
fn suffix_of_len(rng: &mut Rng, len: usize) -> String {
    let mut suffix = String::new();
    while suffix.len() < len {
        let room = len - suffix.len();
        match rng.below(8) {
            0 if room >= 3 => suffix.push('温'),
            1 if room >= 2 && !suffix.is_empty() && !suffix.ends_with('/') => suffix.push('/'),
            _ => suffix.push(ID_CHARS[rng.below(ID_CHARS.len())] as char),
        }
    }
    suffix
}

/// Frames of every type and direction with every length at its limit, largest and
/// smallest.
fn frames_at_limits(rng: &mut Rng) -> Vec<Fields> {
    let shapes = [
        (FrameType::Data, Direction::Up),
        (FrameType::Data, Direction::Down),
        (FrameType::Ack, Direction::Up),
        (FrameType::Ack, Direction::Down),
        (FrameType::Nak, Direction::Up),
        (FrameType::Nak, Direction::Down),
        (FrameType::Resync, Direction::Down),
    ];
    let mut frames = Vec::new();
    for (frame_type, direction) in shapes {
        for largest in [true, false] {
            let (suffix, payload) = match frame_type {
                FrameType::Data if largest => (
                    suffix_of_len(rng, MAX_SUFFIX_LEN),
                    rng.bytes(MAX_PAYLOAD_LEN),
                ),
                FrameType::Data => (suffix_of_len(rng, 1), Vec::new()),
                FrameType::Nak => (String::new(), rng.bytes(9)),
                _ => (String::new(), rng.bytes(8)),
            };
            frames.push(Fields {
                key: rng.bytes(32),
                direction,
                frame_type,
                id: id_of_len(rng, if largest { MAX_ID_LEN } else { 1 }),
                counter: if largest { u64::MAX } else { 1 },
                suffix,
                payload,
            });
        }
    }
    frames
}

/// Whether a COBS encoding ends in a full (`0xFF`) block, so that the longer form,
/// with an empty `0x01` block after it, exists.
fn ends_in_full_block(encoded: &[u8]) -> bool {
    let (mut at, mut last) = (0, 0);
    while let Some(&code) = encoded.get(at) {
        last = code;
        at += usize::from(code).max(1);
    }
    last == 0xFF
}

/// DATA frames whose encoding ends in a full block, found by trying payload lengths.
fn frames_ending_in_full_block(rng: &mut Rng) -> Vec<Fields> {
    let mut template = random_fields(rng, false);
    template.frame_type = FrameType::Data;
    let suffix_len = 1 + rng.below(40);
    template.suffix = suffix_of_len(rng, suffix_len);
    let mut found = Vec::new();
    for len in 200..=MAX_PAYLOAD_LEN {
        let mut fields = template.clone();
        // Its own key: a key stands for one genuine frame in this test.
        fields.key = rng.bytes(32);
        fields.payload = rng.bytes(len).into_iter().map(|b| b | 1).collect();
        let wire = fields.wire();
        if ends_in_full_block(&wire[..wire.len() - 1]) {
            found.push(fields);
        }
    }
    assert!(found.len() >= 2, "only {} found", found.len());
    found
}

fn pool(rng: &mut Rng) -> Vec<Genuine> {
    let mut fields: Vec<Fields> = (0..256).map(|i| random_fields(rng, i % 8 == 0)).collect();
    fields.extend(frames_at_limits(rng));
    fields.extend(frames_ending_in_full_block(rng));
    let pool: Vec<Genuine> = fields.into_iter().map(|f| Genuine::new(rng, f)).collect();
    assert!(pool.iter().any(|g| g.raw.len() == MAX_FRAME_LEN));
    pool
}

/// Offsets of the length fields in a decoded frame: id, suffix, payload (two bytes).
fn length_fields(raw: &[u8]) -> [usize; 4] {
    let id_len = usize::from(raw[2]);
    let suffix_len_at = 3 + id_len + 8;
    let payload_len_at = suffix_len_at + 1 + usize::from(raw[suffix_len_at]);
    [2, suffix_len_at, payload_len_at, payload_len_at + 1]
}

fn re_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; cobs::max_encoded_len(raw.len())];
    let len = cobs::encode(raw, &mut out).unwrap();
    out.truncate(len);
    out
}

/// One change to encoded bytes, as a noisy wire makes them.
fn wire_noise(rng: &mut Rng, w: &mut Vec<u8>) {
    if w.is_empty() {
        w.push(rng.byte());
        return;
    }
    match rng.below(6) {
        0 => {
            let at = rng.below(w.len());
            w[at] ^= 1 << rng.below(8);
        }
        1 => w.truncate(rng.below(w.len())),
        2 => {
            let at = rng.below(w.len() + 1);
            let n = 1 + rng.below(4);
            w.splice(at..at, rng.bytes(n));
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
        _ => {
            // A delimiter inserted: the frame split in two.
            let at = rng.below(w.len());
            w.insert(at, 0);
        }
    }
}

/// One mutation of a genuine frame's encoding (without its delimiter), and whether
/// it took bytes from `other`.
fn mutate(rng: &mut Rng, g: &Genuine, other: &Genuine) -> (Vec<u8>, bool) {
    let mut w = g.encoded().to_vec();
    let mut spliced = false;
    match rng.below(10) {
        0..=3 => wire_noise(rng, &mut w),
        4 => {
            for _ in 0..2 + rng.below(4) {
                wire_noise(rng, &mut w);
            }
        }
        5 => {
            // A length field changed in the decoded frame, the tag left as it was.
            let mut raw = g.raw.clone();
            let at = length_fields(&raw)[rng.below(4)];
            raw[at] = match rng.below(3) {
                0 => 0,
                1 => rng.byte(),
                _ => raw[at].wrapping_add([1, 2, 0x80, 0xFF][rng.below(4)]),
            };
            w = re_encode(&raw);
        }
        6 => {
            // The head of one frame with the tail of another.
            let cut_a = rng.below(g.raw.len());
            let cut_b = rng.below(other.raw.len());
            w = re_encode(&[&g.raw[..cut_a], &other.raw[cut_b..]].concat());
            spliced = true;
        }
        7 => {
            // Any decoded byte changed (reaches fields COBS flips would not).
            let mut raw = g.raw.clone();
            let at = rng.below(raw.len());
            raw[at] ^= 1 + (rng.byte() % 255);
            w = re_encode(&raw);
        }
        8 => {
            // Reflected: the direction bit flipped, as if the other side had sent it.
            let mut raw = g.raw.clone();
            raw[1] ^= 0x80;
            w = re_encode(&raw);
        }
        _ => {
            // An empty block appended: the longer form after a full block (the same
            // frame), an extra zero byte after any other (a different one).
            w.push(0x01);
        }
    }
    (w, spliced)
}

#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    noise: usize,
    mutated: usize,
    streams: usize,
    frames: usize,
    decoded: usize,
    oversize: usize,
    /// Verifications tried under a key that must fail.
    wrong_key_checks: usize,
    verified_genuine: usize,
    longer_form_verified: usize,
}

/// Checks one decoded frame against the keys of `known` genuine frames (when `by_id`,
/// only those of the device the frame names, as a receiver looks keys up): under a
/// genuine frame's key it verifies only as exactly that frame, under a wrong key
/// never. Returns which genuine frames it verified as.
fn check(
    unverified: &Unverified<'_>,
    known: &[&Genuine],
    by_id: bool,
    at: At,
    tally: &mut Tally,
) -> Vec<usize> {
    let mut verified = Vec::new();
    for (i, g) in known.iter().enumerate() {
        if by_id && g.fields.id != unverified.id() {
            continue;
        }
        tally.wrong_key_checks += 1;
        assert!(
            unverified.verify(&g.wrong_key).is_err(),
            "{at}: {unverified:?} verified under a wrong key"
        );
        if let Ok(frame) = unverified.verify(&g.key) {
            assert_eq!(
                frame.raw(),
                g.raw,
                "{at}: a frame that is not the genuine one verified under its key"
            );
            assert_eq!(Fields::of_frame(&g.fields.key, &frame), g.fields, "{at}");
            verified.push(i);
        }
    }
    verified
}

/// Runs `stream` through a fresh Deframer in chunks of random size and checks every
/// frame it yields. Returns how many times each of `known` verified.
fn receive(
    rng: &mut Rng,
    stream: &[u8],
    known: &[&Genuine],
    by_id: bool,
    at: At,
    tally: &mut Tally,
) -> Vec<usize> {
    let mut deframer = Deframer::<MAX_ENCODED_LEN>::new();
    let mut verified = vec![0; known.len()];
    let max_chunk = [1, 3, 16, 255, stream.len().max(1)][rng.below(5)];
    let mut rest = stream;
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at((1 + rng.below(max_chunk)).min(rest.len()));
        rest = after;
        deframer.feed(chunk, |event| match event {
            Deframed::Oversize => tally.oversize += 1,
            Deframed::Frame(encoded) => {
                tally.frames += 1;
                let Ok(unverified) = decode(encoded) else {
                    return;
                };
                tally.decoded += 1;
                for i in check(&unverified, known, by_id, at, tally) {
                    verified[i] += 1;
                }
            }
        });
    }
    tally.verified_genuine += verified.iter().sum::<usize>();
    verified
}

/// `decode` on bytes as they are, zeros and over-long runs included (a caller that
/// frames by other means).
fn decode_directly(bytes: &[u8], known: &[&Genuine], at: At, tally: &mut Tally) {
    let mut buf = bytes.to_vec();
    if let Ok(unverified) = decode(&mut buf) {
        check(&unverified, known, false, at, tally);
    }
}

fn noise_case(rng: &mut Rng, pool: &[Genuine], at: At, tally: &mut Tally) {
    let g = &pool[rng.below(pool.len())];
    let len = rng.below(1400);
    let mut noise = rng.bytes(len);
    if rng.chance(2) {
        // No delimiters: runs past the Deframer's buffer and COBS blocks that fit.
        noise.iter_mut().for_each(|b| *b |= 1);
    }
    receive(rng, &noise, &[g], false, at, tally);
    decode_directly(&noise, &[g], at, tally);
    tally.noise += 1;
}

fn mutation_case(rng: &mut Rng, pool: &[Genuine], at: At, tally: &mut Tally) {
    let g = &pool[rng.below(pool.len())];
    let other = &pool[rng.below(pool.len())];
    let (encoded, spliced) = mutate(rng, g, other);
    let known: &[&Genuine] = if spliced { &[g, other] } else { &[g] };
    let longer_form = encoded.len() == g.encoded().len() + 1
        && encoded.starts_with(g.encoded())
        && ends_in_full_block(g.encoded());
    // A flush delimiter first, as a careful sender does.
    let mut stream = vec![0];
    stream.extend(&encoded);
    stream.push(0);
    let verified = receive(rng, &stream, known, false, at, tally);
    if longer_form {
        assert_eq!(verified[0], 1, "{at}: the longer COBS form was refused");
        tally.longer_form_verified += 1;
    }
    // Without a zero the Deframer gave decode exactly these bytes; with one, decode
    // must refuse them whole.
    if encoded.contains(&0) {
        assert!(
            decode(&mut encoded.clone()).is_err(),
            "{at}: decode took bytes with a 0x00 inside"
        );
    }
    tally.mutated += 1;
}

/// Whole frames, frames cut at either end, mutated frames and noise, one after the
/// other. Every whole frame that starts the stream or follows a delimiter must come
/// out.
fn stream_case(rng: &mut Rng, pool: &[Genuine], at: At, tally: &mut Tally) {
    let mut stream = Vec::new();
    let mut known: Vec<&Genuine> = Vec::new();
    let mut must_recover: Vec<usize> = Vec::new();
    for _ in 0..2 + rng.below(5) {
        let g = &pool[rng.below(pool.len())];
        let index = match known.iter().position(|k| std::ptr::eq(*k, g)) {
            Some(i) => i,
            None => {
                known.push(g);
                must_recover.push(0);
                known.len() - 1
            }
        };
        match rng.below(6) {
            0 | 1 => {
                if stream.last().is_none_or(|&b| b == 0) {
                    must_recover[index] += 1;
                }
                stream.extend(&g.wire);
            }
            2 => stream.extend(&g.wire[..rng.below(g.wire.len())]),
            3 => stream.extend(&g.wire[rng.below(g.wire.len())..]),
            4 => {
                let other = &pool[rng.below(pool.len())];
                stream.extend(mutate(rng, g, other).0);
                if rng.chance(2) {
                    stream.push(0);
                }
            }
            _ => {
                let mut noise = if rng.chance(8) {
                    vec![0x55; MAX_ENCODED_LEN + 1 + rng.below(150)]
                } else {
                    let len = rng.below(64);
                    rng.bytes(len)
                };
                if rng.chance(2) {
                    noise.push(0);
                }
                stream.extend(noise);
            }
        }
    }
    let verified = receive(rng, &stream, &known, true, at, tally);
    for (i, (&got, &want)) in verified.iter().zip(&must_recover).enumerate() {
        assert!(
            got >= want,
            "{at}: frame {:?} was whole after a delimiter {want} times, recovered {got}",
            known[i].fields
        );
    }
    tally.streams += 1;
}

#[test]
fn hostile_input_never_panics_and_never_verifies() {
    let started = std::time::Instant::now();
    let seed = seed();
    let mut rng = Rng(seed);
    let pool = pool(&mut rng);
    let mut tally = Tally::default();
    for case in 0..CASES {
        let at = At { seed, case };
        match case % 10 {
            0 => noise_case(&mut rng, &pool, at, &mut tally),
            1 | 2 => stream_case(&mut rng, &pool, at, &mut tally),
            _ => mutation_case(&mut rng, &pool, at, &mut tally),
        }
        tally.cases += 1;
    }
    let at = At { seed, case: CASES };
    assert!(tally.cases >= MIN_CASES, "{at}: {tally:?}");
    assert!(
        tally.decoded > 1000,
        "{at}: mutations should often get past parsing: {tally:?}"
    );
    assert!(tally.oversize > 0, "{at}: {tally:?}");
    assert!(tally.longer_form_verified > 0, "{at}: {tally:?}");
    eprintln!(
        "seed {seed:#x}: {} cases in {:?}: {tally:?}",
        tally.cases,
        started.elapsed()
    );
}

#[test]
fn noise_before_a_flushed_frame_never_costs_that_frame() {
    let seed = 0xfeed_beef;
    let mut rng = Rng(seed);
    let pool = pool(&mut rng);
    let mut tally = Tally::default();
    for case in 0..5_000 {
        let at = At { seed, case };
        let g = &pool[rng.below(pool.len())];
        let noise_len = if rng.chance(10) {
            1300 + rng.below(200)
        } else {
            rng.below(64)
        };
        let mut stream = rng.bytes(noise_len);
        stream.push(0);
        stream.extend(&g.wire);
        assert_eq!(
            receive(&mut rng, &stream, &[g], false, at, &mut tally),
            [1],
            "{at}"
        );
    }
}

#[test]
fn every_genuine_frame_in_the_pool_verifies() {
    let seed = 0x1234;
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    for (case, g) in pool(&mut rng).iter().enumerate() {
        let at = At { seed, case };
        assert_eq!(
            receive(&mut rng, &g.wire, &[g], false, at, &mut tally),
            [1],
            "{at}: {:?}",
            g.fields
        );
    }
}
