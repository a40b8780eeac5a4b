//! The Grafana dashboard shipped in deploy/grafana/portcullis.json, checked against a
//! live gateway: every metric a panel queries is on its `/metrics` page (in both
//! expositions), the file has the shape Grafana imports, and it names no data source
//! but its own `datasource` variable. Also the series the dashboard was built on
//! (devices per behaviour state, build info, process) as a user sees them live.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const OPENMETRICS: &str =
    "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/portcullis.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON: {e}"))
}

/// Names that are PromQL's own: aggregation operators, keywords, set operators.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The index just past the bracket that closes the one at `start`, skipping strings.
fn skip_group(chars: &[char], start: usize, open: char, close: char) -> Result<usize, String> {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i)?,
            c if c == open => {
                depth += 1;
                i += 1;
            }
            c if c == close => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => i += 1,
        }
    }
    Err(format!("unclosed {open}"))
}

/// The index just past the string literal that starts at `start`.
fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unclosed string {quote}"))
}

/// The metric names a PromQL expression selects: identifiers that are not followed by
/// `(` (functions), not PromQL's words, not in a label list (`by (le)`), a label
/// matcher (`{…}`), a range (`[…]`), a string or a Grafana variable (`$…`). A selector
/// with no metric name (`{__name__=~"…"}`) is refused: it cannot be checked.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut after_metric = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let was_metric = std::mem::take(&mut after_metric);
        // A label list only right after its keyword (`group_left` may have none).
        let list_next = std::mem::take(&mut label_list_next);
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i)?,
            '{' => {
                if !was_metric {
                    return Err(format!("a selector with no metric name at {i}: {expr}"));
                }
                i = skip_group(&chars, i, '{', '}')?;
            }
            '[' => i = skip_group(&chars, i, '[', ']')?,
            '(' if list_next => {
                i = skip_group(&chars, i, '(', ')')?;
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i, '{', '}')?;
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if LABEL_LISTS.contains(&word.as_str()) {
                    label_list_next = true;
                } else if next == Some(&'(') || PROMQL_WORDS.contains(&word.as_str()) {
                    // A function, or one of PromQL's words.
                } else {
                    names.insert(word);
                    after_metric = true;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (0.99, 5m, 1e3).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if names.is_empty() {
        return Err(format!("no metric in {expr:?}"));
    }
    Ok(names)
}

/// Every PromQL query of the dashboard with where it is: each panel's targets (rows'
/// nested panels included) and each query variable's `label_values(METRIC, label)`.
fn queries(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("(untitled)");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("panel {title:?}"), expr.to_string()));
                }
            }
            if let Some(nested) = p["panels"].as_array() {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dash["panels"].as_array().expect("panels"), &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .expect("a query variable's query");
        let selector = q
            .strip_prefix("label_values(")
            .and_then(|rest| rest.rsplit_once(','))
            .map(|(selector, _)| selector)
            .unwrap_or_else(|| panic!("variable query {q:?} is not label_values(METRIC, label)"));
        out.push((format!("variable {}", v["name"]), selector.to_string()));
    }
    out
}

