//! CoAP devices over DTLS, end to end: libcoap's `coap-client-openssl` (Debian
//! `libcoap3-bin`) with a pre-shared key against the real gateway, and mosquitto
//! clients as the services on the other side.

mod common;

use common::*;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

/// A device secret for plain CoAP (as the MQTT tests' secrets: long and random enough).
const SECRET: &str = "0123456789abcdef0123456789abcdef";

const CLIENT: &str = "coap-client-openssl";
const T: Duration = Duration::from_secs(15);

/// `coap-client-openssl -u ID -k KEY` with `args`, then `coaps://ADDR{path}`,
/// verbose (it prints every message it sends and receives: `c:2.04` is a 2.04).
fn coap(addr: SocketAddr, id: &str, key: &str, args: &[&str], path: &str) -> Output {
    coap_waiting(addr, id, key, 10, args, path)
}

/// Like `coap`, giving up after `wait` seconds without an answer.
fn coap_waiting(
    addr: SocketAddr,
    id: &str,
    key: &str,
    wait: u32,
    args: &[&str],
    path: &str,
) -> Output {
    Command::new(CLIENT)
        .args(["-u", id, "-k", key, "-B", &wait.to_string(), "-v", "7"])
        .args(args)
        .arg(format!("coaps://{addr}{path}"))
        .output()
        .unwrap_or_else(|e| panic!("{CLIENT} (Debian libcoap3-bin): {e}"))
}

/// What a `coap` run printed, stdout and stderr.
fn said(out: &Output) -> String {
    text(out)
}

/// A service subscribed to `filter` on the plain service listener.
fn service_sub(gw: &Gateway, filter: &str) -> Sub {
    gw.add_service_cert("analytics");
    let sub = Sub::start(&gw.client(
        gw.service_tls,
        "analytics",
        &["-t", filter, "-v", "-q", "1"],
    ));
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));
    sub
}

#[test]
fn confirmable_telemetry_from_a_psk_device_reaches_a_service_subscriber() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-1");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let out = coap(
        gw.coap_dtls,
        "coap-1",
        &key,
        &["-m", "post", "-e", "21.5"],
        "/t/telemetry/temp",
    );
    let shown = said(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("c:2.04"), "no 2.04 Changed: {shown}");
    let line = sub
        .expect("21.5", T)
        .unwrap_or_else(|seen| panic!("telemetry not received; saw {seen:?}"));
    assert_eq!(line, "devices/coap-1/telemetry/temp 21.5");
    let audit = gw.wait_audit(&["\"connect\"", "\"coap-1\"", "\"coap\""]);
    assert!(audit.contains("psk"), "{audit}");
}

/// A service ("commander", not the subscriber's id) publishing a command to
/// `devices/{id}/commands/{name}`.
fn send_command(gw: &Gateway, id: &str, name: &str, payload: &str) {
    if !gw.data().join("pki/clients/commander.pem").exists() {
        gw.add_service_cert("commander");
    }
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.service_tls,
            "commander",
            &[
                "-t",
                &format!("devices/{id}/commands/{name}"),
                "-m",
                payload,
                "-q",
                "1",
                "-d",
            ],
        ),
        T,
    );
    assert!(text(&out).contains("received PUBACK"), "{}", text(&out));
}

#[test]
fn an_observe_on_the_commands_resource_receives_a_command_from_a_service() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-2");
    // Observe /c for up to 20 s (coap-client prints each notification's payload).
    let mut cmd = Command::new("stdbuf");
    cmd.args([
        "-oL", CLIENT, "-u", "coap-2", "-k", &key, "-s", "20", "-v", "7",
    ])
    .arg(format!("coaps://{}/c", gw.coap_dtls));
    let observer = Sub::spawn(cmd, CLIENT);
    gw.wait_audit(&["\"connect\"", "\"coap-2\"", "\"coap\""]);
    wait_for(T, || {
        (gw.metric("portcullis_coap_observe_registered_total") >= 1).then_some(())
    })
    .expect("the Observe relation is registered");
    send_command(&gw, "coap-2", "reboot", "reboot-now");
    observer
        .expect("reboot-now", T)
        .unwrap_or_else(|seen| panic!("command not received; saw {seen:?}"));
    // Acknowledged by the device: delivered, not retransmitted for want of an ACK.
    wait_for(T, || {
        (gw.metric("portcullis_messages_delivered_total") >= 1).then_some(())
    })
    .expect("the notification was acknowledged");
    // Its payload's bytes, counted for each time it was delivered.
    assert_eq!(
        gw.metric("portcullis_delivered_bytes_total"),
        gw.metric("portcullis_messages_delivered_total") * "reboot-now".len() as u64
    );
}

