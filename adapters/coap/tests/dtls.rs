//! The DTLS endpoint against real peers: libcoap's `coap-client-openssl` (Debian
//! `libcoap3-bin`) and a device driven by hand (dimpl as a client), with a pre-shared
//! key. Handshakes that succeed, fail, stall, are spoofed or replayed, come again from
//! a device that rebooted; datagrams that are garbage, before a handshake and after.

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};
use portcullis_coap::dtls::{self, Admit, AdmitAll, Closed, Endpoint, Event, PskStore, Settings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

const CLIENT: &str = "coap-client-openssl";
const KEY: &str = "dev1-pre-shared-key-0123";
const T: Duration = Duration::from_secs(15);

struct Keys(HashMap<String, Vec<u8>>);

impl PskStore for Keys {
    fn psk(&self, identity: &str) -> Option<Vec<u8>> {
        // A store that breaks: what a bug in the registry would look like.
        assert_ne!(identity, "boom", "the key store failed");
        self.0.get(identity).cloned()
    }
}

fn keys() -> Arc<Keys> {
    Arc::new(Keys(HashMap::from([
        ("dev1".to_string(), KEY.as_bytes().to_vec()),
        ("dev2".to_string(), KEY.as_bytes().to_vec()),
    ])))
}

async fn endpoint(settings: Settings) -> Endpoint {
    endpoint_with(settings, Arc::new(AdmitAll)).await
}

async fn endpoint_with(settings: Settings, gate: Arc<dyn Admit>) -> Endpoint {
    dtls::bind("127.0.0.1:0".parse().unwrap(), settings, keys(), gate)
        .await
        .unwrap()
}

fn stat(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Wait until `done` holds (the endpoint works on its own task).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < deadline, "not in time: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `coap-client-openssl -u ID -k KEY coaps://ADDR/x` (from local port `port` if
/// given), in its own thread: what it printed.
fn coap_get(
    addr: SocketAddr,
    id: &str,
    key: &str,
    port: Option<u16>,
) -> tokio::task::JoinHandle<String> {
    let (id, key) = (id.to_string(), key.to_string());
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(CLIENT);
        command.args(["-m", "get", "-B", "4", "-u", &id, "-k", &key]);
        if let Some(port) = port {
            command.args(["-p", &port.to_string()]);
        }
        let out = command
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

/// The next event about `peer`, others skipped.
async fn next_of(ep: &mut Endpoint, peer: SocketAddr) -> Event {
    loop {
        let event = next(ep).await;
        let of = match &event {
            Event::Connected { peer, .. }
            | Event::Data { peer, .. }
            | Event::Closed { peer, .. } => *peer,
        };
        if of == peer {
            return event;
        }
    }
}

/// Why a session ended, if the event says one did.
trait ClosedWhy {
    fn closed(self) -> Option<Closed>;
}

impl ClosedWhy for Event {
    fn closed(self) -> Option<Closed> {
        match self {
            Event::Closed { why, .. } => Some(why),
            _ => None,
        }
    }
}

struct Fixed(Vec<u8>);

impl PskResolver for Fixed {
    fn resolve(&self, _: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

/// A device driven by hand: dimpl as a client on its own socket.
struct Device {
    dtls: Dtls,
    socket: UdpSocket,
    server: SocketAddr,
    buf: Vec<u8>,
    connected: bool,
    inbox: Vec<Vec<u8>>,
    /// The last datagram it sent.
    sent: Vec<u8>,
}

impl Device {
    async fn new(server: SocketAddr, identity: &str, key: &[u8]) -> Device {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Device::on(socket, server, identity, key)
    }

    fn on(socket: UdpSocket, server: SocketAddr, identity: &str, key: &[u8]) -> Device {
        let config = Config::builder()
            .with_psk_client(identity.as_bytes().to_vec(), Arc::new(Fixed(key.to_vec())))
            .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .build()
            .unwrap();
        let now = std::time::Instant::now();
        let mut dtls = Dtls::new_12_psk(Arc::new(config), now);
        dtls.set_active(true);
        dtls.handle_timeout(now).unwrap();
        Device {
            dtls,
            socket,
            server,
            buf: vec![0; 4096],
            connected: false,
            inbox: Vec::new(),
            sent: Vec::new(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Send what dimpl has for the wire; keep what it has for us.
    async fn pump(&mut self) {
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => {
                    self.sent = p.to_vec();
                    self.socket.send_to(&self.sent, self.server).await.unwrap();
                }
                Output::Connected => self.connected = true,
                Output::ApplicationData(d) => self.inbox.push(d.to_vec()),
                Output::Timeout(_) => return,
                _ => {}
            }
        }
    }

    /// One datagram from the server, if one comes within `within`.
    async fn receive(&mut self, within: Duration) -> Option<Vec<u8>> {
        let mut buf = [0u8; 4096];
        let (n, _) = tokio::time::timeout(within, self.socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf[..n].to_vec())
    }

    /// Feed dimpl one datagram from the server (or its clock, if none comes).
    async fn step(&mut self) {
        if let Some(d) = self.receive(Duration::from_millis(50)).await {
            let _ = self.dtls.handle_packet(&d);
        }
        let _ = self.dtls.handle_timeout(std::time::Instant::now());
        self.pump().await;
    }

    /// Run the handshake; whether it completed within `within`.
    async fn handshake(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        self.pump().await;
        while !self.connected && Instant::now() < deadline {
            self.step().await;
        }
        self.connected
    }

    /// Only as far as the first handshake state: ClientHello, the HelloVerifyRequest
    /// from the endpoint, the ClientHello with its cookie; then silence.
    async fn hello_with_cookie(&mut self) {
        self.pump().await;
        let hvr = self.receive(T).await.expect("a HelloVerifyRequest");
        assert_eq!(hvr[13], 3, "a HelloVerifyRequest: {hvr:?}");
        self.dtls.handle_packet(&hvr).unwrap();
        self.pump().await;
    }

    async fn send(&mut self, data: &[u8]) {
        self.dtls.send_application_data(data).unwrap();
        self.pump().await;
    }

    /// The next datagram of application data, if one comes within `T`.
    async fn data(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + T;
        while self.inbox.is_empty() && Instant::now() < deadline {
            self.step().await;
        }
        (!self.inbox.is_empty()).then(|| self.inbox.remove(0))
    }
}

/// A confirmable GET /x, message id `id`, token [id as u8].
fn get(id: u16) -> Vec<u8> {
    let [a, b] = id.to_be_bytes();
    vec![0x41, 0x01, a, b, b, 0xb1, b'x']
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_its_key_completes_the_handshake_and_exchanges_data() {
    let mut ep = endpoint(Settings::default()).await;
    let client = coap_get(ep.local, "dev1", KEY, None);
    let Event::Connected {
        peer,
        identity,
        session,
        ..
    } = next(&mut ep).await
    else {
        panic!("not connected");
    };
    assert_eq!(identity, "dev1");
    let Event::Data { peer: from, data } = next(&mut ep).await else {
        panic!("no request");
    };
    assert_eq!(from, peer);
    // A confirmable GET (version 1, type CON, code 0.01).
    assert_eq!((data[0] >> 4, data[1]), (0x4, 0x01), "{data:?}");
    ep.sender
        .send(peer, session, content_reply(&data, b"hello dev1"));
    let out = client.await.unwrap();
    assert!(out.contains("hello dev1"), "{out}");
    assert_eq!(stat(&ep.stats.handshakes_completed), 1);
    // The state was made only after the cookie came back.
    assert!(stat(&ep.stats.hello_verify_sent) >= 1);
    assert_eq!(stat(&ep.stats.handshakes_started), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_and_an_unknown_identity_fail_alike_and_connect_nothing() {
    let mut ep = endpoint(Settings::default()).await;
    for (id, key) in [("dev1", "not-the-key-of-dev1-at-all"), ("ghost", KEY)] {
        let client = coap_get(ep.local, id, key, None);
        match next(&mut ep).await {
            Event::Closed {
                why: Closed::HandshakeFailed { identity },
                ..
            } => assert_eq!(identity.as_deref(), Some(id)),
            other => panic!("{id}: {other:?}"),
        }
        // The client saw its handshake fail: it could not send its request.
        let out = client.await.unwrap();
        assert!(out.contains("cannot send CoAP pdu"), "{id}: {out}");
    }
    assert_eq!(stat(&ep.stats.handshakes_completed), 0);
    assert!(stat(&ep.stats.handshakes_failed) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_does_not_hold_up_another_and_ends_at_its_deadline() {
    let mut ep = endpoint(Settings {
        handshake_timeout: Duration::from_secs(3),
        ..Settings::default()
    })
    .await;
    // A ClientHello with its cookie, and then nothing: a handshake stalled midway.
    let mut stalled = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    stalled.hello_with_cookie().await;
    until("the stalled handshake's state", || {
        stat(&ep.stats.half_open) == 1
    })
    .await;
    // Another device completes meanwhile, while the stalled one still waits.
    let client = coap_get(ep.local, "dev1", KEY, None);
    let Event::Connected { peer, session, .. } = next(&mut ep).await else {
        panic!("not connected");
    };
    assert_eq!(stat(&ep.stats.half_open), 1);
    let Event::Data { data, .. } = next(&mut ep).await else {
        panic!("no request");
    };
    ep.sender
        .send(peer, session, content_reply(&data, b"served"));
    assert!(client.await.unwrap().contains("served"));
    // The stalled one ends at its deadline, its slot freed.
    let Event::Closed { why, .. } = next_of(&mut ep, stalled.addr()).await else {
        panic!("the stalled handshake did not end");
    };
    assert!(matches!(why, Closed::HandshakeTimeout { .. }), "{why:?}");
    assert_eq!(stat(&ep.stats.half_open), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_datagrams_past_the_per_source_cap_or_not_a_client_hello_make_no_state() {
    let ep = endpoint(Settings {
        max_per_source: 4,
        ..Settings::default()
    })
    .await;
    let mut devices = Vec::new();
    for _ in 0..10 {
        let mut d = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
        d.hello_with_cookie().await;
        // Not a ClientHello: application data, an encrypted handshake (epoch 1), junk.
        for junk in [
            &[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 9][..],
            &[22, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1][..],
            b"GET / HTTP/1.0\r\n\r\n",
        ] {
            d.socket.send_to(junk, ep.local).await.unwrap();
        }
        devices.push(d);
    }
    let stats = &ep.stats;
    until("every first datagram seen", || {
        stat(&stats.refused_capped) + stat(&stats.handshakes_started) >= 10
            && stat(&stats.dropped_stray) >= 18
    })
    .await;
    // All ten proved their address; one source (127.0.0.1) got four.
    assert_eq!(stat(&stats.handshakes_started), 4);
    assert_eq!(stat(&stats.refused_capped), 6);
    // The six sources refused a slot sent three more each; the four admitted ones'
    // went to their own handshake state.
    assert_eq!(stat(&stats.dropped_stray), 18);
    assert_eq!(stat(&stats.half_open), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_half_open_cap_make_no_state_until_a_slot_frees() {
    let mut ep = endpoint(Settings {
        max_half_open: 3,
        handshake_timeout: Duration::from_secs(2),
        ..Settings::default()
    })
    .await;
    let mut devices = Vec::new();
    for _ in 0..5 {
        let mut d = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
        d.hello_with_cookie().await;
        devices.push(d);
    }
    until("five cookies back", || {
        stat(&ep.stats.handshakes_started) + stat(&ep.stats.refused_capped) >= 5
    })
    .await;
    assert_eq!(stat(&ep.stats.handshakes_started), 3);
    assert_eq!(stat(&ep.stats.refused_capped), 2);
    assert_eq!(stat(&ep.stats.half_open), 3);
    // A device now is refused too; once the three stalled ones end, it gets through.
    let mut late = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    late.hello_with_cookie().await;
    until("refused", || stat(&ep.stats.refused_capped) == 3).await;
    for _ in 0..3 {
        assert!(matches!(
            next(&mut ep).await,
            Event::Closed {
                why: Closed::HandshakeTimeout { .. },
                ..
            }
        ));
    }
    let mut late = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(late.handshake(T).await);
}

/// A device's first ClientHello (no cookie), to send by hand.
fn first_hello(identity: &str) -> Vec<u8> {
    let config = Config::builder()
        .with_psk_client(identity.as_bytes().to_vec(), Arc::new(Fixed(b"k".to_vec())))
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
async fn a_flood_of_spoofed_or_replayed_client_hellos_takes_no_slot_from_a_real_device() {
    let mut ep = endpoint(Settings {
        max_half_open: 4,
        max_per_source: 4,
        ..Settings::default()
    })
    .await;
    // A ClientHello with a good cookie for one address, to replay from others.
    let mut owner = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    owner.hello_with_cookie().await;
    let replayed = owner.sent.clone();
    let mut forged = replayed.clone();
    let at = forged.len() / 2;
    forged[at] ^= 0x40;
    let hello = first_hello("dev1");
    // ClientHellos nobody answers (as from spoofed addresses), without a cookie, with
    // a replayed one, with a forged one, until the real device is through.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (stop, to) = (stop.clone(), ep.local);
        tokio::spawn(async move {
            let mut spoofers = Vec::new();
            for _ in 0..16 {
                spoofers.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            }
            let mut sent = 0usize;
            // Until the real device is through: it runs during the whole handshake.
            while !stop.load(Ordering::Relaxed) {
                for d in [&hello, &replayed, &forged] {
                    let _ = spoofers[sent % 16].send_to(d, to).await;
                    sent += 1;
                }
                // Some thousands a second: what a debug build serves beside a real
                // device on two CPUs (a faster flood only overflows the socket).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    until("the flood under way", || {
        stat(&ep.stats.cookie_refused) >= 100
    })
    .await;
    let client = coap_get(ep.local, "dev1", KEY, None);
    let connected = async {
        loop {
            if let Event::Connected { peer, session, .. } = next(&mut ep).await {
                return (peer, session);
            }
        }
    };
    let (peer, session) = tokio::time::timeout(T, connected)
        .await
        .expect("the real device connected in time");
    let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
        panic!("no request");
    };
    ep.sender
        .send(peer, session, content_reply(&data, b"through"));
    assert!(client.await.unwrap().contains("through"));
    stop.store(true, Ordering::Relaxed);
    flood.await.unwrap();
    // The owner's own handshake and the real device's: no other state was made.
    assert_eq!(stat(&ep.stats.handshakes_started), 2);
    assert_eq!(stat(&ep.stats.refused_capped), 0);
    assert!(stat(&ep.stats.hello_verify_sent) >= 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_damaged_handshakes_never_stop_the_endpoint() {
    let mut ep = endpoint(Settings {
        max_per_source: 10_000,
        max_half_open: 10_000,
        ..Settings::default()
    })
    .await;
    // A real ClientHello, and one with a good cookie from its own socket.
    let mut holder = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    holder.hello_with_cookie().await;
    let with_cookie = holder.sent.clone();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut sockets = Vec::new();
    for _ in 0..64 {
        sockets.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for i in 0..5000u64 {
        let mut d = if i % 2 == 0 {
            // A real ClientHello with bytes flipped, cut or grown.
            let mut d = with_cookie.clone();
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
        let s = if i % 500 == 0 {
            &holder.socket
        } else {
            &sockets[(i as usize) % 64]
        };
        let _ = s.send_to(&d, ep.local).await;
    }
    // The endpoint still serves a real device.
    let client = coap_get(ep.local, "dev1", KEY, None);
    let (peer, session) = loop {
        if let Event::Connected {
            peer,
            identity,
            session,
            ..
        } = next(&mut ep).await
        {
            assert_eq!(identity, "dev1");
            break (peer, session);
        }
    };
    let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
        panic!("no request");
    };
    ep.sender
        .send(peer, session, content_reply(&data, b"still here"));
    assert!(client.await.unwrap().contains("still here"));
    assert_eq!(stat(&ep.stats.panics), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_an_established_peer_is_dropped_and_its_session_goes_on() {
    let mut ep = endpoint(Settings::default()).await;
    let mut device = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    let mut other = Device::new(ep.local, "dev2", KEY.as_bytes()).await;
    assert!(device.handshake(T).await);
    assert!(other.handshake(T).await);
    let peer = device.addr();
    let Event::Connected { session, .. } = next_of(&mut ep, peer).await else {
        panic!("not connected");
    };
    // A real record of the session, to damage.
    device.send(&get(1)).await;
    let record = device.sent.clone();
    let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
        panic!("no request");
    };
    assert_eq!(data, get(1));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Every cut and every single-bit flip of it, and records of random bytes under a
    // real header (epoch 1, any sequence number, any length).
    let mut garbage: Vec<Vec<u8>> = (0..record.len()).map(|n| record[..n].to_vec()).collect();
    for i in 0..record.len() * 8 {
        let mut d = record.clone();
        d[i / 8] ^= 1 << (i % 8);
        garbage.push(d);
    }
    for _ in 0..500 {
        let mut d = record[..3].to_vec();
        d.extend_from_slice(&[0, 1]);
        d.extend((0..6).map(|_| rand() as u8));
        let len = (rand() % 200) as usize;
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.extend((0..len).map(|_| rand() as u8));
        garbage.push(d);
    }
    assert!(garbage.len() > 500);
    for (n, d) in garbage.iter().enumerate() {
        device.socket.send_to(d, ep.local).await.unwrap();
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The session still carries data both ways; so does another device's.
    // (Sent until it comes: the kernel may drop datagrams after such a burst.)
    let data = loop {
        device.send(&get(2)).await;
        let event = tokio::time::timeout(Duration::from_millis(300), next_of(&mut ep, peer));
        if let Ok(event) = event.await {
            break event;
        }
    };
    // Nothing damaged passed as data: the next datagram the layer sees is this one.
    match data {
        Event::Data { data, .. } => assert_eq!(data, get(2), "damaged data passed"),
        other => panic!("{other:?}"),
    }
    ep.sender
        .send(peer, session, content_reply(&get(2), b"intact"));
    let answer = device.data().await.expect("an answer");
    assert!(answer.ends_with(b"intact"), "{answer:?}");
    other.send(&get(3)).await;
    let Event::Data { data, .. } = next_of(&mut ep, other.addr()).await else {
        panic!("no request from the other device");
    };
    assert_eq!(data, get(3));
    assert_eq!(stat(&ep.stats.panics), 0);
    assert_eq!(stat(&ep.stats.sessions), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_authenticated_data_keeps_a_session_alive() {
    let mut ep = endpoint(Settings {
        idle_timeout: Duration::from_millis(1500),
        ..Settings::default()
    })
    .await;
    let mut device = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(device.handshake(T).await);
    let peer = device.addr();
    assert!(matches!(
        next_of(&mut ep, peer).await,
        Event::Connected { .. }
    ));
    // Data keeps it alive past the idle timeout...
    let started = Instant::now();
    for id in 0..6 {
        device.send(&get(id)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(2000));
    for id in 0..6 {
        let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
            panic!("the session ended while in use");
        };
        assert_eq!(data, get(id));
    }
    // ...datagrams from its address that are not its records do not.
    let junk = device.sent.iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>();
    let mut record = device.sent.clone();
    let last = record.len() - 1;
    record[last] ^= 1;
    let quiet = Instant::now();
    let ended = tokio::spawn(async move {
        let why = match next_of(&mut ep, peer).await {
            Event::Closed { why, .. } => why,
            other => panic!("{other:?}"),
        };
        (why, quiet.elapsed())
    });
    while !ended.is_finished() && quiet.elapsed() < T {
        let _ = device.socket.send_to(&junk, device.server).await;
        let _ = device.socket.send_to(&record, device.server).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (why, after) = ended.await.unwrap();
    assert_eq!(why, Closed::Idle);
    assert!(after < Duration::from_secs(3), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_rebooted_connects_again_from_the_same_address() {
    let mut ep = endpoint(Settings::default()).await;
    // A device connects, then loses its session state (no close_notify).
    let mut before = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(before.handshake(T).await);
    let peer = before.addr();
    assert!(matches!(
        next_of(&mut ep, peer).await,
        Event::Connected { .. }
    ));
    let socket = before.socket;
    // It handshakes again from the same address and port, by hand...
    let mut after = Device::on(socket, ep.local, "dev1", KEY.as_bytes());
    assert!(after.handshake(T).await);
    assert_eq!(
        next_of(&mut ep, peer).await.closed(),
        Some(Closed::Replaced),
        "the old session ends first"
    );
    let Event::Connected { identity, .. } = next_of(&mut ep, peer).await else {
        panic!("the new session did not start");
    };
    assert_eq!(identity, "dev1");
    after.send(&get(7)).await;
    let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
        panic!("no data on the new session");
    };
    assert_eq!(data, get(7));
    // ...and then with OpenSSL (libcoap), from that port again.
    drop(after);
    let client = coap_get(ep.local, "dev1", KEY, Some(peer.port()));
    assert_eq!(
        next_of(&mut ep, peer).await.closed(),
        Some(Closed::Replaced)
    );
    let Event::Connected { session, .. } = next_of(&mut ep, peer).await else {
        panic!("not connected again");
    };
    let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
        panic!("no request");
    };
    ep.sender
        .send(peer, session, content_reply(&data, b"welcome back"));
    assert!(client.await.unwrap().contains("welcome back"));
    assert_eq!(stat(&ep.stats.replaced), 2);
    assert_eq!(stat(&ep.stats.handshakes_completed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_start_and_end_are_never_dropped_when_the_coap_layer_is_behind() {
    let mut ep = endpoint(Settings {
        queue: 1,
        ..Settings::default()
    })
    .await;
    // A failed handshake's end fills the queue, and nobody reads it yet.
    let mut failed = Device::new(ep.local, "dev1", b"not-the-key-of-dev1-at-all").await;
    assert!(!failed.handshake(Duration::from_secs(1)).await);
    until("the failure", || stat(&ep.stats.handshakes_failed) == 1).await;
    // A device connects meanwhile: its start waits for room instead of being lost.
    let client = coap_get(ep.local, "dev1", KEY, None);
    until("the handshake", || {
        stat(&ep.stats.handshakes_completed) == 1
    })
    .await;
    assert!(matches!(
        next(&mut ep).await,
        Event::Closed {
            why: Closed::HandshakeFailed { .. },
            ..
        }
    ));
    let (peer, session) = loop {
        match next(&mut ep).await {
            Event::Connected {
                peer,
                identity,
                session,
                ..
            } => {
                assert_eq!(identity, "dev1");
                break (peer, session);
            }
            Event::Data { .. } => panic!("data before the session started"),
            Event::Closed { .. } => {}
        }
    };
    let Event::Data { data, .. } = next_of(&mut ep, peer).await else {
        panic!("no request");
    };
    ep.sender
        .send(peer, session, content_reply(&data, b"late but whole"));
    assert!(client.await.unwrap().contains("late but whole"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handshakes_never_stall_the_socket_behind_a_slow_coap_layer() {
    let mut ep = endpoint(Settings {
        queue: 1,
        ..Settings::default()
    })
    .await;
    // Nobody reads the events: the first failure fills the queue.
    for n in 1..=4 {
        let mut d = Device::new(ep.local, "dev1", b"not-the-key-of-dev1-at-all").await;
        assert!(!d.handshake(Duration::from_millis(600)).await);
        until("the failure", || stat(&ep.stats.handshakes_failed) == n).await;
    }
    assert_eq!(stat(&ep.stats.dropped_closed), 3);
    // The socket is served still.
    let mut d = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(d.handshake(T).await);
    assert!(matches!(next(&mut ep).await, Event::Closed { .. }));
    assert!(matches!(next(&mut ep).await, Event::Connected { .. }));
}

/// A gate that counts the tokens alive, and refuses all once `open` is false.
struct Counting {
    open: bool,
    alive: Arc<AtomicUsize>,
}

struct Token(Arc<AtomicUsize>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admit for Counting {
    fn admit(&self, _: SocketAddr) -> Option<Box<dyn Send + Sync>> {
        if !self.open {
            return None;
        }
        self.alive.fetch_add(1, Ordering::SeqCst);
        Some(Box::new(Token(self.alive.clone())))
    }
    fn header_refused(&self, _: SocketAddr, _: dtls::HeaderRefused<'_>) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_refuses_means_no_state_and_no_handshake() {
    let alive = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Counting {
        open: false,
        alive: alive.clone(),
    });
    let ep = endpoint_with(Settings::default(), gate).await;
    let mut d = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(!d.handshake(Duration::from_secs(2)).await);
    assert!(stat(&ep.stats.refused_gate) >= 1);
    assert_eq!(stat(&ep.stats.handshakes_started), 0);
    assert_eq!(stat(&ep.stats.handshakes_completed), 0);
    assert_eq!(stat(&ep.stats.half_open), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gates_token_lives_as_long_as_the_state_it_admitted() {
    let alive = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Counting {
        open: true,
        alive: alive.clone(),
    });
    let mut ep = endpoint_with(Settings::default(), gate).await;
    let mut d = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(d.handshake(T).await);
    let Event::Connected { session, .. } = next(&mut ep).await else {
        panic!("not connected");
    };
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    // A send or close for another session at the address is not this one's.
    ep.sender.close(d.addr(), session + 1);
    ep.sender.send(d.addr(), session + 1, get(9));
    assert!(
        d.receive(Duration::from_millis(500)).await.is_none(),
        "a send for another session arrived"
    );
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    ep.sender.close(d.addr(), session);
    assert_eq!(next(&mut ep).await.closed(), Some(Closed::Local));
    assert_eq!(alive.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_peers_state_drops_that_peer_only() {
    let mut ep = endpoint(Settings::default()).await;
    // The key store panics for this identity, inside dimpl's handshake.
    let mut boom = Device::new(ep.local, "boom", KEY.as_bytes()).await;
    assert!(!boom.handshake(Duration::from_secs(1)).await);
    assert_eq!(
        next_of(&mut ep, boom.addr()).await.closed(),
        Some(Closed::Failed("internal error".into()))
    );
    assert_eq!(stat(&ep.stats.panics), 1);
    let mut d = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    assert!(d.handshake(T).await);
    assert!(matches!(
        next_of(&mut ep, d.addr()).await,
        Event::Connected { .. }
    ));
}

/// A generated corpus of 100 000 damaged DTLS records: cuts, bit flips, byte
/// changes, forged headers (any content type, epoch, sequence number, length),
/// records glued together, sent from an established peer's own address (into its
/// session) and from new addresses (into the cookie check). None may panic the
/// endpoint or disturb either session, the attacked one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_damaged_records_never_panic_or_disturb_a_session() {
    let mut ep = endpoint(Settings::default()).await;
    let mut device = Device::new(ep.local, "dev1", KEY.as_bytes()).await;
    let mut other = Device::new(ep.local, "dev2", KEY.as_bytes()).await;
    assert!(device.handshake(T).await);
    assert!(other.handshake(T).await);
    let peer = device.addr();
    let Event::Connected { session, .. } = next_of(&mut ep, peer).await else {
        panic!("not connected");
    };
    device.send(&get(1)).await;
    let app = device.sent.clone();
    assert!(matches!(next_of(&mut ep, peer).await, Event::Data { .. }));
    let seeds = [app, first_hello("dev1"), first_hello("nobody")];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let strangers = [
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    ];
    const CASES: usize = 100_000;
    for n in 0..CASES {
        let seed = &seeds[(rand() % 3) as usize];
        let mut d = seed.clone();
        match rand() % 6 {
            0 => d.truncate((rand() as usize) % d.len()),
            1 => {
                for _ in 0..1 + rand() % 8 {
                    let i = (rand() as usize) % d.len();
                    d[i] ^= 1 << (rand() % 8);
                }
            }
            2 => {
                let i = (rand() as usize) % d.len();
                d[i] = rand() as u8;
            }
            3 => {
                // A forged header: type, version, epoch, sequence, length.
                for b in d.iter_mut().take(13) {
                    if rand() % 3 == 0 {
                        *b = rand() as u8;
                    }
                }
            }
            4 => {
                let other = &seeds[(rand() % 3) as usize];
                d.extend_from_slice(&other[..(rand() as usize) % other.len()]);
            }
            _ => d = (0..rand() % 300).map(|_| rand() as u8).collect(),
        }
        if d.is_empty() {
            d.push(22);
        }
        let from = match rand() % 4 {
            0 => &strangers[0],
            1 => &strangers[1],
            _ => &device.socket,
        };
        from.send_to(&d, ep.local).await.unwrap();
        // Paced, so that the kernel's buffer takes (nearly) all of them.
        if n % 25 == 24 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // What the endpoint answered to the garbage sent from the device's address
    // (HelloVerifyRequests to its ClientHellos) is not the device's business.
    while device.receive(Duration::from_millis(300)).await.is_some() {}
    // Both sessions still carry data both ways (sent until it comes: the kernel may
    // have dropped datagrams after such a burst).
    let data = loop {
        device.send(&get(2)).await;
        match tokio::time::timeout(Duration::from_millis(300), next_of(&mut ep, peer)).await {
            Ok(Event::Data { data, .. }) if data == get(2) => break data,
            Ok(Event::Data { data, .. }) => panic!("damaged data passed: {data:?}"),
            Ok(other) => panic!("{other:?}"),
            Err(_) => continue,
        }
    };
    assert_eq!(data, get(2));
    ep.sender
        .send(peer, session, content_reply(&get(2), b"intact"));
    let answer = device.data().await.expect("an answer");
    assert!(answer.ends_with(b"intact"), "{answer:?}");
    other.send(&get(3)).await;
    let Event::Data { data, .. } = next_of(&mut ep, other.addr()).await else {
        panic!("no request from the other device");
    };
    assert_eq!(data, get(3));
    assert_eq!(stat(&ep.stats.panics), 0);
    assert_eq!(stat(&ep.stats.sessions), 2);
    // The corpus reached the endpoint: those from new addresses (half of it) are
    // counted by the first-datagram checks (about 58 000 here when idle; the kernel
    // may drop some under load), the rest went into the session.
    let seen = stat(&ep.stats.dropped_stray)
        + stat(&ep.stats.hello_verify_sent)
        + stat(&ep.stats.cookie_refused);
    assert!(
        seen > CASES as u64 / 4,
        "only {seen} of the first datagrams arrived"
    );
}

// Behind a UDP load balancer: a PROXY protocol v2 header in front of each datagram.

use portcullis_coap::dtls::HeaderRefused;
use portcullis_core::proxy_header::LoadBalancers;
use std::sync::Mutex;

/// The endpoint's balancer: an address of its own on loopback.
const BALANCER: &str = "127.0.0.3";

fn balancers() -> Option<Arc<LoadBalancers>> {
    let net = format!("{BALANCER}/32").parse().unwrap();
    LoadBalancers::new(vec![net], Duration::from_secs(1), 1).map(Arc::new)
}

/// PROXY, UDP over IPv4, naming `client`.
fn udp_header(client: SocketAddr) -> Vec<u8> {
    let std::net::IpAddr::V4(ip) = client.ip() else {
        panic!("IPv4 client")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x12, 0, 12]);
    h.extend_from_slice(&ip.octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&5684u16.to_be_bytes());
    h
}

/// A UDP balancer for one device: what comes to its front goes to `server` from
/// the balancer's address with `header` in front; what comes back goes to the device
/// as it came, and is counted.
struct Relay {
    front: SocketAddr,
    returned: Arc<AtomicU64>,
}

async fn relay(server: SocketAddr, header: Vec<u8>) -> Relay {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let up = Arc::new(UdpSocket::bind((BALANCER, 0)).await.unwrap());
    up.connect(server).await.unwrap();
    let device = Arc::new(Mutex::new(None::<SocketAddr>));
    let returned = Arc::new(AtomicU64::new(0));
    let (f, u, d) = (front.clone(), up.clone(), device.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *d.lock().unwrap() = Some(from);
            let mut datagram = header.clone();
            datagram.extend_from_slice(&buf[..n]);
            let _ = u.send(&datagram).await;
        }
    });
    let (f, count) = (front.clone(), returned.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = up.recv(&mut buf).await {
            let to = *device.lock().unwrap();
            if let Some(to) = to {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = f.send_to(&buf[..n], to).await;
            }
        }
    });
    Relay {
        front: front.local_addr().unwrap(),
        returned,
    }
}

/// Admits everyone; remembers the datagrams refused over their header.
#[derive(Default)]
struct HeaderRefusals(Mutex<Vec<(SocketAddr, String)>>);

impl Admit for HeaderRefusals {
    fn admit(&self, _: SocketAddr) -> Option<Box<dyn Send + Sync>> {
        Some(Box::new(()))
    }

    fn header_refused(&self, from: SocketAddr, why: HeaderRefused<'_>) {
        self.0.lock().unwrap().push((from, format!("{why:?}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_header_names_the_peer_and_answers_go_back_through_it() {
    let refusals = Arc::new(HeaderRefusals::default());
    let settings = Settings {
        balancers: balancers(),
        ..Settings::default()
    };
    let mut ep = endpoint_with(settings, refusals.clone()).await;
    let claimed: SocketAddr = "203.0.113.7:4242".parse().unwrap();
    let first = relay(ep.local, udp_header(claimed)).await;
    let mut device = Device::new(first.front, "dev1", KEY.as_bytes()).await;
    assert!(device.handshake(T).await);
    let Event::Connected { peer, session, .. } = next(&mut ep).await else {
        panic!("not connected");
    };
    assert_eq!(peer, claimed);
    device.send(&get(1)).await;
    let Event::Data { peer, data } = next(&mut ep).await else {
        panic!("no request");
    };
    assert_eq!((peer, data), (claimed, get(1)));

    // A forged datagram for the device from another port of the balancer's address:
    // it does not decrypt, so the answers keep the device's way.
    let forger = UdpSocket::bind((BALANCER, 0)).await.unwrap();
    let mut forged = udp_header(claimed);
    forged.extend_from_slice(&device.sent);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    forger.send_to(&forged, ep.local).await.unwrap();
    // Then one with no header, from the same socket: once it is refused, the forged
    // one before it has been read.
    forger.send_to(&[22, 254, 253], ep.local).await.unwrap();
    until("the datagram without a header refused", || {
        stat(&ep.stats.header_refused) == 1
    })
    .await;
    ep.sender
        .send(claimed, session, content_reply(&get(1), b"one"));
    let answer = device.data().await.expect("an answer");
    assert!(answer.ends_with(b"one"), "{answer:?}");
    let mut buf = [0u8; 64];
    let heard = tokio::time::timeout(Duration::from_millis(300), forger.recv(&mut buf)).await;
    assert!(heard.is_err(), "the forger got an answer");

    // An authenticated datagram by another way moves the device's answers to it.
    let second = relay(ep.local, udp_header(claimed)).await;
    device.server = second.front;
    device.send(&get(2)).await;
    let Event::Data { data, .. } = next_of(&mut ep, claimed).await else {
        panic!("no request");
    };
    assert_eq!(data, get(2));
    let before = first.returned.load(Ordering::SeqCst);
    ep.sender
        .send(claimed, session, content_reply(&get(2), b"two"));
    let answer = device.data().await.expect("an answer");
    assert!(answer.ends_with(b"two"), "{answer:?}");
    assert_eq!(second.returned.load(Ordering::SeqCst), 1);
    assert_eq!(first.returned.load(Ordering::SeqCst), before);

    // A header from a source that is not a balancer.
    let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    stranger.send_to(&forged, ep.local).await.unwrap();
    until("the stranger's header refused", || {
        stat(&ep.stats.header_refused) == 2
    })
    .await;
    let seen = refusals.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, forger.local_addr().unwrap());
    assert!(seen[0].1.starts_with("Invalid(BadSignature"), "{seen:?}");
    assert_eq!(
        seen[1],
        (stranger.local_addr().unwrap(), "NotAllowed".to_string())
    );
    assert_eq!(stat(&ep.stats.sessions), 1);
    assert_eq!(stat(&ep.stats.panics), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_balancers_a_header_is_only_a_stray_datagram() {
    let refusals = Arc::new(HeaderRefusals::default());
    let ep = endpoint_with(Settings::default(), refusals.clone()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let claimed: SocketAddr = "203.0.113.7:4242".parse().unwrap();
    socket
        .send_to(&udp_header(claimed), ep.local)
        .await
        .unwrap();
    until("dropped as stray", || stat(&ep.stats.dropped_stray) == 1).await;
    assert_eq!(stat(&ep.stats.header_refused), 0);
    assert!(refusals.0.lock().unwrap().is_empty());
}
