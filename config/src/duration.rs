//! Durations in the configuration: `"30s"`, `"500ms"`, `"5m"`, `"1h 30m"`, `"7d"` (as
//! humantime reads them), or a bare integer in the unit of the key it replaced.
//!
//! Every duration key was once an integer key named with its unit (`connect_timeout_secs`,
//! `max_delay_ms`). Those names are still read, as aliases, with a warning naming the
//! new key ([`renamed_keys`]).

use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// The longest duration any key takes: far beyond every bound the gateway checks, and
/// far from where adding it to a clock reading could overflow.
pub const LONGEST: Duration = Duration::from_secs(1000 * 365 * 86_400);

/// A duration in a key's `unit` (`whole`): a bare integer counts in it; text is read by
/// humantime, must be a whole number of it, and at most [`LONGEST`].
fn parse(text: &str, unit: &str, whole: Duration) -> Result<Duration, String> {
    let too_long =
        || format!("{text:?} is longer than the longest duration a key takes (1000 years)");
    let d = match text.parse::<u64>() {
        Ok(n) => {
            let nanos = whole.as_nanos().saturating_mul(u128::from(n));
            if nanos > LONGEST.as_nanos() {
                return Err(too_long());
            }
            const NANOS: u128 = 1_000_000_000;
            Duration::new((nanos / NANOS) as u64, (nanos % NANOS) as u32)
        }
        Err(_) => humantime::parse_duration(text).map_err(|e| {
            format!(
                "{text:?} is not a duration ({e}); write e.g. \"30s\", \"500ms\", \"5m\" \
                 or \"1h 30m\""
            )
        })?,
    };
    if d > LONGEST {
        return Err(too_long());
    }
    if d.as_nanos() % whole.as_nanos() != 0 {
        return Err(format!("{text:?}: this key takes whole {unit}"));
    }
    Ok(d)
}

