//! The DTLS endpoint against a real peer: libcoap's `coap-client-openssl` (Debian
//! `libcoap3-bin`), with a pre-shared key. Handshakes that succeed, fail, stall, and
//! datagrams that are garbage.

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};
use portcullis_coap::dtls::{self, Closed, Endpoint, Event, PskStore, Settings};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const CLIENT: &str = "coap-client-openssl";
const KEY: &str = "dev1-pre-shared-key-0123";
const T: Duration = Duration::from_secs(15);

struct Keys(HashMap<String, Vec<u8>>);

impl PskStore for Keys {
    fn psk(&self, identity: &str) -> Option<Vec<u8>> {
        self.0.get(identity).cloned()
    }
}

async fn endpoint(settings: Settings) -> Endpoint {
    let keys = Keys(HashMap::from([(
        "dev1".to_string(),
        KEY.as_bytes().to_vec(),
    )]));
    dtls::bind("127.0.0.1:0".parse().unwrap(), settings, Arc::new(keys))
        .await
        .unwrap()
}

/// `coap-client-openssl -u ID -k KEY coaps://ADDR/x`, in its own thread: its output.
fn coap_get(addr: SocketAddr, id: &str, key: &str) -> tokio::task::JoinHandle<String> {
    let (id, key) = (id.to_string(), key.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new(CLIENT)
            .args(["-m", "get", "-B", "4", "-u", &id, "-k", &key])
            .arg(format!("coaps://{addr}/x"))
            .output()
            .unwrap_or_else(|e| panic!("{CLIENT} (Debian libcoap3-bin): {e}"));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A piggybacked 2.05 answer to a confirmable request: same message id and token.
fn content_reply(request: &[u8], payload: &[u8]) -> Vec<u8> {
    let tkl = usize::from(request[0] & 0x0f);
    let mut out = vec![0x60 | request[0] & 0x0f, 0x45, request[2], request[3]];
    out.extend_from_slice(&request[4..4 + tkl]);
    out.push(0xff);
    out.extend_from_slice(payload);
    out
}

async fn next(ep: &mut Endpoint) -> Event {
    tokio::time::timeout(T, ep.events.recv())
        .await
        .expect("an event in time")
        .expect("the endpoint runs")
}

/// A real ClientHello (from dimpl as a client) for `identity`, to send by hand.
fn client_hello(identity: &str) -> Vec<u8> {
    struct Fixed;
    impl PskResolver for Fixed {
        fn resolve(&self, _: &[u8]) -> Option<Vec<u8>> {
            Some(b"whatever-key-0123456".to_vec())
        }
    }
    let config = Config::builder()
        .with_psk_client(identity.as_bytes().to_vec(), Arc::new(Fixed))
        .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
        .dtls13_cipher_suites(&[])
        .build()
        .unwrap();
    let now = std::time::Instant::now();
    let mut client = Dtls::new_12_psk(Arc::new(config), now);
    client.set_active(true);
    client.handle_timeout(now).unwrap();
    let mut buf = vec![0; 2048];
    loop {
        match client.poll_output(&mut buf) {
            Output::Packet(p) => return p.to_vec(),
            Output::Timeout(_) => panic!("no ClientHello"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_its_key_completes_the_handshake_and_exchanges_data() {
    let mut ep = endpoint(Settings::default()).await;
    let client = coap_get(ep.local, "dev1", KEY);
    let Event::Connected { peer, identity } = next(&mut ep).await else {
        panic!("not connected");
    };
    assert_eq!(identity, "dev1");
    let Event::Data { peer: from, data } = next(&mut ep).await else {
        panic!("no request");
    };
    assert_eq!(from, peer);
    // A confirmable GET (version 1, type CON, code 0.01).
    assert_eq!((data[0] >> 4, data[1]), (0x4, 0x01), "{data:?}");
    ep.sender.send(peer, content_reply(&data, b"hello dev1"));
    let out = client.await.unwrap();
    assert!(out.contains("hello dev1"), "{out}");
    assert_eq!(ep.stats.handshakes_completed.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_and_an_unknown_identity_fail_alike_and_connect_nothing() {
    let mut ep = endpoint(Settings::default()).await;
    for (id, key) in [("dev1", "not-the-key-of-dev1-at-all"), ("ghost", KEY)] {
        let client = coap_get(ep.local, id, key);
        match next(&mut ep).await {
            Event::Closed {
                why: Closed::HandshakeFailed { identity },
                ..
            } => assert_eq!(identity.as_deref(), Some(id)),
            other => panic!("{id}: {other:?}"),
        }
        let out = client.await.unwrap();
        assert!(!out.contains("hello"), "{out}");
    }
    assert_eq!(ep.stats.handshakes_completed.load(Ordering::Relaxed), 0);
    assert!(ep.stats.handshakes_failed.load(Ordering::Relaxed) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_does_not_hold_up_another_and_ends_at_its_deadline() {
    let mut ep = endpoint(Settings {
        handshake_timeout: Duration::from_secs(6),
        ..Settings::default()
    })
    .await;
    // A ClientHello, and then nothing: a handshake stalled midway.
    let stalled = UdpSocket::bind("127.0.0.1:0").unwrap();
    stalled.send_to(&client_hello("dev1"), ep.local).unwrap();
    let mut buf = [0u8; 2048];
    stalled.set_read_timeout(Some(T)).unwrap();
    let (n, _) = stalled.recv_from(&mut buf).unwrap();
    assert!(n > 0, "a HelloVerifyRequest");
    assert_eq!(ep.stats.half_open.load(Ordering::Relaxed), 1);
    // Another device completes meanwhile, while the stalled one still waits.
    let client = coap_get(ep.local, "dev1", KEY);
    let Event::Connected { peer, .. } = next(&mut ep).await else {
        panic!("not connected");
    };
    assert_eq!(ep.stats.half_open.load(Ordering::Relaxed), 1);
    let Event::Data { data, .. } = next(&mut ep).await else {
        panic!("no request");
    };
    ep.sender.send(peer, content_reply(&data, b"served"));
    assert!(client.await.unwrap().contains("served"));
    // The stalled one ends at its deadline, its slot freed.
    let stalled_addr = stalled.local_addr().unwrap();
    loop {
        match next(&mut ep).await {
            Event::Closed { peer, why } if peer == stalled_addr => {
                assert!(matches!(why, Closed::HandshakeTimeout { .. }), "{why:?}");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(ep.stats.half_open.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_datagrams_past_the_caps_or_not_a_client_hello_make_no_state() {
    let ep = endpoint(Settings {
        max_per_source: 4,
        ..Settings::default()
    })
    .await;
    let hello = client_hello("dev1");
    let sockets: Vec<UdpSocket> = (0..10)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for s in &sockets {
        s.send_to(&hello, ep.local).unwrap();
        // Not a ClientHello: application data, an encrypted handshake (epoch 1), junk.
        s.send_to(&[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 9], ep.local)
            .unwrap();
        s.send_to(&[22, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1], ep.local)
            .unwrap();
        s.send_to(b"GET / HTTP/1.0\r\n\r\n", ep.local).unwrap();
    }
    let stats = &ep.stats;
    for _ in 0..200 {
        if stats.refused_capped.load(Ordering::Relaxed)
            + stats.handshakes_started.load(Ordering::Relaxed)
            >= 10
            && stats.dropped_stray.load(Ordering::Relaxed) >= 18
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.handshakes_started.load(Ordering::Relaxed), 4);
    assert_eq!(stats.refused_capped.load(Ordering::Relaxed), 6);
    // The six sources refused a slot sent three more each; the four admitted ones'
    // went to their own handshake state.
    assert_eq!(stats.dropped_stray.load(Ordering::Relaxed), 18);
    assert_eq!(stats.half_open.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_damaged_handshakes_never_stop_the_endpoint() {
    let mut ep = endpoint(Settings {
        max_per_source: 10_000,
        max_half_open: 10_000,
        ..Settings::default()
    })
    .await;
    let hello = client_hello("dev1");
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut sockets: Vec<UdpSocket> = (0..64)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for i in 0..5000u64 {
        let mut d = if i % 2 == 0 {
            // A real ClientHello with bytes flipped, cut or grown.
            let mut d = hello.clone();
            for _ in 0..1 + rand() % 4 {
                let at = (rand() as usize) % d.len();
                d[at] ^= 1 << (rand() % 8);
            }
            d.truncate(14 + (rand() as usize) % d.len());
            d
        } else {
            (0..rand() % 300).map(|_| rand() as u8).collect()
        };
        if i % 7 == 0 {
            d.extend((0..rand() % 64).map(|_| rand() as u8));
        }
        let s = &mut sockets[(i as usize) % 64];
        let _ = s.send_to(&d, ep.local);
        if i % 500 == 0 {
            let _ = socket.send_to(&d, ep.local);
        }
    }
    // The endpoint still serves a real device.
    let client = coap_get(ep.local, "dev1", KEY);
    let peer = loop {
        if let Event::Connected { peer, identity } = next(&mut ep).await {
            assert_eq!(identity, "dev1");
            break peer;
        }
    };
    let data = loop {
        if let Event::Data { peer: p, data } = next(&mut ep).await
            && p == peer
        {
            break data;
        }
    };
    ep.sender.send(peer, content_reply(&data, b"still here"));
    assert!(client.await.unwrap().contains("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_start_and_end_are_never_dropped_when_the_coap_layer_is_behind() {
    let mut ep = endpoint(Settings {
        queue: 1,
        ..Settings::default()
    })
    .await;
    // A failed handshake's end fills the queue, and nobody reads it yet.
    let failed = coap_get(ep.local, "dev1", "not-the-key-of-dev1-at-all");
    failed.await.unwrap();
    // A device connects meanwhile: its start waits for room instead of being lost.
    let client = coap_get(ep.local, "dev1", KEY);
    for _ in 0..500 {
        if ep.stats.handshakes_completed.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ep.stats.handshakes_completed.load(Ordering::Relaxed), 1);
    assert!(matches!(
        next(&mut ep).await,
        Event::Closed {
            why: Closed::HandshakeFailed { .. },
            ..
        }
    ));
    let peer = loop {
        match next(&mut ep).await {
            Event::Connected { peer, identity } => {
                assert_eq!(identity, "dev1");
                break peer;
            }
            Event::Data { .. } => panic!("data before the session started"),
            Event::Closed { .. } => {}
        }
    };
    let data = loop {
        if let Event::Data { peer: p, data } = next(&mut ep).await
            && p == peer
        {
            break data;
        }
    };
    ep.sender
        .send(peer, content_reply(&data, b"late but whole"));
    assert!(client.await.unwrap().contains("late but whole"));
}
