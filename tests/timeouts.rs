//! Every downstream timeout of `[timeouts]` ends the connection (or the
//! request) it is meant to end, not much earlier and not much later.
//!
//! Real time, not `tokio::time::pause()`: the proxy runs in this runtime
//! but speaks to the client and the upstream over real loopback sockets,
//! and a paused clock auto-advances whenever the runtime waits on that I/O,
//! firing the timeouts under test early. So each test configures a short
//! timeout (about a second) and asserts bounds around it.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use common::*;

/// Timers never fire early, but the two ends of a connection start their
/// clocks a little apart: lower bounds allow this much slack.
const SLACK: Duration = Duration::from_millis(200);
/// Upper bound for "it happened" on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(10);

/// The proxy with one site proxying to `up` and the given `[timeouts]` lines.
async fn start(pki: &Pki, up: SocketAddr, timeouts: &str) -> Proxy {
    OneSite::new()
        .top(&format!("[timeouts]\n{timeouts}"))
        .upstream(up)
        .start(pki)
        .await
}

/// Reads until EOF or a read error (a reset counts as closed); returns the
/// bytes read. Fails the test if the peer keeps the connection open past `limit`.
async fn read_until_closed(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let res = tokio::time::timeout(limit, async {
        // Bounded: at most 64 MiB is drained before giving up.
        for _ in 0..1024 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    if got.len() < 4096 {
                        got.extend_from_slice(&buf[..n.min(4096)]);
                    }
                }
            }
        }
        false
    })
    .await;
    assert_eq!(
        res,
        Ok(true),
        "the proxy kept the connection open for over {limit:?}"
    );
    got
}

#[tokio::test]
async fn partial_request_head_is_disconnected_after_request_header_timeout() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    let proxy = start(&pki, up, "request_header = \"1s\"\nidle = \"60s\"").await;

    let t0 = Instant::now();
    let mut tls = tls_connect(proxy.https, "api.test", pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Slow: ")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let got = read_until_closed(&mut tls, LIMIT).await;
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) - SLACK,
        "closed after {elapsed:?}, before the 1s header timeout"
    );
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "a partial head must not be answered as a request: {:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn complete_request_head_within_request_header_timeout_is_served() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    let proxy = start(&pki, up, "request_header = \"1s\"\nidle = \"60s\"").await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let got = get(proxy.https, "api.test", "/fast", pki.client_config(&[alpn])).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.seen()[":path"], "/fast");
    }
}

#[tokio::test]
async fn silent_tcp_client_is_closed_after_tls_handshake_timeout() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    let proxy = start(&pki, up, "tls_handshake = \"1s\"").await;

    let t0 = Instant::now();
    let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
    let got = read_until_closed(&mut tcp, LIMIT).await;
    let elapsed = t0.elapsed();
    assert!(
        got.is_empty(),
        "the proxy wrote to a client that sent no ClientHello: {got:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(1) - SLACK,
        "closed after {elapsed:?}, before the 1s handshake timeout"
    );
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout_on_h1_and_h2() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    // The header timeout (which hyper also runs between h1 requests) is
    // long, so only the idle timeout can close the connection.
    let proxy = start(&pki, up, "idle = \"1s\"\nrequest_header = \"30s\"").await;

    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let name = String::from_utf8_lossy(alpn);
        let tls = tls_connect(proxy.https, "api.test", pki.client_config(&[alpn]))
            .await
            .unwrap();
        let io = TokioIo::new(tls);
        let req = req_builder(alpn, "api.test", "/idle")
            .body(Empty::<Bytes>::new())
            .unwrap();
        // `_sender` stays alive, so the client never closes: only the
        // server can end `conn`.
        let (resp, conn, _sender): (_, _, Box<dyn std::any::Any + Send>) = if alpn == b"h2" {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let resp = send.send_request(req).await.unwrap();
            (resp, conn, Box::new(send))
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            let conn = tokio::spawn(conn);
            let resp = send.send_request(req).await.unwrap();
            (resp, conn, Box::new(send))
        };
        assert_eq!(resp.status(), 200, "{name}");
        resp.into_body().collect().await.unwrap();
        let t0 = Instant::now();
        let ended = tokio::time::timeout(LIMIT, conn)
            .await
            .unwrap_or_else(|_| panic!("{name}: idle connection still open after {LIMIT:?}"));
        let elapsed = t0.elapsed();
        assert!(
            ended.unwrap().is_ok(),
            "{name}: the server closed uncleanly"
        );
        assert!(
            elapsed >= Duration::from_secs(1) - SLACK,
            "{name}: closed {elapsed:?} after the response, before the 1s idle timeout"
        );
    }
}

