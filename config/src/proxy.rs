//! `[proxy_protocol]`: which load balancers may put a PROXY protocol v2 header in
//! front of a device listener's connections (docs/configuration.md). Off unless a
//! listener lists at least one balancer.

use crate::duration::Secs;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocol {
    /// Load balancers (addresses or CIDR blocks) whose connections to
    /// `listeners.device_tls` start with a PROXY v2 header. Empty: no header taken.
    pub device_tls: Vec<String>,
    /// The same for `listeners.device_plain` (a balancer on the same host).
    pub device_plain: Vec<String>,
    /// Load balancers whose datagrams to `listeners.coap_dtls` each start with a
    /// PROXY v2 header (UDP balancers send one per datagram).
    pub coap_dtls: Vec<String>,
    /// Time a balancer's connection has to deliver its whole header.
    pub header_timeout: Secs,
}

impl Default for ProxyProtocol {
    fn default() -> Self {
        ProxyProtocol {
            device_tls: Vec::new(),
            device_plain: Vec::new(),
            coap_dtls: Vec::new(),
            header_timeout: Secs::from_secs(5),
        }
    }
}

/// One entry of a balancer list: `"10.0.0.0/24"`, `"2001:db8::/64"` or a single
/// address. Host bits are dropped. An IPv4-mapped IPv6 entry (`"::ffff:10.0.0.5"`, as
/// a dual-stack host shows its IPv4 peers) is its IPv4 network: peers are matched
/// as IPv4.
fn network(text: &str) -> Option<IpNet> {
    let net = match text.parse::<IpNet>() {
        Ok(n) => n.trunc(),
        Err(_) => IpNet::from(text.parse::<IpAddr>().ok()?),
    };
    Some(match net {
        IpNet::V6(v6) => match (v6.addr().to_ipv4_mapped(), v6.prefix_len()) {
            (Some(v4), len) if len >= 96 => {
                IpNet::V4(ipnet::Ipv4Net::new(v4, len - 96).ok()?.trunc())
            }
            _ => net,
        },
        v4 => v4,
    })
}

impl ProxyProtocol {
    /// The balancers of the device TLS listener (the file is validated: every entry
    /// parses).
    pub fn device_tls_balancers(&self) -> Vec<IpNet> {
        self.device_tls.iter().filter_map(|t| network(t)).collect()
    }

    /// The balancers of the device plain listener.
    pub fn device_plain_balancers(&self) -> Vec<IpNet> {
        self.device_plain
            .iter()
            .filter_map(|t| network(t))
            .collect()
    }

    /// The balancers of the CoAP over DTLS listener.
    pub fn coap_dtls_balancers(&self) -> Vec<IpNet> {
        self.coap_dtls.iter().filter_map(|t| network(t)).collect()
    }

