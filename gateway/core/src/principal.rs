//! Who connects: devices and services, named by validated ids and groups.
//!
//! Ids and group names are parsed once at the edge (`[A-Za-z0-9._-]{1,64}`, not dots
//! only), so the core never handles a raw string that could smuggle a `/`, a wildcard
//! or a NUL into a topic built from it, or a dot segment into a URL.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    Device,
    Service,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Device => "device",
            PrincipalKind::Service => "service",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1-64 characters of [A-Za-z0-9._-], not only dots")]
pub struct InvalidName {
    pub what: &'static str,
}

/// The characters and length of every name, new or stored.
fn valid_chars(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A new name: `.` and `..` would be dot segments wherever a name is a URL path
/// segment (the admin API, the dashboard), so no new name is dots only.
fn valid_name(s: &str) -> bool {
    valid_chars(s) && !s.bytes().all(|b| b == b'.')
}

macro_rules! name_type {
    ($name:ident, $what:literal) => {
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// A new name, from the operator or the network.
            pub fn parse(s: &str) -> Result<Self, InvalidName> {
                if valid_name(s) {
                    Ok($name(Arc::from(s)))
                } else {
                    Err(InvalidName { what: $what })
                }
            }

            /// A name that may already exist: stored records, and the operator naming
            /// one to show, change or remove. Dots only are taken here, as they were
            /// before new names refused them, so a registry holding one still opens
            /// and the name can be removed.
            pub fn existing(s: &str) -> Result<Self, InvalidName> {
                if valid_chars(s) {
                    Ok($name(Arc::from(s)))
                } else {
                    Err(InvalidName { what: $what })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// What is read back (records, journals, replies) was checked when it was new.
        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                $name::existing(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
    };
}

name_type!(PrincipalId, "an id");
name_type!(GroupName, "a group name");

/// A principal as the pipeline sees it once authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrincipalRef {
    pub kind: PrincipalKind,
    pub id: PrincipalId,
    pub group: GroupName,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `.` and `..` are dot segments in a URL: `/api/v1/devices/..` is not that
    /// device's path, in a browser or anywhere else.
    #[test]
    fn dot_only_ids_are_refused_when_new_and_read_when_stored() {
        for bad in [".", "..", "..."] {
            let e = PrincipalId::parse(bad).unwrap_err();
            assert!(e.to_string().contains("not only dots"), "{bad:?}: {e}");
            assert!(GroupName::parse(bad).is_err(), "{bad:?}");
            assert_eq!(PrincipalId::existing(bad).unwrap().as_str(), bad);
            let stored: PrincipalId = serde_json::from_str(&format!("{bad:?}")).unwrap();
            assert_eq!(stored.as_str(), bad);
        }
        for bad in ["", "a/b", "#"] {
            assert!(PrincipalId::existing(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_str::<PrincipalId>(&format!("{bad:?}")).is_err());
        }
    }

    #[test]
    fn ids_with_topic_syntax_are_refused() {
        for bad in ["", "a/b", "a+", "#", "a b", "é", "a\0", &"x".repeat(65)] {
            assert!(PrincipalId::parse(bad).is_err(), "{bad:?}");
        }
        for good in ["sensor-1", "A.b_c-9", ".a", "a..", &"x".repeat(64)] {
            assert!(PrincipalId::parse(good).is_ok(), "{good:?}");
        }
    }
}