#[tokio::test]
async fn idle_timeout_does_not_cut_a_slow_response_on_h1_and_h2() {
    let pki = Pki::new();
    // The upstream takes 2.5 idle periods to answer (the slowness is the
    // behaviour under test).
    let (up, _stop) = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        Response::new(full("slow but fine"))
    })
    .await;
    let proxy = start(&pki, up, "idle = \"1s\"").await;
    let mut tasks = Vec::new();
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let (addr, cfg) = (proxy.https, pki.client_config(&[alpn]));
        tasks.push(tokio::spawn(async move {
            let got = tokio::time::timeout(LIMIT, get(addr, "api.test", "/slow", cfg))
                .await
                .expect("answer in time");
            (alpn, got)
        }));
    }
    for t in tasks {
        let (alpn, got) = t.await.unwrap();
        let name = String::from_utf8_lossy(alpn);
        assert_eq!(got.status, 200, "{name}: {:?}", got.body);
        assert_eq!(&got.body[..], b"slow but fine", "{name}");
    }
}

/// What the counting upstream saw of one request body.
#[derive(Debug)]
struct BodySeen {
    bytes: u64,
    error: Option<String>,
    at: Instant,
}

/// An upstream that reads each request body to its end (or error) and
/// reports what it saw on a channel.
async fn counting_upstream() -> (
    SocketAddr,
    tokio_util::sync::CancellationToken,
    mpsc::UnboundedReceiver<BodySeen>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (addr, stop) = upstream(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let mut body = req.into_body();
            let mut bytes = 0;
            let mut error = None;
            // Bounded by the body: it ends, fails, or the proxy drops it.
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => bytes += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            let _ = tx.send(BodySeen {
                bytes,
                error,
                at: Instant::now(),
            });
            Response::new(full(bytes.to_string()))
        }
    })
    .await;
    (addr, stop, rx)
}

#[tokio::test]
async fn stalled_upload_is_abandoned_after_request_body_timeout_on_h1_and_h2() {
    let pki = Pki::new();
    let (up, _stop, mut seen) = counting_upstream().await;
    let proxy = start(&pki, up, "request_body = \"1s\"").await;
    const SENT: usize = 10_000;

    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let name = String::from_utf8_lossy(alpn);
        // 10 kB, then the client goes quiet without ending the body.
        let body = StreamBody::new(
            stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from(vec![
                b'x';
                SENT
            ])))])
            .chain(stream::pending()),
        );
        let req = req_builder(alpn, "api.test", "/upload")
            .method("POST")
            .header("content-length", "1000000")
            .body(body)
            .unwrap();
        let (addr, cfg) = (proxy.https, pki.client_config(&[alpn]));
        let t0 = Instant::now();
        let client =
            tokio::spawn(async move { send(addr, "api.test", cfg, req).await.map(|r| r.status()) });
        let upstream_saw = tokio::time::timeout(LIMIT, seen.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{name}: the upstream was still waiting for the body after {LIMIT:?}")
            })
            .unwrap();
        let waited = upstream_saw.at - t0;
        assert!(
            upstream_saw.bytes <= SENT as u64,
            "{name}: {upstream_saw:?}"
        );
        assert!(
            upstream_saw.error.is_some(),
            "{name}: the upstream must see a broken body, not a complete short one: {upstream_saw:?}"
        );
        assert!(
            waited >= Duration::from_secs(1) - SLACK,
            "{name}: body abandoned after {waited:?}, before the 1s body timeout"
        );
        // The client gets an answer (an error status) or a closed stream; never a 200.
        let status = tokio::time::timeout(LIMIT, client)
            .await
            .unwrap_or_else(|_| panic!("{name}: client got no answer in {LIMIT:?}"))
            .unwrap();
        if let Ok(s) = status {
            assert!(
                s.is_client_error() || s.is_server_error(),
                "{name}: client got {s}"
            );
        }
    }
}

