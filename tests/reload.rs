//! Configuration reload while devices stay connected: new rules apply to live
//! sessions at once, a certificate that is no longer trusted ends its session, and a
//! broken new file is refused with the reason while the running rules stay.

mod common;

use common::raw::Raw;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn v5_device(gw: &Gateway) -> Raw {
    let mut raw = Raw::connect(gw.device_plain);
    assert_eq!(
        raw.connect_v5("meter-1", Some(("meter-1", SECRET))),
        Some(v5::ConnectReturnCode::Success)
    );
    raw
}

fn publish(raw: &mut Raw, topic: &str, pkid: u16) -> v5::PubAckReason {
    let mut p = v5::Publish::new(topic, Q5::AtLeastOnce, b"x".to_vec(), None);
    p.pkid = pkid;
    raw.send_v5(v5::Packet::Publish(p));
    match raw.recv_v5(T) {
        Some(v5::Packet::PubAck(a)) => a.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Rewrite the gateway's config: the test base plus `extra`.
fn rewrite(gw: &Gateway, from: &str, to: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    assert!(text.contains(from), "config has no {from:?}");
    std::fs::write(&gw.config, text.replace(from, to)).unwrap();
}

#[test]
fn a_narrowed_acl_applies_to_a_live_session_without_dropping_it() {
    let gw = Gateway::start_with("[device_groups.meters]\npublish = [\"devices/{id}/#\"]\n");
    let out = gw.cli_stdin(
        &[
            "device",
            "add",
            "meter-1",
            "--group",
            "meters",
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut raw = v5_device(&gw);
    assert_eq!(
        publish(&mut raw, "devices/meter-1/status", 1),
        v5::PubAckReason::Success
    );
    rewrite(
        &gw,
        "publish = [\"devices/{id}/#\"]",
        "publish = [\"devices/{id}/telemetry/#\"]",
    );
    let out = gw.cli_ok(&["config", "reload"]);
    assert!(out.contains("reloaded"), "{out}");
    // Same connection: the right it lost is refused from now on; the rest still works.
    assert_eq!(
        publish(&mut raw, "devices/meter-1/status", 2),
        v5::PubAckReason::NotAuthorized
    );
    assert_eq!(
        publish(&mut raw, "devices/meter-1/telemetry/t", 3),
        v5::PubAckReason::Success
    );
    gw.wait_audit(&["\"config\"", "\"allow\"", "reloaded"]);
}

#[test]
fn sighup_reloads_rate_limits_for_live_sessions() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = v5_device(&gw);
    // Within the default rate.
    for pkid in 1..=3 {
        assert_eq!(
            publish(&mut raw, "devices/meter-1/telemetry", pkid),
            v5::PubAckReason::Success
        );
    }
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        text.replace(
            "[rate_limits]\n",
            "[rate_limits]\nmessages_per_second = 0.01\nmessage_burst = 1.0\nmax_delay_ms = 1\naction = \"quota_exceeded\"\n",
        ),
    )
    .unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status();
    gw.wait_audit(&[
        "\"config\"",
        "\"allow\"",
        "reloaded",
        "\"protocol\":\"signal\"",
    ]);
    assert_eq!(
        publish(&mut raw, "devices/meter-1/telemetry", 4),
        v5::PubAckReason::Success
    );
    assert_eq!(
        publish(&mut raw, "devices/meter-1/telemetry", 5),
        v5::PubAckReason::QuotaExceeded
    );
}

#[test]
fn a_broken_new_config_is_refused_and_the_running_one_stays() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    let mut raw = v5_device(&gw);
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, good.clone() + "\n[limits]\nnot_a_key = 1\n").unwrap();
    let out = gw.cli(&["config", "reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("portcullis.toml"), "{}", text(&out));
    // A change that needs a restart is refused too, naming it.
    std::fs::write(
        &gw.config,
        good.replace("connect_timeout_secs = 2", "connect_timeout_secs = 3"),
    )
    .unwrap();
    let out = gw.cli(&["config", "reload"]);
    assert!(text(&out).contains("limits changed"), "{}", text(&out));
    // So is the per-source connection rate, which is built once at start.
    std::fs::write(
        &gw.config,
        good.replace(
            "connections_per_second_per_source = 1000.0",
            "connections_per_second_per_source = 999.0",
        ),
    )
    .unwrap();
    let out = gw.cli(&["config", "reload"]);
    assert!(
        text(&out).contains("rate_limits.connections_per_second_per_source changed"),
        "{}",
        text(&out)
    );
    // And the CoAP listener's bounds.
    std::fs::write(
        &gw.config,
        good.clone() + "\n[coap]\nmax_body_size = 1024\n",
    )
    .unwrap();
    let out = gw.cli(&["config", "reload"]);
    assert!(text(&out).contains("coap changed"), "{}", text(&out));
    // And [serial] (its ports are opened at start).
    std::fs::write(
        &gw.config,
        good.clone() + "\n[serial]\nack_timeout = \"300ms\"\n",
    )
    .unwrap();
    let out = gw.cli(&["config", "reload"]);
    assert!(text(&out).contains("serial changed"), "{}", text(&out));
    gw.wait_audit(&["\"config\"", "\"refuse\"", "reload refused"]);
    assert_eq!(
        publish(&mut raw, "devices/meter-1/telemetry", 1),
        v5::PubAckReason::Success
    );
}

#[test]
fn a_session_whose_ca_is_no_longer_trusted_is_closed_on_reload() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    let args = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/commands/#", "-V", "mqttv5", "-d"],
    );
    let mut sub = Sub::start(&args);
    sub.expect("SUBACK", T).expect("connected");
    // The default group now trusts only the other CA.
    let data_ca = format!("{}/data/pki/ca.pem", gw.dir.path().display());
    let other_ca = format!("{}/other/pki/ca.pem", gw.dir.path().display());
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let first = text.find(&data_ca).expect("device group trust");
    let mut edited = text.clone();
    edited.replace_range(first..first + data_ca.len(), &other_ca);
    std::fs::write(&gw.config, edited).unwrap();
    gw.cli_ok(&["config", "reload"]);
    sub.expect("DISCONNECT", T)
        .expect("the untrusted session ends");
    sub.kill();
    gw.wait_audit(&["\"disconnect\"", "\"sensor-1\"", "no longer trusted"]);
}