#[test]
fn a_wrong_key_and_an_unknown_identity_are_refused_alike_and_back_off_applies() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-3");
    let post = |id: &str, key: &str| {
        coap_waiting(
            gw.coap_dtls,
            id,
            key,
            3,
            &["-m", "post", "-e", "x"],
            "/t/telemetry/x",
        )
    };
    let wrong = post("coap-3", "not-the-key-0123456789");
    let unknown = post("nobody-here", "not-the-key-0123456789");
    for (what, out) in [("wrong key", &wrong), ("unknown identity", &unknown)] {
        let shown = said(out);
        assert!(!shown.contains("c:2.04"), "{what} was answered: {shown}");
        assert!(
            !shown.contains("DTLS: session connected"),
            "{what}: {shown}"
        );
    }
    // The same failure from the outside: neither got an answer, and the client ends
    // the same way.
    assert_eq!(wrong.status.code(), unknown.status.code());
    gw.wait_audit(&["\"coap-3\"", "bad_secret"]);
    gw.wait_audit(&["\"nobody-here\"", "unknown_principal"]);
    // Three failures naming it from this source back the pair off (max_failures = 3):
    // the right key is refused too while it lasts.
    let _ = post("coap-3", "still-not-the-key-0123");
    let _ = post("coap-3", "and-still-not-the-key-0");
    let right = post("coap-3", &key);
    assert!(!said(&right).contains("c:2.04"), "{}", said(&right));
    gw.wait_audit(&["\"coap-3\"", "backed_off"]);
}

#[test]
fn a_block_wise_upload_is_reassembled_and_a_too_large_body_is_refused_with_4_13() {
    let gw = Gateway::start_with("[coap]\nmax_body_size = 200\n");
    let key = gw.add_device_psk("coap-4");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    // 150 bytes in blocks of 32: five Block1 blocks, one message.
    let body: String = (0..150)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let out = coap(
        gw.coap_dtls,
        "coap-4",
        &key,
        &["-m", "post", "-b", "32", "-e", &body],
        "/t/telemetry/blob",
    );
    assert!(said(&out).contains("c:2.04"), "{}", said(&out));
    let line = sub
        .expect("devices/coap-4/telemetry/blob", T)
        .unwrap_or_else(|seen| panic!("upload not received; saw {seen:?}"));
    assert_eq!(line, format!("devices/coap-4/telemetry/blob {body}"));
    // 300 bytes: over coap.max_body_size, in one piece or in blocks.
    let big = "z".repeat(300);
    for args in [
        vec!["-m", "post", "-e", &big],
        vec!["-m", "post", "-b", "64", "-e", &big],
    ] {
        let out = coap(gw.coap_dtls, "coap-4", &key, &args, "/t/telemetry/blob");
        assert!(said(&out).contains("c:4.13"), "{args:?}: {}", said(&out));
    }
    assert!(
        sub.drain(Duration::from_millis(500))
            .iter()
            .all(|l| !l.contains("zzz"))
    );
    assert!(gw.refusals("validate", "too_large") >= 2);
}

#[test]
fn a_sleepy_device_gets_its_command_in_the_answer_to_a_post_that_waits() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-5");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    // A first session registers the device's mailbox; it keeps collecting after.
    let out = coap(
        gw.coap_dtls,
        "coap-5",
        &key,
        &["-m", "post", "-e", "hello"],
        "/t/telemetry/boot",
    );
    assert!(said(&out).contains("c:2.04"), "{}", said(&out));
    // Queued while it sleeps: the next POST with ?ttd carries it back, piggybacked.
    send_command(&gw, "coap-5", "set/interval", "interval=60");
    let out = coap(
        gw.coap_dtls,
        "coap-5",
        &key,
        &["-m", "post", "-e", "t=1"],
        "/t/telemetry/x?ttd=5",
    );
    let shown = said(&out);
    let answer = shown
        .lines()
        .find(|l| l.contains("t:ACK c:2.04"))
        .unwrap_or_else(|| panic!("no 2.04: {shown}"));
    assert!(answer.contains("interval=60"), "{answer}");
    assert!(
        answer.contains("Location-Path:set, Location-Path:interval"),
        "{answer}"
    );
    sub.expect("devices/coap-5/telemetry/x t=1", T)
        .expect("the telemetry too");
    // Nothing queued: the request is acknowledged at once, and the command that comes
    // while it waits is the separate answer.
    let mut cmd = Command::new("stdbuf");
    cmd.args([
        "-oL", CLIENT, "-u", "coap-5", "-k", &key, "-B", "15", "-v", "7",
    ])
    .args(["-m", "post", "-e", "t=2"])
    .arg(format!("coaps://{}/t/telemetry/x?ttd=10", gw.coap_dtls));
    let waiting = Sub::spawn(cmd, CLIENT);
    waiting
        .expect("t:ACK c:0.00", T)
        .unwrap_or_else(|seen| panic!("no empty ACK; saw {seen:?}"));
    send_command(&gw, "coap-5", "reboot", "now");
    let answer = waiting
        .expect("c:2.04", T)
        .unwrap_or_else(|seen| panic!("no separate answer; saw {seen:?}"));
    assert!(
        answer.contains("t:CON") && answer.contains("now"),
        "{answer}"
    );
}

