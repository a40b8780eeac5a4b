//! A bus's incoming bytes, read into authenticated frames: cut at each delimiter,
//! decoded with strict bounds, checked against the devices the port allows, and
//! verified under the device's own key. Pure (fed bytes, returns what was heard): the
//! replay floor, the pipeline and the answers belong to the bus's task.
//!
//! Noise between frames costs only the bytes it touches: the deframer starts again at
//! the next delimiter. Nothing but the device id is read from a frame before its tag
//! verifies, and the id only to find the key.

use crate::keys::FrameKeys;
use portcullis_core::principal::PrincipalId;
use portcullis_serial_frame::{
    Body, Deframed, Deframer, Direction, MAX_ENCODED_LEN, NakReason, decode,
};
use std::collections::HashSet;

/// A frame whose tag verified, from a device allowed on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub id: PrincipalId,
    pub counter: u64,
    pub body: HeardBody,
}

/// What a verified frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeardBody {
    /// Telemetry for `devices/{id}/{suffix}`.
    Data { suffix: String, payload: Vec<u8> },
    /// The device took our frame `counter`.
    Ack { counter: u64 },
    /// The device refused our frame `counter`.
    Nak { counter: u64, reason: NakReason },
}

/// Why received bytes were not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// More bytes without a delimiter than any frame has (line noise, or a frame cut).
    Noise,
    /// Not a frame: the rule it broke (the specification's error code).
    Malformed { rule: &'static str },
    /// A frame naming a device this port does not allow (or no valid device id).
    NotOnThisBus { id: String },
    /// The tag does not verify under the device's key, or the device has none.
    BadTag { id: PrincipalId },
}

/// One frame's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Heard(Heard),
    Refused(Refused),
}

/// The reading half of one bus.
pub struct Reader {
    /// Boxed: a frame's worth of buffer.
    deframer: Box<Deframer<MAX_ENCODED_LEN>>,
    allowed: HashSet<PrincipalId>,
}

impl Reader {
    /// A reader for a bus on which only `allowed` may speak.
    pub fn new(allowed: impl IntoIterator<Item = PrincipalId>) -> Reader {
        Reader {
            deframer: Box::new(Deframer::new()),
            allowed: allowed.into_iter().collect(),
        }
    }

    /// Read `bytes` (any cut of the stream), adding each frame's fate to `out`. A
    /// frame going down (the gateway's own, heard back on a shared bus) is ignored.
    pub fn feed(&mut self, bytes: &[u8], keys: &dyn FrameKeys, out: &mut Vec<Outcome>) {
        let allowed = &self.allowed;
        self.deframer.feed(bytes, |deframed| {
            let encoded = match deframed {
                Deframed::Oversize => {
                    out.push(Outcome::Refused(Refused::Noise));
                    return;
                }
                // Two delimiters in a row: a sender's flush, nothing to read.
                Deframed::Frame([]) => return,
                Deframed::Frame(encoded) => encoded,
            };
            if let Some(outcome) = read(encoded, allowed, keys) {
                out.push(outcome);
            }
        });
    }
}

