//! The CoAP workloads: confirmable POSTs over DTLS from many devices, each with its
//! own session and one request outstanding (NSTART 1), through the full pipeline to
//! the subscriber; and the memory an idle DTLS session costs the gateway.

use super::{Bench, PAYLOAD, Server, Sink, payload, process_cpu, sink_thread};
use anyhow::{Context, Result, anyhow, bail};
use coap_lite::ResponseType;
use hdrhistogram::Histogram;
pub(super) use portcullis_coap::client::Credentials;
use portcullis_coap::client::{Client, Request};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::{Instant, sleep};

/// Devices of the request workload, each its own DTLS session.
pub(super) const DEVICES: usize = 100;
/// Handshakes run at once (within the gateway's `coap.max_handshakes`, 256).
const HANDSHAKES_AT_ONCE: usize = 128;
const HANDSHAKE_WAIT: Duration = Duration::from_secs(30);
const ANSWER_WAIT: Duration = Duration::from_secs(10);

pub(super) fn device_id(n: usize) -> String {
    format!("coap-bench-{n}")
}

pub(super) fn idle_id(n: usize) -> String {
    format!("coap-idle-{n}")
}

/// Source address `i` (from 1) of a /16 loopback block `127.b.0.0`: each session from
/// an address of its own (hosts .1 to .254 of each /24 in turn; 64 516 at most), so
/// the per-source caps see a device each.
fn source(block: u8, i: usize) -> IpAddr {
    let j = i.saturating_sub(1);
    IpAddr::V4(Ipv4Addr::new(
        127,
        block,
        (j / 254) as u8,
        (j % 254 + 1) as u8,
    ))
}

impl Bench {
    fn coap_addr(&self, s: &Server) -> Result<SocketAddr> {
        s.coap_dtls
            .ok_or_else(|| anyhow!("{:?} has no CoAP listener", s.target))
    }

    /// Sessions for `ids`, each from its own address of `127.block.0.0/16`,
    /// `HANDSHAKES_AT_ONCE` at a time; and how long they took.
    async fn sessions(
        &self,
        s: &Server,
        ids: &[String],
        block: u8,
    ) -> Result<(Vec<Client>, Duration)> {
        let server = self.coap_addr(s)?;
        let t0 = Instant::now();
        let mut clients = Vec::with_capacity(ids.len());
        for (c, chunk) in ids.chunks(HANDSHAKES_AT_ONCE).enumerate() {
            let mut tasks = Vec::new();
            for (k, id) in chunk.iter().enumerate() {
                let credentials = self
                    .coap_credentials
                    .get(id)
                    .cloned()
                    .ok_or_else(|| anyhow!("no key for {id}"))?;
                let (id, from) = (id.clone(), source(block, c * HANDSHAKES_AT_ONCE + k + 1));
                tasks.push(tokio::spawn(async move {
                    let socket = UdpSocket::bind(SocketAddr::new(from, 0)).await?;
                    let mut client = Client::start_with(socket, server, &credentials)?;
                    client
                        .handshake(HANDSHAKE_WAIT)
                        .await
                        .with_context(|| format!("{id} from {from}"))?;
                    anyhow::Ok(client)
                }));
            }
            for t in tasks {
                clients.push(t.await??);
            }
        }
        Ok((clients, t0.elapsed()))
    }

