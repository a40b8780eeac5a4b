//! `[behaviour]`: the per-device behaviour model (learned baselines, ceilings,
//! probation and quarantine) and its per-group overrides.
//!
//! Every key may be set at the top level and again in `[device_groups.NAME.behaviour]`.
//! The keys are declared once, below, so the table, its override and the merge cannot
//! drift apart. Bounds are checked on the top-level table and on each group's merged
//! result, so an error always names the key the operator has to change.

use crate::duration::{Millis, Secs};
use serde::Deserialize;
use std::time::Duration;

/// Longest learning period: a baseline nobody trusts for a month is no baseline.
const MAX_LEARNING_SECS: u64 = 30 * 86_400;

/// Declares `Behaviour` (every key, with its default), `BehaviourOverride` (the same
/// keys, all optional) and the merge of one over the other.
macro_rules! behaviour_keys {
    ($( $(#[$doc:meta])* $name:ident $(| $old:literal)?: $ty:ty = $default:expr, )*) => {
        /// The behaviour model of a group's devices.
        #[derive(Debug, Clone, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Behaviour {
            $( $(#[$doc])* $(#[serde(alias = $old)])? pub $name: $ty, )*
        }

        impl Default for Behaviour {
            fn default() -> Self {
                Behaviour { $( $name: $default, )* }
            }
        }

        /// A device group's `behaviour` table; unset keys inherit `[behaviour]`.
        #[derive(Debug, Clone, PartialEq, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct BehaviourOverride {
            $( $(#[serde(alias = $old)])? pub $name: Option<$ty>, )*
        }

        impl BehaviourOverride {
            pub(crate) fn apply(&self, to: &mut Behaviour) {
                $(
                    if let Some(v) = self.$name {
                        to.$name = v;
                    }
                )*
            }
        }

        /// Every key of the table.
        /// Every key of the table, and the old names still read.
        pub(crate) const KEYS: &[&str] = &[$( stringify!($name), $($old,)? )*];
    };
}

behaviour_keys! {
    /// `false`: no model and no quarantine for these devices.
    enabled: bool = true,
    /// Length of one feature window (whole milliseconds).
    window | "window_ms": Millis = Millis::from_millis(1000),
    /// Time before the learned baseline is trusted.
    learning | "learning_secs": Secs = Secs::from_secs(900),
    /// Weight of a new window in the baseline once learned.
    decay: f64 = 0.01,
    /// Anomaly threshold, in standard deviations above the baseline.
    sigma: f64 = 6.0,
    /// An anomaly over this many times the baseline (or the floor) is a flood:
    /// quarantine at once.
    flood_factor: f64 = 5.0,
    /// Excess below this many messages per second is never an anomaly.
    floor_messages_per_second: f64 = 5.0,
    /// Excess below this many bytes per second is never an anomaly.
    floor_bytes_per_second: f64 = 16384.0,
    /// Factor by which the baseline may grow at most per hour.
    max_rise_per_hour: f64 = 2.0,
    /// Messages above the baseline allowed at once (a boot burst).
    burst_messages: f64 = 64.0,
    /// Bytes above the baseline allowed at once.
    burst_bytes: f64 = 262144.0,
    /// Time for the burst allowance to refill completely.
    burst_recovery | "burst_recovery_secs": Secs = Secs::from_secs(60),
    /// Absolute ceiling on messages per second, learned or not.
    max_messages_per_second: f64 = 500.0,
    /// Absolute ceiling on bytes per second, learned or not.
    max_bytes_per_second: f64 = 1_048_576.0,
    /// Window of the counted rules below.
    rule_window | "rule_window_secs": Secs = Secs::from_secs(60),
    /// Counted rules: more than this many events in one rule window quarantines.
    max_auth_failures: u32 = 20,
    max_denials: u32 = 20,
    max_validation_failures: u32 = 20,
    max_limit_hits: u32 = 1000,
    max_connects: u32 = 30,
    max_source_changes: u32 = 10,
    /// Distinct topics published in one rule window.
    max_topics: u32 = 100,
    /// Quarantine a device whose identity is used from two places at once.
    quarantine_on_clone: bool = true,
    /// Anomalous windows in probation before quarantine.
    probation_windows: u32 = 3,
    /// Clean time that ends probation.
    probation_clear | "probation_clear_secs": Secs = Secs::from_secs(60),
    /// Probation multiplies the device's rate limits by this.
    probation_rate_factor: f64 = 0.5,
    /// Quarantine ends by itself after this long; 0: only an operator releases it.
    quarantine_ttl | "quarantine_ttl_secs": Secs = Secs::from_secs(0),
    /// Clean time a released device is watched before it is normal again.
    watch | "watch_secs": Secs = Secs::from_secs(600),
    /// What happens to a quarantined device's publishes.
    quarantine_traffic: QuarantineTraffic = QuarantineTraffic::Drop,
    /// Rate of diverted messages per device.
    forensic_messages_per_second: f64 = 1.0,
    /// What happens to commands for a quarantined device.
    quarantine_commands: QuarantineCommands = QuarantineCommands::Hold,
}

/// A quarantined device's publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineTraffic {
    /// Discarded.
    Drop,
    /// Republished to `portcullis/forensic/{id}/<topic>`, at most at
    /// `forensic_messages_per_second`.
    Divert,
}

/// Commands addressed to a quarantined device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuarantineCommands {
    /// Held back while the device is quarantined.
    Hold,
    /// Delivered as usual.
    Deliver,
}

/// The allowed values of a number key.
#[derive(Clone, Copy)]
enum Bound {
    Positive,
    NonNegative,
    AtLeastOne,
    /// (0, 1]
    Fraction,
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::Positive => v > 0.0,
            Bound::NonNegative => v >= 0.0,
            Bound::AtLeastOne => v >= 1.0,
            Bound::Fraction => v > 0.0 && v <= 1.0,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Bound::Positive => "> 0",
            Bound::NonNegative => ">= 0",
            Bound::AtLeastOne => ">= 1",
            Bound::Fraction => "in (0, 1]",
        }
    }
}

