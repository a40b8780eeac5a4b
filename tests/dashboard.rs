//! The operator dashboard as an operator meets it, in headless Chromium driven by
//! tests/dashboard/drive.py (Selenium, `$PORTCULLIS_PYTHON`): the page shows nothing
//! and asks nothing of the API without the token, says "token refused" to a wrong one,
//! shows the registered devices with their state and reasons (as text, whatever they
//! hold), the rates and the audit, and its buttons, once confirmed, quarantine,
//! release, kick and ban on the live gateway, felt by real MQTT clients. Without a
//! browser: the page's files are the only paths served without the token, with a
//! strict Content-Security-Policy.

mod common;

use common::admin::*;
use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One HTTP/1.0 request: status, head (lower-case header names), body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<Value>,
) -> (u16, String, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, head, body) = http_request(addr, method, path, authorization, &body);
    (status, head.to_lowercase(), body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[test]
fn the_page_files_alone_are_served_without_the_token_with_a_strict_policy() {
    let api = Api::start("");
    api.add_device("sensor-1", SECRET);
    let (status, head, _) = request(api.addr, "GET", "/", None, None);
    assert_eq!(status, 303, "{head}");
    assert_eq!(header(&head, "location"), Some("/dashboard/"));
    for (path, content_type, needle) in [
        ("/dashboard/", "text/html", "<form id=\"login-form\""),
        ("/dashboard/app.js", "text/javascript", "Authorization"),
        ("/dashboard/app.css", "text/css", "table"),
        ("/dashboard/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let (status, head, body) = request(api.addr, "GET", path, None, None);
        assert_eq!(status, 200, "{path}: {head}");
        assert!(
            header(&head, "content-type")
                .unwrap()
                .starts_with(content_type),
            "{path}: {head}"
        );
        assert!(body.contains(needle), "{path}: {body}");
        assert!(!body.contains("sensor-1"), "{path} carries no data");
        // Header values as sent (the head was lowered for matching names).
        assert_eq!(
            header(&head, "content-security-policy"),
            Some(CSP.to_lowercase().as_str()),
            "{path}"
        );
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&head, "referrer-policy"), Some("no-referrer"));
        assert_eq!(header(&head, "cache-control"), Some("no-store"));
    }
    // Nothing else: not another method on those paths, nor a path beside them, nor
    // the data the page shows.
    let before = api.gw.refusals("connect", "admin_unauthorized");
    let refused = [
        ("POST", "/dashboard/"),
        ("DELETE", "/"),
        ("GET", "/dashboard"),
        ("GET", "/dashboard/index.html"),
        ("GET", "/dashboard/app.js/x"),
        ("GET", "/dashboard/../api/v1/devices"),
        ("GET", "/api/v1/stats"),
        ("GET", "/api/v1/devices"),
    ];
    for (method, path) in refused {
        let (status, head, body) = request(api.addr, method, path, None, None);
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert!(!body.contains("sensor-1"), "{body}");
        assert_eq!(header(&head, "cache-control"), Some("no-store"));
    }
    assert_eq!(
        api.gw.refusals("connect", "admin_unauthorized"),
        before + refused.len() as u64
    );
}

/// The browser, driven line by line.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Browser {
    fn start(base: &str) -> Browser {
        let python = std::env::var("PORTCULLIS_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/dashboard/drive.py");
        let mut child = Command::new(&python)
            .arg("-u")
            .arg(script)
            .arg(base)
            .env("SE_OFFLINE", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} (set PORTCULLIS_PYTHON): {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut b = Browser {
            child,
            stdin,
            lines,
        };
        let ready = b.next();
        assert_eq!(
            ready["ready"], true,
            "headless Chromium through Selenium (pip install selenium; apt-get install chromium chromium-driver): {ready}"
        );
        b
    }

    fn next(&mut self) -> Value {
        // Bounded so that a hung browser fails the test instead of hanging it; the
        // driver's own waits are shorter.
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the browser driver answers (see its stderr above)");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// One command; its answer, which must not be an error.
    fn run(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        let reply = self.next();
        assert!(reply.get("error").is_none(), "{cmd}: {reply}");
        reply
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"do": "quit"}));
        let _ = self.child.wait();
    }
}

fn fetched_api(page: &Value) -> Vec<String> {
    page["fetched"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|u| u.contains("/api/"))
        .map(String::from)
        .collect()
}

