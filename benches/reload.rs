//! Hot-reload benchmarks against the real proxy on loopback:
//!
//! - the time from renaming new certificate files into place to the new
//!   certificate being served by a fresh full handshake (p50/p99 over
//!   `SWAPS` swaps; the file watcher's 75 ms debounce is part of it);
//! - requests/s of the same load generator with and without a reload
//!   storm (a new certificate renamed into place every 50 ms, which the
//!   watcher's debounce coalesces into a publish about every 500 ms, and
//!   every 150 ms, each one published), for keep-alive HTTP/1.1 clients and
//!   for clients doing a full handshake per request; the windows of each
//!   condition alternate in order so drift hits all of them alike, and a
//!   control condition (a thread waking every 50 ms, writing nothing)
//!   shows the scheduling noise of the machine.
//!
//! `cargo bench --bench reload` prints a markdown table (about 80 s).
//! Under `cargo test` (no `--bench` argument) it runs a short smoke version.
//! SNI lookup with 10 / 10,000 certificates and replacing one among 10,000
//! are in `benches/hot_path.rs`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

use common::*;

struct Plan {
    swaps: usize,
    window: Duration,
    windows: usize,
    keepalive_clients: usize,
    handshake_clients: usize,
    storm_every: Duration,
}

const FULL: Plan = Plan {
    swaps: 120,
    window: Duration::from_secs(4),
    windows: 2,
    keepalive_clients: 32,
    handshake_clients: 8,
    storm_every: Duration::from_millis(50),
};

const SMOKE: Plan = Plan {
    swaps: 5,
    window: Duration::from_millis(500),
    windows: 1,
    keepalive_clients: 4,
    handshake_clients: 2,
    storm_every: Duration::from_millis(50),
};

const HOST: &str = "bench.test";

