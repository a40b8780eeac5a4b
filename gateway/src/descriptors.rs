//! File descriptors: the soft limit is raised to the hard one at start, and the
//! connection caps are sized from what that gives, with a reserve kept back for
//! files (the registry, the audit log and its rotation, certificates). A flood of
//! connections then meets the caps, never the descriptor limit, so logins do not
//! stall on `accept` and the audit log can always open its next file.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The descriptor limit the gateway runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit now in force (`u64::MAX` for unlimited).
    pub soft: u64,
    /// What it was before it was raised, if it was.
    pub raised_from: Option<u64>,
    /// Why it could not be raised, if it could not.
    pub error: Option<String>,
}

/// Raise RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_nofile_limit() -> NofileLimit {
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if soft >= hard {
        return NofileLimit {
            soft,
            raised_from: None,
            error: None,
        };
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => NofileLimit {
            soft: hard,
            raised_from: Some(soft),
            error: None,
        },
        Err(e) => NofileLimit {
            soft,
            raised_from: None,
            error: Some(e.to_string()),
        },
    }
}

/// How many connections the listeners admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// All device and service connections, over all their listeners.
    pub total: usize,
    /// Connections not yet authenticated; a new one past it sheds the oldest.
    pub unauthenticated: usize,
    /// Connections of each HTTP listener (observability, admin API).
    pub http: usize,
}

/// The caps for a descriptor limit of `nofile` with `reserve` kept for files. The
/// `http_listeners` HTTP listeners take their share first: up to
/// `http_listener::CONNECTIONS` each, together at most a quarter of the room. Device
/// and service connections: at most `max_connections` and what is left; those not yet
/// authenticated at most `max_unauthenticated` and half of that, so that
/// authenticated sessions always have room beside a flood of connections that never
/// log in.
pub fn connection_caps(
    nofile: u64,
    reserve: u64,
    max_connections: usize,
    max_unauthenticated: usize,
    http_listeners: usize,
) -> Result<ConnectionCaps, String> {
    let room = nofile.saturating_sub(reserve);
    if room < 8 {
        return Err(format!(
            "the file descriptor limit ({nofile}) leaves no room for connections after \
             limits.fd_reserve ({reserve}): raise the hard limit (ulimit -Hn, or LimitNOFILE= \
             in the systemd unit) or lower limits.fd_reserve"
        ));
    }
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    let http = match http_listeners {
        0 => 0,
        n => crate::http_listener::CONNECTIONS.min(room / 4 / n).max(1),
    };
    let total = max_connections.min(room - http * http_listeners);
    let unauthenticated = max_unauthenticated.min(total / 2).max(1);
    Ok(ConnectionCaps {
        total,
        unauthenticated,
        http,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_descriptor_limit_caps_connections_below_it() {
        let caps = connection_caps(256, 128, 100_000, 1_024, 0).unwrap();
        assert_eq!(
            caps,
            ConnectionCaps {
                total: 128,
                unauthenticated: 64,
                http: 0,
            }
        );
        // The HTTP listeners' connections come out of the same room.
        let caps = connection_caps(256, 128, 100_000, 1_024, 2).unwrap();
        assert_eq!(
            caps,
            ConnectionCaps {
                total: 96,
                unauthenticated: 48,
                http: 16,
            }
        );
    }

    #[test]
    fn a_high_descriptor_limit_leaves_the_configured_caps() {
        let caps = connection_caps(1 << 20, 128, 100_000, 1_024, 2).unwrap();
        assert_eq!(
            caps,
            ConnectionCaps {
                total: 100_000,
                unauthenticated: 1_024,
                http: crate::http_listener::CONNECTIONS,
            }
        );
        let unlimited = connection_caps(u64::MAX, 128, 5_000, 1_024, 2).unwrap();
        assert_eq!(unlimited.total, 5_000);
    }

    #[test]
    fn unauthenticated_connections_never_take_all_the_room() {
        let caps = connection_caps(1 << 20, 128, 10, 1_024, 1).unwrap();
        assert_eq!(caps.total, 10);
        assert_eq!(caps.unauthenticated, 5);
    }

    #[test]
    fn a_limit_inside_the_reserve_is_refused_with_what_to_do() {
        let err = connection_caps(100, 128, 100_000, 1_024, 1).unwrap_err();
        assert!(err.contains("limits.fd_reserve (128)"), "{err}");
        assert!(err.contains("ulimit -Hn"), "{err}");
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let got = raise_nofile_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(Some(got.soft), now.current.or(Some(u64::MAX)));
        assert_eq!(now.current, now.maximum, "{got:?}");
    }
}
