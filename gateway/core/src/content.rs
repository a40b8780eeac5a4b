//! Poison content: text a peer may legally send but that standard consumers refuse.
//!
//! MQTT 5 §1.5.4 says control characters and noncharacters SHOULD NOT be in a UTF-8
//! string, and common client libraries end the connection when one arrives (libmosquitto
//! on U+0001 or U+FFFF in a topic, paho-mqtt on U+FEFF in a user property). One device
//! forwarding such text would knock every consumer of its topics off the broker, so the
//! gateway refuses it from everyone, devices and services alike, as it comes in: in
//! topics (`TopicName` and `TopicFilter` never hold one), user property names and
//! values, the content type and the response topic. Correlation data is binary and is
//! not looked at. A payload whose Payload Format Indicator says UTF-8 must be UTF-8.

use std::fmt;

/// A character no topic or string property may carry: C0 and C1 controls and DEL
/// (U+0000–U+001F, U+007F–U+009F), the noncharacters U+FDD0–U+FDEF and U+xFFFE/U+xFFFF
/// of every plane, and U+FEFF (byte order mark).
pub fn is_forbidden(c: char) -> bool {
    let c = u32::from(c);
    c <= 0x1F
        || (0x7F..=0x9F).contains(&c)
        || (0xFDD0..=0xFDEF).contains(&c)
        || c & 0xFFFE == 0xFFFE
        || c == 0xFEFF
}

/// The first forbidden character of `s` and its byte offset.
pub fn first_forbidden(s: &str) -> Option<(usize, char)> {
    // Every topic is looked at, and most are ASCII, where only the C0 controls and DEL
    // can be forbidden: a byte test that needs no decoding.
    if s.is_ascii() {
        return s
            .bytes()
            .position(|b| b < 0x20 || b == 0x7F)
            .map(|at| (at, char::from(s.as_bytes()[at])));
    }
    s.char_indices().find(|&(_, c)| is_forbidden(c))
}

/// `s` with each forbidden character written `\u{XXXX}`, for logs and audit lines.
pub fn escaped(s: &str) -> std::borrow::Cow<'_, str> {
    if first_forbidden(s).is_none() {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if is_forbidden(c) {
                format!("\\u{{{:04X}}}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Where a message carries text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Topic,
    ResponseTopic,
    ContentType,
    UserPropertyName,
    UserPropertyValue,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Topic => "topic",
            Field::ResponseTopic => "response topic",
            Field::ContentType => "content type",
            Field::UserPropertyName => "user property name",
            Field::UserPropertyValue => "user property value",
        })
    }
}

/// A message refused for its content; counted as a validation failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    #[error(
        "{field} contains U+{code:04X} at byte {at} (control characters, noncharacters and U+FEFF are refused)"
    )]
    Character { field: Field, code: u32, at: usize },
    #[error("payload format indicator says UTF-8 but the payload is not valid UTF-8 at byte {0}")]
    PayloadNotUtf8(usize),
}

impl Poison {
    /// Stable metric label.
    pub fn label(self) -> &'static str {
        match self {
            Poison::Character {
                field: Field::Topic,
                ..
            } => "topic_forbidden_character",
            Poison::Character { .. } => "property_forbidden_character",
            Poison::PayloadNotUtf8(_) => "payload_not_utf8",
        }
    }

    /// Is it the topic itself (MQTT 5: Topic Name invalid) rather than what it carries
    /// (Payload format invalid)?
    pub fn is_topic(self) -> bool {
        matches!(
            self,
            Poison::Character {
                field: Field::Topic,
                ..
            }
        )
    }
}

/// Check one piece of text.
pub fn check_text(field: Field, s: &str) -> Result<(), Poison> {
    match first_forbidden(s) {
        None => Ok(()),
        Some((at, c)) => Err(Poison::Character {
            field,
            code: u32::from(c),
            at,
        }),
    }
}

/// The text a message carries besides its topic, and its payload, as a peer sent them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Carried<'a> {
    pub response_topic: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub user_properties: &'a [(String, String)],
    /// The Payload Format Indicator is 1 (UTF-8).
    pub payload_utf8: bool,
    pub payload: &'a [u8],
}

