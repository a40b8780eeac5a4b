//! `portcullis-sim timing`: can ids be enumerated by how fast a refusal comes?
//!
//! Against a running gateway, interleaves (in random order) CONNECTs naming unknown
//! ids with CONNECTs naming a registered id with a wrong secret, and times each from
//! the CONNECT's write to its CONNACK. Each attempt comes from its own loopback source
//! (127.100.0.0/16 onwards), so no back-off answers in place of the credential check.
//! Reports both medians, their difference and a two-sided Mann-Whitney U test: a
//! small p-value means the two kinds of refusal can be told apart by timing.
//! A statistical check for the benchmark suite, not a unit test.

use crate::mqtt::{self, Connect, Packet, Version};
use anyhow::{Context, Result, bail};
use rand::RngExt;
use rand::seq::SliceRandom;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Options {
    /// The gateway's plain device listener (loopback).
    pub addr: SocketAddr,
    /// A registered device id (its secret is never sent).
    pub known: String,
    /// Samples of each kind (after `warmup` of each).
    pub samples: usize,
    pub warmup: usize,
    /// The p-value under which the two are told apart (exit status 1).
    pub alpha: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub samples: usize,
    pub median_unknown_us: f64,
    pub median_known_us: f64,
    /// Known minus unknown.
    pub difference_us: f64,
    pub mann_whitney_u: f64,
    pub z: f64,
    pub p_value: f64,
    pub alpha: f64,
    pub distinguishable: bool,
}

impl Report {
    pub fn text(&self) -> String {
        format!(
            "refusal timing, {} samples of each (CONNECT to CONNACK):\n  \
             unknown id:               median {:.1} µs\n  \
             registered id, wrong secret: median {:.1} µs\n  \
             difference (known - unknown): {:+.1} µs\n  \
             Mann-Whitney U {:.0}, z {:.2}, two-sided p {:.3e}\n  \
             {} at alpha {}\n",
            self.samples,
            self.median_unknown_us,
            self.median_known_us,
            self.difference_us,
            self.mann_whitney_u,
            self.z,
            self.p_value,
            if self.distinguishable {
                "DISTINGUISHABLE"
            } else {
                "not distinguishable"
            },
            self.alpha
        )
    }
}

/// The n-th loopback source: 127.100.0.1 onwards, skipping .0 and .255.
fn source(n: usize) -> IpAddr {
    let host = (n % 254) as u8 + 1;
    let net = n / 254;
    IpAddr::V4(Ipv4Addr::new(
        127,
        100 + (net / 256) as u8,
        (net % 256) as u8,
        host,
    ))
}

/// One refused CONNECT, timed.
async fn attempt(addr: SocketAddr, from: IpAddr, id: &str, secret: &[u8]) -> Result<Duration> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(from, 0))
        .with_context(|| format!("binding {from}"))?;
    let mut stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} from {from}"))?;
    stream.set_nodelay(true)?;
    let mut packet = Vec::new();
    mqtt::connect(
        &mut packet,
        Version::V5,
        &Connect {
            client_id: id,
            username: Some(id),
            password: Some(secret),
            keep_alive: 30,
            clean: true,
        },
    );
    let mut buf = Vec::with_capacity(64);
    let started = Instant::now();
    stream.write_all(&packet).await?;
    loop {
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .context("no CONNACK within 5 s")??;
        if n == 0 {
            bail!("connection closed before a CONNACK");
        }
        buf.extend_from_slice(&chunk[..n]);
        match mqtt::decode(&buf, Version::V5, 1024)? {
            Some((Packet::ConnAck { code }, _)) => {
                let took = started.elapsed();
                if code == 0 {
                    bail!("{id} was accepted: the timing needs refusals");
                }
                return Ok(took);
            }
            Some((other, _)) => bail!("expected a CONNACK, got {other:?}"),
            None => continue,
        }
    }
}

pub async fn run(o: &Options) -> Result<Report> {
    if o.samples < 20 {
        bail!("--samples must be at least 20 (got {})", o.samples);
    }
    let mut rng = rand::rng();
    let total = o.samples + o.warmup;
    // Both kinds in one shuffled order: drift in the machine's load hits both alike.
    let mut order: Vec<bool> = (0..total).flat_map(|_| [true, false]).collect();
    order.shuffle(&mut rng);
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    let (mut seen_known, mut seen_unknown) = (0, 0);
    for (n, is_known) in order.into_iter().enumerate() {
        let secret: [u8; 16] = rng.random();
        let secret = hex::encode(secret);
        let ghost = format!("ghost-{:016x}", rng.random::<u64>());
        let id = if is_known { o.known.as_str() } else { &ghost };
        let took = attempt(o.addr, source(n), id, secret.as_bytes()).await?;
        let (seen, into) = if is_known {
            (&mut seen_known, &mut known)
        } else {
            (&mut seen_unknown, &mut unknown)
        };
        *seen += 1;
        if *seen > o.warmup {
            into.push(took.as_secs_f64() * 1e6);
        }
    }
    let (u, z, p) = mann_whitney(&known, &unknown);
    let (mk, mu) = (median(&mut known), median(&mut unknown));
    Ok(Report {
        samples: o.samples,
        median_unknown_us: mu,
        median_known_us: mk,
        difference_us: mk - mu,
        mann_whitney_u: u,
        z,
        p_value: p,
        alpha: o.alpha,
        distinguishable: p < o.alpha,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Two-sided Mann-Whitney U (normal approximation, ties corrected): (U of `a`, z, p).
pub fn mann_whitney(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|x| (*x, true))
        .chain(b.iter().map(|x| (*x, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let (mut rank_a, mut ties) = (0.0, 0.0);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let rank = (i + j + 2) as f64 / 2.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_a += all[i..=j].iter().filter(|x| x.1).count() as f64 * rank;
        i = j + 1;
    }
    let u = rank_a - n1 * (n1 + 1.0) / 2.0;
    let nf = n as f64;
    let sigma = (n1 * n2 / 12.0 * ((nf + 1.0) - ties / (nf * (nf - 1.0)))).sqrt();
    if sigma == 0.0 || !sigma.is_finite() {
        return (u, 0.0, 1.0);
    }
    let z = (u - n1 * n2 / 2.0) / sigma;
    (u, z, erfc(z.abs() / std::f64::consts::SQRT_2))
}

/// The complementary error function (Numerical Recipes' erfcc, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_samples_are_not_distinguishable() {
        let a: Vec<f64> = (0..200).map(|i| (i % 17) as f64).collect();
        let (_, z, p) = mann_whitney(&a, &a);
        assert!(z.abs() < 1e-9 && p > 0.99, "{z} {p}");
    }

    #[test]
    fn shifted_samples_are_distinguishable() {
        let a: Vec<f64> = (0..500).map(|i| (i % 50) as f64 + 10.0).collect();
        let b: Vec<f64> = (0..500).map(|i| (i % 50) as f64).collect();
        let (_, z, p) = mann_whitney(&a, &b);
        assert!(z > 0.0 && p < 1e-6, "{z} {p}");
    }

    #[test]
    fn erfc_matches_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-6);
        // Two-sided p of z = 1.96 is 0.05.
        assert!((erfc(1.96 / std::f64::consts::SQRT_2) - 0.05).abs() < 1e-4);
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        assert_eq!(source(0), IpAddr::from([127, 100, 0, 1]));
        assert_eq!(source(254), IpAddr::from([127, 100, 1, 1]));
        assert_ne!(source(1000), source(1001));
    }
}
