//! PROXY protocol v2 on the device listeners: a listed load balancer's header makes
//! the client it names the connection's peer (bans, audit); a header from anyone
//! else, and every malformed header, is refused, counted and audited.

mod common;

use common::raw::Raw;
use common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// 127.0.0.1 (where the tests connect from) is the load balancer of both device
/// listeners.
const BEHIND: &str = r#"
[proxy_protocol]
device_plain = ["127.0.0.1"]
device_tls = ["127.0.0.1/32"]
header_timeout = "1s"
"#;

/// A v2 header: `ver_cmd`, `fam`, then an IPv4 address block naming `client`, then
/// `tlvs`.
fn header_with(ver_cmd: u8, fam: u8, client: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let IpAddr::V4(ip) = client.ip() else {
        panic!("IPv4 client")
    };
    let mut h = SIG.to_vec();
    h.extend_from_slice(&[ver_cmd, fam]);
    h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&ip.octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&1883u16.to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

/// PROXY, TCP over IPv4, naming `client`.
fn header(client: &str) -> Vec<u8> {
    header_with(0x21, 0x11, client.parse().unwrap(), &[])
}

/// MQTT 3.1.1 CONNECT through a fresh connection that first sends `prefix`; the
/// CONNACK code, or None when the gateway closed without one.
fn connect_after(gw: &Gateway, from: Option<IpAddr>, prefix: &[u8], id: &str) -> Option<u8> {
    let mut raw = match from {
        Some(ip) => Raw::connect_from(gw.device_plain, ip),
        None => Raw::connect(gw.device_plain),
    };
    raw.send(prefix);
    raw.connect_v4(id, Some((id, SECRET)))
}

#[test]
fn the_balancers_header_names_the_peer_for_the_audit_and_for_bans() {
    let gw = Gateway::start_with(BEHIND);
    gw.add_device_secret("meter-1", SECRET);
    // The header and the CONNECT in one write: the header is read exactly.
    let mut raw = Raw::connect(gw.device_plain);
    let mut bytes = header("203.0.113.7:4242");
    raw.send(&bytes);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
    gw.wait_audit(&["\"connect\"", "\"allow\"", "meter-1", "203.0.113.7:4242"]);
    drop(raw);

    // A ban on the claimed address closes that client, not the balancer's others.
    gw.cli_ok(&["ban", "add", "203.0.113.7/32"]);
    let mut banned = Raw::connect(gw.device_plain);
    banned.send(&bytes);
    assert_eq!(banned.closed_within(T), (true, vec![]));
    assert_eq!(gw.refusals("connect", "banned"), 1);
    gw.wait_audit(&["\"refuse\"", "banned", "203.0.113.7:4242"]);
    bytes = header("203.0.113.8:4243");
    assert_eq!(connect_after(&gw, None, &bytes, "meter-1"), Some(0));

    // Failed logins back off the client named in the header, not the balancer.
    let wrong = header("198.51.100.5:1000");
    for _ in 0..3 {
        let mut raw = Raw::connect(gw.device_plain);
        raw.send(&wrong);
        assert_eq!(
            raw.connect_v4("meter-1", Some(("meter-1", "wrong"))),
            Some(5)
        );
    }
    gw.wait_audit(&["\"refuse\"", "198.51.100.5:1000"]);
    // That client is backed off, even with the right secret...
    assert_eq!(connect_after(&gw, None, &wrong, "meter-1"), Some(5));
    // Counted once the refusal is decided, which may be just after the CONNACK.
    let counted = wait_for(T, || {
        (gw.refusals("connect", "backed_off") == 1).then_some(())
    });
    assert!(counted.is_some(), "backed_off not counted once");
    // ...another client behind the same balancer is not.
    assert_eq!(
        connect_after(&gw, None, &header("198.51.100.6:1000"), "meter-1"),
        Some(0)
    );
}

#[test]
fn connections_that_never_send_their_header_cannot_keep_a_device_out() {
    let gw = Gateway::start_full(BEHIND, "max_unauthenticated = 2");
    gw.add_device_secret("meter-1", SECRET);
    // The bound's worth of connections through the balancer that send nothing.
    let mut silent = Raw::connect(gw.device_plain);
    let _also_silent = Raw::connect(gw.device_plain);
    // A device behind the balancer still gets in: the oldest silent one makes room.
    assert_eq!(
        connect_after(&gw, None, &header("203.0.113.9:5000"), "meter-1"),
        Some(0)
    );
    assert_eq!(silent.closed_within(T), (true, vec![]));
    assert_eq!(gw.refusals("connect", "unauthenticated_shed"), 1);
    gw.wait_audit(&["\"refuse\"", "unauthenticated_shed", "127.0.0.1"]);
}

#[test]
fn a_header_from_a_source_that_is_not_a_balancer_is_refused() {
    let gw = Gateway::start_with(BEHIND);
    gw.add_device_secret("meter-1", SECRET);
    let device: IpAddr = "127.0.0.2".parse().unwrap();
    for claim in [
        header("203.0.113.7:4242"),
        b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 1883\r\n".to_vec(),
    ] {
        let mut raw = Raw::connect_from(gw.device_plain, device);
        raw.send(&claim);
        raw.send(&[0x10, 0x00]);
        assert_eq!(raw.closed_within(T), (true, vec![]));
    }
    assert_eq!(gw.refusals("connect", "proxy_header_not_allowed"), 2);
    let line = gw.wait_audit(&["\"refuse\"", "proxy_header_not_allowed", "127.0.0.2:"]);
    assert!(!line.contains("203.0.113.7"), "{line}");
    // On the TLS listener too, before any handshake.
    let mut raw = Raw::connect_from(gw.device_tls, device);
    raw.send(&header("203.0.113.7:4242"));
    assert_eq!(raw.closed_within(T), (true, vec![]));
    assert_eq!(gw.refusals("connect", "proxy_header_not_allowed"), 3);
    // The same source without a header is a plain device connection.
    assert_eq!(connect_after(&gw, Some(device), b"", "meter-1"), Some(0));
    gw.wait_audit(&["\"connect\"", "\"allow\"", "meter-1", "127.0.0.2:"]);
}

#[test]
fn framing_errors_from_the_balancer_are_refused_and_the_next_connection_works() {
    let gw = Gateway::start_with(BEHIND);
    gw.add_device_secret("meter-1", SECRET);
    let client: SocketAddr = "203.0.113.7:4242".parse().unwrap();
    let good = header("203.0.113.7:4242");
    let with = |at: usize, b: u8| {
        let mut h = good.clone();
        h[at] = b;
        h
    };
    let mut too_long = good.clone();
    too_long[14..16].copy_from_slice(&600u16.to_be_bytes());
    let mut too_short = good.clone();
    too_short[14..16].copy_from_slice(&4u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad signature", with(4, b'X'), "signature"),
        ("version 1 nibble", with(12, 0x11), "version 1 "),
        ("version 3", with(12, 0x31), "version 3"),
        ("command 2", with(12, 0x22), "command 0x2"),
        ("family 4", with(13, 0x41), "family 0x4"),
        ("protocol 3", with(13, 0x13), "transport 0x3"),
        ("UNSPEC family", with(13, 0x01), "family UNSPEC"),
        ("UDP on TCP", with(13, 0x12), "Datagram"),
        ("over the bound", too_long, "over the bound of 512"),
        ("shorter than its addresses", too_short, "too short"),
        (
            "TLV past the end",
            header_with(0x21, 0x11, client, &[0x04, 0x00, 0x09, 1]),
            "TLV at offset 12",
        ),
        (
            "v1 text",
            b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 1883\r\n".to_vec(),
            "version 1 (text)",
        ),
        (
            "no header at all",
            vec![0x10, 0x0C, 0x00, 0x04],
            "signature",
        ),
    ];
    for (n, (what, bytes, words)) in cases.iter().enumerate() {
        // Whatever follows a bad header is never read: here, a valid CONNECT.
        assert_eq!(
            connect_after(&gw, None, bytes, "meter-1"),
            None,
            "{what} was not refused"
        );
        assert_eq!(
            gw.refusals("handshake", "proxy_header_invalid"),
            n as u64 + 1,
            "{what}"
        );
        gw.wait_audit(&["\"refuse\"", "proxy_header_invalid", words, "127.0.0.1:"]);
    }
    let invalid = cases.len() as u64;

    // Truncated: the balancer closes within the header.
    let mut raw = Raw::connect(gw.device_plain);
    raw.send(&good[..20]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(raw.closed_within(T), (true, vec![]));
    assert_eq!(
        gw.refusals("handshake", "proxy_header_invalid"),
        invalid + 1
    );
    gw.wait_audit(&[
        "\"refuse\"",
        "closed within the PROXY header (after 20 bytes)",
    ]);

    // Too slow: part of a header, then nothing (header_timeout = 1s).
    let mut raw = Raw::connect(gw.device_plain);
    raw.send(&good[..10]);
    assert_eq!(raw.closed_within(T), (true, vec![]));
    assert_eq!(gw.refusals("handshake", "proxy_header_timeout"), 1);
    gw.wait_audit(&["\"refuse\"", "proxy_header_timeout", "127.0.0.1:"]);

    // None of it was charged to the client the good header names, nor to the balancer.
    assert_eq!(connect_after(&gw, None, &good, "meter-1"), Some(0));
    gw.wait_audit(&["\"connect\"", "\"allow\"", "203.0.113.7:4242"]);
}

#[test]
fn local_is_the_balancers_own_connection() {
    let gw = Gateway::start_with(BEHIND);
    gw.add_device_secret("meter-1", SECRET);
    // LOCAL (a health check) with an address block the gateway must ignore.
    let local = header_with(0x20, 0x11, "203.0.113.7:4242".parse().unwrap(), &[]);
    let mut raw = Raw::connect(gw.device_plain);
    let own = raw.stream.local_addr().unwrap();
    raw.send(&local);
    assert_eq!(
        raw.connect_v4("meter-1", Some(("meter-1", SECRET))),
        Some(0)
    );
    gw.wait_audit(&["\"connect\"", "\"allow\"", &own.to_string()]);
    assert!(!gw.audit().contains("203.0.113.7"), "{}", gw.audit());
}

/// A one-connection load balancer: accepts on a port of its own, connects to
/// `backend`, writes a header naming `client`, then relays both ways.
fn balancer(backend: SocketAddr, client: &'static str) -> SocketAddr {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = front.local_addr().unwrap();
    std::thread::spawn(move || {
        let (down, _) = front.accept().unwrap();
        let mut up = TcpStream::connect(backend).unwrap();
        up.write_all(&header(client)).unwrap();
        let pipe = |mut from: TcpStream, mut to: TcpStream| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
            })
        };
        let a = pipe(down.try_clone().unwrap(), up.try_clone().unwrap());
        let b = pipe(up, down);
        let _ = a.join();
        let _ = b.join();
    });
    addr
}

