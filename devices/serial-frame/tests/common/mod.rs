//! Shared by the integration tests: the test vectors read from the specification, a
//! frame's fields in a form both implementations can print, and a small PRNG.

#![allow(dead_code)]

use portcullis_serial_frame::{
    Body, Direction, Frame, FrameType, Key, MAX_WIRE_LEN, NakReason, Outgoing, encode,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn spec_path() -> PathBuf {
    repo_root().join("docs/serial-protocol.md")
}

pub fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "-".into();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    if s == "-" {
        return Vec::new();
    }
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("bad hex: {s}")))
        .collect()
}

/// One record of the ```serial-vectors block: field name -> value.
pub type Vector = BTreeMap<String, String>;

/// Parses the ```serial-vectors block as the specification describes it.
pub fn parse_vectors(text: &str) -> Vec<Vector> {
    let mut vectors: Vec<Vector> = Vec::new();
    let mut inside = false;
    let mut last = String::new();
    for line in text.lines() {
        if !inside {
            inside = line.trim() == "```serial-vectors";
            continue;
        }
        if line.trim() == "```" {
            inside = false;
            continue;
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let current = vectors.last_mut().expect("continuation before any vector");
            current.get_mut(&last).unwrap().push_str(line.trim());
            continue;
        }
        let (name, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim().to_string();
        if name == "vector" {
            vectors.push(Vector::new());
        }
        vectors
            .last_mut()
            .expect("field before any vector")
            .insert(name.to_string(), value);
        last = name.to_string();
    }
    vectors
}

/// A frame's fields, with a control frame's payload as bytes (as the vectors and the
/// Python implementation have it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub key: Vec<u8>,
    pub direction: Direction,
    pub frame_type: FrameType,
    pub id: String,
    pub counter: u64,
    pub suffix: String,
    pub payload: Vec<u8>,
}

impl Fields {
    pub fn from_vector(v: &Vector) -> Self {
        Self {
            key: unhex(&v["key"]),
            direction: match v["direction"].as_str() {
                "up" => Direction::Up,
                "down" => Direction::Down,
                other => panic!("direction {other}"),
            },
            frame_type: frame_type(&v["type"]),
            id: v["id"].clone(),
            counter: v["counter"].parse().unwrap(),
            suffix: if v["suffix"] == "-" {
                String::new()
            } else {
                v["suffix"].clone()
            },
            payload: unhex(&v["payload"]),
        }
    }

    pub fn of_frame(key: &[u8], frame: &Frame<'_>) -> Self {
        Self {
            key: key.to_vec(),
            direction: frame.direction(),
            frame_type: frame.frame_type(),
            id: frame.id().to_string(),
            counter: frame.counter(),
            suffix: frame.suffix().to_string(),
            payload: frame.payload().to_vec(),
        }
    }

    pub fn body(&self) -> Body<'_> {
        let counter = || u64::from_be_bytes(self.payload[..8].try_into().unwrap());
        match self.frame_type {
            FrameType::Data => Body::Data {
                suffix: &self.suffix,
                payload: &self.payload,
            },
            FrameType::Ack => Body::Ack { counter: counter() },
            FrameType::Nak => Body::Nak {
                counter: counter(),
                reason: NakReason::from_byte(self.payload[8]),
            },
            FrameType::Resync => Body::Resync { floor: counter() },
        }
    }

    pub fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            direction: self.direction,
            id: &self.id,
            counter: self.counter,
            body: self.body(),
        }
    }

    /// The frame on the wire, delimiter included.
    pub fn wire(&self) -> Vec<u8> {
        let key = Key::new(&self.key).unwrap();
        let mut out = vec![0u8; MAX_WIRE_LEN];
        let len = encode(&key, &self.outgoing(), &mut out).unwrap();
        out.truncate(len);
        out
    }

    /// `encode` line for frame.py's batch mode.
    pub fn encode_command(&self) -> String {
        format!(
            "encode {} {} {} {} {} {} {}",
            hex(&self.key),
            self.direction.label(),
            self.frame_type.label(),
            self.id,
            self.counter,
            hex(self.suffix.as_bytes()),
            hex(&self.payload)
        )
    }

    /// What frame.py answers to a `decode` of this frame.
    pub fn decoded_answer(&self) -> String {
        format!(
            "ok {} {} {} {} {} {}",
            self.direction.label(),
            self.frame_type.label(),
            self.id,
            self.counter,
            hex(self.suffix.as_bytes()),
            hex(&self.payload)
        )
    }
}

pub fn frame_type(label: &str) -> FrameType {
    match label {
        "DATA" => FrameType::Data,
        "ACK" => FrameType::Ack,
        "NAK" => FrameType::Nak,
        "RESYNC" => FrameType::Resync,
        other => panic!("frame type {other}"),
    }
}

/// xorshift64*: deterministic, good enough to pick test cases.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";
const SUFFIX_PIECES: &[&str] = &[
    "a",
    "telemetry",
    "temp",
    "x",
    "0",
    "é",
    "温度",
    " ",
    "-",
    "~",
    "commands",
    "reboot",
];

/// Random valid fields. `big` favours long ids, suffixes and payloads, to cross COBS
/// blocks.
pub fn random_fields(rng: &mut Rng, big: bool) -> Fields {
    let key_len = 16 + rng.below(65); // 16..=80: keys over 64 bytes are hashed by HMAC
    let key = rng.bytes(key_len);
    let frame_type = [
        FrameType::Data,
        FrameType::Data,
        FrameType::Ack,
        FrameType::Nak,
        FrameType::Resync,
    ][rng.below(5)];
    let direction = if frame_type == FrameType::Resync || rng.chance(2) {
        Direction::Down
    } else {
        Direction::Up
    };
    let id_len = if big {
        1 + rng.below(64)
    } else {
        1 + rng.below(12)
    };
    let id = (0..id_len)
        .map(|_| ID_CHARS[rng.below(ID_CHARS.len())] as char)
        .collect();
    let counter = match rng.below(4) {
        0 => 1 + rng.below(1000) as u64,
        1 => u64::MAX - rng.below(3) as u64,
        _ => rng.next().max(1),
    };
    let (suffix, payload) = match frame_type {
        FrameType::Data => {
            let max = if big { 128 } else { 24 };
            let mut suffix = String::new();
            loop {
                let piece = SUFFIX_PIECES[rng.below(SUFFIX_PIECES.len())];
                let sep = if suffix.is_empty() || rng.chance(3) {
                    ""
                } else {
                    "/"
                };
                if suffix.len() + sep.len() + piece.len() > max {
                    break;
                }
                suffix.push_str(sep);
                suffix.push_str(piece);
                if rng.chance(6) {
                    break;
                }
            }
            let len = if big { rng.below(1025) } else { rng.below(48) };
            let mut payload = rng.bytes(len);
            // Long runs without zeros make full 254-byte COBS blocks.
            if rng.chance(2) {
                payload.iter_mut().for_each(|b| *b |= 1);
            }
            (suffix, payload)
        }
        FrameType::Ack | FrameType::Resync => (String::new(), rng.next().to_be_bytes().to_vec()),
        FrameType::Nak => {
            let mut p = rng.next().to_be_bytes().to_vec();
            p.push(rng.byte());
            (String::new(), p)
        }
    };
    Fields {
        key,
        direction,
        frame_type,
        id,
        counter,
        suffix,
        payload,
    }
}