/// Revoke a certificate of the gateway's development CA with openssl and return the
/// CRL's path.
fn revoke(gw: &Gateway, name: &str) -> std::path::PathBuf {
    let dir = gw.dir.path().join("crl");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("crlnumber"), "01\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ ca ]\ndefault_ca = d\n[ d ]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n",
    )
    .unwrap();
    let pki = gw.data().join("pki");
    let key = pki.join("ca.key");
    let ca = pki.join("ca.pem");
    let cert = pki.join(format!("clients/{name}.pem"));
    let crl = dir.join("crl.pem");
    for args in [
        vec!["-revoke", cert.to_str().unwrap()],
        vec!["-gencrl", "-out", crl.to_str().unwrap()],
    ] {
        let out = std::process::Command::new("openssl")
            .current_dir(&dir)
            .args(["ca", "-config", "ca.cnf", "-keyfile", key.to_str().unwrap()])
            .args(["-cert", ca.to_str().unwrap()])
            .args(&args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{}", text(&out));
    }
    crl
}

#[test]
fn a_certificate_revoked_by_a_crl_ends_its_session_on_reload() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    gw.add_device_cert("sensor-2");
    let session = |id: &str| {
        let args = gw.client(
            gw.device_tls,
            id,
            &[
                "-t",
                &format!("devices/{id}/commands/#"),
                "-V",
                "mqttv5",
                "-d",
            ],
        );
        let sub = Sub::start(&args);
        sub.expect("SUBACK", T).expect("connected");
        sub
    };
    let mut revoked = session("sensor-1");
    let kept = session("sensor-2");
    let crl = revoke(&gw, "sensor-1");
    let data_ca = format!("trust = [\"{}/data/pki/ca.pem\"]", gw.dir.path().display());
    rewrite(
        &gw,
        &data_ca,
        &format!("{data_ca}\ncrls = [\"{}\"]", crl.display()),
    );
    gw.cli_ok(&["config", "reload"]);
    revoked
        .expect("DISCONNECT", T)
        .expect("the revoked certificate's session ends");
    revoked.kill();
    // The other device stays connected, and the revoked one cannot come back.
    assert!(
        kept.drain(Duration::from_millis(500))
            .iter()
            .all(|l| !l.contains("DISCONNECT"))
    );
    let args = gw.client(
        gw.device_tls,
        "sensor-1",
        &["-t", "devices/sensor-1/telemetry", "-m", "x"],
    );
    let out = mosquitto("mosquitto_pub", &args, T);
    assert!(!out.status.success(), "{}", text(&out));
}

#[test]
fn a_new_server_certificate_is_used_for_new_handshakes_after_reload() {
    let gw = Gateway::start();
    gw.add_device_cert("sensor-1");
    let publish = |cafile: &std::path::Path| {
        let args = vec![
            s("-h"),
            s("127.0.0.1"),
            s("-p"),
            gw.device_tls.port().to_string(),
            s("-i"),
            s("sensor-1"),
            s("-t"),
            s("devices/sensor-1/telemetry"),
            s("-m"),
            s("x"),
            s("--cafile"),
            cafile.display().to_string(),
            s("--cert"),
            gw.data()
                .join("pki/clients/sensor-1.pem")
                .display()
                .to_string(),
            s("--key"),
            gw.data()
                .join("pki/clients/sensor-1.key")
                .display()
                .to_string(),
        ];
        mosquitto("mosquitto_pub", &args, T).status.success()
    };
    let other_ca = gw.dir.path().join("other/pki/ca.pem");
    assert!(publish(&gw.ca()));
    assert!(
        !publish(&other_ca),
        "the server certificate is not from the other CA yet"
    );
    // Serve the other PKI's server certificate from now on.
    let other = gw.dir.path().join("other/pki");
    rewrite(
        &gw,
        "[tls]\n",
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            other.join("server.pem").display(),
            other.join("server.key").display()
        ),
    );
    gw.cli_ok(&["config", "reload"]);
    assert!(
        publish(&other_ca),
        "new handshakes present the new certificate"
    );
    assert!(!publish(&gw.ca()));
}