#[test]
fn tls_behind_a_balancer_the_header_comes_before_the_handshake() {
    let gw = Gateway::start_with(BEHIND);
    let (cert, key) = gw.add_device_cert("meter-t");
    let front = balancer(gw.device_tls, "198.51.100.20:5555");
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client_cert(
            front,
            "meter-t",
            &cert,
            &key,
            &["-t", "devices/meter-t/telemetry", "-m", "x"],
        ),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    gw.wait_audit(&["\"connect\"", "\"allow\"", "meter-t", "198.51.100.20:5555"]);
    // Straight to the TLS listener from the balancer's address, with no header: refused.
    let out = mosquitto(
        "mosquitto_pub",
        &gw.client_cert(
            gw.device_tls,
            "meter-t",
            &cert,
            &key,
            &["-t", "devices/meter-t/telemetry", "-m", "x"],
        ),
        T,
    );
    assert!(!out.status.success());
    assert_eq!(gw.refusals("handshake", "proxy_header_invalid"), 1);
}

#[test]
fn without_proxy_protocol_a_header_is_not_taken_from_anyone() {
    let gw = Gateway::start();
    gw.add_device_secret("meter-1", SECRET);
    assert_eq!(
        connect_after(&gw, None, &header("203.0.113.7:4242"), "meter-1"),
        None
    );
    assert_eq!(gw.refusals("connect", "malformed_connect"), 1);
    assert!(!gw.audit().contains("203.0.113.7"));
    assert_eq!(connect_after(&gw, None, b"", "meter-1"), Some(0));
}