#[test]
fn a_flooding_device_is_told_4_29_with_max_age_and_quarantined_by_its_behaviour_model() {
    let gw = Gateway::start_all(
        "[behaviour]\nmax_limit_hits = 3\n",
        "",
        "messages_per_second = 0.2\nmessage_burst = 2.0\n",
    );
    let key = gw.add_device_psk("coap-6");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let mut told = Vec::new();
    for n in 0..10 {
        let out = coap(
            gw.coap_dtls,
            "coap-6",
            &key,
            &["-m", "post", "-e", &format!("n={n}")],
            "/t/telemetry/flood",
        );
        told.push(said(&out));
    }
    // The answers, without the client's debug lines.
    let answers: Vec<String> = told
        .iter()
        .filter_map(|t| t.lines().find(|l| l.contains("t:ACK")).map(str::to_string))
        .collect();
    let limited: Vec<&String> = answers.iter().filter(|a| a.contains("c:4.29")).collect();
    assert!(!limited.is_empty(), "no 4.29 among: {answers:?}");
    assert!(
        limited.iter().all(|a| a.contains("Max-Age:")),
        "4.29 without Max-Age: {limited:?}"
    );
    gw.wait_audit(&["\"quarantine\"", "\"coap-6\"", "normal → quarantined"]);
    let list = gw.cli_ok(&["quarantine", "list"]);
    assert!(
        list.contains("coap-6") && list.contains("quarantined"),
        "{list}"
    );
    // Quarantined: its messages are taken (2.04, so it does not retry) and dropped.
    let out = coap(
        gw.coap_dtls,
        "coap-6",
        &key,
        &["-m", "post", "-e", "after"],
        "/t/telemetry/flood",
    );
    assert!(said(&out).contains("c:2.04"), "{}", said(&out));
    assert!(
        !sub.drain(Duration::from_secs(1))
            .iter()
            .any(|l| l.contains("after")),
        "a quarantined device's message reached a service"
    );
}

// What coap-client cannot show: the gateway's side of the protocol duties, driven by
// a device written with the CoAP crate's own client (dimpl as a DTLS PSK client).

use coap_lite::{MessageType, RequestType, ResponseType};
use portcullis_coap::client::{Client, Request};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn device(gw: &Gateway, id: &str, key: &str) -> Client {
    Client::connect(gw.coap_dtls, id, key.as_bytes(), T)
        .await
        .unwrap_or_else(|e| panic!("{id}: {e}"))
}

#[test]
fn a_retransmitted_request_is_answered_again_and_forwarded_once() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-7");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-7", &key).await;
        let (id, token, bytes) = dev.encode(&Request::post("t/telemetry/once", b"one"));
        let first = dev.exchange(id, &token, &bytes, true, T).await.unwrap();
        // The same message id again, as after a lost ACK: the same answer.
        let again = dev.exchange(id, &token, &bytes, true, T).await.unwrap();
        assert_eq!(first.code, ResponseType::Changed);
        assert_eq!(again, first);
        // A ping is answered with RST; an unknown resource with 4.04.
        dev.send_raw(&[0x40, 0x00, 0x12, 0x34]).await.unwrap();
        let rst = dev.recv(T).await.unwrap().expect("an answer to the ping");
        assert_eq!(rst, vec![0x70, 0x00, 0x12, 0x34]);
        let r = dev
            .request(
                &Request {
                    method: RequestType::Get,
                    ..Request::post("nothing/here", b"")
                },
                T,
            )
            .await
            .unwrap();
        assert_eq!(r.code, ResponseType::NotFound);
    });
    let got = sub.drain(Duration::from_secs(1));
    let once: Vec<&String> = got
        .iter()
        .filter(|l| l.contains("telemetry/once"))
        .collect();
    assert_eq!(once.len(), 1, "forwarded {} times: {got:?}", once.len());
    assert_eq!(gw.metric("portcullis_coap_duplicates_total"), 1);
}

