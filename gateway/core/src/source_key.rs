//! What counts as one source for back-off, rates and connection caps.
//!
//! An IPv4 address is one source. An IPv6 host usually holds a whole /64 (2^64
//! addresses), so keying on the full address would make one host look like 2^64
//! sources: an IPv6 address is keyed by its first `ipv6_prefix` bits instead. An
//! IPv4 peer on a dual-stack socket (`::ffff:a.b.c.d`) is keyed as IPv4.

use std::net::{IpAddr, Ipv6Addr};

/// The default IPv6 prefix length of one source.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// A source address reduced to what identifies one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    addr: IpAddr,
    prefix: u8,
}

impl SourceKey {
    /// `ipv6_prefix` is clamped to 1..=128 (the configuration checks 32..=128).
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> SourceKey {
        match ip {
            IpAddr::V4(_) => SourceKey {
                addr: ip,
                prefix: 32,
            },
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey {
                    addr: IpAddr::V4(v4),
                    prefix: 32,
                },
                None => {
                    let prefix = ipv6_prefix.clamp(1, 128);
                    let mask = u128::MAX << (128 - u32::from(prefix));
                    SourceKey {
                        addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
                        prefix,
                    }
                }
            },
        }
    }

    /// The network address of the source (the address itself for IPv4).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, prefix: u8) -> SourceKey {
        SourceKey::new(s.parse().unwrap(), prefix)
    }

    #[test]
    fn two_addresses_in_one_slash_64_are_one_source() {
        assert_eq!(key("2001:db8:1:2::1", 64), key("2001:db8:1:2:ffff::9", 64));
        assert_ne!(key("2001:db8:1:2::1", 64), key("2001:db8:1:3::1", 64));
    }

    #[test]
    fn a_slash_128_prefix_separates_every_address() {
        assert_ne!(key("2001:db8:1:2::1", 128), key("2001:db8:1:2::2", 128));
        assert_eq!(key("2001:db8:1:2::1", 128), key("2001:db8:1:2::1", 128));
    }

    #[test]
    fn ipv4_addresses_are_each_their_own_source() {
        assert_ne!(key("127.0.0.5", 64), key("127.0.0.6", 64));
        assert_eq!(key("::ffff:127.0.0.5", 64), key("127.0.0.5", 64));
        assert_eq!(key("2001:db8:1:2::1", 64).to_string(), "2001:db8:1:2::/64");
    }
}