impl Behaviour {
    /// Bounds of every key; `table` is the table's full key (`behaviour` or
    /// `device_groups.NAME.behaviour`).
    pub(crate) fn check(&self, table: &str) -> Result<(), (String, String)> {
        let key = |name: &str| format!("{table}.{name}");
        // The counted rules sum six 16-bit buckets; the topic sketch saturates near
        // 1420 distinct topics: a ceiling beyond either could never trip.
        const MAX_COUNT: u64 = 100_000;
        const MAX_TOPICS: u64 = 1_000;
        let ceilings = [
            ("max_auth_failures", self.max_auth_failures),
            ("max_denials", self.max_denials),
            ("max_validation_failures", self.max_validation_failures),
            ("max_limit_hits", self.max_limit_hits),
            ("max_connects", self.max_connects),
            ("max_source_changes", self.max_source_changes),
        ];
        for (name, v) in ceilings {
            if u64::from(v) > MAX_COUNT {
                return Err((key(name), format!("must be at most {MAX_COUNT} (got {v})")));
            }
        }
        if u64::from(self.max_topics) > MAX_TOPICS {
            return Err((
                key("max_topics"),
                format!("must be at most {MAX_TOPICS} (got {})", self.max_topics),
            ));
        }
        // Learning for less than three windows leaves a baseline of nothing; probation
        // and watch shorter than a window end before the next window is judged.
        let (ms, secs) = (Duration::from_millis, Duration::from_secs);
        let durations: [(&str, Duration, Duration, Option<Duration>); 6] = [
            ("window", *self.window, ms(100), Some(secs(60))),
            (
                "learning",
                *self.learning,
                Duration::ZERO,
                Some(secs(MAX_LEARNING_SECS)),
            ),
            ("burst_recovery", *self.burst_recovery, secs(1), None),
            (
                "rule_window",
                *self.rule_window,
                secs(6),
                Some(secs(86_400)),
            ),
            ("probation_clear", *self.probation_clear, secs(1), None),
            ("watch", *self.watch, secs(1), None),
        ];
        let shown = |d: Duration| humantime::format_duration(d).to_string();
        for (name, v, min, max) in durations {
            if v < min || max.is_some_and(|max| v > max) {
                let bound = match max {
                    None => format!("at least {}", shown(min)),
                    Some(max) if min.is_zero() => format!("at most {}", shown(max)),
                    Some(max) => format!("between {} and {}", shown(min), shown(max)),
                };
                return Err((key(name), format!("must be {bound} (got {})", shown(v))));
            }
        }
        if self.probation_windows == 0 {
            return Err((key("probation_windows"), "must be >= 1 (got 0)".into()));
        }
        // Values are whole milliseconds at least: one more than a window is longer.
        let window = *self.window;
        let longer = window + Duration::from_millis(1);
        for (name, v, at_least, words) in [
            ("learning", *self.learning, window * 3, "three windows"),
            (
                "probation_clear",
                *self.probation_clear,
                longer,
                "longer than a window",
            ),
            ("watch", *self.watch, longer, "longer than a window"),
        ] {
            if v < at_least {
                return Err((
                    key(name),
                    format!(
                        "must be {words} ({} each) at least (got {})",
                        shown(window),
                        shown(v)
                    ),
                ));
            }
        }
        let numbers = [
            ("decay", self.decay, Bound::Fraction),
            ("sigma", self.sigma, Bound::Positive),
            ("flood_factor", self.flood_factor, Bound::AtLeastOne),
            (
                "floor_messages_per_second",
                self.floor_messages_per_second,
                Bound::NonNegative,
            ),
            (
                "floor_bytes_per_second",
                self.floor_bytes_per_second,
                Bound::NonNegative,
            ),
            (
                "max_rise_per_hour",
                self.max_rise_per_hour,
                Bound::AtLeastOne,
            ),
            ("burst_messages", self.burst_messages, Bound::NonNegative),
            ("burst_bytes", self.burst_bytes, Bound::NonNegative),
            (
                "max_messages_per_second",
                self.max_messages_per_second,
                Bound::Positive,
            ),
            (
                "max_bytes_per_second",
                self.max_bytes_per_second,
                Bound::Positive,
            ),
            (
                "probation_rate_factor",
                self.probation_rate_factor,
                Bound::Fraction,
            ),
            (
                "forensic_messages_per_second",
                self.forensic_messages_per_second,
                Bound::Positive,
            ),
        ];
        for (name, v, bound) in numbers {
            if !v.is_finite() {
                return Err((key(name), format!("must be a finite number (got {v})")));
            }
            if !bound.holds(v) {
                let reason = format!("must be {} (got {v})", bound.describe());
                return Err((key(name), reason));
            }
        }
        Ok(())
    }
}

