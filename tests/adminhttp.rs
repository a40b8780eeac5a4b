//! The admin API over HTTP as an operator meets it: nothing answers without the bearer
//! token; each operation works end to end on a live gateway and real clients feel it
//! (a ban closes a device's session and refuses mosquitto_pub, a quarantine keeps the
//! device's telemetry from a service); the OpenAPI document in docs/ is what the
//! server does, path by path; and a gateway refuses to start with the API off
//! loopback without TLS, or with a token file others may read.

mod common;

use common::admin::*;
use common::raw::Raw;
use common::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const DOC: &str = include_str!("../docs/admin-api.openapi.json");

/// One HTTP/1.0 request: status, head, body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<String>,
) -> (u16, String, String) {
    http_request(addr, method, path, authorization, &body.unwrap_or_default())
}

/// Every documented operation: method and path template.
fn documented() -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(DOC).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

/// A template with its parameters filled in.
fn fill(template: &str, value: &str) -> String {
    template.replace("{id}", value).replace("{target}", value)
}

#[test]
fn nothing_answers_without_the_right_token_and_each_refusal_is_audited_and_counted() {
    let api = Api::start("");
    let ops = documented();
    assert!(ops.len() > 20, "{ops:?}");
    let mut refused = 0;
    let bodies = [
        None,
        Some("Bearer nope"),
        Some("Basic YWRtaW46YWRtaW4="),
        Some(&format!("Bearer {TOKEN}x")[..]),
        Some(&format!("Bearer {}", &TOKEN[1..])[..]),
    ];
    for (method, template) in ops
        .iter()
        .map(|(m, p)| (m.as_str(), fill(p, "sensor-1")))
        .chain([
            ("GET", "/nope".to_string()),
            ("PUT", "/api/v1/devices".to_string()),
        ])
    {
        for authorization in bodies {
            let (status, head, body) = request(
                api.addr,
                method,
                &template,
                authorization,
                Some("{}".into()),
            );
            assert_eq!(
                status, 401,
                "{method} {template} with {authorization:?}: {body}"
            );
            let challenge = head
                .lines()
                .find_map(|l| l.strip_prefix("www-authenticate: "))
                .unwrap_or_else(|| panic!("no WWW-Authenticate in {head}"));
            assert!(
                challenge.starts_with("Bearer realm=\"portcullis-admin\""),
                "{challenge}"
            );
            let error: Value = serde_json::from_str(&body).unwrap();
            assert!(
                error["error"].as_str().unwrap().contains("bearer token"),
                "{body}"
            );
            refused += 1;
        }
    }
    // Nothing ran: the device named in every path was never created.
    assert_eq!(api.ok("GET", "/api/v1/devices", None, 200), json!([]));
    assert_eq!(api.gw.refusals("connect", "admin_unauthorized"), refused);
    let line = api
        .gw
        .wait_audit(&["\"event\":\"admin\"", "wrong bearer token"]);
    assert!(
        line.contains("\"decision\":\"refuse\"") && line.contains("127.0.0.1"),
        "{line}"
    );
    assert!(!api.gw.audit().contains(TOKEN), "the token is never logged");
    assert!(
        !api.gw.stderr().contains(TOKEN),
        "the token is never logged"
    );
}

#[test]
fn refusals_on_any_path_are_one_fact_in_the_audit_not_a_line_each() {
    let api = Api::start("");
    for i in 0..40 {
        let path = format!("/probe/{i}");
        assert_eq!(request(api.addr, "GET", &path, None, None).0, 401);
    }
    assert_eq!(api.gw.refusals("connect", "admin_unauthorized"), 40);
    api.gw
        .wait_audit(&["\"event\":\"admin\"", "no bearer token"]);
    let audit = api.gw.audit();
    assert!(
        !audit.contains("/probe/"),
        "the path a caller chose never reaches the audit: {audit}"
    );
    let lines = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"admin\"") && l.contains("\"refuse\""))
        .count();
    assert!(
        lines <= 2,
        "{lines} lines for one refusal repeated (the rest are counted): {audit}"
    );
    // A refused caller keeps no connection open, even one that asked to.
    let mut raw = Raw::connect(api.addr);
    raw.send(b"GET /api/v1/devices HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n");
    let (closed, got) = raw.closed_within(T);
    let got = String::from_utf8_lossy(&got);
    assert!(closed && got.starts_with("HTTP/1.1 401"), "{got}");
    assert!(got.contains("connection: close"), "{got}");
}