/// The sample names of a metrics page: what Prometheus stores and a query can select
/// (`_total`, `_bucket`, `_sum`, `_count`, `_info` as the exposition writes them).
fn sample_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The queries' metrics that are on no page of `pages`, with where they are queried.
fn missing(dash: &Value, pages: &[&BTreeSet<String>]) -> Vec<String> {
    let mut out = Vec::new();
    for (place, expr) in queries(dash) {
        let names = metric_names(&expr).unwrap_or_else(|e| panic!("{place}: {e}"));
        for name in names {
            if !pages.iter().all(|p| p.contains(&name)) {
                out.push(format!("{place} queries {name}, not on /metrics ({expr})"));
            }
        }
    }
    out
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn every_metric_the_dashboard_queries_is_on_a_live_gateways_metrics_page() {
    let gw = Gateway::start();
    let (status, _, prometheus) = http_get_raw(gw.observability, "/metrics", "");
    assert_eq!(status, 200);
    let (status, _, openmetrics) = http_get_raw(gw.observability, "/metrics", OPENMETRICS);
    assert_eq!(status, 200);
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    let (prometheus, openmetrics) = (sample_names(&prometheus), sample_names(&openmetrics));
    let dash = dashboard();
    let queried: BTreeSet<String> = queries(&dash)
        .iter()
        .flat_map(|(_, e)| metric_names(e).unwrap())
        .collect();
    // What the issue asks the dashboard to show is there.
    for name in [
        "portcullis_connections_active",
        "portcullis_messages_accepted_total",
        "portcullis_messages_delivered_total",
        "portcullis_accepted_bytes_total",
        "portcullis_refusals_total",
        "portcullis_devices",
        "portcullis_outbox_messages",
        "portcullis_forward_latency_seconds_bucket",
        "portcullis_audit_entries_dropped_total",
        "portcullis_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(queried.contains(name), "no panel queries {name}");
    }
    let missing_now = missing(&dash, &[&prometheus, &openmetrics]);
    assert!(missing_now.is_empty(), "{missing_now:#?}");

    // The check catches a metric that does not exist, and a real one misspelt the way
    // a dashboard most often is (a counter without `_total`, a bare histogram name).
    for wrong in [
        "sum(rate(portcullis_no_such_thing_total[5m]))",
        "rate(portcullis_messages_accepted{instance=~\"$instance\"}[$__rate_interval])",
        "histogram_quantile(0.9, sum by (le) (rate(portcullis_forward_latency_seconds[5m])))",
    ] {
        let mut bad = dash.clone();
        let panel = bad["panels"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["type"] == "timeseries")
            .unwrap();
        panel["targets"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"expr": wrong, "refId": "Z"}));
        let found = missing(&bad, &[&prometheus, &openmetrics]);
        assert_eq!(found.len(), 1, "{wrong}: {found:#?}");
        assert!(found[0].ends_with(&format!("({wrong})")), "{found:?}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_on_its_datasource_variable() {
    let dash = dashboard();
    // A classic dashboard of a current Grafana (11 wrote 39, 12 writes 41).
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((39..100).contains(&schema), "schemaVersion {schema}");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut graphs = 0;
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "id of {title} twice"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24 && g["h"].as_u64().unwrap() > 0, "{title}: {g}");
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: {t}"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    assert!(graphs >= 10, "{graphs} panels");

    // No data source is named anywhere but by the variable (the built-in annotation
    // source aside): the file imports into any Grafana.
    fn uids(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(uid) = m.get("datasource").and_then(|d| d.get("uid")) {
                    out.push(uid.as_str().unwrap_or("(not a string)").to_string());
                }
                m.values().for_each(|v| uids(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| uids(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    uids(&dash, &mut found);
    assert!(!found.is_empty());
    for uid in found {
        assert!(
            uid == "${datasource}" || uid == "-- Grafana --",
            "a hard-coded data source uid: {uid}"
        );
    }
}

#[test]
fn metric_names_are_read_from_promql_not_functions_labels_or_keywords() {
    let names = |e: &str| -> Vec<String> { metric_names(e).unwrap().into_iter().collect() };
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le) (rate(portcullis_forward_latency_seconds_bucket{instance=~\"$instance\"}[$__rate_interval])))"
        ),
        ["portcullis_forward_latency_seconds_bucket"]
    );
    assert_eq!(
        names(
            "topk(10, sum without (instance) (increase(a_total{stage=\"by (x)\"}[5m] offset 1h))) / on (job) group_left (version) b_info"
        ),
        ["a_total", "b_info"]
    );
    assert_eq!(
        names("min(time() - process_start_time_seconds{instance=~\"${instance}\"}) > bool 1e3"),
        ["process_start_time_seconds"]
    );
    assert_eq!(
        names("x * on (instance) group_left y + sum(rate(z[5m]))"),
        ["x", "y", "z"]
    );
    assert_eq!(
        names("sum(x:recorded:rate5m) and count (y) unless z"),
        ["x:recorded:rate5m", "y", "z"]
    );
    assert!(metric_names("{__name__=~\"portcullis_.*\"}").is_err());
    assert!(metric_names("sum(rate({job=\"x\"}[5m]))").is_err());
    assert!(metric_names("time()").is_err(), "no metric at all");
    assert!(metric_names("rate(x{a=\"b}[5m])").is_err(), "unclosed");
}

/// The series added for the dashboard, live: devices per behaviour state follow an
/// operator's quarantine and release, the build is named, the process is measured.
#[test]
fn devices_per_state_build_info_and_process_series_are_live() {
    let began = unix_now();
    let gw = Gateway::start();
    for id in ["meter-1", "meter-2", "meter-3"] {
        gw.add_device_secret(id, SECRET);
    }
    let state = |s: &str| gw.metric(&format!("portcullis_devices{{state=\"{s}\"}} "));
    assert_eq!(state("normal"), 3);
    assert_eq!(state("quarantined"), 0);
    gw.cli_ok(&["quarantine", "add", "meter-2", "--reason", "under review"]);
    assert_eq!(state("quarantined"), 1);
    assert_eq!(state("normal"), 2);
    gw.cli_ok(&["quarantine", "release", "meter-2"]);
    assert_eq!(state("quarantined"), 0);
    assert_eq!(state("released"), 1);
    // A removed device leaves every state.
    gw.cli_ok(&["device", "remove", "meter-2"]);
    assert_eq!(state("released"), 0);
    assert_eq!(state("normal"), 2);

    let page = gw.metrics();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        page.contains(&format!(
            "\nportcullis_build_info{{version=\"{version}\"}} 1\n"
        )),
        "{page}"
    );
    let value = |name: &str| -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {page}"))
            .parse()
            .unwrap()
    };
    // The gateway's own process, not the test's: its descriptor limit and its start.
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(value("process_open_fds") >= 3.0);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let soft: f64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(value("process_max_fds"), soft);
    // Started after the test began, and by now (btime is whole seconds).
    let reported = value("process_start_time_seconds");
    let now = unix_now();
    assert!(
        (began - 1.0..=now + 1.0).contains(&reported),
        "started {reported}, test began {began}, now {now}"
    );
}