fn read(
    encoded: &mut [u8],
    allowed: &HashSet<PrincipalId>,
    keys: &dyn FrameKeys,
) -> Option<Outcome> {
    let refused = |r| Some(Outcome::Refused(r));
    let unverified = match decode(encoded) {
        Ok(u) => u,
        Err(e) => return refused(Refused::Malformed { rule: e.label() }),
    };
    if unverified.direction() == Direction::Down {
        return None;
    }
    let claimed = unverified.id();
    let id = match PrincipalId::parse(claimed) {
        Ok(id) if allowed.contains(&id) => id,
        _ => {
            return refused(Refused::NotOnThisBus {
                id: claimed.to_string(),
            });
        }
    };
    let Some(key) = keys.key(&id) else {
        return refused(Refused::BadTag { id });
    };
    let Ok(frame) = unverified.verify(&key) else {
        return refused(Refused::BadTag { id });
    };
    let body = match frame.body() {
        Body::Data { suffix, payload } => HeardBody::Data {
            suffix: suffix.to_string(),
            payload: payload.to_vec(),
        },
        Body::Ack { counter } => HeardBody::Ack { counter },
        Body::Nak { counter, reason } => HeardBody::Nak { counter, reason },
        // The decoder refuses a RESYNC going up; never reached.
        Body::Resync { .. } => return refused(Refused::Malformed { rule: "resync_up" }),
    };
    Some(Outcome::Heard(Heard {
        id,
        counter: frame.counter(),
        body,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_serial_frame::{Key, MAX_WIRE_LEN, Outgoing, encode};
    use std::collections::HashMap;

    struct Table(HashMap<PrincipalId, [u8; 32]>);

    impl FrameKeys for Table {
        fn key(&self, id: &PrincipalId) -> Option<Key> {
            self.0.get(id).and_then(|k| Key::new(k).ok())
        }
    }

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    fn keys() -> Table {
        Table(HashMap::from([
            (id("pump-1"), [1; 32]),
            (id("pump-2"), [2; 32]),
            (id("elsewhere"), [3; 32]),
        ]))
    }

    fn wire(key: [u8; 32], direction: Direction, who: &str, counter: u64, body: Body) -> Vec<u8> {
        let mut out = [0u8; MAX_WIRE_LEN];
        let frame = Outgoing {
            direction,
            id: who,
            counter,
            body,
        };
        let n = encode(&Key::new(&key).unwrap(), &frame, &mut out).unwrap();
        out[..n].to_vec()
    }

    fn data(key: [u8; 32], who: &str, counter: u64) -> Vec<u8> {
        wire(
            key,
            Direction::Up,
            who,
            counter,
            Body::Data {
                suffix: "telemetry/flow",
                payload: b"12.5",
            },
        )
    }

    fn reader() -> Reader {
        Reader::new([id("pump-1"), id("pump-2")])
    }

    #[test]
    fn a_frame_from_a_device_on_the_bus_is_heard_in_any_cut_of_the_stream() {
        let bytes = [data([1; 32], "pump-1", 7), data([2; 32], "pump-2", 9)].concat();
        for cut in [1, 3, 17, bytes.len()] {
            let mut r = reader();
            let mut out = Vec::new();
            for chunk in bytes.chunks(cut) {
                r.feed(chunk, &keys(), &mut out);
            }
            assert_eq!(out.len(), 2, "cut {cut}: {out:?}");
            assert_eq!(
                out[0],
                Outcome::Heard(Heard {
                    id: id("pump-1"),
                    counter: 7,
                    body: HeardBody::Data {
                        suffix: "telemetry/flow".into(),
                        payload: b"12.5".to_vec(),
                    },
                })
            );
            assert!(matches!(&out[1], Outcome::Heard(h) if h.id == id("pump-2") && h.counter == 9));
        }
    }

    #[test]
    fn a_frame_under_another_devices_key_is_a_bad_tag() {
        let mut out = Vec::new();
        reader().feed(&data([2; 32], "pump-1", 1), &keys(), &mut out);
        assert_eq!(
            out,
            [Outcome::Refused(Refused::BadTag { id: id("pump-1") })]
        );
    }

    #[test]
    fn a_device_not_allowed_on_this_bus_is_refused_even_with_its_right_key() {
        let mut out = Vec::new();
        reader().feed(&data([3; 32], "elsewhere", 1), &keys(), &mut out);
        assert_eq!(
            out,
            [Outcome::Refused(Refused::NotOnThisBus {
                id: "elsewhere".into()
            })]
        );
    }

    #[test]
    fn line_noise_between_frames_costs_only_itself() {
        let mut bytes = data([1; 32], "pump-1", 1);
        bytes.extend_from_slice(&[0x55, 0xAA, 0x13, 0x37, 0x00]);
        bytes.extend(std::iter::repeat_n(0xFFu8, 3000));
        bytes.push(0);
        bytes.extend(data([1; 32], "pump-1", 2));
        let mut out = Vec::new();
        reader().feed(&bytes, &keys(), &mut out);
        let heard: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Heard(h) => Some(h.counter),
                _ => None,
            })
            .collect();
        assert_eq!(heard, [1, 2]);
        assert!(out.contains(&Outcome::Refused(Refused::Noise)));
        assert!(
            out.iter()
                .any(|o| matches!(o, Outcome::Refused(Refused::Malformed { .. })))
        );
    }

    #[test]
    fn a_truncated_frame_is_malformed_and_the_next_one_is_heard() {
        let whole = data([1; 32], "pump-1", 1);
        let mut bytes = whole[..whole.len() / 2].to_vec();
        bytes.push(0);
        bytes.extend(data([1; 32], "pump-1", 2));
        let mut out = Vec::new();
        reader().feed(&bytes, &keys(), &mut out);
        assert!(
            matches!(out[0], Outcome::Refused(Refused::Malformed { .. })),
            "{out:?}"
        );
        assert!(matches!(&out[1], Outcome::Heard(h) if h.counter == 2));
    }

    #[test]
    fn our_own_downlink_heard_back_on_the_bus_is_ignored() {
        let down = wire(
            [1; 32],
            Direction::Down,
            "pump-1",
            3,
            Body::Ack { counter: 1 },
        );
        let mut out = Vec::new();
        reader().feed(&down, &keys(), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn acks_and_naks_are_heard_with_what_they_answer() {
        let bytes = [
            wire(
                [1; 32],
                Direction::Up,
                "pump-1",
                4,
                Body::Ack { counter: 10 },
            ),
            wire(
                [1; 32],
                Direction::Up,
                "pump-1",
                5,
                Body::Nak {
                    counter: 11,
                    reason: NakReason::Busy,
                },
            ),
        ]
        .concat();
        let mut out = Vec::new();
        reader().feed(&bytes, &keys(), &mut out);
        assert!(matches!(&out[0], Outcome::Heard(h) if h.body == HeardBody::Ack { counter: 10 }));
        assert!(
            matches!(&out[1], Outcome::Heard(h) if h.body == HeardBody::Nak { counter: 11, reason: NakReason::Busy })
        );
    }

    #[test]
    fn random_bytes_never_panic_and_are_never_heard() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut r = reader();
        let k = keys();
        let mut out = Vec::new();
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8)
                .collect();
            r.feed(&bytes, &k, &mut out);
        }
        assert!(!out.iter().any(|o| matches!(o, Outcome::Heard(_))));
    }
}