/// The schema of one documented response, with the document's components to resolve
/// its references.
fn response_schema(doc: &Value, op: &Value, status: u16) -> Option<Value> {
    let mut response = op["responses"].get(status.to_string())?.clone();
    if let Some(r) = response.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        response = doc["components"]["responses"][name].clone();
    }
    let mut schema = response["content"]["application/json"]["schema"].clone();
    schema["components"] = doc["components"].clone();
    Some(schema)
}

#[test]
fn the_openapi_document_is_what_the_live_server_does() {
    let api = Api::start("");
    let doc: Value = serde_json::from_str(DOC).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut covered = std::collections::BTreeSet::new();
    // Each step: a real request, its documented operation, the status it must get.
    let secret = json!({ "id": "sensor-1", "secret": SECRET });
    let service = json!({ "id": "billing", "secret": SECRET });
    let steps: Vec<(&str, &str, String, Option<Value>, u16)> = vec![
        (
            "POST",
            "/api/v1/devices",
            "/api/v1/devices".into(),
            Some(secret),
            201,
        ),
        (
            "POST",
            "/api/v1/devices",
            "/api/v1/devices".into(),
            Some(json!({"id": "x", "colour": 1})),
            400,
        ),
        (
            "GET",
            "/api/v1/devices",
            "/api/v1/devices".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/devices/{id}",
            "/api/v1/devices/sensor-1".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/devices/{id}",
            "/api/v1/devices/ghost".into(),
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/devices/{id}",
            "/api/v1/devices/bad%20id".into(),
            None,
            400,
        ),
        (
            "POST",
            "/api/v1/devices/{id}/disable",
            "/api/v1/devices/sensor-1/disable".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/devices/{id}/enable",
            "/api/v1/devices/sensor-1/enable".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/devices/{id}/enable",
            "/api/v1/devices/ghost/enable".into(),
            None,
            404,
        ),
        (
            "POST",
            "/api/v1/devices/{id}/rotate",
            "/api/v1/devices/sensor-1/rotate".into(),
            Some(json!({"secret": SECRET})),
            200,
        ),
        (
            "POST",
            "/api/v1/devices/{id}/rotate",
            "/api/v1/devices/sensor-1/rotate".into(),
            Some(json!({})),
            400,
        ),
        (
            "POST",
            "/api/v1/devices/{id}/kick",
            "/api/v1/devices/sensor-1/kick".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/services",
            "/api/v1/services".into(),
            Some(service),
            201,
        ),
        (
            "GET",
            "/api/v1/services",
            "/api/v1/services".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/services/{id}",
            "/api/v1/services/billing".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/services/{id}/disable",
            "/api/v1/services/billing/disable".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/services/{id}/enable",
            "/api/v1/services/billing/enable".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/services/{id}/rotate",
            "/api/v1/services/billing/rotate".into(),
            Some(json!({"secret": SECRET})),
            200,
        ),
        (
            "POST",
            "/api/v1/services/{id}/kick",
            "/api/v1/services/billing/kick".into(),
            None,
            200,
        ),
        (
            "DELETE",
            "/api/v1/services/{id}",
            "/api/v1/services/billing".into(),
            None,
            200,
        ),
        (
            "DELETE",
            "/api/v1/services/{id}",
            "/api/v1/services/billing".into(),
            None,
            404,
        ),
        (
            "POST",
            "/api/v1/bans",
            "/api/v1/bans".into(),
            Some(json!({"target": "10.9.0.0/16", "reason": "test"})),
            201,
        ),
        (
            "POST",
            "/api/v1/bans",
            "/api/v1/bans".into(),
            Some(json!({"target": "10.9.0.0/16", "ttl_secs": 0})),
            400,
        ),
        ("GET", "/api/v1/bans", "/api/v1/bans".into(), None, 200),
        (
            "DELETE",
            "/api/v1/bans/{target}",
            "/api/v1/bans/10.9.0.0%2F16".into(),
            None,
            200,
        ),
        (
            "DELETE",
            "/api/v1/bans/{target}",
            "/api/v1/bans/10.9.0.0%2F16".into(),
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/clients",
            "/api/v1/clients".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/quarantine/{id}",
            "/api/v1/quarantine/sensor-1".into(),
            Some(json!({"reason": "under test"})),
            200,
        ),
        (
            "POST",
            "/api/v1/quarantine/{id}",
            "/api/v1/quarantine/ghost".into(),
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/quarantine",
            "/api/v1/quarantine".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/quarantine",
            "/api/v1/quarantine?all=true".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/quarantine",
            "/api/v1/quarantine?all=maybe".into(),
            None,
            400,
        ),
        (
            "GET",
            "/api/v1/quarantine/{id}",
            "/api/v1/quarantine/sensor-1".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/quarantine/{id}",
            "/api/v1/quarantine/ghost".into(),
            None,
            404,
        ),
        (
            "POST",
            "/api/v1/quarantine/{id}/release",
            "/api/v1/quarantine/sensor-1/release".into(),
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/quarantine/{id}/release",
            "/api/v1/quarantine/sensor-1/release".into(),
            None,
            400,
        ),
        (
            "GET",
            "/api/v1/events",
            "/api/v1/events?limit=5".into(),
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/events",
            "/api/v1/events?limit=0".into(),
            None,
            400,
        ),
        ("POST", "/api/v1/reload", "/api/v1/reload".into(), None, 200),
        ("GET", "/api/v1/stats", "/api/v1/stats".into(), None, 200),
        (
            "DELETE",
            "/api/v1/devices/{id}",
            "/api/v1/devices/sensor-1".into(),
            None,
            200,
        ),
        (
            "DELETE",
            "/api/v1/devices/{id}",
            "/api/v1/devices/sensor-1".into(),
            None,
            404,
        ),
    ];
    for (method, template, path, body, want) in steps {
        let op = &doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        let (status, reply) = api.call(method, &path, body);
        assert_eq!(status, want, "{method} {path}: {reply}");
        let schema = response_schema(&doc, op, status)
            .unwrap_or_else(|| panic!("{method} {template}: {status} is not documented"));
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&reply)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} ({status}): {errors:?} in {reply}"
        );
        // Every documented operation also answers 401 without the token, documented.
        assert!(
            response_schema(&doc, op, 401).is_some(),
            "{method} {template}: no 401"
        );
        covered.insert((method.to_string(), template.to_string()));
    }
    let all: std::collections::BTreeSet<_> = documented().into_iter().collect();
    assert_eq!(covered, all, "every documented operation is exercised");
    // A documented path answers no method the document does not name.
    for (_, template) in &all {
        let item = doc["paths"][template].as_object().unwrap();
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if !item.contains_key(&method.to_lowercase()) {
                let (status, reply) = api.call(method, &fill(template, "sensor-1"), None);
                assert_eq!(status, 405, "{method} {template}: {reply}");
            }
        }
    }
    // And a path it does not list is not found.
    assert_eq!(api.call("GET", "/api/v2/devices", None).0, 404);
    assert_eq!(api.call("GET", "/metrics", None).0, 404);
}

