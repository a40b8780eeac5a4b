//! The benchmark harness itself (not its figures): every workload runs against the
//! gateway and the rumqttd baseline and yields what docs/performance.md reports.

mod common;

use common::BIN;
use portcullis_sim::bench::{self, Options, Target, Workload};

#[test]
fn the_benchmark_suite_measures_every_workload_on_each_target() {
    let policy = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../firmware-sim/bench/portcullis-bench.toml"
    );
    let samples = bench::run(Options {
        reps: 1,
        secs: 1.0,
        targets: vec![Target::Portcullis, Target::Rumqttd],
        workloads: vec![
            Workload::Latency,
            Workload::Idle,
            Workload::Isolation,
            Workload::Coap,
        ],
        portcullis: BIN.into(),
        // Built beside the gateway by `cargo test --workspace`.
        sim: std::path::Path::new(BIN).with_file_name("portcullis-sim"),
        policy: policy.into(),
        idle: 50,
        coap_idle: 50,
        // The test shares the machine with others: no pinning, figures not judged.
        pin: false,
        server_cpu: 0,
        load_cpu: 1,
        upstream_cpu: None,
        json: None,
    })
    .expect("bench runs");
    let get = |workload: &str, case: &str, target: Target, figure: &str| -> f64 {
        samples
            .iter()
            .find(|s| s.workload == workload && s.case == case && s.target == target)
            .and_then(|s| s.figures.get(figure).copied())
            .unwrap_or_else(|| panic!("no {workload} {case} {target:?} {figure} in {samples:?}"))
    };
    for target in [Target::Portcullis, Target::Rumqttd] {
        for case in ["1k", "10k"] {
            assert!(get("latency", case, target, "p50_us") > 0.0);
            assert!(get("latency", case, target, "offered_per_s") > 100.0);
        }
        assert_eq!(get("idle", "plain", target, "connections"), 50.0);
        assert!(get("isolation", "solo", target, "delivery_pct") >= 99.0);
    }
    // The gateway's own histogram is read from its metrics.
    assert!(
        get(
            "latency",
            "10k",
            Target::Portcullis,
            "gateway_forward_p99_le_us"
        ) > 0.0
    );
    // CoAP over DTLS: the gateway only (the baselines speak no CoAP).
    assert!(get("coap", "con-post", Target::Portcullis, "req_per_s") > 0.0);
    assert_eq!(
        get("coap", "idle-dtls", Target::Portcullis, "sessions"),
        50.0
    );
    // Mutual TLS idle connections: the gateway only (the baseline has no TLS).
    assert_eq!(get("idle", "mtls", Target::Portcullis, "connections"), 50.0);
    assert!(
        !samples
            .iter()
            .any(|s| s.target == Target::Rumqttd && s.case == "mtls")
    );
    // The flooder does not take the steady device's delivery through the gateway.
    assert!(get("isolation", "flood", Target::Portcullis, "delivery_pct") >= 99.0);
    let table = bench::summary(&samples);
    assert!(table.contains("| latency | 10k | p99_us |"), "{table}");
}
