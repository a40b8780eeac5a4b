//! `device import --sync` and `service import --sync` (issue 17, item 8): the registry
//! reconciled to a file, checked by what devices and operators see.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// A device group whose members may publish only their status.
const NARROW: &str = r#"
[device_groups.narrow]
trust = []
publish = ["devices/{id}/status"]
"#;

const OLD_SECRET: &str = "old-1-secret-0123456789";
const STAY_SECRET: &str = "stay-1-secret-0123456789";
const MOVED_SECRET: &str = "moved-1-secret-0123456789";
const NEW_SECRET: &str = "new-1-secret-0123456789";

fn write(gw: &Gateway, name: &str, text: &str) -> PathBuf {
    let path = gw.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sync(gw: &Gateway, file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["device", "import", "--sync", file.to_str().unwrap()];
    args.extend(extra);
    gw.cli(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Publish at QoS 1 over MQTT 5 with a secret: the client's debug output (the PUBACK's
/// reason code says whether the ACL let it through), and whether it connected at all.
fn publish(gw: &Gateway, id: &str, secret: &str, topic: &str) -> (bool, String) {
    let args = gw.client(
        gw.device_plain,
        id,
        &[
            "-u", id, "-P", secret, "-t", topic, "-m", "x", "-q", "1", "-d", "-V", "mqttv5",
        ],
    );
    let out = mosquitto("mosquitto_pub", &args, T);
    (out.status.success(), text(&out))
}

fn accepted(gw: &Gateway, id: &str, secret: &str, topic: &str) -> bool {
    let (ok, out) = publish(gw, id, secret, topic);
    ok && out.contains("received PUBACK (Mid: 1, RC:0)")
}

fn refused_by_acl(gw: &Gateway, id: &str, secret: &str, topic: &str) -> bool {
    let (_, out) = publish(gw, id, secret, topic);
    out.contains("received PUBACK (Mid: 1, RC:135)")
}

fn cannot_connect(gw: &Gateway, id: &str, secret: &str) -> bool {
    let (ok, out) = publish(gw, id, secret, &format!("devices/{id}/telemetry"));
    !ok && !out.contains("received PUBACK")
}

/// The file a GitOps repository would hold: no secret for devices that have one.
fn desired(with_new_secret: bool) -> String {
    let new_secret = if with_new_secret {
        format!("secret = \"{NEW_SECRET}\"\n")
    } else {
        String::new()
    };
    format!(
        "# devices of this site\n\
         [[principal]]\nid = \"stay-1\"\n\n\
         [[principal]]\nid = \"moved-1\"\ngroup = \"narrow\"\n\n\
         [[principal]]\nid = \"new-1\"\n{new_secret}"
    )
}

fn registered(gw: &Gateway) {
    for (id, secret) in [
        ("old-1", OLD_SECRET),
        ("stay-1", STAY_SECRET),
        ("moved-1", MOVED_SECRET),
    ] {
        gw.add_device_secret(id, secret);
    }
}

#[test]
fn a_sync_adds_updates_and_removes_as_devices_see_it_and_a_second_run_does_nothing() {
    let gw = Gateway::start_with(NARROW);
    registered(&gw);
    assert!(accepted(
        &gw,
        "moved-1",
        MOVED_SECRET,
        "devices/moved-1/telemetry"
    ));
    // old-1 is connected when the sync removes it.
    let old = Sub::start(&gw.client(
        gw.device_plain,
        "old-1",
        &[
            "-u",
            "old-1",
            "-P",
            OLD_SECRET,
            "-t",
            "devices/old-1/commands/#",
            "-d",
        ],
    ));
    old.expect("CONNACK", T).expect("old-1 connected");
    // And moved-1, whose session must not keep its old group's ACL.
    let moved = Sub::start(&gw.client(
        gw.device_plain,
        "moved-1",
        &[
            "-u",
            "moved-1",
            "-P",
            MOVED_SECRET,
            "-t",
            "devices/moved-1/commands/#",
            "-d",
        ],
    ));
    moved.expect("CONNACK", T).expect("moved-1 connected");
    let file = write(&gw, "devices.toml", &desired(true));

    let out = sync(&gw, &file, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = stdout(&out);
    let lines: Vec<&str> = plan.lines().collect();
    assert_eq!(
        lines[..5],
        [
            format!(
                "device sync from {}: 1 to add, 1 to update, 1 to remove, 1 unchanged",
                file.display()
            )
            .as_str(),
            "+ new-1  group default; secret",
            "~ moved-1  group: default -> narrow; kept (not in the file): secret",
            "- old-1",
            "applied in one commit: 1 added, 1 updated, 1 removed; 2 session(s) ended",
        ],
        "{plan}"
    );
    assert!(!plan.contains(NEW_SECRET), "{plan}");

    // Removed: its session ended and it cannot connect again.
    wait_for(T, || {
        (!gw.cli_ok(&["clients", "list"]).contains("old-1")).then_some(())
    })
    .expect("old-1's session ended");
    assert!(cannot_connect(&gw, "old-1", OLD_SECRET));
    // Added: connects with the secret from the file.
    assert!(accepted(
        &gw,
        "new-1",
        NEW_SECRET,
        "devices/new-1/telemetry"
    ));
    // Moved to the narrow group: its ACL is that group's, its secret the one it had.
    assert!(refused_by_acl(
        &gw,
        "moved-1",
        MOVED_SECRET,
        "devices/moved-1/telemetry"
    ));
    assert!(accepted(
        &gw,
        "moved-1",
        MOVED_SECRET,
        "devices/moved-1/status"
    ));
    // Unchanged, the secret kept.
    assert!(accepted(
        &gw,
        "stay-1",
        STAY_SECRET,
        "devices/stay-1/telemetry"
    ));
    gw.wait_audit(&["sync: remove", "old-1"]);
    gw.wait_audit(&["sync: update (group)", "moved-1"]);
    // Its session was ended: the client connects again (into the new group).
    moved
        .expect("sending CONNECT", T)
        .expect("moved-1's session ended by the move");

    // The same file again (here without new-1's secret, as a repository keeps it):
    // nothing to do, nothing rotated.
    let file = write(&gw, "devices.toml", &desired(false));
    let again = sync(&gw, &file, &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(
        stdout(&again),
        format!(
            "device sync from {}: nothing to do (3 unchanged)\n",
            file.display()
        )
    );
    assert!(accepted(
        &gw,
        "new-1",
        NEW_SECRET,
        "devices/new-1/telemetry"
    ));
}

#[test]
fn a_dry_run_prints_the_plan_and_changes_nothing_and_a_sync_works_with_no_gateway() {
    let mut gw = Gateway::start_with(NARROW);
    registered(&gw);
    let (status, _) = gw.terminate();
    assert!(status.success());
    let file = write(&gw, "devices.toml", &desired(true));
    let before = gw.cli_ok(&["device", "list"]);

    let dry = sync(&gw, &file, &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let plan = stdout(&dry);
    assert!(
        plan.contains("1 to add, 1 to update, 1 to remove")
            && plan.contains("- old-1")
            && plan.ends_with("dry run: nothing changed\n"),
        "{plan}"
    );
    assert_eq!(gw.cli_ok(&["device", "list"]), before);

    // Applied on the registry file directly; the gateway starts with the result.
    let out = sync(&gw, &file, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out)
            .contains("applied in one commit: 1 added, 1 updated, 1 removed; 0 session(s) ended"),
        "{}",
        stdout(&out)
    );
    gw.restart_after_stop();
    assert!(cannot_connect(&gw, "old-1", OLD_SECRET));
    assert!(accepted(
        &gw,
        "new-1",
        NEW_SECRET,
        "devices/new-1/telemetry"
    ));
    assert!(refused_by_acl(
        &gw,
        "moved-1",
        MOVED_SECRET,
        "devices/moved-1/telemetry"
    ));
}

#[test]
fn a_file_with_errors_changes_nothing_and_names_every_error_by_line() {
    let gw = Gateway::start_with(NARROW);
    registered(&gw);
    let before = gw.cli_ok(&["device", "list"]);
    let file = write(
        &gw,
        "devices.toml",
        "[[principal]]\nid = \"new-1\"\nsecret = \"new-1-secret-0123456789\"\n\n\
         [[principal]]\nid = \"stay-1\"\ngroup = \"nope\"\n\n\
         [[principal]]\nid = \"short-1\"\nsecret = \"tiny-pw\"\n\n\
         [[principal]]\nid = \"new-1\"\ncert_any = true\n\n\
         [[principal]]\nid = \"pinned-1\"\ncert = \"missing.pem\"\n",
    );
    for extra in [&[][..], &["--dry-run"][..]] {
        let out = sync(&gw, &file, extra);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let expected = [
            format!("{}: 4 error(s), nothing changed:", file.display()),
            "line 5: entry 2 (\"stay-1\"): no device group \"nope\" in the configuration".into(),
            "line 9: entry 3 (\"short-1\"): secret must be at least 16 bytes (got 7); use generate_secret = true".into(),
            "line 13: entry 4 (\"new-1\"): device new-1 is listed already, at line 1: entry 1 (\"new-1\")".into(),
            "line 17: entry 5 (\"pinned-1\"): cert: reading the certificate file".into(),
        ];
        let mut at = 0;
        for needle in &expected {
            let found = err[at..]
                .find(needle.as_str())
                .unwrap_or_else(|| panic!("{needle:?} not in order in:\n{err}"));
            at += found + needle.len();
        }
        assert!(
            !err.contains("tiny-pw") && !err.contains("new-1-secret"),
            "{err}"
        );
        assert_eq!(stdout(&out), "", "no plan for a refused file");
    }
    assert_eq!(gw.cli_ok(&["device", "list"]), before);
    assert!(cannot_connect(&gw, "new-1", NEW_SECRET));
    assert!(accepted(
        &gw,
        "old-1",
        OLD_SECRET,
        "devices/old-1/telemetry"
    ));

    // An empty file would remove every device: refused.
    let empty = write(&gw, "empty.toml", "# nothing yet\n");
    let out = sync(&gw, &empty, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("would remove every device"),
        "{}",
        text(&out)
    );
    assert_eq!(gw.cli_ok(&["device", "list"]), before);
}

#[test]
fn a_generated_secret_is_made_once_and_the_next_sync_does_not_rotate_it() {
    let gw = Gateway::start();
    let file = write(
        &gw,
        "devices.toml",
        "[[principal]]\nid = \"gen-1\"\ngenerate_secret = true\n",
    );
    let out = sync(&gw, &file, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = stdout(&out);
    assert!(
        plan.contains("+ gen-1  group default; secret (generated)"),
        "{plan}"
    );
    let secret = plan
        .lines()
        .find_map(|l| l.strip_prefix("gen-1 secret: "))
        .unwrap_or_else(|| panic!("no generated secret in {plan}"))
        .to_string();
    assert!(accepted(&gw, "gen-1", &secret, "devices/gen-1/telemetry"));
    let again = sync(&gw, &file, &[]);
    assert!(
        stdout(&again).contains("nothing to do (1 unchanged)")
            && !stdout(&again).contains("secret:"),
        "{}",
        text(&again)
    );
    assert!(accepted(&gw, "gen-1", &secret, "devices/gen-1/telemetry"));
}

#[test]
fn a_service_sync_touches_services_only() {
    let gw = Gateway::start();
    gw.add_device_secret("sensor-1", "sensor-1-secret-0123456789");
    gw.add_service_cert("ingest");
    gw.add_service_cert("legacy");
    let file = write(
        &gw,
        "services.toml",
        "[[principal]]\nid = \"ingest\"\ncert_any = true\n\n\
         [[principal]]\nid = \"billing\"\ncert_any = true\n",
    );
    let out = gw.cli(&["service", "import", "--sync", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = stdout(&out);
    assert!(
        plan.contains("service sync from")
            && plan.contains("+ billing  group default; certificate (any from the group's CA)")
            && plan.contains("- legacy")
            && plan.contains("1 unchanged"),
        "{plan}"
    );
    let services = gw.cli_ok(&["service", "list"]);
    assert!(
        services.contains("billing") && !services.contains("legacy"),
        "{services}"
    );
    assert!(gw.cli_ok(&["device", "list"]).contains("sensor-1"));
}
