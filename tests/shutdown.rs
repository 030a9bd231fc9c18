//! Graceful shutdown: in-flight requests finish, new connections are
//! refused, and a request that outlives the grace period is cut off
//! without holding the process. Also the binary's SIGTERM path.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use common::*;

/// Upper bound for "it happened" on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(10);

/// One site proxying to `up`, with `shutdown_grace = grace`.
fn site(up: SocketAddr, grace: &str) -> OneSite {
    OneSite::new()
        .top(&format!("[timeouts]\nshutdown_grace = \"{grace}\""))
        .upstream(up)
}

/// An upstream that reports each request's arrival on a channel, then
/// answers `slow` after `delay`.
async fn slow_upstream(
    delay: Duration,
) -> (
    SocketAddr,
    tokio_util::sync::CancellationToken,
    mpsc::UnboundedReceiver<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (addr, stop) = upstream(move |_req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            // The slowness is the behaviour under test; arrival is awaited
            // through the channel.
            tokio::time::sleep(delay).await;
            Response::new(full("slow"))
        }
    })
    .await;
    (addr, stop, rx)
}

/// Starts one GET per ALPN and waits until the upstream holds all of them.
async fn start_in_flight(
    addr: SocketAddr,
    pki: &Pki,
    arrived: &mut mpsc::UnboundedReceiver<()>,
) -> Vec<(
    &'static [u8],
    tokio::task::JoinHandle<Result<(u16, Bytes), String>>,
)> {
    let mut tasks = Vec::new();
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let cfg = pki.client_config(&[alpn]);
        let req = req_builder(alpn, "api.test", "/slow")
            .body(Empty::<Bytes>::new())
            .unwrap();
        tasks.push((
            alpn,
            tokio::spawn(async move {
                request(addr, "api.test", cfg, req)
                    .await
                    .map(|got| (got.status, got.body))
                    .map_err(|e| e.to_string())
            }),
        ));
    }
    for _ in 0..tasks.len() {
        tokio::time::timeout(LIMIT, arrived.recv())
            .await
            .expect("requests reach the upstream")
            .unwrap();
    }
    tasks
}