#[test]
fn a_reload_does_not_change_the_balancers() {
    let gw = Gateway::start_with(BEHIND);
    gw.add_device_secret("meter-1", SECRET);
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        good.replace(
            "device_plain = [\"127.0.0.1\"]",
            "device_plain = [\"127.0.0.2\"]",
        ),
    )
    .unwrap();
    let out = gw.cli(&["config", "reload"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("proxy_protocol changed"),
        "{}",
        text(&out)
    );
    // 127.0.0.1 is still the balancer: its connections still need a header.
    assert_eq!(
        connect_after(&gw, None, &header("203.0.113.9:9"), "meter-1"),
        Some(0)
    );
    assert_eq!(connect_after(&gw, None, b"", "meter-1"), None);
}

#[test]
fn config_check_names_a_bad_balancer_entry() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[proxy_protocol]\ndevice_tls = [\"10.0.0.0/24\", \"10.0.0.0/33\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("proxy_protocol.device_tls[1]") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}

// CoAP over DTLS: a UDP balancer puts a v2 header in front of every datagram.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The CoAP listener's balancer; the tests' other sources (127.0.0.1, 127.0.0.2) are
/// not balancers.
const COAP_BEHIND: &str = r#"
[proxy_protocol]
coap_dtls = ["127.0.0.3"]
"#;
const BALANCER: &str = "127.0.0.3";

/// PROXY, UDP over IPv4, naming `client`.
fn udp_header(client: &str) -> Vec<u8> {
    header_with(0x21, 0x12, client.parse().unwrap(), &[])
}

/// `coap-client-openssl` posting `payload` to `coaps://to/t/telemetry/temp` with
/// `id`'s key, giving up after `wait` seconds; whether it got a 2.04, and what it said.
fn coap_post(to: SocketAddr, id: &str, key: &str, payload: &str, wait: u32) -> (bool, String) {
    let out = std::process::Command::new("coap-client-openssl")
        .args(["-u", id, "-k", key, "-B", &wait.to_string(), "-v", "7"])
        .args(["-m", "post", "-e", payload])
        .arg(format!("coaps://{to}/t/telemetry/temp"))
        .output()
        .expect("coap-client-openssl (Debian libcoap3-bin)");
    let said = text(&out);
    (out.status.success() && said.contains("c:2.04"), said)
}

/// A UDP load balancer: datagrams to its front (127.0.0.1) go to `backend` from
/// 127.0.0.3 with `header` in front of each; answers go back to whoever sent last,
/// as they came. Stops when dropped.
struct Relay {
    front: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(backend: SocketAddr, header: Vec<u8>) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let up = UdpSocket::bind((BALANCER, 0)).unwrap();
        up.connect(backend).unwrap();
        let poll = Some(Duration::from_millis(50));
        front.set_read_timeout(poll).unwrap();
        up.set_read_timeout(poll).unwrap();
        let relay = Relay {
            front: front.local_addr().unwrap(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let (down, up2) = (front.try_clone().unwrap(), up.try_clone().unwrap());
        let (stop, last) = (relay.stop.clone(), client.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    *last.lock().unwrap() = Some(from);
                    let mut d = header.clone();
                    d.extend_from_slice(&buf[..n]);
                    let _ = up.send(&d);
                }
            }
        });
        let stop = relay.stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = up2.recv(&mut buf)
                    && let Some(to) = *client.lock().unwrap()
                {
                    let _ = down.send_to(&buf[..n], to);
                }
            }
        });
        relay
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn coap_behind_a_balancer_the_datagrams_header_names_the_device_for_audit_and_bans() {
    let gw = Gateway::start_with(COAP_BEHIND);
    let key = gw.add_device_psk("coap-p1");
    gw.add_service_cert("analytics");
    let sub = Sub::start(&gw.client(
        gw.service_tls,
        "analytics",
        &["-t", "devices/+/telemetry/#", "-v", "-q", "1"],
    ));
    gw.wait_audit(&["\"connect\"", "\"analytics\""]);
    std::thread::sleep(Duration::from_millis(300));

    let relay = Relay::start(gw.coap_dtls, udp_header("203.0.113.7:4242"));
    let (ok, said) = coap_post(relay.front, "coap-p1", &key, "21.5", 10);
    assert!(ok, "{said}");
    let line = sub
        .expect("21.5", T)
        .unwrap_or_else(|seen| panic!("telemetry not received; saw {seen:?}"));
    assert_eq!(line, "devices/coap-p1/telemetry/temp 21.5");
    let line = gw.wait_audit(&["\"connect\"", "\"allow\"", "coap-p1", "203.0.113.7:4242"]);
    assert!(!line.contains(BALANCER), "{line}");

    // A ban on the claimed address refuses the device behind the balancer...
    gw.cli_ok(&["ban", "add", "203.0.113.7/32"]);
    let (ok, said) = coap_post(relay.front, "coap-p1", &key, "22.5", 3);
    assert!(!ok, "{said}");
    assert!(gw.refusals("connect", "banned") >= 1);
    gw.wait_audit(&["\"refuse\"", "banned", "203.0.113.7"]);
    // ...not another client behind it, nor a device straight from 127.0.0.1.
    let other = Relay::start(gw.coap_dtls, udp_header("203.0.113.8:4242"));
    let (ok, said) = coap_post(other.front, "coap-p1", &key, "23.5", 10);
    assert!(ok, "{said}");
    gw.wait_audit(&["\"connect\"", "\"allow\"", "coap-p1", "203.0.113.8:4242"]);
    let (ok, said) = coap_post(gw.coap_dtls, "coap-p1", &key, "24.5", 10);
    assert!(ok, "{said}");
    gw.wait_audit(&["\"connect\"", "\"allow\"", "coap-p1", "127.0.0.1:"]);
    assert!(sub.expect("24.5", T).is_ok());
}

