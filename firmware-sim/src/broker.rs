//! rumqttd on its own, with a plain TCP listener: the "rumqttd direct" baseline of the
//! benchmarks (the same broker Portcullis embeds, with the same router settings, in
//! its own process).

use anyhow::{Context, Result, bail};
use rumqttd::{Config, ConnectionSettings, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The gateway's own router settings (its default `[broker]` section, through the
/// function the embedded forwarder uses), plus a plain MQTT 3.1.1 listener.
fn config(listen: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let mut v4 = HashMap::new();
    v4.insert("v4".to_string(), server("v4", listen));
    let mut config = portcullis_embedded::router_config(&portcullis_config::Broker::default());
    config.v4 = Some(v4);
    // The gateway's router holds a few links; this one holds every benchmark client.
    config.router.max_connections = 100_000;
    config
}

/// Run rumqttd with an MQTT 3.1.1 listener on `listen` until the process is killed.
pub fn serve(listen: SocketAddr) -> Result<()> {
    // rumqttd's start swallows bind errors: check the address first.
    drop(
        std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen}"))?,
    );
    let mut broker = rumqttd::Broker::new(config(listen));
    std::thread::spawn(move || {
        // The error is reported by the listening check below.
        let _ = broker.start();
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            println!("rumqttd listening on {listen}");
            loop {
                std::thread::park();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("rumqttd did not start listening on {listen}")
}