fn main() {
    let plan = if std::env::args().any(|a| a == "--bench") {
        FULL
    } else {
        SMOKE
    };
    let started = Instant::now();
    // The proxy and the load generator on separate runtimes, so a busy
    // client side cannot starve the watcher (and the other way round).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let pki = Arc::new(Pki::new());
    let dir = tempfile::tempdir().unwrap();
    let first = pki.leaf(&[HOST], Alg::Ecdsa);
    let (cert, key) = first.write(dir.path(), "");
    let toml = format!(
        "[admin]\nlisten = \"off\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[sites]]\nname = \"bench\"\nhosts = [\"{HOST}\"]\n\
         tls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n  [[sites.routes]]\n  respond = {{ status = 200, body = \"ok\" }}\n"
    );
    let (proxy, certs) = server_rt.block_on(start_with_certs(dir, &toml));
    let addr = proxy.https;

    // (a) rename -> served.
    let mut latencies = client_rt.block_on(swap_latencies(addr, &pki, &cert, &key, plan.swaps));
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };

    // (b) throughput, quiet vs storms, windows in ABC / CBA order so drift
    // on a shared machine hits every condition alike.
    // (interval, whether files are written): the last one is a control, a
    // thread that wakes as often as the storm but writes nothing, to show
    // what scheduling noise alone does to the numbers.
    let storms = [
        (plan.storm_every, true),
        (Duration::from_millis(150), true),
        (plan.storm_every, false),
    ];
    let mut rows = Vec::new();
    for (label, kind, clients) in [
        (
            "keep-alive HTTP/1.1",
            Load::KeepAlive,
            plan.keepalive_clients,
        ),
        (
            "full handshake per request",
            Load::Handshake,
            plan.handshake_clients,
        ),
    ] {
        // Index 0: quiet; 1..: storms. (requests, time, certificates published)
        let mut totals = vec![(0u64, Duration::ZERO, 0usize); storms.len() + 1];
        for round in 0..plan.windows {
            let mut order: Vec<usize> = (0..totals.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for c in order {
                let mut events = certs.subscribe();
                let storming = Arc::new(AtomicBool::new(true));
                let swapper = (c > 0).then(|| {
                    spawn_storm(
                        pki.clone(),
                        cert.clone(),
                        key.clone(),
                        storms[c - 1],
                        storming.clone(),
                    )
                });
                let (n, d) = client_rt.block_on(load(addr, &pki, kind, clients, plan.window));
                storming.store(false, Ordering::SeqCst);
                if let Some(s) = swapper {
                    assert!(s.join().unwrap() > 0);
                }
                let t = &mut totals[c];
                *t = (t.0 + n, t.1 + d, t.2 + drain_published(&mut events));
            }
        }
        rows.push((label, clients, totals));
    }

    println!();
    println!(
        "| hot reload ({} swaps; load windows {:?} x {} per condition) | value |",
        plan.swaps, plan.window, plan.windows
    );
    println!("|---|---|");
    println!(
        "| rename -> new certificate served by a fresh handshake, p50 | {:.1} ms |",
        ms(pct(0.50))
    );
    println!(
        "| rename -> new certificate served by a fresh handshake, p99 | {:.1} ms |",
        ms(pct(0.99))
    );
    println!(
        "| rename -> new certificate served, max | {:.1} ms |",
        ms(*latencies.last().unwrap())
    );
    let rate = |(n, d, _): (u64, Duration, usize)| n as f64 / d.as_secs_f64();
    for (label, clients, totals) in &rows {
        let quiet = rate(totals[0]);
        println!("| {label}, {clients} clients, no reloads | {quiet:.0} req/s |");
        for (i, (every, writes)) in storms.iter().enumerate() {
            let t = totals[i + 1];
            let what = if *writes {
                format!(
                    "new certificate renamed in every {} ms ({} published)",
                    every.as_millis(),
                    t.2
                )
            } else {
                format!(
                    "control: a thread waking every {} ms, no writes",
                    every.as_millis()
                )
            };
            println!(
                "| {label}, {clients} clients, {what} | {:.0} req/s (/ quiet {:.3}) |",
                rate(t),
                rate(t) / quiet
            );
        }
    }
    println!();
    println!("total bench time {:.1} s", started.elapsed().as_secs_f64());
    server_rt.block_on(async {
        proxy.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), proxy.done).await;
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes both files to temp names, then renames them into place: the
/// two renames are the "write". Returns when it is done.
fn rename_in(cert: &Path, key: &Path, leaf: &Leaf) -> Instant {
    let (ct, kt) = (
        cert.with_extension("bench-tmp"),
        key.with_extension("bench-tmp"),
    );
    std::fs::write(&ct, &leaf.chain_pem).unwrap();
    std::fs::write(&kt, &leaf.key_pem).unwrap();
    let t0 = Instant::now();
    std::fs::rename(&kt, key).unwrap();
    std::fs::rename(&ct, cert).unwrap();
    t0
}

async fn swap_latencies(
    addr: SocketAddr,
    pki: &Pki,
    cert: &Path,
    key: &Path,
    swaps: usize,
) -> Vec<Duration> {
    let cfg = full_handshake_config(pki, &[]);
    let mut out = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let leaf = pki.leaf(&[HOST], Alg::Ecdsa);
        let t0 = rename_in(cert, key, &leaf);
        let deadline = t0 + Duration::from_secs(10);
        loop {
            let tls = tls_connect(addr, HOST, cfg.clone())
                .await
                .expect("handshake");
            if serial_of(&peer_leaf(&tls)) == leaf.serial {
                out.push(t0.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "swap {i}: not served within 10 s"
            );
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Load {
    KeepAlive,
    Handshake,
}

/// `clients` concurrent clients sending `GET /` for `window`; returns
/// (completed requests, elapsed).
async fn load(
    addr: SocketAddr,
    pki: &Arc<Pki>,
    kind: Load,
    clients: usize,
    window: Duration,
) -> (u64, Duration) {
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + window;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (pki, done) = (pki.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            match kind {
                Load::KeepAlive => {
                    let tls = tls_connect(addr, HOST, pki.client_config(&[b"http/1.1"]))
                        .await
                        .unwrap();
                    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    while Instant::now() < end {
                        send.ready().await.unwrap();
                        let resp = send.send_request(get_req()).await.unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.into_body().collect().await.unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Load::Handshake => {
                    let cfg = full_handshake_config(&pki, &[b"h2"]);
                    while Instant::now() < end {
                        let tls = tls_connect(addr, HOST, cfg.clone()).await.unwrap();
                        let (mut send, conn) = hyper::client::conn::http2::handshake(
                            TokioExecutor::new(),
                            TokioIo::new(tls),
                        )
                        .await
                        .unwrap();
                        tokio::spawn(conn);
                        let resp = send.send_request(get_req_h2()).await.unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.into_body().collect().await.unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (done.load(Ordering::Relaxed), t0.elapsed())
}

fn get_req() -> hyper::Request<Empty<Bytes>> {
    req_builder(b"http/1.1", HOST, "/")
        .body(Empty::new())
        .unwrap()
}

fn get_req_h2() -> hyper::Request<Empty<Bytes>> {
    req_builder(b"h2", HOST, "/").body(Empty::new()).unwrap()
}

/// A thread renaming a new certificate into place every `every` (or, when
/// `writes` is false, only waking up that often) while `on`; returns how
/// many times it woke. Leaves are made ahead of time.
fn spawn_storm(
    pki: Arc<Pki>,
    cert: PathBuf,
    key: PathBuf,
    (every, writes): (Duration, bool),
    on: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let leaves: Vec<Leaf> = (0..16).map(|_| pki.leaf(&[HOST], Alg::Ecdsa)).collect();
    std::thread::spawn(move || {
        let mut n = 0;
        let mut next = Instant::now();
        while on.load(Ordering::SeqCst) && n < 100_000 {
            if writes {
                rename_in(&cert, &key, &leaves[n % leaves.len()]);
            }
            n += 1;
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        n
    })
}

fn drain_published(
    rx: &mut tokio::sync::broadcast::Receiver<portcullis::certstore::CertEvent>,
) -> usize {
    let mut n = 0;
    loop {
        match rx.try_recv() {
            Ok(portcullis::certstore::CertEvent::Published { .. }) => n += 1,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(k)) => n += k as usize,
            Err(_) => return n,
        }
    }
}
