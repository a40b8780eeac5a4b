//! `[upstream]`: the external broker cluster that upstream mode forwards to, and the
//! durable outbox in front of it (`[upstream.outbox]`).

use crate::duration::{Millis, Secs};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// A broker to connect to: `mqtt://HOST:PORT` or `mqtts://HOST:PORT` (TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!(
                "{text:?}: a broker URL starts with mqtt:// or mqtts://"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address is written in brackets: mqtt://[::1]:1883.
            Some((host, port)) if !host.is_empty() && !port.contains(']') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{text:?}: the port must be 1-65535"))?;
                (host, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let valid = |c: char| c.is_ascii_alphanumeric() || "-._:".contains(c);
        if host.is_empty() || !host.chars().all(valid) {
            return Err(format!(
                "{text:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT (no user, path or query)"
            ));
        }
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for BrokerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        BrokerUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// Brokers of the cluster, tried in turn until one accepts.
    pub urls: Vec<BrokerUrl>,
    /// This replica's client id upstream: fixed, and different on every replica.
    pub client_id: Option<String>,
    /// Trust roots (PEM) for `mqtts://` brokers.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// A file holding the user name on its first line and the password on its second.
    pub credentials_file: Option<PathBuf>,
    /// MQTT keep-alive towards the broker: a link silent for 1.5x this is given up.
    pub keep_alive: Secs,
    /// Time to connect and be answered (TCP, TLS and CONNACK).
    pub connect_timeout: Secs,
    /// Wait before reconnecting: doubles from `reconnect_min` to `reconnect_max`.
    pub reconnect_min: Millis,
    pub reconnect_max: Millis,
    /// Prepended to every topic upstream (`PREFIX/devices/…`); empty: none.
    pub prefix: String,
    /// QoS 1 publishes in flight at once, at most; a broker's Receive Maximum lowers it.
    pub max_inflight: u16,
    /// How long the broker keeps this replica's session (its command subscription)
    /// while the link is down.
    pub session_expiry: Secs,
    /// The key replicas share to authenticate their control messages (quarantine,
    /// release, bans); unset: this replica neither sends nor takes them.
    pub control_key_file: Option<PathBuf>,
    pub outbox: Outbox,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            urls: Vec::new(),
            client_id: None,
            ca: None,
            client_cert: None,
            client_key: None,
            credentials_file: None,
            keep_alive: Secs::from_secs(30),
            connect_timeout: Secs::from_secs(10),
            reconnect_min: Millis::from_millis(100),
            reconnect_max: Millis::from_millis(10_000),
            prefix: String::new(),
            max_inflight: 1000,
            session_expiry: Secs::from_secs(86_400),
            control_key_file: None,
            outbox: Outbox::default(),
        }
    }
}

/// What the outbox does when it holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// New messages wait (the devices' sockets are not read); a QoS 1/2 publish still
    /// waiting after `full_wait` is refused (MQTT 5: quota exceeded).
    BackPressure,
    /// The oldest QoS 0 messages make room; QoS 1/2 messages are never dropped, and
    /// wait as with `back-pressure` when no QoS 0 message is left.
    DropOldestQos0,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outbox {
    /// Bytes of messages the outbox holds on disk, at most.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// How long a QoS 1/2 publish waits for room before it is refused.
    pub full_wait: Millis,
    /// A message not delivered within this is dropped, counted and audited.
    pub message_ttl: Secs,
    /// Sends without an acknowledgement before a message goes to the dead letters.
    pub max_attempts: u32,
    /// Messages queued towards the outbox's writer before senders wait.
    pub queue: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            max_bytes: 1 << 30,
            when_full: WhenFull::BackPressure,
            full_wait: Millis::from_millis(5_000),
            message_ttl: Secs::from_secs(7 * 86_400),
            max_attempts: 10,
            queue: 8192,
        }
    }
}