#[test]
fn bodies_are_bounded_and_bad_ones_are_named() {
    let api = Api::start("");
    // A body declared too large is refused before it is sent: a client that waits
    // for `100 Continue` (curl does, for a large body) gets the 413 instead.
    let mut raw = Raw::connect(api.addr);
    raw.send(
        format!(
            "POST /api/v1/devices HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 70000\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    let (closed, got) = raw.closed_within(T);
    let got = String::from_utf8_lossy(&got);
    assert!(closed, "{got}");
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains("65536 bytes"), "{got}");
    let (status, _, body) = request(
        api.addr,
        "POST",
        "/api/v1/devices",
        Some(&format!("Bearer {TOKEN}")),
        Some("{\"id\": ".into()),
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("bad request body: EOF while parsing"),
        "{body}"
    );
    let reply = api.ok(
        "POST",
        "/api/v1/devices",
        Some(json!({ "id": "sensor-1", "secret_hash": "x" })),
        400,
    );
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `secret_hash`"),
        "{reply}"
    );
    let reply = api.ok(
        "POST",
        "/api/v1/devices",
        Some(json!({ "id": "sensor-1" })),
        400,
    );
    assert!(
        reply["error"].as_str().unwrap().contains("credential"),
        "{reply}"
    );
    // A dot-only id would be a dot segment in the API's and the page's URLs.
    for id in [".", ".."] {
        let reply = api.ok(
            "POST",
            "/api/v1/devices",
            Some(json!({ "id": id, "secret": SECRET })),
            400,
        );
        assert!(reply["error"].as_str().unwrap().contains("id"), "{reply}");
    }
    let reply = api.ok("GET", "/api/v1/events?limit=3&colour=red", None, 400);
    assert!(
        reply["error"].as_str().unwrap().contains("\"colour\""),
        "{reply}"
    );
    assert_eq!(api.ok("GET", "/api/v1/devices", None, 200), json!([]));
}