/// The first key of a `[device_groups.NAME.behaviour]` table that is not a behaviour
/// key, as its full key. serde refuses it too, but cannot say which group it is in.
pub(crate) fn unknown_group_key(text: &str) -> Option<String> {
    let root: toml::Table = toml::from_str(text).ok()?;
    let groups = root.get("device_groups")?.as_table()?;
    groups.iter().find_map(|(name, group)| {
        let table = group.as_table()?.get("behaviour")?.as_table()?;
        let unknown = table.keys().find(|k| !KEYS.contains(&k.as_str()))?;
        Some(format!("device_groups.{name}.behaviour.{unknown}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn refused(text: &str) -> crate::ConfigError {
        Config::parse(text, "x.toml").unwrap_err()
    }

    #[test]
    fn absent_behaviour_table_is_the_default() {
        let c = Config::parse("", "x.toml").unwrap();
        assert_eq!(c.behaviour, Behaviour::default());
        assert_eq!(c.behaviour_for("default"), Behaviour::default());
        let b = Behaviour::default();
        assert!(b.enabled && b.quarantine_on_clone);
        assert_eq!((b.window.as_millis(), b.learning.as_secs()), (1000, 900));
        assert_eq!((b.decay, b.sigma, b.flood_factor), (0.01, 6.0, 5.0));
        assert_eq!(b.max_bytes_per_second, 1_048_576.0);
        assert_eq!(
            (b.rule_window.as_secs(), b.max_limit_hits, b.max_topics),
            (60, 1000, 100)
        );
        assert_eq!((b.quarantine_ttl.as_secs(), b.watch.as_secs()), (0, 600));
        assert_eq!(b.quarantine_traffic, QuarantineTraffic::Drop);
        assert_eq!(b.quarantine_commands, QuarantineCommands::Hold);
    }

    #[test]
    fn group_behaviour_keys_override_the_top_level() {
        let text = "[behaviour]\nsigma = 4.0\nwatch_secs = 30\n\
                    [device_groups.cameras.behaviour]\nsigma = 8.0\nmax_topics = 5\n\
                    [device_groups.meters]\n";
        let c = Config::parse(text, "x.toml").unwrap();
        let cameras = c.behaviour_for("cameras");
        assert_eq!(cameras.sigma, 8.0, "set in both: the group wins");
        assert_eq!(cameras.max_topics, 5, "set only in the group");
        assert_eq!(cameras.watch.as_secs(), 30, "set only at the top level");
        assert_eq!(cameras.decay, Behaviour::default().decay, "set nowhere");
        assert_eq!(c.behaviour_for("meters"), c.behaviour);
        assert_eq!(c.behaviour_for("no-such-group"), c.behaviour);
    }

    #[test]
    fn documented_example_parses_and_checks() {
        let c = Config::parse(
            r#"
            [behaviour]
            sigma = 5.0
            quarantine_traffic = "divert"
            [device_groups.cameras.behaviour]
            sigma = 4.0
            max_bytes_per_second = 4194304.0
            [device_groups.legacy.behaviour]
            enabled = false
            "#,
            "x.toml",
        )
        .unwrap();
        let cameras = c.behaviour_for("cameras");
        assert_eq!(
            (cameras.sigma, cameras.max_bytes_per_second),
            (4.0, 4_194_304.0)
        );
        assert_eq!(cameras.quarantine_traffic, QuarantineTraffic::Divert);
        assert!(!c.behaviour_for("legacy").enabled);
    }

    #[test]
    fn group_can_turn_the_model_off() {
        let text = "[device_groups.legacy.behaviour]\nenabled = false\n";
        let c = Config::parse(text, "x.toml").unwrap();
        assert!(!c.behaviour_for("legacy").enabled);
        assert!(c.behaviour.enabled);
    }

    #[test]
    fn unknown_group_behaviour_key_is_refused_naming_it() {
        let err = refused("[device_groups.cameras.behaviour]\nsigmaa = 3.0\n");
        assert_eq!(err.key, "device_groups.cameras.behaviour.sigmaa");
        assert!(
            err.to_string()
                .starts_with("x.toml: device_groups.cameras.behaviour.sigmaa: ")
        );
    }

    #[test]
    fn unknown_top_level_behaviour_key_is_refused_naming_it() {
        let err = refused("[behaviour]\nsigmaa = 3.0\n");
        let text = err.to_string();
        assert!(text.contains("sigmaa") && text.contains("line 2"), "{text}");
    }

    #[test]
    fn out_of_range_top_level_value_names_the_key() {
        let err = refused("[behaviour]\nsigma = 0.0\n");
        assert_eq!(err.key, "behaviour.sigma");
        assert_eq!(err.reason, "must be > 0 (got 0)");
    }

    #[test]
    fn out_of_range_group_value_names_the_group_key() {
        let err = refused("[device_groups.cameras.behaviour]\ndecay = 1.5\n");
        assert_eq!(err.key, "device_groups.cameras.behaviour.decay");
        assert_eq!(err.reason, "must be in (0, 1] (got 1.5)");
    }

    #[test]
    fn settings_that_could_never_act_are_refused() {
        // Learning over fewer than three windows, probation or watch no longer than
        // a window, a ceiling the counters or the topic sketch cannot reach.
        for (text, key) in [
            ("learning_secs = 2", "learning"),
            (
                "window = \"2s\"\nprobation_clear = \"2s\"",
                "probation_clear",
            ),
            ("window_ms = 5000\nwatch_secs = 5", "watch"),
            ("max_topics = 1001", "max_topics"),
            ("max_denials = 100001", "max_denials"),
        ] {
            let err = refused(&format!("[behaviour]\n{text}\n"));
            assert_eq!(err.key, format!("behaviour.{key}"), "{text}");
        }
        let err = refused("[behaviour]\nlearning_secs = 2\n");
        assert_eq!(
            err.reason,
            "must be three windows (1s each) at least (got 2s)"
        );
        // At the edges: accepted.
        let ok = "[behaviour]\nlearning_secs = 3\nwindow_ms = 2000\nlearning_secs = 6\n";
        assert!(Config::parse(&ok.replacen("learning_secs = 3\n", "", 1), "x.toml").is_ok());
    }

    #[test]
    fn every_bound_is_checked() {
        let refused_values = [
            ("window_ms = 99", "window"),
            ("window_ms = 60001", "window"),
            ("learning_secs = 2592001", "learning"),
            ("decay = 0.0", "decay"),
            ("decay = 1.01", "decay"),
            ("sigma = -1.0", "sigma"),
            ("sigma = nan", "sigma"),
            ("flood_factor = 0.99", "flood_factor"),
            (
                "floor_messages_per_second = -0.1",
                "floor_messages_per_second",
            ),
            ("floor_bytes_per_second = -1.0", "floor_bytes_per_second"),
            ("max_rise_per_hour = 0.5", "max_rise_per_hour"),
            ("burst_messages = -1.0", "burst_messages"),
            ("burst_bytes = -1.0", "burst_bytes"),
            ("burst_recovery_secs = 0", "burst_recovery"),
            ("max_messages_per_second = 0.0", "max_messages_per_second"),
            ("max_bytes_per_second = inf", "max_bytes_per_second"),
            ("rule_window_secs = 5", "rule_window"),
            ("rule_window_secs = 86401", "rule_window"),
            ("probation_windows = 0", "probation_windows"),
            ("probation_clear_secs = 0", "probation_clear"),
            ("probation_rate_factor = 0.0", "probation_rate_factor"),
            ("probation_rate_factor = 1.5", "probation_rate_factor"),
            ("watch_secs = 0", "watch"),
            (
                "forensic_messages_per_second = 0.0",
                "forensic_messages_per_second",
            ),
        ];
        for (line, name) in refused_values {
            let err = refused(&format!("[behaviour]\n{line}\n"));
            assert_eq!(err.key, format!("behaviour.{name}"), "{line}");
        }
        let edges = "[behaviour]\nwindow_ms = 100\nlearning_secs = 2592000\ndecay = 1.0\n\
                     flood_factor = 1.0\nfloor_messages_per_second = 0.0\n\
                     floor_bytes_per_second = 0\nmax_rise_per_hour = 1.0\nburst_messages = 0.0\n\
                     burst_bytes = 0.0\nburst_recovery_secs = 1\nrule_window_secs = 86400\n\
                     max_auth_failures = 0\nmax_topics = 0\nprobation_windows = 1\n\
                     probation_clear_secs = 1\nprobation_rate_factor = 1.0\n\
                     quarantine_ttl_secs = 0\nwatch_secs = 1\n";
        let c = Config::parse(edges, "x.toml").unwrap();
        assert_eq!(c.behaviour.floor_bytes_per_second, 0.0);
    }

    #[test]
    fn quarantine_modes_parse_and_bad_ones_are_refused() {
        let text =
            "[behaviour]\nquarantine_traffic = \"divert\"\nquarantine_commands = \"deliver\"\n";
        let c = Config::parse(text, "x.toml").unwrap();
        assert_eq!(c.behaviour.quarantine_traffic, QuarantineTraffic::Divert);
        assert_eq!(c.behaviour.quarantine_commands, QuarantineCommands::Deliver);
        let text = "[device_groups.cameras.behaviour]\nquarantine_traffic = \"drop\"\n";
        let c = Config::parse(text, "x.toml").unwrap();
        assert_eq!(
            c.behaviour_for("cameras").quarantine_traffic,
            QuarantineTraffic::Drop
        );
        for bad in [
            "[behaviour]\nquarantine_traffic = \"forward\"\n",
            "[behaviour]\nquarantine_commands = \"Hold\"\n",
            "[device_groups.cameras.behaviour]\nquarantine_commands = \"queue\"\n",
        ] {
            let err = refused(bad);
            assert!(err.to_string().contains("unknown variant"), "{err}");
        }
    }
}
