//! Stage 4, validation: payload size limits and per-topic payload formats.
//!
//! Everything that can fail is done once, at load: topic patterns are parsed, schema
//! files are read and compiled (offline, `pattern` evaluated by the linear-time `regex`
//! engine, unknown formats refused). `Validator::check` is then a pure function of the
//! principal, the topic and the payload: no I/O, no lock, and no allocation for
//! `binary` and `utf8` rules; only JSON parsing allocates. The size limit is checked
//! before anything is parsed, so the work a payload can cause is bounded by it.
//!
//! A refusal names the rule and what failed, in words fit for the audit log: never
//! more than 64 bytes of the payload itself, never more than 200 characters.

use crate::principal::{GroupName, PrincipalId};
use crate::topic::{TopicFilter, TopicName};
use jsonschema::error::ValidationErrorKind;
use jsonschema::{PatternOptions, ValidationError};
use portcullis_config::validation::{PayloadFormat, Validation};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Schema files are written by operators, but a path pointing at the wrong file (a log,
/// `/dev/zero`) must not hang or exhaust the loader.
const MAX_SCHEMA_FILE_BYTES: u64 = 1024 * 1024;
/// Compiled size of one schema `pattern` (the `regex` crate's own default). Setting a
/// limit also makes jsonschema compile every pattern at load instead of on first use.
const REGEX_SIZE_LIMIT: usize = 10 * 1024 * 1024;
/// Payload bytes a reason may quote: the instance path and the offending value get
/// half each.
const PATH_BUDGET: usize = 32;
const VALUE_BUDGET: usize = 32;
/// Longest reason, in characters.
const MAX_REASON_CHARS: usize = 200;

/// A payload refused by validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {reason}")]
pub struct Invalid {
    /// Which rule refused: `rule 2 (devices/+/telemetry/#, json-schema t.schema.json)`
    /// or `size limit (group meters)`.
    pub rule: String,
    /// What failed: `temperature: 912 is greater than the maximum of 150`.
    pub reason: String,
    /// Which kind of failure (its metric label: `too_large`, `not_utf8`, `not_json`
    /// or `schema`).
    pub kind: InvalidKind,
}

/// The kinds of validation failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    TooLarge,
    NotUtf8,
    NotJson,
    Schema,
}

impl InvalidKind {
    pub fn label(self) -> &'static str {
        match self {
            InvalidKind::TooLarge => "too_large",
            InvalidKind::NotUtf8 => "not_utf8",
            InvalidKind::NotJson => "not_json",
            InvalidKind::Schema => "schema",
        }
    }
}

/// The validation configuration could not be loaded: the config key and why (a schema
/// problem names the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ValidateSetupError {
    pub key: String,
    pub reason: String,
}

/// The compiled `[validation]` policy, built once at load and shared by every session.
#[derive(Debug)]
pub struct Validator {
    max_payload_bytes: usize,
    group_limits: BTreeMap<Box<str>, usize>,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    topic: RuleTopic,
    /// `None`: every group.
    groups: Option<Box<[GroupName]>>,
    format: Format,
    max_bytes: Option<usize>,
    /// `rule 2 (devices/+/telemetry/#, json)`, for refusals.
    name: Box<str>,
}

#[derive(Debug)]
enum RuleTopic {
    Filter(TopicFilter),
    /// A pattern with `{id}` or `{group}` levels, matched level by level against the
    /// principal's own id and group, so nothing is substituted per message.
    Template(Box<[Level]>),
}

#[derive(Debug)]
enum Level {
    Text(Box<str>),
    Plus,
    Hash,
    Id,
    Group,
}

enum Format {
    Binary,
    Utf8,
    Json,
    Schema(Arc<jsonschema::Validator>),
}

impl fmt::Debug for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Binary => "Binary",
            Format::Utf8 => "Utf8",
            Format::Json => "Json",
            Format::Schema(_) => "Schema",
        })
    }
}

/// Shared between sessions and threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Validator>();
};

impl Default for Validator {
    /// The default policy: any payload up to 256 KiB.
    fn default() -> Self {
        Validator::new(&Validation::default(), Path::to_path_buf)
            .expect("the default validation policy has no schema")
    }
}

