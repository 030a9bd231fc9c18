//! Requests/s through the real proxy with rate limiting on vs off, in one
//! run: the proxy (in process, release build), a fast HTTP/1.1 upstream,
//! and two routes to it that differ only in their limits — `/limited` has
//! a per-address and a route-wide limit, both generous enough never to
//! reject; `/open` has none. The same 32 keep-alive HTTP/1.1 connections
//! over TLS (each from its own loopback address, so the per-address limit
//! tracks 32 clients) drive one route at a time for `RUN` each, alternating
//! which goes first, for `ROUNDS` rounds. Prints requests/s of both and
//! their ratio (target >= 0.97).
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

type Sender = SendRequest<Full<Bytes>>;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (run, rounds, warmup) = if bench {
        (Duration::from_secs(5), 3, Duration::from_secs(1))
    } else {
        (Duration::from_millis(300), 1, Duration::ZERO)
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(bench_main(run, rounds, warmup, bench));
}

async fn bench_main(run: Duration, rounds: usize, warmup: Duration, bench: bool) {
    let pki = Pki::new();
    let (up, _stop) = upstream(|_req| async { Response::new(full(Bytes::from_static(b"ok\n"))) }).await;
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
        let tls = tls_connect_from(from, proxy.https, HOST, cfg.clone()).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
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
    for round in 0..rounds {
        let order = if round % 2 == 0 { ["/limited", "/open"] } else { ["/open", "/limited"] };
        let mut line = format!("  round {}:", round + 1);
        for path in order {
            let (s, (n, took)) = drive(senders, path, run).await;
            senders = s;
            let acc = if path == "/limited" { &mut on } else { &mut off };
            acc.0 += n;
            acc.1 += took;
            line += &format!(" {path} {:.0} req/s;", n as f64 / took.as_secs_f64());
        }
        println!("{line}");
    }
    let on_rps = on.0 as f64 / on.1.as_secs_f64();
    let off_rps = off.0 as f64 / off.1.as_secs_f64();
    let ratio = on_rps / off_rps;
    println!(
        "  limiting on {on_rps:.0} req/s, off {off_rps:.0} req/s, ratio {ratio:.3} (target >= {TARGET}){}",
        if ratio >= TARGET { "" } else { "  BELOW TARGET" }
    );
    if !bench {
        assert!(on.0 > 0 && off.0 > 0);
    }
    proxy.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy.done).await;
}

/// Sends `GET path` back to back on every connection for `run`; returns the
/// connections, the responses received and the time taken. Every response
/// must be a 200 (the generous limits never reject).
async fn drive(senders: Vec<Sender>, path: &'static str, run: Duration) -> (Vec<Sender>, (u64, Duration)) {
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