#[test]
fn an_unacknowledged_notification_is_retransmitted_then_dropped_and_the_command_kept() {
    // ACK_TIMEOUT 200 ms: sent at 0, ~0.2, ~0.6, ~1.4, ~3 s, given up at ~6 s.
    let gw = Gateway::start_with("[coap]\nack_timeout = \"200ms\"\n");
    let key = gw.add_device_psk("coap-8");
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-8", &key).await;
        let observe = Request {
            method: RequestType::Get,
            observe: Some(0),
            ..Request::post("c", b"")
        };
        let first = dev.request(&observe, T).await.unwrap();
        assert_eq!(first.code, ResponseType::Content);
        assert!(first.observe.is_some(), "{first:?}");
        send_command(&gw, "coap-8", "blink", "twice");
        // Never acknowledged: sent again (ACK_TIMEOUT, doubling), four times, then
        // given up.
        let mut seen = Vec::new();
        while let Some(n) = dev
            .next_message(Duration::from_secs(60), false)
            .await
            .unwrap()
        {
            assert_eq!(n.kind, MessageType::Confirmable);
            assert_eq!(n.payload, b"twice");
            assert_eq!(n.token, first.token, "the registration's token");
            seen.push(n.message_id);
            if seen.len() == 5 {
                break;
            }
        }
        assert_eq!(seen.len(), 5, "sent once and again four times");
        assert!(
            seen.iter().all(|id| *id == seen[0]),
            "one message id: {seen:?}"
        );
        wait_for(T, || {
            (gw.metric("portcullis_coap_exchanges_timed_out_total") == 1).then_some(())
        })
        .expect("given up after the last retransmission");
        assert_eq!(gw.metric("portcullis_coap_retransmissions_total"), 4);
        // The relation is gone; the command waits for the device's next request.
        let poll = dev
            .request(
                &Request {
                    method: RequestType::Get,
                    ..Request::post("c", b"")
                },
                T,
            )
            .await
            .unwrap();
        assert_eq!(poll.payload, b"twice");
        assert_eq!(poll.location, "blink");
    });
}

#[test]
fn a_reset_notification_drops_the_relation_and_a_new_address_keeps_the_session() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-9");
    runtime().block_on(async {
        let observe = Request {
            method: RequestType::Get,
            observe: Some(0),
            ..Request::post("c", b"")
        };
        // Observing from one address; then the device shows up from another (its
        // NAT mapping changed), handshakes again, and keeps getting notifications on
        // the token it registered with.
        let mut old = device(&gw, "coap-9", &key).await;
        let registered = old.request(&observe, T).await.unwrap();
        let mut moved = device(&gw, "coap-9", &key).await;
        assert_ne!(moved.local_addr().unwrap(), old.local_addr().unwrap());
        gw.wait_audit(&["\"takeover\"", "\"coap-9\""]);
        send_command(&gw, "coap-9", "first", "1");
        let n = moved
            .next_message(T, true)
            .await
            .unwrap()
            .expect("a notification at the new address");
        assert_eq!(
            (n.payload.as_slice(), n.token.clone()),
            (&b"1"[..], registered.token.clone())
        );
        // A device that no longer knows the relation resets the notification: it is
        // dropped, and the command waits for the next poll.
        send_command(&gw, "coap-9", "second", "2");
        let n = moved
            .next_message(T, false)
            .await
            .unwrap()
            .expect("a notification");
        moved.reset(n.message_id).await.unwrap();
        wait_for(T, || {
            (gw.metric("portcullis_coap_observe_dropped_total") == 1).then_some(())
        })
        .expect("the relation dropped on RST");
        let poll = moved
            .request(
                &Request {
                    method: RequestType::Get,
                    ..Request::post("c", b"")
                },
                T,
            )
            .await
            .unwrap();
        assert_eq!(poll.payload, b"2");
        drop(old);
    });
}

