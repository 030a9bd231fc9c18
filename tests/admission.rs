//! Connection-slot fairness: one address cannot take every slot, with
//! silent connections (TLS handshakes that never start) or with idle
//! keep-alive connections.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::net::TcpStream;
use tokio::time::timeout;

use common::{Alg, Pki, Proxy};

const HOST: &str = "fair.test";
/// How long a second client may wait to be served.
const SERVED_WITHIN: Duration = Duration::from_secs(2);

async fn start(pki: &Pki, limits: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&[HOST], Alg::Ecdsa).write(dir.path(), "");
    Proxy::start_in(
        dir,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [limits]\n{limits}\n\
             [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
             [[sites]]\nhosts = [\"{HOST}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\
             [[sites.routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
        ),
    )
    .await
}

/// One GET from the local address `from`, timed against [`SERVED_WITHIN`].
async fn served_from(from: &str, proxy: &Proxy, pki: &Pki) -> Duration {
    let start = Instant::now();
    let req = Request::builder()
        .uri(format!("https://{HOST}/"))
        .header("host", HOST)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = timeout(
        SERVED_WITHIN,
        common::request_from(
            from.parse().unwrap(),
            proxy.https,
            HOST,
            pki.client_config(&[b"http/1.1"]),
            req,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("a client from {from} was not served within {SERVED_WITHIN:?}"))
    .unwrap_or_else(|e| panic!("a client from {from}: {e}"));
    assert_eq!(got.status, 200);
    start.elapsed()
}

/// The soft limit on open files of this process.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_connections_from_one_address_do_not_lock_out_another() {
    let pki = Pki::new();
    // Default limits: 10,000 connections in all, so the silent ones alone
    // would take every slot without the per-address budgets.
    let proxy = start(&pki, "").await;
    // Each silent connection costs this process one descriptor, and the
    // proxy (in this process) one for as long as it keeps it.
    let n = 10_000.min(open_files_limit().saturating_sub(2_000));
    assert!(
        n >= 5_000,
        "open-file limit too low for this test: {}",
        open_files_limit()
    );
    let mut silent: Vec<TcpStream> = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while silent.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} connections in 60 s",
            silent.len()
        );
        let batch = (n - silent.len()).min(500);
        let conns =
            futures_util::future::join_all((0..batch).map(|_| TcpStream::connect(proxy.https)))
                .await;
        silent.extend(conns.into_iter().filter_map(Result::ok));
        // Every few hundred, another address is still served promptly.
        if silent.len() % 2_000 < 500 {
            served_from("127.0.0.2", &proxy, &pki).await;
        }
    }
    for _ in 0..5 {
        served_from("127.0.0.2", &proxy, &pki).await;
    }
    let (status, text) = common::admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let refused = metric(
        &text,
        "portcullis_connections_refused_total{reason=\"per_ip_handshakes\"}",
    );
    assert!(
        refused >= (n - 64) as f64 * 0.9,
        "the silent connections beyond the per-address handshake budget are refused: {refused}"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_make_room_at_the_connection_cap() {
    let pki = Pki::new();
    const CAP: usize = 8;
    let proxy = start(&pki, &format!("max_connections = {CAP}")).await;
    // CAP idle keep-alive connections from one address, each after one
    // request.
    let mut idle = Vec::new();
    for _ in 0..CAP {
        let tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"http/1.1"]))
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let task = tokio::spawn(conn);
        let req = Request::builder()
            .uri("/")
            .header("host", HOST)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send.send_request(req).await.unwrap().status(), 200);
        idle.push((send, task));
    }
    // Every slot is taken; a new client from another address is served
    // because the longest idle connection is closed for it.
    served_from("127.0.0.2", &proxy, &pki).await;
    let (_, text) = common::admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert!(metric(&text, "portcullis_connections_shed_total") >= 1.0);
    // The shed connection was closed by the proxy (its client task ends).
    assert!(
        common::eventually(SERVED_WITHIN, || async {
            idle.iter().any(|(_, t)| t.is_finished())
        })
        .await,
        "no idle connection was closed"
    );
}
