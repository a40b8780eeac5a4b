//! The registry file under damage: every page flipped, truncations, a refused start,
//! and backup/restore (issue 12, item 10).

mod common;

use common::{BIN, Gateway, mosquitto, text};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// Run the CLI (no gateway running) with a deadline: a hang is a failure too.
fn run(config: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The listings a user sees, offline.
const LISTINGS: [&[&str]; 4] = [
    &["device", "list"],
    &["service", "list"],
    &["ban", "list"],
    &["quarantine", "list", "--all"],
];

/// A registry with devices, a service, bans and quarantine records; the gateway
/// stopped afterwards.
fn populated() -> Gateway {
    let mut gw = Gateway::start();
    for i in 0..12 {
        gw.add_device_secret(&format!("sensor-{i}"), "a-long-enough-secret-0123");
    }
    gw.add_device_cert("camera-1");
    gw.add_service_cert("ingest");
    gw.cli_ok(&["ban", "add", "192.0.2.0/24", "--reason", "scanner"]);
    gw.cli_ok(&["ban", "add", "device/sensor-11", "--ttl", "7d"]);
    gw.cli_ok(&["quarantine", "add", "sensor-3"]);
    gw.cli_ok(&["quarantine", "add", "sensor-4"]);
    gw.cli_ok(&["quarantine", "release", "sensor-4"]);
    gw.cli_ok(&["device", "disable", "sensor-5"]);
    let (status, _) = gw.terminate();
    assert!(status.success());
    gw
}

fn listings(config: &Path) -> Vec<String> {
    LISTINGS
        .iter()
        .map(|args| {
            let o = run(config, args);
            assert!(o.status.success(), "{args:?}: {}", err(&o));
            out(&o)
        })
        .collect()
}

/// Never a panic; a success shows exactly the original; a failure names the file.
fn assert_right_or_refused(args: &[&str], o: &Output, expected: Option<&str>, what: &str) {
    let stderr = err(o);
    assert_ne!(
        o.status.code(),
        Some(101),
        "{what}: {args:?} panicked: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {args:?}: {stderr}");
    if o.status.success() {
        if let Some(expected) = expected {
            assert_eq!(out(o), expected, "{what}: {args:?} served altered data");
        }
    } else {
        assert!(
            stderr.contains("registry.redb"),
            "{what}: {args:?}: unclear error: {stderr}"
        );
    }
}

/// `registry check` and the listings on the damaged file: when the check passes every
/// listing must be the original; when it fails, a listing is refused or right.
fn probe(config: &Path, expected: &[String], what: &str) -> bool {
    let check = run(config, &["registry", "check"]);
    assert_right_or_refused(&["registry", "check"], &check, None, what);
    let passed = check.status.success();
    if !passed {
        assert!(
            err(&check).contains("portcullis registry restore"),
            "{what}: {}",
            err(&check)
        );
    }
    for (args, expected) in LISTINGS.iter().zip(expected) {
        let o = run(config, args);
        assert_right_or_refused(args, &o, Some(expected), what);
        assert!(
            !passed || o.status.success(),
            "{what}: check passed, {args:?} failed"
        );
        if !passed {
            // One listing is enough to see a refusal is not a panic or altered data.
            break;
        }
    }
    passed
}

#[test]
fn every_flipped_page_gives_the_right_data_or_a_clear_error() {
    let gw = populated();
    let live = gw.data().join("registry.redb");
    let original = std::fs::read(&live).unwrap();
    let expected = listings(&gw.config);
    assert!(expected[0].contains("sensor-11") && expected[3].contains("sensor-3"));
    let (mut pages, mut refused) = (0, 0);
    for page in 0..original.len().div_ceil(PAGE) {
        let bytes = &original[page * PAGE..((page + 1) * PAGE).min(original.len())];
        let Some(first) = bytes.iter().position(|&b| b != 0) else {
            continue;
        };
        pages += 1;
        // One flip per page: the first byte in use on even pages (headers, lengths),
        // one further in, chosen by the page number, on odd pages.
        let offset = if page % 2 == 0 {
            first
        } else {
            (first + 1 + page * 1543) % bytes.len()
        };
        {
            let mut damaged = original.clone();
            damaged[page * PAGE + offset] ^= 0x5a;
            std::fs::write(&live, &damaged).unwrap();
            let what = format!("page {page} byte {offset}");
            if !probe(&gw.config, &expected, &what) {
                refused += 1;
            }
        }
    }
    eprintln!("{pages} pages in use, {refused} flips refused, the others harmless");
    assert!(pages >= 3 && refused > 0);
}

#[test]
fn a_truncated_registry_is_refused_naming_the_file() {
    let gw = populated();
    let live = gw.data().join("registry.redb");
    let original = std::fs::read(&live).unwrap();
    let expected = listings(&gw.config);
    for len in [0, 1, 100, PAGE, original.len() / 2, original.len() - 1] {
        std::fs::write(&live, &original[..len]).unwrap();
        let what = format!("truncated to {len} bytes");
        probe(&gw.config, &expected, &what);
    }
    // Empty: not taken for a new registry.
    std::fs::write(&live, b"").unwrap();
    let o = run(&gw.config, &["device", "list"]);
    assert!(
        !o.status.success() && err(&o).contains("empty"),
        "{}",
        err(&o)
    );
}

/// Flip a byte inside the sealed record of `id` (found by its JSON).
fn alter_record(live: &Path, id: &str) {
    let mut bytes = std::fs::read(live).unwrap();
    let needle = format!("\"id\":\"{id}\"");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("record in the file");
    bytes[at + 7] ^= 0x01;
    std::fs::write(live, bytes).unwrap();
}

#[test]
fn the_gateway_refuses_to_start_on_a_corrupt_registry_naming_it() {
    let gw = populated();
    let live = gw.data().join("registry.redb");
    alter_record(&live, "sensor-7");
    let o = run(&gw.config, &["serve"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let stderr = err(&o);
    assert!(stderr.contains(&live.display().to_string()), "{stderr}");
    assert!(stderr.contains("portcullis registry restore"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_backup_taken_while_running_restores_the_registry() {
    let mut gw = Gateway::start();
    gw.add_device_secret("kept-1", "a-long-enough-secret-0123");
    gw.cli_ok(&["quarantine", "add", "kept-1"]);
    gw.cli_ok(&["ban", "add", "198.51.100.7"]);
    let backup: PathBuf = gw.dir.path().join("backups/registry-1.redb");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    let taken = gw.cli_ok(&["registry", "backup", backup.to_str().unwrap()]);
    assert!(taken.contains("1 principal(s), 1 ban(s)"), "{taken}");
    let at_backup = (
        gw.cli_ok(&["device", "list"]),
        gw.cli_ok(&["quarantine", "list", "--all"]),
    );
    let check = gw.cli_ok(&["registry", "check"]);
    assert!(check.starts_with("ok: 1 principal(s), 1 ban(s)"), "{check}");
    // The backup is never overwritten.
    let again = gw.cli(&["registry", "backup", backup.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2), "{}", err(&again));
    // Restoring under a running gateway is refused.
    let busy = gw.cli(&["registry", "restore", backup.to_str().unwrap()]);
    assert!(
        !busy.status.success() && err(&busy).contains("stop it"),
        "{}",
        err(&busy)
    );
    gw.add_device_secret("after-backup", "a-long-enough-secret-0123");
    let (status, _) = gw.terminate();
    assert!(status.success());

    let live = gw.data().join("registry.redb");
    alter_record(&live, "kept-1");
    let check = gw.cli(&["registry", "check"]);
    assert_eq!(check.status.code(), Some(1), "{}", err(&check));
    // A damaged backup is refused before anything is replaced.
    let bad = gw.dir.path().join("backups/damaged.redb");
    std::fs::copy(&backup, &bad).unwrap();
    alter_record(&bad, "kept-1");
    let refused = gw.cli(&["registry", "restore", bad.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{}", err(&refused));
    assert!(
        err(&refused).contains("failed its check"),
        "{}",
        err(&refused)
    );
    let restored = gw.cli_ok(&["registry", "restore", backup.to_str().unwrap()]);
    assert!(
        restored.contains("kept aside") || restored.contains("kept at"),
        "{restored}"
    );
    let check = gw.cli_ok(&["registry", "check"]);
    assert!(
        check.starts_with("ok: 1 principal(s), 1 ban(s), 1 behaviour"),
        "{check}"
    );
    let aside = std::fs::read_dir(gw.data())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("registry.redb.before-restore-")
        });
    assert!(aside, "the damaged file is kept aside");

    gw.restart_after_stop();
    assert_eq!(gw.cli_ok(&["device", "list"]), at_backup.0);
    assert_eq!(gw.cli_ok(&["quarantine", "list", "--all"]), at_backup.1);
}

/// A data dir written by the gateway before redb 5 (redb 2, file format 2): made by
/// `portcullis` at b8d20ff with `device add` (sensor-1..3 with secrets
/// `fixture-secret-0123456789-N`, camera-1 with any certificate), `service add ingest`,
/// `ban add 192.0.2.0/24`, `ban add device/sensor-3`, `quarantine add sensor-2` and
/// `device disable sensor-1`.
const REDB2_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/registry-redb2"
);

#[test]
fn a_registry_written_by_redb_2_is_upgraded_with_everything_in_it() {
    let mut gw = Gateway::start_seeded(Path::new(REDB2_FIXTURE));
    let live = gw.data().join("registry.redb");
    let original = std::fs::read(format!("{REDB2_FIXTURE}/data/registry.redb")).unwrap();
    // The original is kept beside the upgraded file, byte for byte, owner-only.
    let copy = gw.data().join("registry.redb.format2");
    assert_eq!(std::fs::read(&copy).unwrap(), original);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_ne!(std::fs::read(&live).unwrap(), original, "upgraded in place");
    assert!(gw.stderr().contains("upgraded from redb file format 2"));

    let devices = gw.cli_ok(&["device", "list"]);
    for id in ["camera-1", "sensor-1", "sensor-2", "sensor-3"] {
        assert!(devices.contains(&format!("\"id\": \"{id}\"")), "{devices}");
    }
    assert!(
        gw.cli_ok(&["service", "list"])
            .contains("\"id\": \"ingest\"")
    );
    let bans = gw.cli_ok(&["ban", "list"]);
    assert!(bans.contains("source 192.0.2.0/24") && bans.contains("device sensor-3"));
    assert!(
        gw.cli_ok(&["quarantine", "list", "--all"])
            .contains("sensor-2")
    );

    // The secrets still verify (their hashes and the key beside them came through):
    // sensor-2 (quarantined, not refused) connects with its own secret only.
    let publish = |secret: &str| {
        let mut args = gw.client(
            gw.device_plain,
            "sensor-2",
            &["-u", "sensor-2", "-P", secret],
        );
        args.extend(["-t", "devices/sensor-2/telemetry/t", "-m", "1"].map(String::from));
        mosquitto("mosquitto_pub", &args, Duration::from_secs(10))
    };
    let ok = publish("fixture-secret-0123456789-2");
    assert!(ok.status.success(), "{}", text(&ok));
    let wrong = publish("fixture-secret-0123456789-9");
    assert!(!wrong.status.success(), "{}", text(&wrong));
    // sensor-1 stays disabled: refused with its right secret.
    let mut args = gw.client(
        gw.device_plain,
        "sensor-1",
        &["-u", "sensor-1", "-P", "fixture-secret-0123456789-1"],
    );
    args.extend(["-t", "devices/sensor-1/telemetry/t", "-m", "1"].map(String::from));
    let disabled = mosquitto("mosquitto_pub", &args, Duration::from_secs(10));
    assert!(!disabled.status.success(), "{}", text(&disabled));

    // Upgraded once: a restart opens the new file as it is.
    gw.restart();
    assert_eq!(gw.cli_ok(&["device", "list"]), devices);
    assert_eq!(
        gw.stderr()
            .matches("upgraded from redb file format 2")
            .count(),
        1
    );
    let (status, _) = gw.terminate();
    assert!(status.success());
    let check = run(&gw.config, &["registry", "check"]);
    assert!(check.status.success(), "{}", err(&check));
    assert!(
        out(&check).starts_with("ok: 5 principal(s), 2 ban(s)"),
        "{}",
        out(&check)
    );
}

/// The fixture's data dir in a temp dir, with `registry.redb` damaged by `damage`.
fn damaged_redb2(damage: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::copy_tree(Path::new(REDB2_FIXTURE), dir.path());
    let mut bytes = std::fs::read(format!("{REDB2_FIXTURE}/data/registry.redb")).unwrap();
    damage(&mut bytes);
    let live = data.join("registry.redb");
    std::fs::write(&live, &bytes).unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\n", data.display())).unwrap();
    let pki = run(&config, &["pki", "init"]);
    assert!(pki.status.success(), "{}", err(&pki));
    (dir, config, live)
}

#[test]
fn a_damaged_redb_2_registry_is_refused_naming_the_file_and_keeping_the_original() {
    // A sealed record altered: the upgrade goes through, the check refuses the file.
    let (_dir, config, live) = damaged_redb2(|bytes| {
        let needle = b"\"id\":\"sensor-3\"";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        bytes[at + 7] ^= 0x01;
    });
    let damaged = std::fs::read(&live).unwrap();
    let o = run(&config, &["device", "list"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let stderr = err(&o);
    assert!(stderr.contains(&live.display().to_string()), "{stderr}");
    assert!(stderr.contains("portcullis registry restore"), "{stderr}");
    assert_eq!(
        std::fs::read(format!("{}.format2", live.display())).unwrap(),
        damaged
    );

    // Damage redb itself reads (the header's commit slots, the allocator, half the
    // file gone): never a panic; a listing is the original's or the file is named.
    let original = {
        let (_dir, config, _) = damaged_redb2(|_| {});
        let o = run(&config, &["device", "list"]);
        assert!(o.status.success(), "{}", err(&o));
        out(&o)
    };
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 3] = [
        ("header", |b| b[64..128].iter_mut().for_each(|x| *x ^= 0xa5)),
        ("second page", |b| {
            let at = PAGE + b[PAGE..].iter().position(|&x| x != 0).unwrap();
            b[at..at + 64].iter_mut().for_each(|x| *x ^= 0xa5)
        }),
        ("truncated", |b| b.truncate(b.len() / 2)),
    ];
    for (what, damage) in damages {
        let (_dir, config, live) = damaged_redb2(damage);
        let o = run(&config, &["device", "list"]);
        let stderr = err(&o);
        assert_ne!(o.status.code(), Some(101), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        eprintln!("{what}: {}", stderr.lines().last().unwrap_or("listed"));
        if o.status.success() {
            assert_eq!(out(&o), original, "{what}: altered data");
        } else {
            assert!(
                stderr.contains(&live.display().to_string()),
                "{what}: {stderr}"
            );
        }
    }
}
