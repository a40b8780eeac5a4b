//! Topic names and filters, parsed once at the edge.
//!
//! A `TopicName` (what a message is published to) has no wildcard, no empty level and
//! no NUL, and fits the configured length and depth; a `TopicFilter` (what is
//! subscribed to) may use `+` and a trailing `#`. Matching and "is this filter inside
//! that one" are what authorization is built on.

use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_length: usize,
    pub max_depth: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {0} bytes, over the limit of {1}")]
    TooLong(usize, usize),
    #[error("topic has {0} levels, over the limit of {1}")]
    TooDeep(usize, usize),
    #[error("topic has an empty level")]
    EmptyLevel,
    #[error("topic name contains a wildcard")]
    Wildcard,
    #[error("topic contains NUL")]
    Nul,
    #[error("topic contains U+{0:04X} (control characters, noncharacters and U+FEFF are refused)")]
    ForbiddenCharacter(u32),
    #[error("'#' must be the whole last level of a filter")]
    MisplacedHash,
    #[error("'+' must be a whole level of a filter")]
    MisplacedPlus,
    #[error("topics starting with '$' are reserved")]
    Reserved,
    #[error("topic must start with an ASCII character")]
    NonAsciiStart,
}

fn check_common(s: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_length {
        return Err(TopicError::TooLong(s.len(), limits.max_length));
    }
    // What standard consumers refuse never becomes a topic (`content`); NUL among
    // them is named as such.
    if let Some((_, c)) = crate::content::first_forbidden(s) {
        if s.contains('\0') {
            return Err(TopicError::Nul);
        }
        return Err(TopicError::ForbiddenCharacter(u32::from(c)));
    }
    // Levels counted and checked for emptiness in one pass over the bytes ('/' is a
    // single byte in UTF-8, never part of another character).
    let (mut depth, mut level, mut empty_level) = (1, 0usize, false);
    for &b in s.as_bytes() {
        if b == b'/' {
            empty_level |= level == 0;
            depth += 1;
            level = 0;
        } else {
            level += 1;
        }
    }
    empty_level |= level == 0;
    if depth > limits.max_depth {
        return Err(TopicError::TooDeep(depth, limits.max_depth));
    }
    if empty_level {
        return Err(TopicError::EmptyLevel);
    }
    // `$SYS`-style topics belong to brokers; and the embedded broker cannot take a
    // topic whose first character is not a single byte.
    match s.as_bytes().first() {
        Some(b'$') => return Err(TopicError::Reserved),
        Some(b) if !b.is_ascii() => return Err(TopicError::NonAsciiStart),
        _ => {}
    }
    Ok(())
}

