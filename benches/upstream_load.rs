//! Requests/s through the real proxy to a group of four upstreams vs a
//! single upstream, in one run: the proxy (in process, release build),
//! four fast HTTP/1.1 upstreams, and routes that differ only in their
//! upstreams — `/one` forwards to one of them; `/four` balances over all
//! four with round robin, `/four-lr` with least requests (so the cost of
//! selection, per-upstream pools and metrics is what differs). The same 32
//! keep-alive HTTP/1.1 connections over TLS drive one route at a time for
//! `RUN` each, rotating which goes first, for `ROUNDS` rounds. Prints
//! requests/s of each route and the ratios to `/one`.
//!
//! cargo bench --bench upstream_load
//! (Under `cargo test --benches` it runs one short round as a smoke test.)

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const HOST: &str = "load.test";
const CONNECTIONS: usize = 32;
const ROUTES: [&str; 3] = ["/one", "/four", "/four-lr"];

type Sender = SendRequest<Full<Bytes>>;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (run, rounds, warmup) = if bench {
        (Duration::from_secs(5), 3, Duration::from_secs(1))
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
    let mut ups = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..4 {
        let (up, stop) =
            upstream(|_req| async { Response::new(full(Bytes::from_static(b"ok\n"))) }).await;
        ups.push(format!("\"http://{up}\""));
        stops.push(stop);
    }
    let all = ups.join(", ");
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
  path = "/one"
  upstream = {one}

  [[sites.routes]]
  path = "/four"
  upstreams = [{all}]

  [[sites.routes]]
  path = "/four-lr"
  upstreams = [{all}]
  lb = "least_requests"
"#,
            one = ups[0],
        ),
    )
    .await;

    let cfg = pki.client_config(&[b"http/1.1"]);
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        let tls = tls_connect(proxy.https, HOST, cfg.clone()).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(send);
    }

    println!(
        "upstream_load: {CONNECTIONS} keep-alive HTTP/1.1 connections over TLS, {run:?} per run, {rounds} round(s), rotating order"
    );
    if !warmup.is_zero() {
        for path in ROUTES {
            (senders, _) = drive(senders, path, warmup).await;
        }
    }
    let mut acc = [(0u64, Duration::ZERO); 3];
    for round in 0..rounds {
        let mut line = format!("  round {}:", round + 1);
        for k in 0..ROUTES.len() {
            let i = (round + k) % ROUTES.len();
            let (s, (n, took)) = drive(senders, ROUTES[i], run).await;
            senders = s;
            acc[i].0 += n;
            acc[i].1 += took;
            line += &format!(" {} {:.0} req/s;", ROUTES[i], n as f64 / took.as_secs_f64());
        }
        println!("{line}");
    }
    let rps: Vec<f64> = acc
        .iter()
        .map(|(n, t)| *n as f64 / t.as_secs_f64())
        .collect();
    println!(
        "  single upstream {:.0} req/s; 4-upstream round robin {:.0} req/s (ratio {:.3}); 4-upstream least requests {:.0} req/s (ratio {:.3})",
        rps[0],
        rps[1],
        rps[1] / rps[0],
        rps[2],
        rps[2] / rps[0]
    );
    if !bench {
        assert!(acc.iter().all(|(n, _)| *n > 0));
    }
    proxy.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy.done).await;
}

/// Sends `GET path` back to back on every connection for `run`; returns the
/// connections, the responses received and the time taken. Every response
/// must be a 200.
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