#[test]
fn a_ban_and_a_kick_through_http_end_sessions_and_refuse_a_real_client() {
    let api = Api::start("");
    api.add_device("sensor-1", SECRET);
    let mut raw = device(&api.gw, "sensor-1", SECRET);
    let clients = wait_for(T, || {
        let list = api.ok("GET", "/api/v1/clients", None, 200);
        (list.as_array().unwrap().len() == 1).then_some(list)
    })
    .expect("the device is listed");
    assert_eq!(clients[0]["id"], "sensor-1");
    assert!(
        clients[0]["protocol"].as_str().unwrap().starts_with("mqtt"),
        "{clients}"
    );
    let shown = api.ok("GET", "/api/v1/devices/sensor-1", None, 200);
    assert_eq!(shown["sessions"].as_array().unwrap().len(), 1, "{shown}");

    let kicked = api.ok("POST", "/api/v1/devices/sensor-1/kick", None, 200);
    assert_eq!(kicked["sessions_ended"], 1);
    assert!(raw.closed_within(T).0, "the kicked session is closed");

    let mut raw = device(&api.gw, "sensor-1", SECRET);
    let ban = json!({ "target": "device/sensor-1", "reason": "stolen" });
    let banned = api.ok("POST", "/api/v1/bans", Some(ban), 201);
    assert_eq!(banned["sessions_ended"], 1, "{banned}");
    assert_eq!(banned["target"], "device sensor-1");
    assert!(raw.closed_within(T).0, "the banned session is closed");
    // Made over HTTP: the audit names the way in and the caller's address.
    let line = api.gw.wait_audit(&["\"event\":\"ban\"", "ban (stolen"]);
    assert!(
        line.contains("\"protocol\":\"admin-http\"") && line.contains("127.0.0.1"),
        "{line}"
    );
    let refused = mosquitto_pub_telemetry(&api.gw, "sensor-1", SECRET);
    assert!(
        !refused.status.success(),
        "a banned device is refused: {}",
        text(&refused)
    );
    api.ok("DELETE", "/api/v1/bans/device%2Fsensor-1", None, 200);
    let allowed = mosquitto_pub_telemetry(&api.gw, "sensor-1", SECRET);
    assert!(
        allowed.status.success(),
        "the ban is lifted: {}",
        text(&allowed)
    );
    assert_eq!(api.ok("GET", "/api/v1/bans", None, 200), json!([]));
}

#[test]
fn a_quarantine_through_http_keeps_a_devices_telemetry_from_services_until_released() {
    let api = Api::start(OPS);
    let gw = &api.gw;
    let sub = ops_watching(gw);
    api.add_device("sensor-1", SECRET);
    let mut raw = device(gw, "sensor-1", SECRET);
    publish_until_seen(&mut raw, "sensor-1", &sub, "before");

    let state = api.ok(
        "POST",
        "/api/v1/quarantine/sensor-1",
        Some(json!({ "reason": "firmware under investigation" })),
        200,
    );
    assert_eq!(state, json!({ "id": "sensor-1", "state": "quarantined" }));
    let listed = api.ok("GET", "/api/v1/quarantine", None, 200);
    assert_eq!(listed[0]["id"], "sensor-1");
    assert!(
        listed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("firmware under investigation"),
        "{listed}"
    );
    publish_telemetry(&mut raw, "sensor-1", "during");
    // Dropped: the message reached the gateway and went no further.
    wait_quarantine_drop(gw);

    let released = api.ok("POST", "/api/v1/quarantine/sensor-1/release", None, 200);
    assert_eq!(released["state"], "released");
    publish_telemetry(&mut raw, "sensor-1", "after");
    // In order on one session: what comes after the "before"s is "after", not "during".
    let next = next_past_before(&sub, "sensor-1");
    assert_eq!(
        next, "devices/sensor-1/telemetry after",
        "nothing sent in quarantine reached the service"
    );

    // The operator's actions are in the recent events, newest last.
    let events = wait_for(T, || {
        let events = api.ok("GET", "/api/v1/events?limit=1000", None, 200);
        let text = events.to_string();
        text.contains("released by operator").then_some(events)
    })
    .expect("the release is a recent event");
    let reasons: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .filter(|r| r.contains("by operator") || r.contains("firmware under investigation"))
        .collect();
    assert!(reasons.len() >= 2, "{reasons:?}");
    assert!(
        reasons.last().unwrap().contains("released by operator"),
        "{reasons:?}"
    );
}