impl Upstream {
    /// Checks that apply only in upstream mode (`required`) and always.
    pub(crate) fn validate(&self, required: bool) -> Result<(), (String, String)> {
        let err = |k: &str, why: String| Err((format!("upstream.{k}"), why));
        if required {
            if self.urls.is_empty() {
                return err(
                    "urls",
                    "upstream mode needs at least one broker URL (mqtts://HOST:PORT)".into(),
                );
            }
            match &self.client_id {
                None => {
                    return err(
                        "client_id",
                        "upstream mode needs this replica's fixed client id".into(),
                    );
                }
                Some(id) => {
                    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
                    if id.is_empty() || id.len() > 64 || !id.chars().all(ok) {
                        return err(
                            "client_id",
                            "1-64 characters of letters, digits, '-', '_' and '.'".into(),
                        );
                    }
                }
            }
            if self.urls.iter().any(|u| u.tls) && self.ca.is_none() {
                return err(
                    "ca",
                    "an mqtts:// broker needs the CA (PEM) its certificate is checked against"
                        .into(),
                );
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return err(
                "client_cert",
                "client_cert and client_key go together (mutual TLS)".into(),
            );
        }
        if self.client_cert.is_some() && !self.urls.iter().all(|u| u.tls) {
            return err(
                "client_cert",
                "a client certificate is for mqtts:// brokers; every URL must be mqtts://".into(),
            );
        }
        if !(5..=65_535).contains(&self.keep_alive.as_secs()) {
            return err(
                "keep_alive",
                format!(
                    "must be between 5s and 65535s (got {}s)",
                    self.keep_alive.as_secs()
                ),
            );
        }
        if self.connect_timeout.as_secs() == 0 {
            return err("connect_timeout", "must be > 0 (got 0)".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return err("reconnect_max", "must be >= reconnect_min > 0".into());
        }
        if self.max_inflight == 0 {
            return err("max_inflight", "must be > 0 (got 0)".into());
        }
        if self.session_expiry.as_secs() > u64::from(u32::MAX) {
            return err(
                "session_expiry",
                format!("must be at most {}s, the MQTT maximum", u32::MAX),
            );
        }
        if let Some(why) = prefix_problem(&self.prefix) {
            return err("prefix", why);
        }
        let o = &self.outbox;
        if o.max_bytes < 1024 * 1024 {
            return err(
                "outbox.max_bytes",
                format!("must be at least 1048576 (1 MiB) (got {})", o.max_bytes),
            );
        }
        if o.max_attempts == 0 {
            return err("outbox.max_attempts", "must be > 0 (got 0)".into());
        }
        if o.message_ttl.as_secs() == 0 {
            return err("outbox.message_ttl", "must be > 0 (got 0)".into());
        }
        if !(1..=1_000_000).contains(&o.queue) {
            return err(
                "outbox.queue",
                format!("must be between 1 and 1000000 (got {})", o.queue),
            );
        }
        Ok(())
    }

    /// The prefix as it goes before a topic: empty, or ending in exactly one `/`.
    pub fn topic_prefix(&self) -> String {
        let p = self.prefix.trim_end_matches('/');
        if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        }
    }
}

/// Why `prefix` cannot go before a topic, if it cannot.
fn prefix_problem(prefix: &str) -> Option<String> {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return None;
    }
    if p.starts_with('/') || p.starts_with('$') {
        return Some(format!(
            "{prefix:?}: must not start with '/' or '$' (write e.g. \"site-a\")"
        ));
    }
    if p.len() > 128 {
        return Some("at most 128 bytes".into());
    }
    if p.split('/').any(str::is_empty) {
        return Some(format!("{prefix:?}: empty topic level"));
    }
    if p.chars().any(|c| c == '+' || c == '#' || c.is_control()) {
        return Some(format!(
            "{prefix:?}: no wildcards ('+', '#') or control characters"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_name_scheme_host_and_port() {
        let u = BrokerUrl::parse("mqtts://broker.example:8884").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "broker.example", 8884)
        );
        let u = BrokerUrl::parse("mqtt://127.0.0.1").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 1883));
        let u = BrokerUrl::parse("mqtts://[::1]:9000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(u.to_string(), "mqtts://[::1]:9000");
        for bad in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://user:pw@h:1",
            "mqtt://h:1/path",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_prefix_is_levels_without_wildcards() {
        assert_eq!(prefix_problem(""), None);
        assert_eq!(prefix_problem("site-a/"), None);
        assert_eq!(prefix_problem("a/b"), None);
        for bad in ["/a", "$SYS", "a//b", "a/+", "a/#"] {
            assert!(prefix_problem(bad).is_some(), "{bad}");
        }
        let u = Upstream {
            prefix: "site-a".into(),
            ..Upstream::default()
        };
        assert_eq!(u.topic_prefix(), "site-a/");
        assert_eq!(Upstream::default().topic_prefix(), "");
    }
}