/// A topic a message may be published to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    pub fn parse(s: &str, limits: TopicLimits) -> Result<Self, TopicError> {
        check_common(s, limits)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        Ok(TopicName(Arc::from(s)))
    }

    /// A topic that was a `TopicName` when the gateway handed it to a forwarder whose
    /// only writer is the gateway (the embedded broker): not checked again on the way
    /// back. A forwarder with other writers parses what it receives.
    pub fn from_forwarded(s: &str) -> Self {
        TopicName(Arc::from(s))
    }

    /// A topic built by the gateway itself (its own events), checked for shape only.
    pub fn parse_unlimited(s: &str) -> Result<Self, TopicError> {
        if s.is_empty()
            || s.contains(['+', '#'])
            || crate::content::first_forbidden(s).is_some()
            || s.split('/').any(str::is_empty)
        {
            return Err(TopicError::Wildcard);
        }
        Ok(TopicName(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

// Ordered and hashed as its text, so maps keyed by topic can be searched by `&str`.
impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A subscription filter.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(Arc<str>);

impl TopicFilter {
    pub fn parse(s: &str, limits: TopicLimits) -> Result<Self, TopicError> {
        check_common(s, limits)?;
        Self::check_wildcards(s)?;
        Ok(TopicFilter(Arc::from(s)))
    }

    /// A filter built by the gateway itself (ACL expansion), checked for shape only.
    pub fn parse_unlimited(s: &str) -> Result<Self, TopicError> {
        Self::parse(
            s,
            TopicLimits {
                max_length: usize::MAX,
                max_depth: usize::MAX,
            },
        )
    }

    fn check_wildcards(s: &str) -> Result<(), TopicError> {
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            if level.contains('#') && (level != "#" || levels.peek().is_some()) {
                return Err(TopicError::MisplacedHash);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::MisplacedPlus);
            }
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does this filter match the topic name?
    pub fn matches(&self, topic: &TopicName) -> bool {
        filter_matches(&self.0, &topic.0)
    }

    /// Is every topic this `inner` filter can match also matched by `self`?
    pub fn covers(&self, inner: &TopicFilter) -> bool {
        let mut outer = self.0.split('/');
        let mut inner = inner.0.split('/');
        loop {
            match (outer.next(), inner.next()) {
                // `a/#` matches everything below `a`, and `a` itself.
                (Some("#"), _) => return true,
                (None, None) => return true,
                (Some(_), None) | (None, Some(_)) => return false,
                (Some(o), Some(i)) => {
                    if i == "#" || (o != "+" && o != i) {
                        return false;
                    }
                }
            }
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// MQTT matching of a topic name against a filter (both already validated).
///
/// On the per-message path (every ACL and validation rule is matched against every
/// message), so it walks the bytes of both once, level by level, rather than splitting
/// them: a level is compared in place, `+` skips one level of the topic, and `#` as a
/// whole level matches the rest (including nothing: `a/#` matches `a`).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let (f, t) = (filter.as_bytes(), topic.as_bytes());
    let (mut i, mut j) = (0, 0);
    loop {
        // At the start of a level in both.
        let whole = |c: u8| f.get(i) == Some(&c) && matches!(f.get(i + 1), None | Some(b'/'));
        if whole(b'#') {
            return true;
        }
        if whole(b'+') {
            i += 1;
            while j < t.len() && t[j] != b'/' {
                j += 1;
            }
        } else {
            while i < f.len() && f[i] != b'/' {
                if t.get(j) != Some(&f[i]) {
                    return false;
                }
                i += 1;
                j += 1;
            }
            if j < t.len() && t[j] != b'/' {
                return false;
            }
        }
        // At the end of a level in both.
        match (i == f.len(), j == t.len()) {
            (true, true) => return true,
            (true, false) => return false,
            (false, true) => {
                return f[i..].starts_with(b"/#") && matches!(f.get(i + 2), None | Some(b'/'));
            }
            (false, false) => {
                i += 1;
                j += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: TopicLimits = TopicLimits {
        max_length: 64,
        max_depth: 5,
    };

    fn name(s: &str) -> TopicName {
        TopicName::parse(s, L).unwrap()
    }
    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s, L).unwrap()
    }

    #[test]
    fn publish_topic_with_wildcard_empty_level_or_nul_is_refused() {
        assert_eq!(TopicName::parse("a/+/b", L), Err(TopicError::Wildcard));
        assert_eq!(TopicName::parse("a/#", L), Err(TopicError::Wildcard));
        assert_eq!(TopicName::parse("a//b", L), Err(TopicError::EmptyLevel));
        assert_eq!(TopicName::parse("/a", L), Err(TopicError::EmptyLevel));
        assert_eq!(TopicName::parse("a/", L), Err(TopicError::EmptyLevel));
        assert_eq!(TopicName::parse("a\0b", L), Err(TopicError::Nul));
        assert_eq!(TopicName::parse("", L), Err(TopicError::Empty));
    }

    #[test]
    fn topic_or_filter_with_a_control_character_or_noncharacter_is_refused() {
        for bad in [
            "a/\u{1}",
            "a/b\u{FFFF}",
            "\u{FEFF}a",
            "a/\u{9F}",
            "a/\u{10FFFE}",
        ] {
            assert!(
                matches!(
                    TopicName::parse(bad, L),
                    Err(TopicError::ForbiddenCharacter(_))
                ),
                "{bad:?}"
            );
            assert!(TopicFilter::parse(bad, L).is_err(), "{bad:?}");
            assert!(TopicName::parse_unlimited(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            TopicName::parse("a/\u{1}", L).unwrap_err().to_string(),
            "topic contains U+0001 (control characters, noncharacters and U+FEFF are refused)"
        );
    }

    #[test]
    fn reserved_and_non_ascii_leading_topics_are_refused() {
        assert_eq!(TopicName::parse("$SYS/x", L), Err(TopicError::Reserved));
        assert_eq!(
            TopicFilter::parse("$share/g/a", L),
            Err(TopicError::Reserved)
        );
        assert_eq!(TopicName::parse("é/x", L), Err(TopicError::NonAsciiStart));
        assert!(TopicName::parse("a/é", L).is_ok());
    }

    #[test]
    fn topic_over_length_or_depth_is_refused() {
        assert!(matches!(
            TopicName::parse(&"a".repeat(65), L),
            Err(TopicError::TooLong(65, 64))
        ));
        assert!(matches!(
            TopicName::parse("a/b/c/d/e/f", L),
            Err(TopicError::TooDeep(6, 5))
        ));
    }

    #[test]
    fn filter_wildcards_must_be_whole_levels() {
        assert_eq!(
            TopicFilter::parse("a/#/b", L),
            Err(TopicError::MisplacedHash)
        );
        assert_eq!(
            TopicFilter::parse("a/b#", L),
            Err(TopicError::MisplacedHash)
        );
        assert_eq!(
            TopicFilter::parse("a/b+", L),
            Err(TopicError::MisplacedPlus)
        );
        assert!(TopicFilter::parse("a/+/#", L).is_ok());
    }

    #[test]
    fn matching_agrees_with_level_by_level_matching_on_every_short_string() {
        // The reference: MQTT's rule stated on split levels.
        fn reference(filter: &str, topic: &str) -> bool {
            let (mut f, mut t) = (filter.split('/'), topic.split('/'));
            loop {
                match (f.next(), t.next()) {
                    (Some("#"), _) => return true,
                    (Some("+"), Some(_)) => {}
                    (Some(fl), Some(tl)) if fl == tl => {}
                    (None, None) => return true,
                    _ => return false,
                }
            }
        }
        // Every string of up to five characters over a, b, /, + and #.
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..5 {
            last = last
                .iter()
                .flat_map(|s| ['a', 'b', '/', '+', '#'].map(|c| format!("{s}{c}")))
                .collect();
            all.extend(last.iter().cloned());
        }
        let topics: Vec<&String> = all.iter().filter(|s| !s.contains(['+', '#'])).collect();
        for filter in &all {
            for topic in &topics {
                assert_eq!(
                    filter_matches(filter, topic),
                    reference(filter, topic),
                    "{filter:?} against {topic:?}"
                );
            }
        }
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(filter("devices/+/telemetry/#").matches(&name("devices/s1/telemetry")));
        assert!(filter("devices/+/telemetry/#").matches(&name("devices/s1/telemetry/t")));
        assert!(!filter("devices/+/telemetry/#").matches(&name("devices/s1/commands")));
        assert!(filter("a/+").matches(&name("a/b")));
        assert!(!filter("a/+").matches(&name("a/b/c")));
        assert!(!filter("a/+").matches(&name("a")));
        assert!(filter("#").matches(&name("a/b")));
        assert!(!filter("a/b").matches(&name("a/b/c")));
    }

    #[test]
    fn covers_is_filter_inclusion() {
        let acl = filter("devices/+/telemetry/#");
        assert!(acl.covers(&filter("devices/+/telemetry/#")));
        assert!(acl.covers(&filter("devices/s1/telemetry/#")));
        assert!(acl.covers(&filter("devices/s1/telemetry")));
        assert!(acl.covers(&filter("devices/+/telemetry/+/x")));
        assert!(!acl.covers(&filter("devices/#")));
        assert!(!acl.covers(&filter("devices/+/+/#")));
        assert!(!acl.covers(&filter("#")));
        assert!(!acl.covers(&filter("devices/s1/commands/#")));
        assert!(!filter("devices/s1/commands/+").covers(&filter("devices/s1/commands/#")));
        assert!(!filter("a/b").covers(&filter("a")));
        assert!(!filter("a/b").covers(&filter("a/b/c")));
    }
}