macro_rules! duration_type {
    ($(#[$doc:meta])* $name:ident, $unit:literal, $whole:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
        pub struct $name(pub Duration);

        impl std::ops::Deref for $name {
            type Target = Duration;
            fn deref(&self) -> &Duration {
                &self.0
            }
        }

        impl $name {
            /// A bare number of the unit, or a duration as humantime reads it.
            pub fn parse(text: &str) -> Result<$name, String> {
                parse(text, $unit, $whole).map($name)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(
                            f,
                            "a duration such as \"30s\", \"500ms\", \"5m\" or \"1h 30m\", \
                             or a whole number of {}",
                            $unit
                        )
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$name, E> {
                        if v < 0 {
                            return Err(E::custom(format!("a duration cannot be negative (got {v})")));
                        }
                        $name::parse(&v.to_string()).map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$name, E> {
                        $name::parse(&v.to_string()).map_err(E::custom)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_any(Visitor)
            }
        }
    };
}

duration_type!(
    /// A duration kept in whole seconds; a bare integer is seconds.
    Secs,
    "seconds",
    Duration::from_secs(1)
);

duration_type!(
    /// A duration kept in whole milliseconds; a bare integer is milliseconds.
    Millis,
    "milliseconds",
    Duration::from_millis(1)
);

impl Secs {
    pub const fn from_secs(s: u64) -> Secs {
        Secs(Duration::from_secs(s))
    }
}

impl Millis {
    pub const fn from_millis(ms: u64) -> Millis {
        Millis(Duration::from_millis(ms))
    }
}

/// Old key → new key, for every duration key that was renamed (the table does not
/// matter: no old name is used for anything else).
pub const RENAMED: &[(&str, &str)] = &[
    ("handshake_timeout_secs", "handshake_timeout"),
    ("connect_timeout_secs", "connect_timeout"),
    ("drain_timeout_secs", "drain_timeout"),
    ("write_timeout_secs", "write_timeout"),
    ("max_session_expiry_secs", "max_session_expiry"),
    ("queue_max_age_secs", "queue_max_age"),
    ("max_keep_alive_secs", "max_keep_alive"),
    ("max_delay_ms", "max_delay"),
    ("sustained_secs", "sustained"),
    ("failure_window_secs", "failure_window"),
    ("backoff_initial_secs", "backoff_initial"),
    ("backoff_max_secs", "backoff_max"),
    ("backoff_forget_secs", "backoff_forget"),
    ("aggregate_window_secs", "aggregate_window"),
    ("checkpoint_interval_secs", "checkpoint_interval"),
    ("window_ms", "window"),
    ("learning_secs", "learning"),
    ("burst_recovery_secs", "burst_recovery"),
    ("rule_window_secs", "rule_window"),
    ("probation_clear_secs", "probation_clear"),
    ("quarantine_ttl_secs", "quarantine_ttl"),
    ("watch_secs", "watch"),
];

/// One warning per old duration key found in the configuration text, naming the
/// key with its table and the new key to write instead.
pub fn renamed_keys(text: &str) -> Vec<String> {
    let Ok(root) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&root, "", &mut out);
    out
}

fn walk(table: &toml::Table, path: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        if let Some((old, new)) = RENAMED.iter().find(|(old, _)| old == key) {
            let unit = if old.ends_with("_ms") { "ms" } else { "s" };
            let example = match value {
                toml::Value::Integer(n) => format!("\"{n}{unit}\""),
                _ => "a duration such as \"30s\"".to_string(),
            };
            out.push(format!(
                "{full}: renamed; write `{new} = {example}` instead (the old key is still read)"
            ));
        }
        if let toml::Value::Table(inner) = value {
            walk(inner, &full, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        s: Option<Secs>,
        m: Option<Millis>,
    }

    fn parse(text: &str) -> Result<T, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn durations_read_as_text_or_as_integers_in_the_old_unit() {
        let t = parse("s = \"1h 30m\"\nm = \"1.5s\"").unwrap();
        assert_eq!(*t.s.unwrap(), Duration::from_secs(5400));
        assert_eq!(*t.m.unwrap(), Duration::from_millis(1500));
        let t = parse("s = 30\nm = 250").unwrap();
        assert_eq!(*t.s.unwrap(), Duration::from_secs(30));
        assert_eq!(*t.m.unwrap(), Duration::from_millis(250));
        assert_eq!(
            *parse("s = \"7d\"").unwrap().s.unwrap(),
            Duration::from_secs(604_800)
        );
    }

    #[test]
    fn bad_durations_say_what_to_write() {
        for (text, needle) in [
            ("s = \"soon\"", "write e.g. \"30s\""),
            ("s = -3", "cannot be negative"),
            ("s = \"1500ms\"", "whole seconds"),
            ("m = \"10us\"", "whole milliseconds"),
            ("s = 1.5", "a duration such as"),
        ] {
            let err = parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text} accepted"));
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn nothing_longer_than_a_thousand_years_is_taken() {
        for text in [
            "s = 18446744073709551615",
            "s = \"1001years\"",
            "m = 9223372036854775807",
        ] {
            let err = parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text} accepted"));
            assert!(err.contains("1000 years"), "{text}: {err}");
        }
        assert_eq!(
            *Secs::parse("999years").unwrap(),
            humantime::parse_duration("999years").unwrap()
        );
        assert_eq!(*Secs::parse("90").unwrap(), Duration::from_secs(90));
        assert_eq!(*Millis::parse("90").unwrap(), Duration::from_millis(90));
    }

    #[test]
    fn old_keys_are_named_with_their_table_and_the_new_key() {
        let w = renamed_keys(
            "[limits]\nconnect_timeout_secs = 30\n[device_groups.cams.behaviour]\nwindow_ms = 500\n",
        );
        assert_eq!(
            w,
            [
                "device_groups.cams.behaviour.window_ms: renamed; write `window = \"500ms\"` instead (the old key is still read)",
                "limits.connect_timeout_secs: renamed; write `connect_timeout = \"30s\"` instead (the old key is still read)",
            ]
        );
        assert!(renamed_keys("[limits]\nconnect_timeout = \"30s\"\n").is_empty());
    }
}