    /// `tls_on`, `plain_on`, `coap_on`: whether the listeners are on.
    pub(crate) fn validate(
        &self,
        tls_on: bool,
        plain_on: bool,
        coap_on: bool,
    ) -> Result<(), (String, String)> {
        for (name, list, on) in [
            ("device_tls", &self.device_tls, tls_on),
            ("device_plain", &self.device_plain, plain_on),
            ("coap_dtls", &self.coap_dtls, coap_on),
        ] {
            let key = format!("proxy_protocol.{name}");
            if !list.is_empty() && !on {
                return Err((
                    key,
                    format!("lists load balancers but listeners.{name} is \"off\""),
                ));
            }
            for (i, text) in list.iter().enumerate() {
                let Some(net) = network(text) else {
                    return Err((
                        format!("{key}[{i}]"),
                        format!(
                            "expected an address or CIDR block like \"10.0.0.0/24\" (got {text:?})"
                        ),
                    ));
                };
                // Wider than a /8 (IPv4) or a /32 (IPv6, a whole provider's
                // allocation) is no list of balancers: it would let a large part of
                // the Internet claim any address.
                let widest = match net {
                    IpNet::V4(_) => 8,
                    IpNet::V6(_) => 32,
                };
                if net.prefix_len() < widest {
                    return Err((
                        format!("{key}[{i}]"),
                        format!(
                            "{text:?} is wider than a /{widest} and would let a large part of the \
                             Internet claim any address; list the load balancers only"
                        ),
                    ));
                }
            }
        }
        let t = self.header_timeout.as_secs();
        if !(1..=60).contains(&t) {
            return Err((
                "proxy_protocol.header_timeout".into(),
                format!("must be between 1s and 60s (got {t}s)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn off_by_default() {
        let c = Config::default();
        assert!(c.proxy_protocol.device_tls_balancers().is_empty());
        assert!(c.proxy_protocol.device_plain_balancers().is_empty());
        assert!(c.proxy_protocol.coap_dtls_balancers().is_empty());
    }

    #[test]
    fn balancers_parse_as_networks_and_addresses() {
        let c = Config::parse(
            "[proxy_protocol]\ndevice_tls = [\"10.0.0.7/24\", \"2001:db8::1\"]\ndevice_plain = [\"127.0.0.1\"]\nheader_timeout = \"3s\"\n",
            "x.toml",
        )
        .unwrap();
        let tls: Vec<String> = c
            .proxy_protocol
            .device_tls_balancers()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(tls, ["10.0.0.0/24", "2001:db8::1/128"]);
        assert_eq!(c.proxy_protocol.device_plain_balancers().len(), 1);
        assert!(c.proxy_protocol.coap_dtls_balancers().is_empty());
        assert_eq!(c.proxy_protocol.header_timeout.as_secs(), 3);
    }

    #[test]
    fn an_ipv4_mapped_entry_is_its_ipv4_network() {
        let c = Config::parse(
            "[proxy_protocol]\ndevice_tls = [\"::ffff:10.0.0.5\", \"::ffff:10.1.0.0/112\"]\n",
            "x.toml",
        )
        .unwrap();
        let tls: Vec<String> = c
            .proxy_protocol
            .device_tls_balancers()
            .iter()
            .map(|n| n.to_string())
            .collect();
        // Peers are matched as IPv4 (a mapped peer is made IPv4 first).
        assert_eq!(tls, ["10.0.0.5/32", "10.1.0.0/16"]);
    }

    #[test]
    fn a_bad_entry_is_named_by_its_key() {
        let err = Config::parse(
            "[proxy_protocol]\ndevice_tls = [\"10.0.0.0/24\", \"10.0.0.300/24\"]\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(err.key, "proxy_protocol.device_tls[1]");
        assert!(err.reason.contains("10.0.0.300/24"), "{}", err.reason);
        let err =
            Config::parse("[proxy_protocol]\ndevice_plain = [\"::/0\"]\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "proxy_protocol.device_plain[0]");
        // Two halves of everything are no better than everything.
        for wide in [
            "0.0.0.0/1",
            "128.0.0.0/1",
            "10.0.0.0/7",
            "::/1",
            "2000::/3",
            "2001:db8::/31",
        ] {
            let err = Config::parse(
                &format!("[proxy_protocol]\ndevice_tls = [\"10.0.0.1\", \"{wide}\"]\n"),
                "x.toml",
            )
            .unwrap_err();
            assert_eq!(err.key, "proxy_protocol.device_tls[1]", "{wide}");
            assert!(
                err.reason.contains("list the load balancers only"),
                "{}",
                err.reason
            );
        }
        for narrow in ["10.0.0.0/8", "2001:db8::/32", "::ffff:10.0.0.0/104"] {
            Config::parse(
                &format!("[proxy_protocol]\ndevice_tls = [\"{narrow}\"]\n"),
                "x.toml",
            )
            .unwrap_or_else(|e| panic!("{narrow}: {e}"));
        }
        let err =
            Config::parse("[proxy_protocol]\nheader_timeout = \"0s\"\n", "x.toml").unwrap_err();
        assert_eq!(err.key, "proxy_protocol.header_timeout");
        let err = Config::parse(
            "[listeners]\ndevice_tls = \"off\"\n[proxy_protocol]\ndevice_tls = [\"10.0.0.1\"]\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(err.key, "proxy_protocol.device_tls");
    }

    #[test]
    fn the_coap_listener_takes_its_own_list_with_the_same_rules() {
        let c = Config::parse(
            "[proxy_protocol]\ncoap_dtls = [\"10.0.0.7/24\", \"::ffff:10.1.0.5\"]\n",
            "x.toml",
        )
        .unwrap();
        let nets: Vec<String> = c
            .proxy_protocol
            .coap_dtls_balancers()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/24", "10.1.0.5/32"]);
        assert!(c.proxy_protocol.device_tls_balancers().is_empty());
        let err = Config::parse(
            "[proxy_protocol]\ncoap_dtls = [\"10.0.0.1\", \"0.0.0.0/0\"]\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(err.key, "proxy_protocol.coap_dtls[1]");
        let err = Config::parse(
            "[listeners]\ncoap_dtls = \"off\"\n[proxy_protocol]\ncoap_dtls = [\"10.0.0.1\"]\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(err.key, "proxy_protocol.coap_dtls");
    }
}