impl Validator {
    /// Compile the policy. `resolve` turns a configured schema path into the file to
    /// read (`Config::resolve`, for `{data_dir}`). Schema files are read here and never
    /// again; a schema shared by several rules is compiled once.
    pub fn new(
        cfg: &Validation,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<Validator, ValidateSetupError> {
        cfg.check()
            .map_err(|(key, reason)| ValidateSetupError { key, reason })?;
        let mut compiled: HashMap<PathBuf, Arc<jsonschema::Validator>> = HashMap::new();
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, rule) in cfg.rules.iter().enumerate() {
            let err = |field: &str, reason: String| ValidateSetupError {
                key: format!("validation.rules[{i}].{field}"),
                reason,
            };
            let topic = parse_topic(&rule.topic).map_err(|r| err("topic", r))?;
            let groups = match &rule.groups {
                None => None,
                Some(names) => Some(
                    names
                        .iter()
                        .map(|g| GroupName::parse(g).map_err(|e| err("groups", e.to_string())))
                        .collect::<Result<Box<[_]>, _>>()?,
                ),
            };
            let mut name = format!("rule {} ({}, {}", i + 1, rule.topic, rule.format);
            let format = match (rule.format, &rule.schema) {
                (PayloadFormat::Binary, _) => Format::Binary,
                (PayloadFormat::Utf8, _) => Format::Utf8,
                (PayloadFormat::Json, _) => Format::Json,
                (PayloadFormat::JsonSchema, None) => {
                    return Err(err(
                        "schema",
                        "required with format = \"json-schema\"".into(),
                    ));
                }
                (PayloadFormat::JsonSchema, Some(configured)) => {
                    let path = resolve(configured);
                    let schema = match compiled.get(&path) {
                        Some(schema) => Arc::clone(schema),
                        None => {
                            let schema =
                                Arc::new(compile_schema(&path).map_err(|r| {
                                    err("schema", format!("{}: {r}", path.display()))
                                })?);
                            compiled.insert(path.clone(), Arc::clone(&schema));
                            schema
                        }
                    };
                    let file = path.file_name().unwrap_or(path.as_os_str());
                    let _ = write!(name, " {}", file.to_string_lossy());
                    Format::Schema(schema)
                }
            };
            name.push(')');
            rules.push(Rule {
                topic,
                groups,
                format,
                max_bytes: rule.max_bytes,
                name: name.into(),
            });
        }
        Ok(Validator {
            max_payload_bytes: cfg.max_payload_bytes,
            group_limits: cfg
                .group_limits
                .iter()
                .map(|(g, limit)| (Box::from(g.as_str()), *limit))
                .collect(),
            rules,
        })
    }

    /// Accept or refuse a payload published by (`group`, `id`) on `topic`. The first
    /// rule whose topic and groups match decides the format; the size limit is the
    /// smallest of the global, group and rule limits.
    pub fn check(
        &self,
        group: &GroupName,
        id: &PrincipalId,
        topic: &TopicName,
        payload: &[u8],
    ) -> Result<(), Invalid> {
        let rule = self.rules.iter().find(|r| r.applies(group, id, topic));

        // The binding limit; on a tie the more specific one is named.
        let mut limit = self.max_payload_bytes;
        let mut source = LimitSource::Global;
        if let Some(&g) = self.group_limits.get(group.as_str())
            && g <= limit
        {
            (limit, source) = (g, LimitSource::Group);
        }
        if let Some(rule) = rule
            && let Some(r) = rule.max_bytes
            && r <= limit
        {
            (limit, source) = (r, LimitSource::Rule(rule));
        }
        if payload.len() > limit {
            return Err(Invalid {
                rule: match source {
                    LimitSource::Global => "size limit (global)".to_string(),
                    LimitSource::Group => format!("size limit (group {group})"),
                    LimitSource::Rule(rule) => format!("size limit ({})", rule.name),
                },
                reason: format!("payload is {} bytes, limit {limit}", payload.len()),
                kind: InvalidKind::TooLarge,
            });
        }

        let Some(rule) = rule else {
            return Ok(());
        };
        let refuse = |reason: String, kind| Invalid {
            rule: rule.name.to_string(),
            reason,
            kind,
        };
        match &rule.format {
            Format::Binary => Ok(()),
            Format::Utf8 => match std::str::from_utf8(payload) {
                Ok(_) => Ok(()),
                Err(e) => Err(refuse(
                    format!("not valid UTF-8 at byte {}", e.valid_up_to()),
                    InvalidKind::NotUtf8,
                )),
            },
            Format::Json => check_json(payload).map_err(|r| refuse(r, InvalidKind::NotJson)),
            Format::Schema(schema) => {
                let value = parse_json(payload).map_err(|r| refuse(r, InvalidKind::NotJson))?;
                if schema.is_valid(&value) {
                    return Ok(());
                }
                match schema.validate(&value) {
                    Ok(()) => Ok(()),
                    Err(error) => Err(refuse(describe(&error), InvalidKind::Schema)),
                }
            }
        }
    }
}

enum LimitSource<'a> {
    Global,
    Group,
    Rule(&'a Rule),
}

impl Rule {
    fn applies(&self, group: &GroupName, id: &PrincipalId, topic: &TopicName) -> bool {
        if let Some(groups) = &self.groups
            && !groups.contains(group)
        {
            return false;
        }
        match &self.topic {
            RuleTopic::Filter(filter) => filter.matches(topic),
            RuleTopic::Template(levels) => {
                template_matches(levels, id.as_str(), group.as_str(), topic.as_str())
            }
        }
    }
}