#[test]
fn coap_local_is_the_balancers_own_datagram() {
    let gw = Gateway::start_with(COAP_BEHIND);
    let key = gw.add_device_psk("coap-p2");
    // LOCAL with an address block the gateway must ignore.
    let local = header_with(0x20, 0x12, "203.0.113.7:4242".parse().unwrap(), &[]);
    let relay = Relay::start(gw.coap_dtls, local);
    let (ok, said) = coap_post(relay.front, "coap-p2", &key, "1", 10);
    assert!(ok, "{said}");
    gw.wait_audit(&["\"connect\"", "\"allow\"", "coap-p2", "127.0.0.3:"]);
    assert!(!gw.audit().contains("203.0.113.7"), "{}", gw.audit());
}

#[test]
fn coap_datagrams_with_a_header_from_a_source_that_is_not_a_balancer_are_refused() {
    let gw = Gateway::start_with(COAP_BEHIND);
    let key = gw.add_device_psk("coap-p3");
    let raw = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut claim = udp_header("203.0.113.7:4242");
    claim.extend_from_slice(&[22, 0xfe, 0xff, 0, 0]);
    raw.send_to(&claim, gw.coap_dtls).unwrap();
    raw.send_to(
        b"PROXY UDP4 203.0.113.7 127.0.0.1 4242 5684\r\n",
        gw.coap_dtls,
    )
    .unwrap();
    let counted = wait_for(T, || {
        (gw.refusals("connect", "proxy_header_not_allowed") == 2).then_some(())
    });
    assert!(counted.is_some(), "not counted twice");
    let line = gw.wait_audit(&["\"refuse\"", "proxy_header_not_allowed", "127.0.0.2:"]);
    assert!(!line.contains("203.0.113.7"), "{line}");
    // UDP sources can be forged: a burst from many is each counted, and the audit
    // gets about a line a second of it, not a line each.
    let before = gw.refusals("connect", "proxy_header_not_allowed");
    for n in 3..=40u8 {
        let forged = UdpSocket::bind(format!("127.0.2.{n}:0")).unwrap();
        forged.send_to(&claim, gw.coap_dtls).unwrap();
    }
    let counted = wait_for(T, || {
        (gw.refusals("connect", "proxy_header_not_allowed") == before + 38).then_some(())
    });
    assert!(counted.is_some(), "each counted");
    // The same source without a header is a device like any other.
    let (ok, said) = coap_post(gw.coap_dtls, "coap-p3", &key, "1", 10);
    assert!(ok, "{said}");
    // Its login is written after the burst's refusals, in order.
    let audit = gw.wait_audit(&["\"connect\"", "\"allow\"", "coap-p3"]);
    assert!(!audit.is_empty());
    let lines = gw
        .audit()
        .lines()
        .filter(|l| l.contains("proxy_header_not_allowed") && l.contains("127.0.2."))
        .count();
    assert!(lines <= 3, "{lines} audit lines for 38 forged sources");
}