#[test]
fn banning_a_coap_device_ends_its_session_and_refuses_it_until_lifted() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-10");
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-10", &key).await;
        let ok = dev
            .request(&Request::post("t/telemetry/a", b"1"), T)
            .await
            .unwrap();
        assert_eq!(ok.code, ResponseType::Changed);
        gw.cli_ok(&["ban", "add", "device/coap-10", "--reason", "stolen key"]);
        gw.wait_audit(&["\"disconnect\"", "\"coap-10\"", "banned"]);
        // The session is over: nothing more is answered on it.
        assert!(
            dev.request(
                &Request::post("t/telemetry/a", b"2"),
                Duration::from_secs(3)
            )
            .await
            .is_err()
        );
        // A new session proves the key, and is refused before any request is read.
        let mut again = device(&gw, "coap-10", &key).await;
        assert!(
            again
                .request(
                    &Request::post("t/telemetry/a", b"3"),
                    Duration::from_secs(3)
                )
                .await
                .is_err()
        );
        gw.wait_audit(&["\"connect\"", "\"refuse\"", "\"coap-10\"", "banned"]);
        gw.cli_ok(&["ban", "remove", "device/coap-10"]);
        let mut back = device(&gw, "coap-10", &key).await;
        let ok = back
            .request(&Request::post("t/telemetry/a", b"4"), T)
            .await
            .unwrap();
        assert_eq!(ok.code, ResponseType::Changed);
    });
}

#[test]
fn a_new_observe_relation_gets_the_devices_retained_command_first() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-11");
    // Retained by a service before the device ever observes.
    gw.add_service_cert("commander");
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client(
            gw.service_tls,
            "commander",
            &[
                "-t",
                "devices/coap-11/commands/config",
                "-m",
                "mode=eco",
                "-q",
                "1",
                "-r",
                "-d",
            ],
        ),
        T,
    );
    assert!(text(&out).contains("received PUBACK"), "{}", text(&out));
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-11", &key).await;
        let observe = Request {
            method: RequestType::Get,
            observe: Some(0),
            ..Request::post("c", b"")
        };
        dev.request(&observe, T).await.unwrap();
        let n = dev
            .next_message(T, true)
            .await
            .unwrap()
            .expect("the retained command");
        assert_eq!(
            (n.payload.as_slice(), n.location.as_str()),
            (&b"mode=eco"[..], "config")
        );
    });
}

/// Services of group "ops" may send commands asking for a response on
/// `devices/+/results`, and read those results.
const OPS: &str = r#"
[service_groups.ops]
trust = ["{data_dir}/pki/ca.pem"]
publish = ["devices/+/commands/#", "devices/+/results"]
subscribe = ["devices/+/results"]
"#;

#[test]
fn a_device_posts_a_commands_result_to_its_response_topic_with_the_correlation_data() {
    let gw = Gateway::start_with(&format!("{OPS}\n[coap]\nmax_body_size = 64\n"));
    let key = gw.add_device_psk("coap-12");
    gw.issue("ops");
    gw.cli_ok(&["service", "add", "ops", "--cert-any", "--group", "ops"]);
    // The reader needs an identity of its own (one session per identity).
    gw.issue("ops-reader");
    gw.cli_ok(&[
        "service",
        "add",
        "ops-reader",
        "--cert-any",
        "--group",
        "ops",
    ]);
    let results = Sub::start(&gw.client(
        gw.service_tls,
        "ops-reader",
        &[
            "-t",
            "devices/+/results",
            "-v",
            "-V",
            "mqttv5",
            "-F",
            "%t %p cd=%D",
        ],
    ));
    gw.wait_audit(&["\"connect\"", "\"ops-reader\""]);
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-12", &key).await;
        let observe = Request {
            method: RequestType::Get,
            observe: Some(0),
            ..Request::post("c", b"")
        };
        dev.request(&observe, T).await.unwrap();
        let args = gw.client(
            gw.service_tls,
            "ops",
            &[
                "-t",
                "devices/coap-12/commands/selftest",
                "-m",
                "run",
                "-q",
                "1",
                "-d",
                "-V",
                "mqttv5",
                "-D",
                "publish",
                "response-topic",
                "devices/coap-12/results",
                "-D",
                "publish",
                "correlation-data",
                "req-42",
            ],
        );
        let out = text(&mosquitto("mosquitto_pub", &args, T));
        assert!(out.contains("received PUBACK"), "{out}");
        let n = dev
            .next_message(T, true)
            .await
            .unwrap()
            .expect("the command");
        assert_eq!(n.payload, b"run");
        let query = n.query.clone();
        let r = query
            .iter()
            .find_map(|q| q.strip_prefix("r="))
            .unwrap_or_else(|| panic!("no r=N in {n:?}"))
            .to_string();
        let path = format!("r/{r}");
        // A result refused (too large) may be posted again.
        let big = [b'x'; 100];
        let refused = dev.request(&Request::post(&path, &big), T).await.unwrap();
        assert_eq!(refused.code, ResponseType::RequestEntityTooLarge);
        let done = dev
            .request(&Request::post(&path, b"passed"), T)
            .await
            .unwrap();
        assert_eq!(done.code, ResponseType::Changed);
        // Once per command: a second result for it is not taken.
        let again = dev
            .request(&Request::post(&path, b"again"), T)
            .await
            .unwrap();
        assert_eq!(again.code, ResponseType::NotFound);
    });
    let line = results
        .expect("devices/coap-12/results", T)
        .unwrap_or_else(|seen| panic!("no result; saw {seen:?}"));
    assert_eq!(line, "devices/coap-12/results passed cd=req-42");
}