impl<'a> Carried<'a> {
    /// A message that carries nothing but its payload (CoAP, serial).
    pub fn payload(payload: &'a [u8]) -> Carried<'a> {
        Carried {
            response_topic: None,
            content_type: None,
            user_properties: &[],
            payload_utf8: false,
            payload,
        }
    }
}

/// Refuse a message whose topic or properties carry a forbidden character, or whose
/// payload is announced as UTF-8 and is not.
pub fn check(topic: &str, carried: &Carried<'_>) -> Result<(), Poison> {
    check_text(Field::Topic, topic)?;
    if let Some(rt) = carried.response_topic {
        check_text(Field::ResponseTopic, rt)?;
    }
    if let Some(ct) = carried.content_type {
        check_text(Field::ContentType, ct)?;
    }
    for (name, value) in carried.user_properties {
        check_text(Field::UserPropertyName, name)?;
        check_text(Field::UserPropertyValue, value)?;
    }
    if carried.payload_utf8
        && let Err(e) = std::str::from_utf8(carried.payload)
    {
        return Err(Poison::PayloadNotUtf8(e.valid_up_to()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(code: u32) -> char {
        char::from_u32(code).unwrap()
    }

    #[test]
    fn controls_noncharacters_and_bom_are_forbidden() {
        for code in (0..=0x1F).chain(0x7F..=0x9F).chain(0xFDD0..=0xFDEF) {
            assert!(is_forbidden(ch(code)), "U+{code:04X}");
        }
        for plane in 0..=0x10 {
            assert!(is_forbidden(ch(plane << 16 | 0xFFFE)), "plane {plane}");
            assert!(is_forbidden(ch(plane << 16 | 0xFFFF)), "plane {plane}");
        }
        assert!(is_forbidden('\u{FEFF}'));
    }

    #[test]
    fn ordinary_text_including_its_neighbours_is_allowed() {
        for code in [
            0x20, 0x7E, 0xA0, 0xE9, 0xFDCF, 0xFDF0, 0xFEFE, 0xFF00, 0xFFFD, 0x1_0000, 0x1_FFFD,
            0x1F600, 0x10_FFFD,
        ] {
            assert!(!is_forbidden(ch(code)), "U+{code:04X}");
        }
        assert_eq!(first_forbidden("devices/é/telemetry 😀"), None);
    }

    #[test]
    fn the_first_forbidden_character_is_named_with_its_offset() {
        assert_eq!(first_forbidden("ab\u{1}c\u{FFFF}"), Some((2, '\u{1}')));
        let err = check_text(Field::Topic, "a/\u{FFFF}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "topic contains U+FFFF at byte 2 (control characters, noncharacters and U+FEFF are refused)"
        );
        assert_eq!(err.label(), "topic_forbidden_character");
        assert!(err.is_topic());
    }

    #[test]
    fn escaped_text_shows_forbidden_characters_as_code_points() {
        assert_eq!(escaped("a/é"), "a/é");
        assert_eq!(escaped("a/\u{1}\u{FEFF}b"), "a/\\u{0001}\\u{FEFF}b");
    }

    #[test]
    fn every_carried_string_is_checked() {
        let props = vec![("k".to_string(), "v\u{FEFF}".to_string())];
        let carried = Carried {
            user_properties: &props,
            ..Carried::default()
        };
        assert_eq!(
            check("a/b", &carried),
            Err(Poison::Character {
                field: Field::UserPropertyValue,
                code: 0xFEFF,
                at: 1
            })
        );
        let props = vec![("k\u{7F}".to_string(), "v".to_string())];
        let carried = Carried {
            user_properties: &props,
            ..Carried::default()
        };
        assert_eq!(
            check("a/b", &carried).unwrap_err().label(),
            "property_forbidden_character"
        );
        for carried in [
            Carried {
                content_type: Some("text/\u{85}plain"),
                ..Carried::default()
            },
            Carried {
                response_topic: Some("replies/\u{FDD0}"),
                ..Carried::default()
            },
        ] {
            let err = check("a/b", &carried).unwrap_err();
            assert!(!err.is_topic(), "{err}");
        }
        assert!(
            check("a/\u{0}", &Carried::default())
                .unwrap_err()
                .is_topic()
        );
    }

    #[test]
    fn payload_announced_as_utf8_must_be_utf8() {
        let bad = Carried {
            payload_utf8: true,
            payload: b"ok\xff",
            ..Carried::default()
        };
        assert_eq!(check("a", &bad), Err(Poison::PayloadNotUtf8(2)));
        // Binary payloads are not looked at unless announced as UTF-8.
        let binary = Carried {
            payload: b"ok\xff",
            ..Carried::default()
        };
        assert_eq!(check("a", &binary), Ok(()));
        // The payload is binary: a control character in it is the device's business.
        let text = Carried {
            payload_utf8: true,
            payload: "\u{1}é".as_bytes(),
            ..Carried::default()
        };
        assert_eq!(check("a", &text), Ok(()));
    }
}