#[test]
fn a_reload_through_http_applies_a_good_file_and_refuses_a_bad_one() {
    let api = Api::start("");
    let reloaded = api.ok("POST", "/api/v1/reload", None, 200);
    assert!(
        reloaded["reloaded"].as_str().unwrap().contains("groups"),
        "{reloaded}"
    );
    let line = api.gw.wait_audit(&["\"config\"", "reloaded: "]);
    assert!(
        line.contains("\"protocol\":\"admin-http\"") && line.contains("127.0.0.1"),
        "a reload over HTTP names its caller: {line}"
    );
    // The CLI reads the same recent events through the socket.
    let cli: Value =
        serde_json::from_str(&api.gw.cli_ok(&["audit", "recent", "--limit", "3"])).unwrap();
    assert_eq!(cli, api.ok("GET", "/api/v1/events?limit=3", None, 200));
    assert!(cli.to_string().contains("reloaded: "), "{cli}");

    let config = std::fs::read_to_string(&api.gw.config).unwrap();
    std::fs::write(&api.gw.config, format!("{config}\nthis is not toml\n")).unwrap();
    let refused = api.ok("POST", "/api/v1/reload", None, 400);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("portcullis.toml"),
        "{refused}"
    );
    api.gw.wait_audit(&["\"config\"", "reload refused"]);
    // Still serving, on the configuration it had.
    assert_eq!(api.ok("GET", "/api/v1/devices", None, 200), json!([]));
}

#[test]
fn over_tls_curl_reads_the_token_from_a_header_file() {
    // `extra` goes right after the [admin] table: an [admin] key.
    let api = Api::start("http_tls = true\n");
    assert_eq!(
        curl_https(&api, &api.gw.ca(), TOKEN),
        (true, "[]\n200".into())
    );
    // Plain HTTP is not spoken there: the request is not answered, the connection
    // is closed.
    let mut plain = Raw::connect(api.addr);
    plain.send(
        format!("GET /api/v1/devices HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes(),
    );
    let (closed, got) = plain.closed_within(T);
    assert!(closed, "the plain request's connection is closed");
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1."),
        "no HTTP answer over plain TCP: {got:?}"
    );
}