#[test]
fn a_command_too_large_for_one_coap_message_is_dropped_and_counted_and_blocks_nothing() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-13");
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-13", &key).await;
        let observe = Request {
            method: RequestType::Get,
            observe: Some(0),
            ..Request::post("c", b"")
        };
        dev.request(&observe, T).await.unwrap();
        send_command(&gw, "coap-13", "firmware", &"x".repeat(2000));
        send_command(&gw, "coap-13", "blink", "small");
        let n = dev
            .next_message(T, true)
            .await
            .unwrap()
            .expect("the small command");
        assert_eq!(
            (n.payload.as_slice(), n.location.as_str()),
            (&b"small"[..], "blink")
        );
    });
    assert_eq!(gw.refusals("deliver", "over_client_maximum_packet_size"), 1);
    gw.wait_audit(&[
        "\"deliver\"",
        "\"coap-13\"",
        "does not fit one CoAP message",
    ]);
}

#[test]
fn a_confirmable_request_is_still_recognised_after_many_non_confirmable_ones() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-14");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-14", &key).await;
        let (id, token, bytes) = dev.encode(&Request::post("t/telemetry/con", b"once"));
        let first = dev.exchange(id, &token, &bytes, true, T).await.unwrap();
        // More non-confirmable requests than the cache holds (coap.dedup_entries 16).
        for n in 0..20 {
            let body = format!("non-{n}");
            let non = Request {
                confirmable: false,
                ..Request::post("t/telemetry/non", body.as_bytes())
            };
            dev.request(&non, T).await.unwrap();
        }
        // The confirmable one again, as after a lost ACK: answered, not forwarded.
        let again = dev.exchange(id, &token, &bytes, true, T).await.unwrap();
        assert_eq!(again, first);
    });
    let got = sub.drain(Duration::from_secs(1));
    let once = got.iter().filter(|l| l.contains("telemetry/con")).count();
    assert_eq!(once, 1, "{got:?}");
}

/// Devices of group "narrow" may publish telemetry only; telemetry must be JSON.
const NARROW: &str = r#"
[device_groups.narrow]
trust = ["{data_dir}/pki/ca.pem"]
publish = ["devices/{id}/telemetry/#"]
[[validation.rules]]
topic = "devices/+/telemetry/json"
format = "json"
"#;