/// Sends its message when dropped: tells the test the upstream's response
/// body was dropped (the proxy gave up on it), and how much it produced.
struct DropSignal {
    tx: Option<mpsc::UnboundedSender<u64>>,
    produced: u64,
}

impl DropSignal {
    /// Counts produced bytes. A method (not a field update) so that a `move`
    /// closure captures the whole signal, not just a copy of the counter.
    fn produced(&mut self, n: u64) {
        self.produced += n;
    }
}

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(self.produced);
        }
    }
}

#[tokio::test]
async fn client_that_stops_reading_is_cut_off_after_response_write_timeout() {
    let pki = Pki::new();
    const CHUNK: usize = 64 * 1024;
    const TOTAL: u64 = 4 << 30;
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    // An upstream with a 4 GiB body that reports when it is dropped.
    let (up, _stop) = upstream(move |_req: Request<Incoming>| {
        let mut signal = DropSignal {
            tx: Some(dropped_tx.clone()),
            produced: 0,
        };
        async move {
            let chunk = Bytes::from(vec![b'z'; CHUNK]);
            let frames = stream::iter(0..TOTAL / CHUNK as u64).map(move |_| {
                signal.produced(CHUNK as u64);
                Ok::<_, Infallible>(Frame::data(chunk.clone()))
            });
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
    })
    .await;
    let proxy = start(&pki, up, "response_write = \"1s\"").await;

    let mut tls = tls_connect(proxy.https, "api.test", pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(LIMIT, tls.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    // From here on the client reads nothing (but keeps the connection).
    let t0 = Instant::now();
    let produced = tokio::time::timeout(LIMIT, dropped.recv())
        .await
        .expect("the proxy still streams to a client that stopped reading")
        .unwrap();
    let elapsed = t0.elapsed();
    assert!(produced < TOTAL, "the whole body was produced: {produced}");
    assert!(
        elapsed >= Duration::from_secs(1) - SLACK,
        "cut off {elapsed:?} after the client stopped reading, before the 1s write timeout"
    );
    // The downstream connection was closed too: what is buffered drains, then EOF.
    read_until_closed(&mut tls, LIMIT).await;
}

// When the client resets an h2 stream hyper drops the service future before
// any body exists; the in-flight count must still come back down.
#[tokio::test]
async fn idle_timeout_closes_an_h2_connection_whose_request_the_client_cancelled() {
    let pki = Pki::new();
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    // The upstream holds every request for a minute.
    let (up, _stop) = upstream(move |_req: Request<Incoming>| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let _ = arrived_tx.send(());
            // Behaviour, not synchronisation: the answer never comes in time.
            tokio::time::sleep(Duration::from_secs(60)).await;
            Response::new(full("late"))
        }
    })
    .await;
    let proxy = start(&pki, up, "idle = \"1s\"").await;

    let tls = tls_connect(proxy.https, "api.test", pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = req_builder(b"h2", "api.test", "/cancel")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let pending = tokio::spawn(sender.send_request(req));
    tokio::time::timeout(LIMIT, arrived.recv())
        .await
        .expect("request reaches the upstream")
        .unwrap();
    // Dropping the response future resets the stream (RST_STREAM CANCEL);
    // the connection itself stays open and now carries nothing.
    pending.abort();
    let _ = pending.await;
    let t0 = Instant::now();
    let ended = tokio::time::timeout(LIMIT, conn).await.unwrap_or_else(|_| {
        panic!("the connection was still open {LIMIT:?} after its only request was cancelled (idle is 1s)")
    });
    assert!(ended.unwrap().is_ok());
    assert!(
        t0.elapsed() >= Duration::from_secs(1) - SLACK,
        "{:?}",
        t0.elapsed()
    );
    drop(sender);
}