/// curl over HTTPS with the CA `ca` and the token `token`: exit status success and
/// what it printed (body, then the status code).
fn curl_https(api: &Api, ca: &Path, token: &str) -> (bool, String) {
    let (dir, header) = token_file(&format!("Authorization: Bearer {token}\n"), 0o600);
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("@{}", header.display())])
        .args(["-w", "\n%{http_code}"])
        .arg(format!(
            "https://localhost:{}/api/v1/devices",
            api.addr.port()
        ))
        .output()
        .unwrap();
    drop(dir);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_reload_puts_a_new_certificate_and_a_new_token_in_force_on_the_https_api() {
    let api = Api::start("http_tls = true\n");
    let (old_ca, new_ca) = (api.gw.ca(), api.gw.dir.path().join("other/pki/ca.pem"));
    assert_eq!(curl_https(&api, &old_ca, TOKEN), (true, "[]\n200".into()));
    assert!(
        !curl_https(&api, &new_ca, TOKEN).0,
        "not the other CA's yet"
    );
    // Rotate both: the other PKI's server certificate, and a new token.
    let other = api.gw.dir.path().join("other/pki");
    let config = std::fs::read_to_string(&api.gw.config).unwrap();
    assert!(config.contains("[tls]\n"), "{config}");
    std::fs::write(
        &api.gw.config,
        config.replace(
            "[tls]\n",
            &format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                other.join("server.pem").display(),
                other.join("server.key").display()
            ),
        ),
    )
    .unwrap();
    let new_token = "feedface".repeat(5);
    std::fs::write(&api.token, format!("{new_token}\n")).unwrap();
    api.gw.cli_ok(&["config", "reload"]);
    assert_eq!(
        curl_https(&api, &new_ca, &new_token),
        (true, "[]\n200".into()),
        "new handshakes present the new certificate, and the new token is taken"
    );
    let (ok, out) = curl_https(&api, &new_ca, TOKEN);
    assert!(
        ok && out.ends_with("\n401"),
        "the old token is refused: {out}"
    );
    assert!(!curl_https(&api, &old_ca, &new_token).0);
    // A token file that became unreadable by the rules refuses the whole reload.
    std::fs::set_permissions(&api.token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = api.gw.cli(&["config", "reload"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("mode 644"), "{}", text(&out));
    assert!(!text(&out).contains(&new_token), "the token is never shown");
    assert_eq!(
        curl_https(&api, &new_ca, &new_token),
        (true, "[]\n200".into())
    );
}

/// Connections from one source at once on each HTTP listener, and in all (with the
/// descriptor limit the tests run with).
const PER_SOURCE: usize = 16;
const CONNECTIONS: usize = 64;

/// Send a request head a byte a second from 127.0.0.9, as a slowloris client does:
/// how long until the gateway closed the connection (None: still open after 30 s).
fn trickle(addr: SocketAddr) -> Option<Duration> {
    use std::io::{Read, Write};
    let mut s = Raw::connect_from(addr, "127.0.0.9".parse().unwrap()).stream;
    let started = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .unwrap();
    while started.elapsed() < Duration::from_secs(30) {
        if s.write_all(b"a").is_err() {
            return Some(started.elapsed());
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            // An answer to a head never finished (a 408) is a close too.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn a_trickling_request_head_is_cut_off_at_its_deadline_on_both_listeners() {
    let api = Api::start("");
    let listeners = [api.addr, api.gw.observability];
    let trickling: Vec<_> = listeners
        .iter()
        .map(|&addr| std::thread::spawn(move || trickle(addr)))
        .collect();
    for (t, addr) in trickling.into_iter().zip(listeners) {
        let cut = t
            .join()
            .unwrap()
            .expect("a trickling request head is cut off");
        assert!(
            cut >= Duration::from_secs(9) && cut < Duration::from_secs(20),
            "{addr}: cut off after {cut:?}, not by the 10 s head deadline"
        );
    }
}

/// `GET path` from `source` on a new connection: the status line's code, 0 if none.
fn get_from(addr: SocketAddr, source: &str, path: &str) -> u16 {
    let mut raw = Raw::connect_from(addr, source.parse().unwrap());
    raw.send(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    raw.stream.set_read_timeout(Some(T)).unwrap();
    read_response(&raw.stream).0
}

/// Idle connections held by one host, or by several, keep no one out: a newcomer
/// closes the oldest idle connection (its own source's first) and is served.
#[test]
fn connections_that_say_nothing_keep_no_one_out_of_either_listener() {
    let api = Api::start("");
    for (addr, path) in [
        (api.addr, "/dashboard/"),
        (api.gw.observability, "/healthz"),
    ] {
        let mut held: Vec<Raw> = (0..PER_SOURCE)
            .map(|_| Raw::connect_from(addr, "127.0.0.1".parse().unwrap()))
            .collect();
        // Answered after the held ones were taken in (one accept loop, in order).
        assert_eq!(get_from(addr, "127.0.0.2", path), 200, "{addr}");
        // One more from the same source: served; that source's oldest is closed.
        assert_eq!(get_from(addr, "127.0.0.1", path), 200, "{addr}");
        assert_eq!(held[0].closed_within(T), (true, vec![]), "{addr}");
        assert!(
            !held[1].closed_within(Duration::from_millis(300)).0,
            "{addr}: only the oldest goes"
        );
        // Fill the listener from three more sources: a fifth is still served, and
        // the oldest idle connection of all (127.0.0.1's) makes room.
        let others: Vec<Raw> = ["127.0.0.3", "127.0.0.4", "127.0.0.5"]
            .iter()
            .flat_map(|s| (0..PER_SOURCE).map(|_| Raw::connect_from(addr, s.parse().unwrap())))
            .collect();
        assert_eq!(PER_SOURCE - 1 + others.len(), CONNECTIONS - 1);
        // 63 held: the 64th fits; the 65th needs room.
        assert_eq!(get_from(addr, "127.0.0.6", path), 200, "{addr}");
        let fourth = Raw::connect_from(addr, "127.0.0.7".parse().unwrap());
        assert_eq!(get_from(addr, "127.0.0.8", path), 200, "{addr}");
        assert_eq!(held[1].closed_within(T), (true, vec![]), "{addr}");
        drop((held, others, fourth));
    }
}