/// MQTT matching (as `topic::filter_matches`) with `{id}` and `{group}` levels matching
/// exactly the principal's id and group.
fn template_matches(levels: &[Level], id: &str, group: &str, topic: &str) -> bool {
    let mut pattern = levels.iter();
    let mut topic = topic.split('/');
    loop {
        match (pattern.next(), topic.next()) {
            // `a/#` matches everything below `a`, and `a` itself.
            (Some(Level::Hash), _) => return true,
            (Some(Level::Plus), Some(_)) => {}
            (Some(Level::Text(text)), Some(level)) if **text == *level => {}
            (Some(Level::Id), Some(level)) if level == id => {}
            (Some(Level::Group), Some(level)) if level == group => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn parse_topic(pattern: &str) -> Result<RuleTopic, String> {
    let is_placeholder = |level: &str| matches!(level, "{id}" | "{group}");
    if !pattern.split('/').any(is_placeholder) {
        return TopicFilter::parse_unlimited(pattern)
            .map(RuleTopic::Filter)
            .map_err(|e| format!("{e} (in {pattern:?})"));
    }
    // Ids and group names are single levels without wildcards: checking the shape with
    // a `+` in their place checks every expansion.
    let shape: Vec<&str> = pattern
        .split('/')
        .map(|level| if is_placeholder(level) { "+" } else { level })
        .collect();
    TopicFilter::parse_unlimited(&shape.join("/")).map_err(|e| format!("{e} (in {pattern:?})"))?;
    Ok(RuleTopic::Template(
        pattern
            .split('/')
            .map(|level| match level {
                "+" => Level::Plus,
                "#" => Level::Hash,
                "{id}" => Level::Id,
                "{group}" => Level::Group,
                text => Level::Text(text.into()),
            })
            .collect(),
    ))
}

/// Read and compile one schema file: offline, linear-time patterns, formats asserted.
fn compile_schema(path: &Path) -> Result<jsonschema::Validator, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SCHEMA_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_SCHEMA_FILE_BYTES {
        return Err(format!(
            "larger than {MAX_SCHEMA_FILE_BYTES} bytes; is this a schema?"
        ));
    }
    let schema: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    jsonschema::options()
        // No `$ref` is ever fetched, over the network or from disk: a schema must be
        // self-contained (`$defs`), apart from the standard meta-schemas built in.
        .offline()
        .with_pattern_options(PatternOptions::regex().size_limit(REGEX_SIZE_LIMIT))
        // A schema is the device's contract: `format` is checked, and a format this
        // build cannot check is an error rather than silently ignored.
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(&schema)
        .map_err(|e| describe_build_error(&e))
}

fn describe_build_error(error: &ValidationError<'_>) -> String {
    let at = error.instance_path().as_str();
    let at = if at.is_empty() {
        String::new()
    } else {
        format!(" at {at}")
    };
    // jsonschema's advice names its own options, which a Portcullis user cannot set.
    let message = error.to_string().replace(
        "Adjust configuration to ignore unrecognized formats",
        "Portcullis checks every format it knows and refuses the others",
    );
    let hint = match error.kind() {
        ValidationErrorKind::Referencing(_) => {
            " (Portcullis never fetches a $ref, over the network or from disk: put the \
             referenced schema under $defs)"
        }
        ValidationErrorKind::Format { format } if format == "regex" => {
            " (patterns run on a linear-time engine: no look-around, no backreferences, \
             at most 10 MiB compiled)"
        }
        _ => "",
    };
    format!("invalid schema{at}: {message}{hint}")
}

/// One JSON document (UTF-8, nesting depth at most serde_json's 128).
fn parse_json(payload: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| format!("not JSON: not valid UTF-8 at byte {}", e.valid_up_to()))?;
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// What `parse_json` accepts, without building the document (no allocation for a
/// payload that is only checked to be JSON).
fn check_json(payload: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| format!("not JSON: not valid UTF-8 at byte {}", e.valid_up_to()))?;
    serde_json::from_str::<AnyJson>(text)
        .map(drop)
        .map_err(|e| format!("not JSON: {e}"))
}

/// Any JSON value, read the way serde_json reads one it builds: escapes and surrogate
/// pairs checked, numbers in range, nesting limited (skipping a value with
/// `IgnoredAny` checks none of these), but nothing kept.
struct AnyJson;

impl<'de> serde::Deserialize<'de> for AnyJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AnyJson, D::Error> {
        d.deserialize_any(AnyJsonVisitor)
    }
}

struct AnyJsonVisitor;

impl<'de> serde::de::Visitor<'de> for AnyJsonVisitor {
    type Value = AnyJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_f64<E>(self, _: f64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_str<E>(self, _: &str) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_unit<E>(self) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<AnyJson, A::Error> {
        while seq.next_element::<AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AnyJson, A::Error> {
        while map.next_entry::<AnyJson, AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }
}

/// `<instance path>: <message>`, quoting at most `PATH_BUDGET` bytes of the path and
/// `VALUE_BUDGET` bytes of the value from the payload.
fn describe(error: &ValidationError<'_>) -> String {
    let mut out = String::new();
    {
        let mut path = Capped::new(&mut out, PATH_BUDGET);
        for (i, segment) in error.instance_path().segments().enumerate() {
            let _ = if i == 0 {
                write!(path, "{segment}")
            } else {
                write!(path, ".{segment}")
            };
        }
    }
    if !out.is_empty() {
        out.push_str(": ");
    }
    let _ = match error.kind() {
        // These list property names taken from the payload.
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            unexpected_properties(&mut out, "additional", unexpected)
        }
        ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            unexpected_properties(&mut out, "unevaluated", unexpected)
        }
        ValidationErrorKind::PropertyNames { error: name } => write!(
            out,
            "property name {}",
            name.masked_with(preview(name.instance()))
        ),
        _ => write!(out, "{}", error.masked_with(preview(error.instance()))),
    };
    truncate_chars(out, MAX_REASON_CHARS)
}