/// Connects until the listener refuses (it closes right after shutdown
/// starts); true if refused within `limit`.
async fn refused_within(addr: SocketAddr, limit: Duration) -> bool {
    eventually(limit, || async {
        matches!(
            TcpStream::connect(addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await
}

/// Waits for the binary to exit after SIGTERM; fails unless it exits 0
/// within [`LIMIT`].
async fn assert_exits_0(proxy: &mut BinProxy) {
    let exit = proxy.wait_exit(LIMIT).await.unwrap_or_else(|| {
        panic!(
            "portcullis still running {LIMIT:?} after SIGTERM:\n{}",
            proxy.log_text()
        )
    });
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; stderr:\n{}",
        proxy.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_after_shutdown_starts_and_new_connections_are_refused() {
    let pki = Pki::new();
    let (up, _stop, mut arrived) = slow_upstream(Duration::from_millis(1500)).await;
    let proxy = site(up, "20s").start(&pki).await;
    let in_flight = start_in_flight(proxy.https, &pki, &mut arrived).await;

    let t0 = Instant::now();
    proxy.shutdown.cancel();
    assert!(
        refused_within(proxy.https, Duration::from_secs(5)).await,
        "the listener still accepts connections after shutdown started"
    );
    for (alpn, task) in in_flight {
        let name = String::from_utf8_lossy(alpn);
        let got = tokio::time::timeout(LIMIT, task)
            .await
            .expect("answer in time")
            .unwrap();
        let (status, body) =
            got.unwrap_or_else(|e| panic!("{name}: in-flight request failed: {e}"));
        assert_eq!(status, 200, "{name}");
        assert_eq!(&body[..], b"slow", "{name}");
    }
    let done = tokio::time::timeout(LIMIT, proxy.done)
        .await
        .expect("run() returns once in-flight requests are done")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    // It returned because the work was done, long before the 20 s grace.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// Opens a connection with ALPN `alpn`, completes one request on it, and
/// returns it open and idle: the request sender (kept by the caller so the
/// client never closes) and the connection task.
async fn idle_connection(
    addr: SocketAddr,
    pki: &Pki,
    alpn: &[u8],
) -> (
    Box<dyn std::any::Any + Send>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tls = tls_connect(addr, "api.test", pki.client_config(&[alpn]))
        .await
        .unwrap();
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = req_builder(alpn, "api.test", "/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (resp, conn, sender): (_, _, Box<dyn std::any::Any + Send>) = if alpn == b"h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        (send.send_request(req).await.unwrap(), conn, Box::new(send))
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        let conn = tokio::spawn(conn);
        (send.send_request(req).await.unwrap(), conn, Box::new(send))
    };
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    (sender, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_handshaking_connections_do_not_delay_shutdown() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    let proxy = site(up, "20s").start(&pki).await;
    // A TCP client that never starts its TLS handshake (the handshake
    // timeout is the default 10 s)...
    let _silent = TcpStream::connect(proxy.https).await.unwrap();
    // ...and idle keep-alive connections, one per protocol. The listener
    // accepts in order, so once these are served the silent one was
    // accepted too.
    let h1 = idle_connection(proxy.https, &pki, b"http/1.1").await;
    let h2 = idle_connection(proxy.https, &pki, b"h2").await;

    let t0 = Instant::now();
    proxy.shutdown.cancel();
    let done = tokio::time::timeout(LIMIT, proxy.done)
        .await
        .expect("run() returns while idle connections are open")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "idle or handshaking connections held shutdown for {:?} (grace is 20 s)",
        t0.elapsed()
    );
    // The idle connections were closed by the proxy.
    for (name, (_sender, conn)) in [("http/1.1", h1), ("h2", h2)] {
        let ended = tokio::time::timeout(LIMIT, conn)
            .await
            .unwrap_or_else(|_| panic!("{name}: idle connection still open after shutdown"));
        assert!(ended.unwrap().is_ok(), "{name}: closed uncleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_outliving_shutdown_grace_is_cut_off_and_run_returns() {
    let pki = Pki::new();
    // The upstream would answer after a minute.
    let (up, _stop, mut arrived) = slow_upstream(Duration::from_secs(60)).await;
    let proxy = site(up, "1s").start(&pki).await;
    let in_flight = start_in_flight(proxy.https, &pki, &mut arrived).await;

    let t0 = Instant::now();
    proxy.shutdown.cancel();
    let done = tokio::time::timeout(LIMIT, proxy.done)
        .await
        .expect("run() returns after the grace period")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    let returned = t0.elapsed();
    assert!(
        returned >= Duration::from_millis(900),
        "run() returned after {returned:?}, before the 1s grace"
    );
    // The clients are cut off promptly, not left hanging for the upstream.
    for (alpn, task) in in_flight {
        let name = String::from_utf8_lossy(alpn);
        let got = tokio::time::timeout(LIMIT, task)
            .await
            .unwrap_or_else(|_| {
                panic!("{name}: the connection outlived the grace period by {LIMIT:?}")
            })
            .unwrap();
        match got {
            Err(_) => {}
            Ok((status, body)) => assert!(
                status >= 500,
                "{name}: a request cut off at shutdown must not look successful: {status} {body:?}"
            ),
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "clients were cut off only after {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_request_and_the_binary_exits_0() {
    let pki = Pki::new();
    let (up, _stop, mut arrived) = slow_upstream(Duration::from_millis(1000)).await;
    let mut proxy = site(up, "20s").start_bin(&pki);

    let req = req_builder(b"http/1.1", "api.test", "/slow")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (addr, cfg) = (proxy.https, pki.client_config(&[b"http/1.1"]));
    let client = tokio::spawn(async move {
        request(addr, "api.test", cfg, req)
            .await
            .map(|got| (got.status, got.body))
            .map_err(|e| e.to_string())
    });
    tokio::time::timeout(LIMIT, arrived.recv())
        .await
        .expect("request reaches the upstream")
        .unwrap();

    proxy.signal("TERM");
    let (status, body) = tokio::time::timeout(LIMIT, client)
        .await
        .expect("answer in time")
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "in-flight request failed on SIGTERM: {e}\n{}",
                proxy.log_text()
            )
        });
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"slow");
    assert_exits_0(&mut proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_binary_exits_0_promptly() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    let mut proxy = site(up, "20s").start_bin(&pki);
    // An idle keep-alive connection is open while the signal arrives.
    let req = req_builder(b"http/1.1", "api.test", "/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send(
        proxy.https,
        "api.test",
        pki.client_config(&[b"http/1.1"]),
        req,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    let t0 = Instant::now();
    proxy.signal("TERM");
    assert_exits_0(&mut proxy).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        t0.elapsed()
    );
}