#[test]
fn coap_framing_errors_from_the_balancer_are_refused_and_the_next_datagram_works() {
    let gw = Gateway::start_with(COAP_BEHIND);
    let key = gw.add_device_psk("coap-p4");
    let good = udp_header("203.0.113.7:4242");
    let with = |at: usize, b: u8| {
        let mut h = good.clone();
        h[at] = b;
        h
    };
    let mut past_the_end = good.clone();
    past_the_end[14..16].copy_from_slice(&100u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad signature", with(4, b'X'), "signature"),
        (
            "v1 text",
            b"PROXY UDP4 203.0.113.7 127.0.0.1 4242 5684\r\n".to_vec(),
            "version 1 (text)",
        ),
        ("version 3", with(12, 0x31), "version 3"),
        ("command 2", with(12, 0x22), "command 0x2"),
        (
            "truncated",
            good[..20].to_vec(),
            "ends within its PROXY header",
        ),
        ("STREAM on UDP", with(13, 0x11), "Stream"),
        (
            "length past the datagram",
            past_the_end,
            "ends within its PROXY header",
        ),
        (
            "TLV past the end",
            header_with(
                0x21,
                0x12,
                "203.0.113.7:4242".parse().unwrap(),
                &[4, 0, 9, 1],
            ),
            "TLV at offset 12",
        ),
        // A ClientHello's first bytes, with no header.
        ("no header at all", vec![22, 0xfe, 0xff, 0, 0], "signature"),
    ];
    let balancer = UdpSocket::bind((BALANCER, 0)).unwrap();
    let lines = |words: &str| {
        gw.audit()
            .lines()
            .filter(|l| {
                l.contains("proxy_header_invalid") && l.contains(words) && l.contains("127.0.0.3:")
            })
            .count()
    };
    let mut seen = std::collections::HashSet::new();
    for (n, (what, bytes, words)) in cases.iter().enumerate() {
        let before = lines(words);
        balancer.send_to(bytes, gw.coap_dtls).unwrap();
        let counted = wait_for(T, || {
            (gw.refusals("handshake", "proxy_header_invalid") == n as u64 + 1).then_some(())
        });
        assert!(counted.is_some(), "{what} was not counted");
        // The first of each kind is audited in its own words (a second of the same
        // kind within the second is only counted).
        if seen.insert(*words) {
            let audited = wait_for(T, || (lines(words) > before).then_some(()));
            assert!(audited.is_some(), "{what}: no audit line with {words:?}");
        }
    }
    // Forged datagrams of every length cannot write a line each.
    let invalid = gw.refusals("handshake", "proxy_header_invalid");
    for len in 17..57 {
        balancer
            .send_to(&good[..len.min(good.len() - 1)], gw.coap_dtls)
            .unwrap();
    }
    let counted = wait_for(T, || {
        (gw.refusals("handshake", "proxy_header_invalid") == invalid + 40).then_some(())
    });
    assert!(counted.is_some(), "each counted");
    // Straight from the balancer's address without a header: refused too.
    let (ok, _) = coap_post_from_balancer(&gw, "coap-p4", &key);
    assert!(!ok);
    // None of it was charged to the client a good header names.
    let relay = Relay::start(gw.coap_dtls, good);
    let (ok, said) = coap_post(relay.front, "coap-p4", &key, "1", 10);
    assert!(ok, "{said}");
    gw.wait_audit(&["\"connect\"", "\"allow\"", "coap-p4", "203.0.113.7:4242"]);
    // Written after the burst, so the burst's lines are in: a few, not 40.
    let burst = lines("ends within its PROXY header");
    assert!(burst <= 4, "{burst} audit lines for 40 truncated headers");
}

/// `coap-client-openssl` bound to the balancer's address, with no header.
fn coap_post_from_balancer(gw: &Gateway, id: &str, key: &str) -> (bool, String) {
    let out = std::process::Command::new("coap-client-openssl")
        .args(["-u", id, "-k", key, "-B", "3", "-a", BALANCER])
        .args(["-m", "post", "-e", "x"])
        .arg(format!("coaps://{}/t/telemetry/temp", gw.coap_dtls))
        .output()
        .expect("coap-client-openssl (Debian libcoap3-bin)");
    let said = text(&out);
    (out.status.success() && said.contains("c:2.04"), said)
}

#[test]
fn without_a_coap_balancer_a_header_is_only_a_stray_datagram() {
    let gw = Gateway::start();
    let key = gw.add_device_psk("coap-p5");
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.send_to(&udp_header("203.0.113.7:4242"), gw.coap_dtls)
        .unwrap();
    let (ok, said) = coap_post(gw.coap_dtls, "coap-p5", &key, "1", 10);
    assert!(ok, "{said}");
    assert_eq!(gw.refusals("connect", "proxy_header_not_allowed"), 0);
    assert!(!gw.audit().contains("203.0.113.7"));
}
