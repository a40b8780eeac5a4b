//! Bans: sources (an address or a CIDR block) and principals refused outright, for a
//! time or until lifted.
//!
//! Source bans are checked when a connection is accepted, before a byte is read;
//! principal bans at authentication. Bans are stored with the registry (they survive
//! restarts) and read from an in-memory list, like the registry snapshot.

use crate::principal::{PrincipalId, PrincipalKind};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address block. Parsing and matching are ipnet's; the host bits are dropped.
///
/// Stored (with the registry's bans) as `{"addr": ..., "prefix": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "StoredCidr", try_from = "StoredCidr")]
pub struct Cidr(IpNet);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or CIDR block (e.g. 192.0.2.7, 192.0.2.0/24, 2001:db8::/32)")]
pub struct BadCidr(pub String);

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => IpNet::from(s.parse::<IpAddr>().map_err(|_| BadCidr(s.to_string()))?),
        };
        Ok(Cidr(net.trunc()))
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The stored form of a [`Cidr`], as written since bans were first kept.
#[derive(Serialize, Deserialize)]
struct StoredCidr {
    addr: IpAddr,
    prefix: u8,
}

impl From<Cidr> for StoredCidr {
    fn from(c: Cidr) -> Self {
        StoredCidr {
            addr: c.0.addr(),
            prefix: c.0.prefix_len(),
        }
    }
}

impl TryFrom<StoredCidr> for Cidr {
    type Error = String;
    fn try_from(s: StoredCidr) -> Result<Self, String> {
        IpNet::new(s.addr, s.prefix)
            .map(|net| Cidr(net.trunc()))
            .map_err(|_| format!("prefix /{} is too long for {}", s.prefix, s.addr))
    }
}

/// What a ban applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum BanTarget {
    Source(Cidr),
    Principal(PrincipalKind, PrincipalId),
}

impl fmt::Display for BanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::Source(c) => write!(f, "source {c}"),
            BanTarget::Principal(k, id) => write!(f, "{k} {id}"),
        }
    }
}

impl BanTarget {
    /// As an operator writes it (`device/ID`, `service/ID`, an address or a CIDR
    /// block): what `ban add` and `ban remove` take.
    pub fn as_arg(&self) -> String {
        match self {
            BanTarget::Source(c) => c.to_string(),
            BanTarget::Principal(k, id) => format!("{k}/{id}"),
        }
    }

    /// The key a ban is stored under.
    pub fn key(&self) -> String {
        match self {
            BanTarget::Source(c) => format!("source/{c}"),
            BanTarget::Principal(k, id) => format!("{k}/{id}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub target: BanTarget,
    pub reason: String,
    pub created_unix: u64,
    /// `None`: until lifted.
    pub expires_unix: Option<u64>,
}

impl Ban {
    pub fn active(&self, now_unix: u64) -> bool {
        self.expires_unix.is_none_or(|t| t > now_unix)
    }
}

/// The bans in force, as an immutable list swapped whole on change.
#[derive(Debug, Default, Clone)]
pub struct BanList {
    bans: Vec<Ban>,
}

impl BanList {
    pub fn new(bans: Vec<Ban>) -> Self {
        BanList { bans }
    }

    pub fn all(&self) -> &[Ban] {
        &self.bans
    }

    /// The active ban covering this source, if any.
    pub fn source(&self, ip: IpAddr, now_unix: u64) -> Option<&Ban> {
        self.bans.iter().find(|b| {
            b.active(now_unix) && matches!(&b.target, BanTarget::Source(c) if c.contains(ip))
        })
    }

    /// The active ban on this principal, if any.
    pub fn principal(&self, kind: PrincipalKind, id: &PrincipalId, now_unix: u64) -> Option<&Ban> {
        self.bans.iter().find(|b| {
            b.active(now_unix)
                && matches!(&b.target, BanTarget::Principal(k, i) if *k == kind && i == id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_blocks_match_their_addresses_only() {
        let c = cidr("192.0.2.0/24");
        assert!(c.contains("192.0.2.7".parse().unwrap()));
        assert!(!c.contains("192.0.3.7".parse().unwrap()));
        assert!(c.contains("::ffff:192.0.2.9".parse().unwrap()));
        assert!(cidr("127.0.0.5").contains("127.0.0.5".parse().unwrap()));
        assert!(!cidr("127.0.0.5").contains("127.0.0.6".parse().unwrap()));
        assert!(cidr("2001:db8::/32").contains("2001:db8::1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("10.1.2.3".parse().unwrap()));
        assert!(!cidr("0.0.0.0/0").contains("::1".parse().unwrap()));
        // The host bits of a block are ignored.
        assert_eq!(cidr("192.0.2.77/24"), cidr("192.0.2.0/24"));
    }

    #[test]
    fn a_block_is_stored_as_address_and_prefix() {
        let json = serde_json::to_string(&cidr("192.0.2.77/24")).unwrap();
        assert_eq!(json, r#"{"addr":"192.0.2.0","prefix":24}"#);
        let back: Cidr = serde_json::from_str(r#"{"addr":"2001:db8::","prefix":32}"#).unwrap();
        assert_eq!(back, cidr("2001:db8::/32"));
        assert!(serde_json::from_str::<Cidr>(r#"{"addr":"10.0.0.0","prefix":40}"#).is_err());
    }

    #[test]
    fn malformed_blocks_are_refused() {
        for bad in ["", "300.1.1.1", "1.2.3.4/33", "::/129", "1.2.3.4/x", "host"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn expired_bans_do_not_apply() {
        let id = PrincipalId::parse("sensor-1").unwrap();
        let list = BanList::new(vec![
            Ban {
                target: BanTarget::Source(cidr("127.0.0.0/8")),
                reason: "t".into(),
                created_unix: 0,
                expires_unix: Some(100),
            },
            Ban {
                target: BanTarget::Principal(PrincipalKind::Device, id.clone()),
                reason: "t".into(),
                created_unix: 0,
                expires_unix: None,
            },
        ]);
        let ip = "127.0.0.1".parse().unwrap();
        assert!(list.source(ip, 99).is_some());
        assert!(list.source(ip, 100).is_none());
        assert!(
            list.principal(PrincipalKind::Device, &id, u64::MAX)
                .is_some()
        );
        assert!(list.principal(PrincipalKind::Service, &id, 0).is_none());
    }
}