#[test]
fn the_dashboard_needs_the_token_shows_devices_and_its_buttons_act_on_the_gateway() {
    let api = Api::start(OPS);
    let gw = &api.gw;
    let sub = ops_watching(gw);
    for id in ["sensor-1", "sensor-2"] {
        api.add_device(id, SECRET);
    }
    // A reason is free text: markup in it must show as text, never run.
    let hostile = "<b id=\"xss\">bold</b><img src=x>";
    api.ok(
        "POST",
        "/api/v1/quarantine/sensor-2",
        Some(json!({ "reason": hostile })),
        200,
    );
    let mut raw = device(gw, "sensor-1", SECRET);
    publish_until_seen(&mut raw, "sensor-1", &sub, "before");

    let mut b = Browser::start(&format!("http://{}", api.addr));

    // Without the token: the form and nothing else, and no API call made.
    let refusals = gw.refusals("connect", "admin_unauthorized");
    let page = b.run(json!({"do": "open", "path": "/"}));
    assert!(
        page["url"].as_str().unwrap().ends_with("/dashboard/"),
        "{page}"
    );
    assert_eq!(page["login_visible"], true, "{page}");
    assert_eq!(page["dashboard_visible"], false, "{page}");
    assert!(!page["text"].as_str().unwrap().contains("sensor"), "{page}");
    assert_eq!(fetched_api(&page), Vec::<String>::new());
    assert_eq!(gw.refusals("connect", "admin_unauthorized"), refusals);

    // A wrong token: refused, still nothing shown.
    let page = b.run(json!({"do": "login", "token": format!("{TOKEN}x")}));
    assert_eq!(page["login_error"], "token refused", "{page}");
    assert_eq!(page["dashboard_visible"], false, "{page}");
    assert!(!page["text"].as_str().unwrap().contains("sensor"), "{page}");
    assert_eq!(
        gw.refusals("connect", "admin_unauthorized"),
        refusals + 1,
        "one call checks the token"
    );

    // The token: the devices, their state and reasons, connected or not.
    let page = b.run(json!({"do": "login", "token": TOKEN}));
    assert_eq!(page["dashboard_visible"], true, "{page}");
    assert_eq!(page["login_visible"], false, "{page}");
    let row = b.run(json!({"do": "row", "id": "sensor-1", "state": "normal"}));
    assert!(
        row["connected"].as_str().unwrap().starts_with("mqtt"),
        "{row}"
    );
    assert_eq!(
        row["buttons"],
        json!(["Quarantine", "Kick", "Ban"]),
        "{row}"
    );
    let row = b.run(json!({"do": "row", "id": "sensor-2", "state": "quarantined"}));
    assert!(row["reason"].as_str().unwrap().contains(hostile), "{row}");
    assert_eq!(row["injected"], 0, "the reason is text: {row}");
    assert_eq!(row["connected"], "", "{row}");
    assert_eq!(row["buttons"], json!(["Release", "Kick", "Ban"]), "{row}");

    // Rates from two readings of /stats, and the totals behind them.
    let rates = b.run(json!({"do": "rates"}));
    let messages_in = rates["rates"]["messages in"]["total"].as_u64().unwrap();
    assert!(messages_in >= 1, "{rates}");
    assert!(
        rates["rates"]["refusals at connect"]["total"]
            .as_u64()
            .unwrap()
            >= 1,
        "the wrong token is a refusal: {rates}"
    );
    assert!(
        rates["census"]
            .as_str()
            .unwrap()
            .contains("1 normal, 0 on probation, 1 quarantined"),
        "{rates}"
    );
    b.run(json!({"do": "events", "needle": "wrong bearer token"}));

    // A quarantine asks first: declined, nothing happens.
    let asked =
        b.run(json!({"do": "click", "id": "sensor-1", "action": "quarantine", "confirm": false}));
    assert!(
        asked["question"]
            .as_str()
            .unwrap()
            .contains("Quarantine sensor-1?"),
        "{asked}"
    );
    assert_eq!(
        api.ok("GET", "/api/v1/quarantine/sensor-1", None, 200)["state"],
        "normal"
    );
    // Confirmed: the gateway quarantines the device, with the reason typed.
    let done = b.run(
        json!({"do": "click", "id": "sensor-1", "action": "quarantine",
        "confirm": true, "reason": "odd traffic seen on the dashboard"}),
    );
    assert_eq!(done["status"], "sensor-1 is now quarantined", "{done}");
    let shown = api.ok("GET", "/api/v1/quarantine/sensor-1", None, 200);
    assert_eq!(shown["state"], "quarantined", "{shown}");
    assert!(
        shown
            .to_string()
            .contains("odd traffic seen on the dashboard"),
        "{shown}"
    );
    let row = b.run(json!({"do": "row", "id": "sensor-1", "state": "quarantined"}));
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("odd traffic seen on the dashboard"),
        "{row}"
    );
    publish_telemetry(&mut raw, "sensor-1", "during");
    wait_quarantine_drop(gw);

    // Release from the page: telemetry flows again, and what was sent in quarantine
    // never reached the service.
    let done =
        b.run(json!({"do": "click", "id": "sensor-1", "action": "release", "confirm": true}));
    assert_eq!(done["status"], "sensor-1 is now released", "{done}");
    publish_telemetry(&mut raw, "sensor-1", "after");
    let next = next_past_before(&sub, "sensor-1");
    assert_eq!(next, "devices/sensor-1/telemetry after");

    // Kick: the session ends.
    let done = b.run(json!({"do": "click", "id": "sensor-1", "action": "kick", "confirm": true}));
    assert_eq!(done["status"], "sensor-1: 1 session(s) ended", "{done}");
    assert!(raw.closed_within(T).0, "the kicked session is closed");

    // Ban: a real client is refused.
    let mut raw = device(gw, "sensor-1", SECRET);
    let done = b.run(json!({"do": "click", "id": "sensor-1", "action": "ban",
        "confirm": true, "reason": "stolen"}));
    assert_eq!(
        done["status"], "device sensor-1 banned; 1 session(s) ended",
        "{done}"
    );
    assert!(raw.closed_within(T).0, "the banned session is closed");
    let bans = api.ok("GET", "/api/v1/bans", None, 200);
    assert_eq!(bans[0]["target"], "device sensor-1", "{bans}");
    assert_eq!(bans[0]["reason"], "stolen", "{bans}");
    let refused = mosquitto_pub_telemetry(gw, "sensor-1", SECRET);
    assert!(!refused.status.success(), "{}", text(&refused));
    // Lift: the ban is gone and the device connects again.
    let done = b.run(json!({"do": "lift", "target": "device sensor-1"}));
    assert_eq!(
        done["question"], "Lift the ban on device sensor-1?",
        "{done}"
    );
    assert_eq!(done["status"], "ban on device sensor-1 lifted", "{done}");
    assert_eq!(api.ok("GET", "/api/v1/bans", None, 200), json!([]));
    let allowed = mosquitto_pub_telemetry(gw, "sensor-1", SECRET);
    assert!(allowed.status.success(), "{}", text(&allowed));

    // The token stays in the tab: not in a cookie, local storage or the URL; a reload
    // keeps the session, logging out forgets it.
    let storage = b.run(json!({"do": "storage"}));
    assert_eq!(storage["local"], 0, "{storage}");
    assert_eq!(storage["cookie"], "", "{storage}");
    assert!(
        !storage["url"].as_str().unwrap().contains(TOKEN),
        "{storage}"
    );
    let page = b.run(json!({"do": "reload"}));
    assert_eq!(page["dashboard_visible"], true, "{page}");
    let page = b.run(json!({"do": "logout"}));
    assert_eq!(page["login_visible"], true, "{page}");
    assert_eq!(page["dashboard_visible"], false, "{page}");
    assert_eq!(page["session"], json!([]), "{page}");
    assert!(!page["text"].as_str().unwrap().contains("sensor"), "{page}");
    let page = b.run(json!({"do": "reload"}));
    assert_eq!(page["login_visible"], true, "{page}");

    // The token rotated under a logged-in page (file replaced, gateway reloaded):
    // the page's next poll is refused and it goes back to the form, showing nothing.
    let page = b.run(json!({"do": "login", "token": TOKEN}));
    assert_eq!(page["dashboard_visible"], true, "{page}");
    let rotated = "feedface".repeat(5);
    std::fs::write(&api.token, format!("{rotated}\n")).unwrap();
    gw.cli_ok(&["config", "reload"]);
    let page = b.run(json!({"do": "wait_login"}));
    assert_eq!(page["login_error"], "token refused", "{page}");
    assert_eq!(page["dashboard_visible"], false, "{page}");
    let page = b.run(json!({"do": "login", "token": rotated}));
    assert_eq!(page["dashboard_visible"], true, "{page}");
    assert!(!gw.audit().contains(TOKEN), "the token is never logged");
    assert!(!gw.audit().contains(&rotated), "the token is never logged");
}
