//! Requests/s through the real proxy with rate limiting on vs off, in one
//! run: the proxy (in process, release build), a fast HTTP/1.1 upstream,
//! and two routes to it that differ only in their limits — `/limited` has
//! a per-address and a route-wide limit, both generous enough never to
//! reject; `/open` has none. The same 32 keep-alive HTTP/1.1 connections
//! over TLS (each from its own loopback address, so the per-address limit
//! tracks 32 clients) drive one route at a time for 2 s each, alternating
//! which goes first, for 8 rounds (after 1 s of warm-up on each; every run
//! is also preceded by 250 ms unmeasured on its route). Prints requests/s
//! of both, the ratio of the totals (target >= 0.97) and the geometric mean
//! of the per-round ratios. Short alternating runs matter on a shared
//! machine: a burst of outside load then hits both sides alike instead of
//! one 5 s run, and whatever favours the first or second run of a round
//! cancels out over the rounds. It also prints the process's CPU time per
//! request on each side (client, proxy and upstream all run here), which
//! outside load on the machine hardly moves: with the process saturated,
//! requests/s is proportional to its inverse.
//!
//! cargo bench --bench ratelimit_load
//! (Under `cargo test --benches` it runs one short round as a smoke test.)

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const HOST: &str = "load.test";
const CONNECTIONS: u8 = 32;
const TARGET: f64 = 0.97;
/// Unmeasured traffic on a route right before each measured run.
const SETTLE: Duration = Duration::from_millis(250);

type Sender = SendRequest<Full<Bytes>>;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (run, rounds, warmup) = if bench {
        (Duration::from_secs(2), 8, Duration::from_secs(1))
    } else {
        (Duration::from_millis(300), 1, Duration::ZERO)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench_main(run, rounds, warmup, bench));
}

async fn bench_main(run: Duration, rounds: usize, warmup: Duration, bench: bool) {
    let pki = Pki::new();
    let (up, _stop) =
        upstream(|_req| async { Response::new(full(Bytes::from_static(b"ok\n"))) }).await;
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&[HOST], Alg::Ecdsa).write(dir.path(), "");
    let proxy = Proxy::start_in(
        dir,
        &format!(
            r#"
[admin]
listen = "off"

[[listeners]]
listen = "127.0.0.1:0"

[[sites]]
hosts = ["{HOST}"]
tls = {{ cert = "cert.pem", key = "key.pem" }}

  [[sites.routes]]
  path = "/limited"
  upstream = "http://{up}"
    [[sites.routes.rate_limits]]
    name = "per-client"
    rate = "1000000/s"
    burst = 1000000
    [[sites.routes.rate_limits]]
    name = "global"
    rate = "1000000/s"
    burst = 1000000
    key = "route"

  [[sites.routes]]
  path = "/open"
  upstream = "http://{up}"
"#
        ),
    )
    .await;

    let cfg = pki.client_config(&[b"http/1.1"]);
    let mut senders = Vec::new();
    for i in 0..CONNECTIONS {
        let from = IpAddr::from([127, 0, 1, i + 1]);
        let tls = tls_connect_from(from, proxy.https, HOST, cfg.clone())
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(send);
    }

    println!(
        "ratelimit_load: {CONNECTIONS} keep-alive HTTP/1.1 connections over TLS, {:?} per run, {rounds} round(s), alternating order",
        run
    );
    if !warmup.is_zero() {
        for path in ["/limited", "/open"] {
            (senders, _) = drive(senders, path, warmup).await;
        }
    }
    let (mut on, mut off) = ((0u64, Duration::ZERO), (0u64, Duration::ZERO));
    let mut ratios = Vec::new();
    let (mut on_cpu, mut off_cpu) = (0u64, 0u64);
    for round in 0..rounds {
        let mut rps = [0.0f64; 2];
        let order = if round % 2 == 0 {
            ["/limited", "/open"]
        } else {
            ["/open", "/limited"]
        };
        let mut line = format!("  round {}:", round + 1);
        for path in order {
            if !warmup.is_zero() {
                (senders, _) = drive(senders, path, SETTLE).await;
            }
            let cpu0 = cpu_ticks();
            let (s, (n, took)) = drive(senders, path, run).await;
            let cpu = cpu_ticks() - cpu0;
            senders = s;
            let (acc, acc_cpu) = if path == "/limited" {
                (&mut on, &mut on_cpu)
            } else {
                (&mut off, &mut off_cpu)
            };
            acc.0 += n;
            acc.1 += took;
            *acc_cpu += cpu;
            let r = n as f64 / took.as_secs_f64();
            rps[usize::from(path == "/open")] = r;
            line += &format!(" {path} {r:.0} req/s;");
        }
        ratios.push(rps[0] / rps[1]);
        println!("{line} ratio {:.3}", rps[0] / rps[1]);
    }
    let geomean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    let on_rps = on.0 as f64 / on.1.as_secs_f64();
    let off_rps = off.0 as f64 / off.1.as_secs_f64();
    let ratio = on_rps / off_rps;
    println!(
        "  limiting on {on_rps:.0} req/s, off {off_rps:.0} req/s, ratio {ratio:.3} (target >= {TARGET}){}; geometric mean of the rounds' ratios {geomean:.3}",
        match (bench, ratio >= TARGET) {
            (false, _) => "  [smoke run under cargo test: not a measurement]",
            (true, true) => "",
            (true, false) => "  BELOW TARGET",
        }
    );
    // Clock ticks are 10 ms (USER_HZ = 100).
    let on_us = on_cpu as f64 * 10_000.0 / on.0 as f64;
    let off_us = off_cpu as f64 * 10_000.0 / off.0 as f64;
    println!(
        "  CPU per request (client + proxy + upstream): on {on_us:.1} us, off {off_us:.1} us; off/on {:.3}",
        off_us / on_us
    );
    if !bench {
        assert!(on.0 > 0 && off.0 > 0);
    }
    proxy.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy.done).await;
}

/// User + system CPU time of this process so far, in clock ticks
/// (`/proc/self/stat` fields 14 and 15).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat (Linux)");
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Sends `GET path` back to back on every connection for `run`; returns the
/// connections, the responses received and the time taken. Every response
/// must be a 200 (the generous limits never reject).
async fn drive(
    senders: Vec<Sender>,
    path: &'static str,
    run: Duration,
) -> (Vec<Sender>, (u64, Duration)) {
    let start = Instant::now();
    let deadline = start + run;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let req = Request::builder()
                        .uri(path)
                        .header("host", HOST)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let resp = send.send_request(req).await.expect("request");
                    let status = resp.status();
                    resp.into_body().collect().await.expect("body");
                    assert_eq!(status, 200, "{path} answered {status}");
                    n += 1;
                }
                (send, n)
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut total = 0;
    for t in tasks {
        let (send, n) = t.await.unwrap();
        out.push(send);
        total += n;
    }
    (out, (total, start.elapsed()))
}