fn unexpected_properties(out: &mut String, what: &str, unexpected: &[String]) -> fmt::Result {
    let Some(first) = unexpected.first() else {
        return write!(out, "{what} properties are not allowed");
    };
    write!(out, "{what} property ")?;
    let _ = write!(Capped::new(out, VALUE_BUDGET), "{:?}", first.as_str());
    match unexpected.len() - 1 {
        0 => write!(out, " is not allowed"),
        more => write!(out, " and {more} more are not allowed"),
    }
}

/// The value as compact JSON, cut to `VALUE_BUDGET` bytes.
fn preview(value: &Value) -> String {
    let mut out = String::new();
    let _ = write!(Capped::new(&mut out, VALUE_BUDGET), "{value}");
    out
}

fn truncate_chars(mut s: String, max: usize) -> String {
    if let Some((cut, _)) = s.char_indices().nth(max) {
        s.truncate(cut);
        s.pop();
        s.push('…');
    }
    s
}

/// Appends at most `budget` bytes (whole characters), then `…` and refuses the rest,
/// so formatting a large value stops early instead of rendering all of it.
struct Capped<'a> {
    out: &'a mut String,
    budget: usize,
    full: bool,
}

impl<'a> Capped<'a> {
    fn new(out: &'a mut String, budget: usize) -> Self {
        Capped {
            out,
            budget,
            full: false,
        }
    }
}