    /// `DEVICES` devices in a closed loop: each sends a confirmable POST of 64 bytes
    /// of JSON telemetry and the next when its answer comes. Requests answered 2.04
    /// per second, the device's request → answer latency, the gateway's CPU per
    /// request, and what the subscriber received.
    pub(super) async fn coap_requests(&self, s: &Server) -> Result<BTreeMap<String, f64>> {
        let start = Instant::now();
        let sub = self.client(s, "bench-sub", false, true)?;
        let sink_state = Sink::new(None);
        sink_thread(sub, 1, sink_state.clone(), start, false).await?;
        let ids: Vec<String> = (1..=DEVICES).map(device_id).collect();
        let (clients, _) = self.sessions(s, &ids, 3).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let counting = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        let mut body = Vec::with_capacity(PAYLOAD);
        payload(&mut body, 0);
        for mut c in clients {
            let (stop, counting, answered, refused, lost, latency, body) = (
                stop.clone(),
                counting.clone(),
                answered.clone(),
                refused.clone(),
                lost.clone(),
                latency.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let request = Request::post("t/telemetry", &body);
                while !stop.load(Relaxed) {
                    let t0 = Instant::now();
                    let r = c.request(&request, ANSWER_WAIT).await;
                    if !counting.load(Relaxed) {
                        continue;
                    }
                    match r {
                        Ok(r) if r.code == ResponseType::Changed => {
                            answered.fetch_add(1, Relaxed);
                            let us = t0.elapsed().as_micros() as u64;
                            latency
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .saturating_record(us.max(1));
                        }
                        Ok(_) => {
                            refused.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            lost.fetch_add(1, Relaxed);
                        }
                    }
                }
                c.close().await;
            });
        }
        let w = self.window();
        sleep(w.warm).await;
        let cpu0 = s.cpu()?;
        let gateway0 = process_cpu(s.pid())?;
        let t0 = Instant::now();
        counting.store(true, Relaxed);
        sink_state.counting.store(true, Relaxed);
        sleep(w.secs).await;
        counting.store(false, Relaxed);
        sink_state.counting.store(false, Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = s.cpu()? - cpu0;
        let gateway = process_cpu(s.pid())? - gateway0;
        stop.store(true, Relaxed);
        let n = answered.load(Relaxed) as f64;
        if n == 0.0 {
            bail!(
                "no request answered 2.04 ({} refused, {} unanswered)",
                refused.load(Relaxed),
                lost.load(Relaxed)
            );
        }
        let h = latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut f = BTreeMap::new();
        f.insert("req_per_s".into(), n / elapsed);
        f.insert(
            "delivered_per_s".into(),
            sink_state.received.load(Relaxed) as f64 / elapsed,
        );
        f.insert(
            "refused_per_s".into(),
            refused.load(Relaxed) as f64 / elapsed,
        );
        f.insert("unanswered".into(), lost.load(Relaxed) as f64);
        f.insert("p50_us".into(), h.value_at_quantile(0.5) as f64);
        f.insert("p99_us".into(), h.value_at_quantile(0.99) as f64);
        f.insert("p999_us".into(), h.value_at_quantile(0.999) as f64);
        f.insert("server_cpu_us_per_req".into(), cpu * 1e6 / n);
        f.insert("server_cpu_share".into(), cpu / elapsed);
        if s.upstream.is_some() {
            f.insert("gateway_cpu_us_per_req".into(), gateway * 1e6 / n);
        }
        // The sessions' ends reach the gateway before it is stopped.
        sleep(Duration::from_millis(100)).await;
        Ok(f)
    }

    /// `coap_idle` sessions opened and left idle: (RSS with them − RSS without) / N,
    /// and the handshakes per second it took to open them.
    pub(super) async fn coap_idle(&self, s: &Server) -> Result<BTreeMap<String, f64>> {
        let n = self.opts.coap_idle;
        sleep(Duration::from_millis(500)).await;
        let rss0 = s.rss()?;
        let ids: Vec<String> = (1..=n).map(idle_id).collect();
        let cpu0 = s.cpu()?;
        let (clients, took) = self.sessions(s, &ids, 4).await?;
        let cpu = s.cpu()? - cpu0;
        sleep(Duration::from_secs(2)).await;
        let rss1 = s.rss()?;
        let mut f = BTreeMap::new();
        f.insert("sessions".into(), n as f64);
        if let Some(held) = s.metric("portcullis_coap_dtls_sessions") {
            f.insert("gateway_sessions".into(), held);
        }
        f.insert("handshakes_per_s".into(), n as f64 / took.as_secs_f64());
        f.insert("server_cpu_us_per_handshake".into(), cpu * 1e6 / n as f64);
        f.insert(
            "bytes_per_session".into(),
            (rss1 as f64 - rss0 as f64) / n as f64,
        );
        f.insert("rss_idle_mb".into(), rss0 as f64 / 1e6);
        f.insert("rss_sessions_mb".into(), rss1 as f64 / 1e6);
        drop(clients);
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_session_has_a_source_address_of_its_own() {
        let all: std::collections::HashSet<IpAddr> = (1..=5000).map(|i| source(4, i)).collect();
        assert_eq!(all.len(), 5000);
        assert_eq!(source(3, 1), IpAddr::V4(Ipv4Addr::new(127, 3, 0, 1)));
        assert_eq!(source(3, 254), IpAddr::V4(Ipv4Addr::new(127, 3, 0, 254)));
        assert_eq!(source(3, 255), IpAddr::V4(Ipv4Addr::new(127, 3, 1, 1)));
    }
}
