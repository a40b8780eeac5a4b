//! A gateway with the admin API over HTTP on, for the admin API and dashboard tests,
//! and the telemetry set-up both use: a service watching devices' telemetry.

use super::raw::{Raw, publish_v4_raw};
use super::{Gateway, Sub, http_request, mosquitto, wait_for};
use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The admin token the tests' gateways read from their token file.
pub const TOKEN: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// A service group that may watch telemetry.
pub const OPS: &str = r#"
[service_groups.ops]
trust = ["{data_dir}/pki/ca.pem"]
subscribe = ["devices/+/telemetry/#"]
"#;

/// A gateway with the HTTP admin API on, and the API's address.
pub struct Api {
    pub gw: Gateway,
    pub addr: SocketAddr,
    /// The token file (its dir is the test's own).
    pub token: PathBuf,
    _token_dir: tempfile::TempDir,
}

/// `text` in a file of its own with `mode` (the gateway refuses a token file others
/// may read).
pub fn token_file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin-token");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, path)
}

/// An `[admin]` table with the API on loopback, then `extra` (more `[admin]` keys,
/// or further tables).
pub fn admin_table(token: &Path, extra: &str) -> String {
    format!(
        "[admin]\nhttp_listen = \"127.0.0.1:0\"\nhttp_token_file = \"{}\"\n{extra}\n",
        token.display()
    )
}

/// The address the banner gives for `label`.
pub fn banner_addr(gw: &Gateway, label: &str) -> SocketAddr {
    gw.banner
        .iter()
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {label} in {:?}", gw.banner))
}

impl Api {
    /// `extra` goes right after the `[admin]` table: `[admin]` keys first, if any.
    pub fn start(extra: &str) -> Api {
        let (dir, token) = token_file(&format!("{TOKEN}\n"), 0o600);
        let gw = Gateway::start_with(&admin_table(&token, extra));
        let addr = banner_addr(&gw, "admin API over HTTP");
        Api {
            gw,
            addr,
            token,
            _token_dir: dir,
        }
    }

    /// A request with the right token: status and JSON body (a string if not JSON).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, text) = http_request(
            self.addr,
            method,
            path,
            Some(&format!("Bearer {TOKEN}")),
            &body,
        );
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Register device `id` with `secret` through the API.
    pub fn add_device(&self, id: &str, secret: &str) {
        let body = serde_json::json!({ "id": id, "secret": secret });
        self.ok("POST", "/api/v1/devices", Some(body), 201);
    }

    /// A request that must answer `want`: its JSON body.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, reply) = self.call(method, path, body);
        assert_eq!(status, want, "{method} {path}: {reply}");
        reply
    }
}

/// Service `ops` (group [`OPS`]) subscribed to every device's telemetry with
/// mosquitto_sub, its login seen in the audit.
pub fn ops_watching(gw: &Gateway) -> Sub {
    gw.issue("ops");
    gw.cli_ok(&["service", "add", "ops", "--cert-any", "--group", "ops"]);
    let sub = Sub::start(&gw.client(
        gw.service_tls,
        "ops",
        &["-v", "-t", "devices/+/telemetry/#"],
    ));
    gw.wait_audit(&["\"connect\"", "\"ops\"", "\"allow\""]);
    sub
}

/// Device `id` logged in on the plain listener with its secret (MQTT 3.1.1).
pub fn device(gw: &Gateway, id: &str, secret: &str) -> Raw {
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v4(id, Some((id, secret))),
        Some(0),
        "{id} connects"
    );
    raw
}

/// `payload` on `devices/{id}/telemetry`, QoS 0.
pub fn publish_telemetry(raw: &mut Raw, id: &str, payload: &str) {
    raw.send(&publish_v4_raw(
        format!("devices/{id}/telemetry").as_bytes(),
        payload.as_bytes(),
        0,
        0,
    ));
}

/// Publish `payload` until `sub` sees it (its subscription may not be in place yet).
pub fn publish_until_seen(raw: &mut Raw, id: &str, sub: &Sub, payload: &str) {
    wait_for(Duration::from_secs(10), || {
        publish_telemetry(raw, id, payload);
        sub.expect(payload, Duration::from_millis(200)).ok()
    })
    .expect("telemetry reaches the service");
}

/// One `hi` from device `id` on `devices/{id}/telemetry` with mosquitto_pub, logged in
/// with its secret on the plain listener.
pub fn mosquitto_pub_telemetry(gw: &Gateway, id: &str, secret: &str) -> std::process::Output {
    let topic = format!("devices/{id}/telemetry");
    let args = gw.client(
        gw.device_plain,
        id,
        &["-u", id, "-P", secret, "-t", &topic, "-m", "hi"],
    );
    mosquitto("mosquitto_pub", &args, Duration::from_secs(10))
}

/// Wait until the gateway has dropped a quarantined device's message.
pub fn wait_quarantine_drop(gw: &Gateway) {
    wait_for(Duration::from_secs(10), || {
        (gw.metric("portcullis_quarantine_dropped_total ") >= 1).then_some(())
    })
    .expect("the quarantined device's message is dropped");
}

/// The next telemetry line `sub` prints for device `id` that is not one of the
/// `before`s [`publish_until_seen`] may have left on the way.
pub fn next_past_before(sub: &Sub, id: &str) -> String {
    let topic = format!("devices/{id}/telemetry");
    loop {
        let line = sub
            .expect(&topic, Duration::from_secs(10))
            .expect("telemetry flows again after release");
        if !line.ends_with(" before") {
            return line;
        }
    }
}
