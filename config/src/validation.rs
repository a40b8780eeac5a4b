//! `[validation]`: payload size limits and per-topic payload rules.
//!
//! Only the shape is checked here (pattern syntax, a schema exactly where one is
//! needed, sizes > 0); the gateway reads and compiles the schema files once at load,
//! so a schema that does not compile is refused before any message is seen.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// The largest payload MQTT can carry: a bigger limit could never be reached.
const MQTT_MAX_PAYLOAD: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Validation {
    /// Largest payload accepted on any topic, in bytes.
    pub max_payload_bytes: usize,
    /// Payload rules, tried in order: the first whose topic and groups match decides.
    /// A message no rule matches is `binary`: only the size limits apply.
    pub rules: Vec<PayloadRule>,
    /// Largest payload per principal group (device or service group), in bytes.
    pub group_limits: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadRule {
    /// An MQTT filter whose levels may also be `{id}` or `{group}` (the publishing
    /// principal's own id and group).
    pub topic: String,
    /// Only principals of these groups; unset means every group.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    pub format: PayloadFormat,
    /// JSON Schema file, for `format = "json-schema"` only; may start with `{data_dir}`.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// Largest payload on topics this rule decides, in bytes.
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadFormat {
    /// Any bytes.
    Binary,
    /// Valid UTF-8.
    Utf8,
    /// One JSON document.
    Json,
    /// One JSON document valid under the rule's schema.
    JsonSchema,
}

impl PayloadFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Binary => "binary",
            PayloadFormat::Utf8 => "utf8",
            PayloadFormat::Json => "json",
            PayloadFormat::JsonSchema => "json-schema",
        }
    }
}

impl fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for Validation {
    fn default() -> Self {
        Validation {
            max_payload_bytes: 256 * 1024,
            rules: Vec::new(),
            group_limits: BTreeMap::new(),
        }
    }
}

impl Validation {
    /// Static checks; the error is (key, reason), keys under `validation.`.
    pub fn check(&self) -> Result<(), (String, String)> {
        check_size("validation.max_payload_bytes", self.max_payload_bytes)?;
        for (group, limit) in &self.group_limits {
            let key = format!("validation.group_limits.{group}");
            crate::check_group_name(group).map_err(|r| (key.clone(), r))?;
            check_size(&key, *limit)?;
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let key = |field: &str| format!("validation.rules[{i}].{field}");
            crate::check_pattern(&rule.topic).map_err(|r| (key("topic"), r))?;
            if let Some(groups) = &rule.groups {
                if groups.is_empty() {
                    return Err((
                        key("groups"),
                        "an empty list matches nobody; leave groups out to match every group"
                            .into(),
                    ));
                }
                for (j, group) in groups.iter().enumerate() {
                    crate::check_group_name(group)
                        .map_err(|r| (key(&format!("groups[{j}]")), r))?;
                }
            }
            match (rule.format, &rule.schema) {
                (PayloadFormat::JsonSchema, None) => {
                    return Err((
                        key("schema"),
                        "required with format = \"json-schema\"".into(),
                    ));
                }
                (PayloadFormat::JsonSchema, Some(path)) if path.as_os_str().is_empty() => {
                    return Err((key("schema"), "empty path".into()));
                }
                (format, Some(_)) if format != PayloadFormat::JsonSchema => {
                    return Err((
                        key("schema"),
                        format!("only allowed with format = \"json-schema\" (got \"{format}\")"),
                    ));
                }
                _ => {}
            }
            if let Some(max) = rule.max_bytes {
                check_size(&key("max_bytes"), max)?;
            }
        }
        Ok(())
    }

    /// Every group named in `group_limits` and `rules[].groups` must exist (`is_known`
    /// answers for device and service groups): a misspelt group would silently exempt
    /// the group it meant.
    pub fn check_groups(&self, is_known: impl Fn(&str) -> bool) -> Result<(), (String, String)> {
        let unknown = |group: &str| format!("no device or service group is named {group:?}");
        for group in self.group_limits.keys() {
            if !is_known(group) {
                return Err((format!("validation.group_limits.{group}"), unknown(group)));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, group) in rule.groups.iter().flatten().enumerate() {
                if !is_known(group) {
                    return Err((format!("validation.rules[{i}].groups[{j}]"), unknown(group)));
                }
            }
        }
        Ok(())
    }
}