#[test]
fn refusals_say_which_stage_in_their_code_and_payload_and_non_confirmable_posts_go_through() {
    let gw = Gateway::start_with(NARROW);
    let out = gw.cli(&[
        "device",
        "add",
        "coap-15",
        "--group",
        "narrow",
        "--psk-generate",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let key = text(&out)
        .lines()
        .find_map(|l| l.strip_prefix("psk: ").map(|k| k.trim().to_string()))
        .expect("a psk line");
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-15", &key).await;
        // Outside the group's ACL: 4.03, naming the stage.
        let r = dev
            .request(&Request::post("t/status", b"up"), T)
            .await
            .unwrap();
        assert_eq!(r.code, ResponseType::Forbidden);
        assert_eq!(r.payload, b"authorize: topic not allowed by ACL");
        // Not JSON where the rule wants JSON: 4.00, naming the rule.
        let r = dev
            .request(&Request::post("t/telemetry/json", b"not json"), T)
            .await
            .unwrap();
        assert_eq!(r.code, ResponseType::BadRequest);
        assert_eq!(r.payload, b"validate: payload is not JSON");
        // A non-confirmable POST is QoS 0: answered non-confirmable, and delivered.
        let non = Request {
            confirmable: false,
            ..Request::post("t/telemetry/json", br#"{"ok":1}"#)
        };
        let r = dev.request(&non, T).await.unwrap();
        assert_eq!(
            (r.kind, r.code),
            (MessageType::NonConfirmable, ResponseType::Changed)
        );
    });
    sub.expect(r#"devices/coap-15/telemetry/json {"ok":1}"#, T)
        .expect("the non-confirmable message delivered");
    assert!(
        !sub.drain(Duration::from_millis(300))
            .iter()
            .any(|l| l.contains("not json"))
    );
    assert_eq!(gw.refusals("authorize", "topic_not_allowed"), 1);
    assert_eq!(gw.refusals("validate", "not_json"), 1);
}

#[test]
fn a_reload_that_removes_an_idle_devices_group_ends_its_session() {
    let group = "[device_groups.meters]\npublish = [\"devices/{id}/#\"]\n";
    let gw = Gateway::start_with(group);
    let out = gw.cli_ok(&[
        "device",
        "add",
        "coap-m1",
        "--group",
        "meters",
        "--psk-generate",
    ]);
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("psk: "))
        .unwrap_or_else(|| panic!("no psk line in {out:?}"))
        .trim()
        .to_string();
    runtime().block_on(async {
        let mut dev = device(&gw, "coap-m1", &key).await;
        let ok = dev
            .request(&Request::post("t/telemetry/a", b"1"), T)
            .await
            .unwrap();
        assert_eq!(ok.code, ResponseType::Changed);
        // The session is idle from here on: the reload alone has to reach it.
        let text = std::fs::read_to_string(&gw.config).unwrap();
        assert!(text.contains(group), "config has no {group:?}");
        std::fs::write(&gw.config, text.replace(group, "")).unwrap();
        let out = gw.cli_ok(&["config", "reload"]);
        assert!(out.contains("reloaded"), "{out}");
        gw.wait_audit(&[
            "\"disconnect\"",
            "\"coap-m1\"",
            "group removed by a configuration reload",
        ]);
    });
}

/// `coap-client-openssl` on the plain CoAP listener, the device id and its secret in
/// options 65001 and 65003 (`None` sends neither).
fn plain(gw: &Gateway, creds: Option<(&str, &str)>, args: &[&str], path: &str) -> Output {
    let mut cmd = Command::new(CLIENT);
    cmd.args(["-B", "3", "-v", "7"]);
    if let Some((id, secret)) = creds {
        cmd.args([
            "-O",
            &format!("65001,{id}"),
            "-O",
            &format!("65003,{secret}"),
        ]);
    }
    cmd.args(args)
        .arg(format!("coap://{}{path}", gw.coap_plain))
        .output()
        .unwrap_or_else(|e| panic!("{CLIENT} (Debian libcoap3-bin): {e}"))
}

#[test]
fn plain_coap_on_loopback_takes_a_devices_secret_and_answers_4_01_without_the_right_one() {
    let gw = Gateway::start();
    let out = gw.cli_stdin(
        &["device", "add", "plain-1", "--secret-stdin"],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let post = |creds| plain(&gw, creds, &["-m", "post", "-e", "7.5"], "/t/telemetry/t");
    let ok = post(Some(("plain-1", SECRET)));
    assert!(
        said(&ok).contains("c:2.04"),
        "no 2.04 Changed: {}",
        said(&ok)
    );
    let line = sub
        .expect("7.5", T)
        .unwrap_or_else(|seen| panic!("telemetry not received; saw {seen:?}"));
    assert_eq!(line, "devices/plain-1/telemetry/t 7.5");
    let audit = gw.wait_audit(&["\"connect\"", "\"plain-1\"", "\"coap\""]);
    assert!(audit.contains("secret"), "{audit}");
    // A wrong secret, and no credentials at all: 4.01, nothing published.
    let wrong = post(Some(("plain-1", "not-the-secret-at-all-0123456789")));
    assert!(said(&wrong).contains("c:4.01"), "{}", said(&wrong));
    gw.wait_audit(&["\"plain-1\"", "bad_secret"]);
    let none = post(None);
    assert!(said(&none).contains("c:4.01"), "{}", said(&none));
    assert!(sub.expect("never", Duration::from_millis(300)).is_err());
}

/// A plain CoAP request from `socket`: a confirmable POST of `body` to `/t/telemetry/t`,
/// with the device id and secret when given; the answer's code.
fn plain_post(
    socket: &std::net::UdpSocket,
    to: SocketAddr,
    message_id: u16,
    creds: Option<(&str, &str)>,
    body: &[u8],
) -> Option<ResponseType> {
    use coap_lite::{CoapOption, MessageClass, Packet};
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = message_id;
    p.set_token(message_id.to_be_bytes().to_vec());
    p.add_option(CoapOption::UriPath, b"t".to_vec());
    p.add_option(CoapOption::UriPath, b"telemetry".to_vec());
    p.add_option(CoapOption::UriPath, b"t".to_vec());
    if let Some((id, secret)) = creds {
        p.add_option(CoapOption::Unknown(65001), id.as_bytes().to_vec());
        p.add_option(CoapOption::Unknown(65003), secret.as_bytes().to_vec());
    }
    p.payload = body.to_vec();
    socket
        .send_to(&p.to_bytes_with_limit(2048).unwrap(), to)
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    match Packet::from_bytes(&buf[..n]).ok()?.header.code {
        MessageClass::Response(code) => Some(code),
        _ => None,
    }
}

#[test]
fn every_plain_coap_request_carries_the_devices_credentials_or_is_not_read() {
    let gw = Gateway::start();
    for id in ["plain-2", "plain-3"] {
        let out = gw.cli_stdin(&["device", "add", id, "--secret-stdin"], Some(SECRET));
        assert!(out.status.success(), "{}", text(&out));
    }
    let sub = service_sub(&gw, "devices/+/telemetry/#");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let to = gw.coap_plain;
    let post = |id, creds, body: &[u8]| plain_post(&socket, to, id, creds, body);
    assert_eq!(
        post(1, Some(("plain-2", SECRET)), b"1"),
        Some(ResponseType::Changed)
    );
    assert_eq!(sub.expect("1", T).unwrap(), "devices/plain-2/telemetry/t 1");
    // The same address without them (a port another process took, say): 4.01, unread.
    assert_eq!(post(2, None, b"2"), Some(ResponseType::Unauthorized));
    // Or with the device's id and a wrong secret: a new login, refused.
    assert_eq!(
        post(
            3,
            Some(("plain-2", "not-the-secret-at-all-0123456789")),
            b"3"
        ),
        Some(ResponseType::Unauthorized)
    );
    let published = sub.drain(Duration::from_millis(500));
    assert!(
        published.is_empty(),
        "refused requests were published: {published:?}"
    );
    // Another device's credentials from that address: a session of its own.
    assert_eq!(
        post(4, Some(("plain-3", SECRET)), b"4"),
        Some(ResponseType::Changed)
    );
    assert_eq!(sub.expect("4", T).unwrap(), "devices/plain-3/telemetry/t 4");
    // A request over coap-lite's default size limit (1280 bytes) still loses its
    // options (it was passed on with them, and refused 4.02).
    let big = vec![b'7'; 1400];
    assert_eq!(
        post(5, Some(("plain-3", SECRET)), &big),
        Some(ResponseType::Changed)
    );
}

#[test]
fn an_observe_over_plain_coap_is_answered_as_a_poll_and_keeps_no_relation() {
    use coap_lite::{CoapOption, MessageClass, Packet};
    let gw = Gateway::start();
    let out = gw.cli_stdin(
        &["device", "add", "plain-4", "--secret-stdin"],
        Some(SECRET),
    );
    assert!(out.status.success(), "{}", text(&out));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Get);
    p.header.message_id = 7;
    p.set_token(vec![7]);
    p.add_option(CoapOption::Observe, vec![]);
    p.add_option(CoapOption::UriPath, b"c".to_vec());
    p.add_option(CoapOption::Unknown(65001), b"plain-4".to_vec());
    p.add_option(CoapOption::Unknown(65003), SECRET.as_bytes().to_vec());
    socket
        .send_to(&p.to_bytes().unwrap(), gw.coap_plain)
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    let answer = Packet::from_bytes(&buf[..n]).unwrap();
    assert_eq!(
        answer.header.code,
        MessageClass::Response(ResponseType::Content)
    );
    assert!(
        answer.get_option(CoapOption::Observe).is_none(),
        "a relation was registered over plain CoAP"
    );
    // A command sent now is not pushed to the address.
    send_command(&gw, "plain-4", "reboot", "now");
    socket
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    assert!(socket.recv_from(&mut buf).is_err(), "a notification came");
}