impl fmt::Write for Capped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.full {
            return Err(fmt::Error);
        }
        if s.len() <= self.budget {
            self.out.push_str(s);
            self.budget -= s.len();
            return Ok(());
        }
        let mut cut = self.budget;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.out.push_str(&s[..cut]);
        self.out.push('…');
        self.full = true;
        Err(fmt::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checking_json_accepts_exactly_what_parsing_accepts() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let (d127, d128, d129, d200) = (deep(127), deep(128), deep(129), deep(200));
        let strings = r#"{"a":"[[[\"{{{"}"#;
        let surrogate = r#"{"a":"\udc00x"}"#;
        for text in [
            d127.as_str(),
            d128.as_str(),
            d129.as_str(),
            d200.as_str(),
            strings,
            surrogate,
            "\"\\ud800\"",
            "1e400",
            "[-1e309]",
            "[1.5, -0, 1e308]",
            "{\"\\u00e9\": [true, false, null]}",
            r#"{"a":1}"#,
            " [1, 2.5e3, null, true, \"x\"] ",
            r#"{"a":1} x"#,
            r#"{"a":}"#,
            "",
            "\"unterminated",
            "01",
        ] {
            assert_eq!(
                check_json(text.as_bytes()).is_ok(),
                parse_json(text.as_bytes()).is_ok(),
                "{text}"
            );
        }
        assert!(check_json(&[0xff, b'1']).unwrap_err().contains("UTF-8"));
        for refused in ["1e400", "\"\\ud800\"", d128.as_str()] {
            assert!(check_json(refused.as_bytes()).is_err(), "{refused}");
        }
    }
    use crate::topic::TopicLimits;
    use portcullis_config::validation::PayloadRule;

    const L: TopicLimits = TopicLimits {
        max_length: 256,
        max_depth: 16,
    };

    const TELEMETRY_SCHEMA: &str = r#"{
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["temperature"],
        "properties": {
            "temperature": { "type": "number", "minimum": -40, "maximum": 150 },
            "unit": { "enum": ["C", "F"] },
            "serial": { "type": "string", "pattern": "^(a+)+$" },
            "at": { "type": "string", "format": "date-time" }
        },
        "additionalProperties": false
    }"#;

    fn rule(topic: &str, format: PayloadFormat) -> PayloadRule {
        PayloadRule {
            topic: topic.into(),
            groups: None,
            format,
            schema: None,
            max_bytes: None,
        }
    }

    fn schema_rule(topic: &str, schema: &Path) -> PayloadRule {
        PayloadRule {
            schema: Some(schema.to_path_buf()),
            ..rule(topic, PayloadFormat::JsonSchema)
        }
    }

    fn policy(rules: Vec<PayloadRule>) -> Validation {
        Validation {
            rules,
            ..Validation::default()
        }
    }

    fn build(cfg: &Validation) -> Validator {
        Validator::new(cfg, Path::to_path_buf).unwrap()
    }

    /// A schema file in a fresh temporary directory (kept alive by the returned guard).
    fn schema_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("telemetry.schema.json");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn check(
        v: &Validator,
        group: &str,
        id: &str,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), Invalid> {
        v.check(
            &GroupName::parse(group).unwrap(),
            &PrincipalId::parse(id).unwrap(),
            &TopicName::parse(topic, L).unwrap(),
            payload,
        )
    }

    fn meter(v: &Validator, payload: &[u8]) -> Result<(), Invalid> {
        check(
            v,
            "meters",
            "sensor-1",
            "devices/sensor-1/telemetry",
            payload,
        )
    }

    #[test]
    fn default_policy_accepts_any_bytes_up_to_the_global_limit() {
        let v = Validator::default();
        assert_eq!(meter(&v, &[0xff, 0x00, 0xfe]), Ok(()));
        assert_eq!(meter(&v, &vec![0; 262_144]), Ok(()));
        let err = meter(&v, &vec![0; 262_145]).unwrap_err();
        assert_eq!(err.rule, "size limit (global)");
        assert_eq!(err.reason, "payload is 262145 bytes, limit 262144");
        assert_eq!(err.kind.label(), "too_large");
    }

    #[test]
    fn binary_rule_accepts_anything_within_size() {
        let v = build(&policy(vec![rule(
            "devices/+/telemetry",
            PayloadFormat::Binary,
        )]));
        assert_eq!(meter(&v, b"\xff\xfe{"), Ok(()));
    }

    #[test]
    fn utf8_rule_names_the_first_bad_byte() {
        let v = build(&policy(vec![rule(
            "devices/+/telemetry",
            PayloadFormat::Utf8,
        )]));
        assert_eq!(meter(&v, "température".as_bytes()), Ok(()));
        let err = meter(&v, b"seventeen bytes..\xff").unwrap_err();
        assert_eq!(err.rule, "rule 1 (devices/+/telemetry, utf8)");
        assert_eq!(err.reason, "not valid UTF-8 at byte 17");
        assert_eq!(err.kind.label(), "not_utf8");
    }

    #[test]
    fn json_rule_refuses_what_is_not_one_json_document() {
        let v = build(&policy(vec![rule(
            "devices/+/telemetry",
            PayloadFormat::Json,
        )]));
        assert_eq!(meter(&v, br#"{"temperature": 21.5}"#), Ok(()));
        assert_eq!(meter(&v, b"[1, 2, 3]"), Ok(()));
        let err = meter(&v, b"<temperature>21</temperature>").unwrap_err();
        assert_eq!(err.reason, "not JSON: expected value at line 1 column 1");
        assert_eq!(err.kind.label(), "not_json");
        let err = meter(&v, b"{} {}").unwrap_err();
        assert!(
            err.reason.starts_with("not JSON: trailing characters"),
            "{err}"
        );
        let err = meter(&v, b"\"\xff\"").unwrap_err();
        assert_eq!(err.reason, "not JSON: not valid UTF-8 at byte 1");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let err = meter(&v, deep.as_bytes()).unwrap_err();
        assert!(err.reason.contains("recursion limit"), "{err}");
    }

    #[test]
    fn schema_error_names_the_field_and_the_values() {
        let (_dir, path) = schema_file(TELEMETRY_SCHEMA);
        let v = build(&policy(vec![schema_rule("devices/+/telemetry/#", &path)]));
        assert_eq!(meter(&v, br#"{"temperature": 21.5, "unit": "C"}"#), Ok(()));
        let err = meter(&v, br#"{"temperature": 912}"#).unwrap_err();
        assert_eq!(
            err.rule,
            "rule 1 (devices/+/telemetry/#, json-schema telemetry.schema.json)"
        );
        assert_eq!(
            err.reason,
            "temperature: 912 is greater than the maximum of 150"
        );
        assert_eq!(err.kind.label(), "schema");
        assert_eq!(
            err.to_string(),
            "rule 1 (devices/+/telemetry/#, json-schema telemetry.schema.json): \
             temperature: 912 is greater than the maximum of 150"
        );
        let err = meter(&v, br#"{"unit": "C"}"#).unwrap_err();
        assert_eq!(err.reason, "\"temperature\" is a required property");
        let err = meter(&v, br#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(err.reason, "temperature: \"hot\" is not of type \"number\"");
        let err = meter(&v, b"not json").unwrap_err();
        assert_eq!(err.kind.label(), "not_json");
    }

    #[test]
    fn schema_formats_are_asserted() {
        let (_dir, path) = schema_file(TELEMETRY_SCHEMA);
        let v = build(&policy(vec![schema_rule("devices/+/telemetry", &path)]));
        let ok = br#"{"temperature": 1, "at": "2026-01-02T03:04:05Z"}"#;
        assert_eq!(meter(&v, ok), Ok(()));
        let err = meter(&v, br#"{"temperature": 1, "at": "yesterday"}"#).unwrap_err();
        assert_eq!(err.reason, "at: \"yesterday\" is not a \"date-time\"");
    }

    #[test]
    fn reason_quotes_at_most_64_bytes_of_the_payload() {
        let (_dir, path) = schema_file(TELEMETRY_SCHEMA);
        let v = build(&policy(vec![schema_rule("devices/+/telemetry", &path)]));
        let secret = "S".repeat(5000);
        for payload in [
            format!(r#"{{"temperature": "{secret}"}}"#),
            format!(r#"{{"temperature": 1, "{secret}": 1}}"#),
            format!(r#"{{"temperature": 1, "unit": "{secret}"}}"#),
            format!(r#"["{secret}"]"#),
        ] {
            let err = meter(&v, payload.as_bytes()).unwrap_err();
            let quoted = err.reason.matches('S').count();
            assert!(quoted <= 64, "{quoted} payload bytes in {:?}", err.reason);
            assert!(err.reason.chars().count() <= 200, "{}", err.reason);
        }
        let err = meter(
            &v,
            format!(r#"{{"temperature": 1, "{secret}": 1}}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(
            err.reason.starts_with("additional property \"SSSS")
                && err.reason.ends_with("is not allowed"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn pathological_pattern_is_matched_in_linear_time() {
        // `^(a+)+$` on "aaa…ab" takes exponential time in a backtracking engine; with
        // the `regex` engine it returns at once.
        let (_dir, path) = schema_file(TELEMETRY_SCHEMA);
        let v = build(&policy(vec![schema_rule("devices/+/telemetry", &path)]));
        let serial = format!("{}b", "a".repeat(30));
        let payload = format!(r#"{{"temperature": 20, "serial": "{serial}"}}"#);
        let err = meter(&v, payload.as_bytes()).unwrap_err();
        assert_eq!(err.kind.label(), "schema");
        assert!(err.reason.starts_with("serial: \"aaaa"), "{}", err.reason);
        assert!(
            err.reason.ends_with("does not match \"^(a+)+$\""),
            "{}",
            err.reason
        );
        let payload = format!(r#"{{"temperature": 20, "serial": "{}"}}"#, "a".repeat(30));
        assert_eq!(meter(&v, payload.as_bytes()), Ok(()));
    }

    #[test]
    fn backtracking_only_pattern_is_refused_at_load() {
        let (_dir, path) = schema_file(r#"{"properties": {"x": {"pattern": "^(a)\\1$"}}}"#);
        let err =
            Validator::new(&policy(vec![schema_rule("a", &path)]), Path::to_path_buf).unwrap_err();
        assert_eq!(err.key, "validation.rules[0].schema");
        assert!(err.reason.contains(&path.display().to_string()), "{err}");
        assert!(err.reason.contains("linear-time engine"), "{err}");
        let (_dir, path) = schema_file(r#"{"properties": {"x": {"pattern": "(?<=a)b"}}}"#);
        let err =
            Validator::new(&policy(vec![schema_rule("a", &path)]), Path::to_path_buf).unwrap_err();
        assert!(err.reason.contains("linear-time engine"), "{err}");
    }

    #[test]
    fn group_limit_is_tighter_than_global() {
        let mut cfg = Validation::default();
        cfg.group_limits.insert("meters".into(), 8192);
        let v = build(&cfg);
        assert_eq!(meter(&v, &[0; 8192]), Ok(()));
        let err = meter(&v, &[0; 9000]).unwrap_err();
        assert_eq!(err.rule, "size limit (group meters)");
        assert_eq!(err.reason, "payload is 9000 bytes, limit 8192");
        // Other groups keep the global limit.
        assert_eq!(
            check(&v, "default", "s2", "devices/s2/telemetry", &[0; 9000]),
            Ok(())
        );
    }

    #[test]
    fn rule_limit_applies_where_the_rule_matches() {
        let mut cfg = policy(vec![PayloadRule {
            max_bytes: Some(4096),
            ..rule("devices/+/telemetry", PayloadFormat::Binary)
        }]);
        cfg.group_limits.insert("meters".into(), 8192);
        let v = build(&cfg);
        let err = meter(&v, &[0; 5000]).unwrap_err();
        assert_eq!(
            err.rule,
            "size limit (rule 1 (devices/+/telemetry, binary))"
        );
        assert_eq!(err.reason, "payload is 5000 bytes, limit 4096");
        let other = check(
            &v,
            "meters",
            "sensor-1",
            "devices/sensor-1/logs",
            &[0; 5000],
        );
        assert_eq!(other, Ok(()));
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let mut cfg = policy(vec![rule("devices/+/telemetry", PayloadFormat::Json)]);
        cfg.max_payload_bytes = 10;
        let v = build(&cfg);
        assert_eq!(
            meter(&v, b"not json, and too long")
                .unwrap_err()
                .kind
                .label(),
            "too_large"
        );
    }

    #[test]
    fn first_matching_rule_decides() {
        let v = build(&policy(vec![
            rule("devices/+/telemetry/raw", PayloadFormat::Binary),
            rule("devices/+/telemetry/#", PayloadFormat::Json),
        ]));
        let raw = check(&v, "meters", "s1", "devices/s1/telemetry/raw", b"\xff");
        assert_eq!(raw, Ok(()));
        let err = check(&v, "meters", "s1", "devices/s1/telemetry/temp", b"\xff").unwrap_err();
        assert!(
            err.rule.starts_with("rule 2 (devices/+/telemetry/#, json)"),
            "{err}"
        );
        // `#` also matches its parent level.
        assert!(check(&v, "meters", "s1", "devices/s1/telemetry", b"x").is_err());
        // No rule: only the size limits.
        assert_eq!(
            check(&v, "meters", "s1", "devices/s1/logs", b"\xff"),
            Ok(())
        );
    }

    #[test]
    fn group_filter_limits_a_rule_to_its_groups() {
        let v = build(&policy(vec![PayloadRule {
            groups: Some(vec!["meters".into()]),
            ..rule("devices/+/telemetry", PayloadFormat::Json)
        }]));
        assert!(check(&v, "meters", "s1", "devices/s1/telemetry", b"x").is_err());
        assert_eq!(
            check(&v, "cameras", "s1", "devices/s1/telemetry", b"x"),
            Ok(())
        );
    }

    #[test]
    fn id_placeholder_matches_only_the_principal_itself() {
        let v = build(&policy(vec![
            rule("devices/{id}/telemetry", PayloadFormat::Json),
            rule("fleet/{group}/+/state", PayloadFormat::Utf8),
        ]));
        assert!(check(&v, "meters", "s1", "devices/s1/telemetry", b"x").is_err());
        // A service publishing on a device's topic is not that device.
        assert_eq!(
            check(&v, "ops", "svc", "devices/s1/telemetry", b"x"),
            Ok(())
        );
        assert!(check(&v, "meters", "s1", "fleet/meters/s1/state", b"\xff").is_err());
        assert_eq!(
            check(&v, "meters", "s1", "fleet/cameras/s1/state", b"\xff"),
            Ok(())
        );
    }

    #[test]
    fn template_matching_agrees_with_substituted_filters() {
        let patterns = [
            "devices/{id}/#",
            "{group}/+/{id}",
            "a/{id}",
            "#",
            "x/{group}/y/#",
        ];
        let topics = [
            "devices/s1",
            "devices/s1/t",
            "devices/s2/t",
            "meters/x/s1",
            "meters/x/s1/y",
            "a/s1",
            "a/s1/b",
            "x/meters/y",
            "x/meters/y/z",
            "x/ops/y",
            "a",
        ];
        for pattern in patterns {
            let RuleTopic::Template(levels) = parse_topic(pattern).unwrap() else {
                assert_eq!(pattern, "#");
                continue;
            };
            let filter = TopicFilter::parse_unlimited(
                &pattern.replace("{id}", "s1").replace("{group}", "meters"),
            )
            .unwrap();
            for topic in topics {
                let name = TopicName::parse(topic, L).unwrap();
                assert_eq!(
                    template_matches(&levels, "s1", "meters", topic),
                    filter.matches(&name),
                    "{pattern} vs {topic}"
                );
            }
        }
    }

    #[test]
    fn missing_schema_file_is_named() {
        let cfg = policy(vec![schema_rule(
            "a/#",
            Path::new("/nonexistent/t.schema.json"),
        )]);
        let err = Validator::new(&cfg, Path::to_path_buf).unwrap_err();
        assert_eq!(err.key, "validation.rules[0].schema");
        assert!(
            err.reason
                .starts_with("/nonexistent/t.schema.json: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn schema_path_goes_through_resolve() {
        let (dir, _) = schema_file(TELEMETRY_SCHEMA);
        let cfg = policy(vec![schema_rule(
            "a/#",
            Path::new("{data_dir}/telemetry.schema.json"),
        )]);
        let resolve = |p: &Path| match p.strip_prefix("{data_dir}") {
            Ok(rest) => dir.path().join(rest),
            Err(_) => p.to_path_buf(),
        };
        assert!(Validator::new(&cfg, resolve).is_ok());
    }

    #[test]
    fn invalid_schema_file_is_named_with_the_problem() {
        let (_dir, path) = schema_file("{ \"type\": ");
        let err =
            Validator::new(&policy(vec![schema_rule("a", &path)]), Path::to_path_buf).unwrap_err();
        assert!(
            err.reason
                .starts_with(&format!("{}: not JSON", path.display())),
            "{err}"
        );

        let (_dir, path) = schema_file(r#"{"type": "integr"}"#);
        let err =
            Validator::new(&policy(vec![schema_rule("a", &path)]), Path::to_path_buf).unwrap_err();
        assert!(
            err.reason
                .starts_with(&format!("{}: invalid schema", path.display())),
            "{err}"
        );

        let (_dir, path) = schema_file(r#"{"format": "colour"}"#);
        let err =
            Validator::new(&policy(vec![schema_rule("a", &path)]), Path::to_path_buf).unwrap_err();
        assert!(err.reason.contains("colour"), "{err}");
        assert!(err.reason.contains("refuses the others"), "{err}");
    }

    #[test]
    fn remote_ref_is_refused_at_load() {
        for target in [
            "https://example.com/telemetry.json",
            "file:///etc/portcullis/other.json",
            "other.schema.json",
        ] {
            let text = format!(r#"{{"properties": {{"t": {{"$ref": "{target}"}}}}}}"#);
            let (_dir, path) = schema_file(&text);
            let err = Validator::new(&policy(vec![schema_rule("a", &path)]), Path::to_path_buf)
                .unwrap_err();
            assert_eq!(err.key, "validation.rules[0].schema");
            assert!(err.reason.contains("never fetches"), "{err}");
        }
        // References inside the document resolve.
        let (_dir, path) = schema_file(
            r##"{"$defs": {"t": {"maximum": 150}}, "properties": {"t": {"$ref": "#/$defs/t"}}}"##,
        );
        let v = build(&policy(vec![schema_rule("devices/#", &path)]));
        assert_eq!(
            meter(&v, br#"{"t": 912}"#).unwrap_err().reason,
            "t: 912 is greater than the maximum of 150"
        );
    }

    #[test]
    fn shared_schema_file_is_compiled_once() {
        let (_dir, path) = schema_file(TELEMETRY_SCHEMA);
        let v = build(&policy(vec![
            schema_rule("a/#", &path),
            schema_rule("b/#", &path),
        ]));
        let [
            Rule {
                format: Format::Schema(a),
                ..
            },
            Rule {
                format: Format::Schema(b),
                ..
            },
        ] = &v.rules[..]
        else {
            panic!("two schema rules expected");
        };
        assert!(Arc::ptr_eq(a, b));
    }

    /// The worked example in docs/validation.md, row by row.
    #[test]
    fn documented_example_refusals() {
        let (_dir, path) = schema_file(
            r#"{
              "$schema": "https://json-schema.org/draft/2020-12/schema",
              "type": "object",
              "required": ["temperature"],
              "properties": {
                "temperature": { "type": "number", "minimum": -40, "maximum": 150 },
                "unit": { "enum": ["C", "F"] },
                "at": { "type": "string", "format": "date-time" }
              },
              "additionalProperties": false
            }"#,
        );
        let cfg = Validation {
            max_payload_bytes: 65536,
            rules: vec![
                PayloadRule {
                    groups: Some(vec!["meters".into()]),
                    max_bytes: Some(1024),
                    ..schema_rule("devices/{id}/telemetry", &path)
                },
                rule("devices/+/logs/#", PayloadFormat::Utf8),
            ],
            group_limits: BTreeMap::new(),
        };
        let v = build(&cfg);
        let telemetry = |payload: &[u8]| {
            check(
                &v,
                "meters",
                "meter-7",
                "devices/meter-7/telemetry",
                payload,
            )
            .unwrap_err()
        };
        let err = telemetry(br#"{"temperature": 912, "unit": "C"}"#);
        assert_eq!(
            err.to_string(),
            "rule 1 (devices/{id}/telemetry, json-schema telemetry.schema.json): \
             temperature: 912 is greater than the maximum of 150"
        );
        for (payload, reason, label) in [
            (
                &br#"{"unit": "C"}"#[..],
                r#""temperature" is a required property"#,
                "schema",
            ),
            (
                br#"{"temperature": "hot"}"#,
                r#"temperature: "hot" is not of type "number""#,
                "schema",
            ),
            (
                br#"{"temperature": 20, "at": "yesterday"}"#,
                r#"at: "yesterday" is not a "date-time""#,
                "schema",
            ),
            (
                br#"{"temperature": 20, "humidity": 40}"#,
                r#"additional property "humidity" is not allowed"#,
                "schema",
            ),
            (
                b"temperature=20",
                "not JSON: expected ident at line 1 column 2",
                "not_json",
            ),
            (
                &[b' '; 2000],
                "payload is 2000 bytes, limit 1024",
                "too_large",
            ),
        ] {
            let err = telemetry(payload);
            assert_eq!((err.reason.as_str(), err.kind.label()), (reason, label));
        }
        let err = check(
            &v,
            "meters",
            "meter-7",
            "devices/meter-7/logs/boot",
            b"\xff",
        )
        .unwrap_err();
        assert_eq!(err.rule, "rule 2 (devices/+/logs/#, utf8)");
        assert_eq!(err.reason, "not valid UTF-8 at byte 0");
        let err = check(&v, "meters", "meter-7", "devices/meter-7/x", &[0; 70000]).unwrap_err();
        assert_eq!(err.rule, "size limit (global)");
        assert_eq!(err.reason, "payload is 70000 bytes, limit 65536");
    }

    #[test]
    fn bad_config_is_refused_with_its_key() {
        let cfg = policy(vec![rule("a/#/b", PayloadFormat::Utf8)]);
        let err = Validator::new(&cfg, Path::to_path_buf).unwrap_err();
        assert_eq!(err.key, "validation.rules[0].topic");
    }
}