fn check_size(key: &str, value: usize) -> Result<(), (String, String)> {
    if value == 0 {
        return Err((key.to_string(), "must be > 0 (got 0)".into()));
    }
    if value > MQTT_MAX_PAYLOAD {
        return Err((
            key.to_string(),
            format!("must be at most {MQTT_MAX_PAYLOAD}, the MQTT maximum (got {value})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Validation {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn default_allows_any_payload_up_to_256_kib() {
        let v = Validation::default();
        assert_eq!(v.max_payload_bytes, 262_144);
        assert!(v.rules.is_empty() && v.group_limits.is_empty());
        assert_eq!(v.check(), Ok(()));
        assert_eq!(parse(""), v);
    }

    #[test]
    fn documented_example_parses_and_checks() {
        let v = parse(
            r#"
            max_payload_bytes = 262144
            [[rules]]
            topic = "devices/+/telemetry/#"
            groups = ["meters"]
            format = "json-schema"
            schema = "{data_dir}/schemas/telemetry.schema.json"
            max_bytes = 4096
            [[rules]]
            topic = "devices/{id}/logs"
            format = "utf8"
            [group_limits]
            meters = 8192
            "#,
        );
        assert_eq!(v.check(), Ok(()));
        assert_eq!(v.rules[0].format, PayloadFormat::JsonSchema);
        assert_eq!(
            v.rules[0].groups.as_deref(),
            Some(&["meters".to_string()][..])
        );
        assert_eq!(v.rules[1].groups, None);
        assert_eq!(v.group_limits["meters"], 8192);
    }

    #[test]
    fn unknown_key_and_unknown_format_are_rejected() {
        assert!(toml::from_str::<Validation>("max_payload = 1").is_err());
        let err = toml::from_str::<Validation>("[[rules]]\ntopic = \"a\"\nformat = \"xml\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("json-schema"), "{err}");
    }

    #[test]
    fn json_schema_without_schema_names_the_key() {
        let v = parse("[[rules]]\ntopic = \"a/#\"\nformat = \"json-schema\"\n");
        let (key, reason) = v.check().unwrap_err();
        assert_eq!(key, "validation.rules[0].schema");
        assert!(reason.contains("required"), "{reason}");
    }

    #[test]
    fn schema_on_a_non_schema_rule_is_rejected() {
        let v = parse("[[rules]]\ntopic = \"a/#\"\nformat = \"json\"\nschema = \"s.json\"\n");
        let (key, reason) = v.check().unwrap_err();
        assert_eq!(key, "validation.rules[0].schema");
        assert!(reason.contains("\"json\""), "{reason}");
    }

    #[test]
    fn zero_sizes_are_rejected_at_every_level() {
        let (key, _) = parse("max_payload_bytes = 0").check().unwrap_err();
        assert_eq!(key, "validation.max_payload_bytes");
        let (key, _) = parse("[group_limits]\nmeters = 0\n").check().unwrap_err();
        assert_eq!(key, "validation.group_limits.meters");
        let (key, _) = parse("[[rules]]\ntopic = \"a\"\nformat = \"binary\"\nmax_bytes = 0\n")
            .check()
            .unwrap_err();
        assert_eq!(key, "validation.rules[0].max_bytes");
    }

    #[test]
    fn malformed_topic_patterns_are_rejected() {
        for bad in ["", "a/#/b", "a//b", "a/b+", "a/{idx}", "a/x{id}", "$SYS/#"] {
            let text = format!("[[rules]]\ntopic = {bad:?}\nformat = \"utf8\"\n");
            let (key, _) = parse(&text).check().unwrap_err();
            assert_eq!(key, "validation.rules[0].topic", "{bad:?}");
        }
        for good in ["#", "a/+/b", "devices/{id}/#", "groups/{group}/+"] {
            let text = format!("[[rules]]\ntopic = {good:?}\nformat = \"utf8\"\n");
            assert_eq!(parse(&text).check(), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn group_lists_must_be_valid_and_known() {
        let v = parse("[[rules]]\ntopic = \"a\"\nformat = \"utf8\"\ngroups = []\n");
        assert_eq!(v.check().unwrap_err().0, "validation.rules[0].groups");
        let v = parse("[[rules]]\ntopic = \"a\"\nformat = \"utf8\"\ngroups = [\"a/b\"]\n");
        assert_eq!(v.check().unwrap_err().0, "validation.rules[0].groups[0]");
        let v = parse("[[rules]]\ntopic = \"a\"\nformat = \"utf8\"\ngroups = [\"metres\"]\n");
        assert_eq!(v.check(), Ok(()));
        let (key, reason) = v.check_groups(|g| g == "meters").unwrap_err();
        assert_eq!(key, "validation.rules[0].groups[0]");
        assert!(reason.contains("metres"), "{reason}");
        assert_eq!(v.check_groups(|g| g == "metres"), Ok(()));
    }
}
