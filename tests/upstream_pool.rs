//! The HTTP/1.1 upstream connection pool (`src/proxy/upstream/pool.rs`),
//! end to end through the real proxy: keep-alive reuse, a response body
//! dropped before its end, an upstream that closes after every response,
//! `timeouts.upstream_idle` and `limits.max_upstream_idle_per_host`.
//!
//! The upstream is a hand-written HTTP/1.1 server on 127.0.0.1:0, so the
//! test sees every connection the proxy opens and every close the proxy
//! makes. It publishes what it saw in [`Events`]; the tests await those
//! events (each wait bounded) instead of sleeping.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::timeout;

use common::{OneSite, Pki, Proxy};

/// Upper bound for "it happened" on a loaded machine.
const WAIT: Duration = Duration::from_secs(10);
/// The client sees a response a little after the proxy has pooled its
/// connection: lower bounds on idle time allow this much slack.
const SLACK: Duration = Duration::from_millis(200);
/// The site's name (SNI and Host).
const HOST: &str = "pool.test";
/// The body of `/small` (and of `/hold` once released).
const SMALL: &[u8] = b"small body from the test upstream\n";
/// The size of `/big`: far more than the proxy can pass on to a client
/// that does not read (its socket buffers and hyper's), so the proxy never
/// reads it to the end. (The upstream side may absorb most of it: loopback
/// send and receive buffers grow to megabytes.)
const BIG: usize = 4 << 20;

// ---------------------------------------------------------------------------
// The test upstream

/// How the test upstream treats a connection after a response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Answers with `Connection: close` and closes it.
    CloseEach,
}

/// What the test upstream saw, shared with the test.
#[derive(Default)]
struct Events {
    /// Per accepted connection, by id (accept order): the paths requested
    /// on it, in order.
    conns: Mutex<Vec<Vec<String>>>,
    /// Ids of the connections the proxy closed (EOF or error while reading
    /// the next request, or an error while writing a response). Closes made
    /// by the upstream itself ([`Style::CloseEach`]) are not in here.
    closed_by_proxy: Mutex<Vec<usize>>,
    /// `/hold` requests that have arrived and wait for [`Events::released`].
    holding: Mutex<usize>,
    /// Lets every held `/hold` request answer.
    released: AtomicBool,
    /// Woken (all waiters) on every change above.
    changed: Notify,
}

impl Events {
    fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    fn closed(&self) -> Vec<usize> {
        self.closed_by_proxy.lock().unwrap().clone()
    }

    fn holding(&self) -> usize {
        *self.holding.lock().unwrap()
    }

    /// Paths requested on connection `id`.
    fn paths(&self, id: usize) -> Vec<String> {
        self.conns.lock().unwrap()[id].clone()
    }

    fn changed(&self) {
        self.changed.notify_waiters();
    }

    /// Waits until `cond` holds; false if it still does not after `limit`.
    async fn until(&self, limit: Duration, cond: impl Fn(&Events) -> bool) -> bool {
        let wait = async {
            loop {
                // Registered before the check, so a change made between the
                // check and the await still wakes this waiter.
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if cond(self) {
                    return;
                }
                notified.await;
            }
        };
        timeout(limit, wait).await.is_ok()
    }

    /// Like [`Events::until`], failing the test with `what` on expiry.
    async fn expect(&self, what: &str, cond: impl Fn(&Events) -> bool) {
        assert!(self.until(WAIT, cond).await, "{what}: not within {WAIT:?}");
    }
}

/// Starts the test upstream on 127.0.0.1:0. It serves `GET /small`,
/// `GET /big` ([`BIG`] bytes with Content-Length) and `GET /hold` (answered
/// once [`Events::released`] is set). It stops with the test's runtime.
async fn start_upstream(style: Style) -> (SocketAddr, Arc<Events>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events = Arc::new(Events::default());
    let ev = events.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let id = {
                let mut conns = ev.conns.lock().unwrap();
                conns.push(Vec::new());
                conns.len() - 1
            };
            ev.changed();
            tokio::spawn(serve(tcp, id, ev.clone(), style));
        }
    });
    (addr, events)
}

/// Serves one connection until either side closes it.
async fn serve(mut tcp: TcpStream, id: usize, ev: Arc<Events>, style: Style) {
    let closed_by_proxy = |ev: &Events| {
        ev.closed_by_proxy.lock().unwrap().push(id);
        ev.changed();
    };
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Some(path) = read_head(&mut tcp, &mut buf).await else {
            return closed_by_proxy(&ev);
        };
        ev.conns.lock().unwrap()[id].push(path.clone());
        ev.changed();
        let connection = match style {
            Style::KeepAlive => "keep-alive",
            Style::CloseEach => "close",
        };
        if let Some(raw) = bad_framing(&path) {
            if !write_all(&mut tcp, raw.as_bytes()).await {
                return closed_by_proxy(&ev);
            }
            continue;
        }
        let (status, len) = match path.as_str() {
            "/small" => ("200 OK", SMALL.len()),
            "/big" => ("200 OK", BIG),
            "/hold" => {
                *ev.holding.lock().unwrap() += 1;
                ev.changed();
                // Bounded: a test that never releases gets a 502, not a hang.
                ev.until(WAIT, |e| e.released.load(Ordering::SeqCst)).await;
                ("200 OK", SMALL.len())
            }
            _ => ("404 Not Found", 0),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {len}\r\nconnection: {connection}\r\n\r\n"
        );
        let written = match (status, path.as_str()) {
            ("200 OK", "/big") => write_big(&mut tcp, head.as_bytes()).await,
            ("200 OK", _) => write_all(&mut tcp, &[head.as_bytes(), SMALL].concat()).await,
            _ => write_all(&mut tcp, head.as_bytes()).await,
        };
        if !written {
            return closed_by_proxy(&ev);
        }
        if style == Style::CloseEach {
            let _ = tcp.shutdown().await;
            return;
        }
    }
}

/// Responses whose framing is ambiguous, by path: each says one thing in
/// its head and does another on the wire.
fn bad_framing(path: &str) -> Option<&'static str> {
    Some(match path {
        // Content-Length 3, but the body is chunked "hello".
        "/cl-te" => {
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        }
        // A coding the proxy would decode as "until close" and re-frame.
        "/te-gzip" => "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhello",
        // Two lengths that disagree.
        "/two-cl" => "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nhello",
        _ => return None,
    })
}

/// Reads one request head (the proxy only sends GETs here: no body) and
/// returns its path; None when the peer closed the connection or sent
/// something that is not HTTP/1.1.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let path = match req.parse(&buf[..end + 4]) {
                Ok(httparse::Status::Complete(_)) => req.path?.to_string(),
                _ => return None,
            };
            buf.drain(..end + 4);
            return Some(path);
        }
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn write_all(tcp: &mut TcpStream, bytes: &[u8]) -> bool {
    tcp.write_all(bytes).await.is_ok()
}

/// Writes `head` and [`BIG`] bytes in 64 KiB pieces; false as soon as the
/// proxy stops taking them (it closed the connection).
async fn write_big(tcp: &mut TcpStream, head: &[u8]) -> bool {
    if !write_all(tcp, head).await {
        return false;
    }
    let piece = vec![b'x'; 64 << 10];
    for _ in 0..BIG / piece.len() {
        if !write_all(tcp, &piece).await {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------
// The proxy and its clients

/// Starts the proxy with one site routing everything to `up`, with the
/// given `[timeouts]` and `[limits]` lines.
async fn start_proxy(pki: &Pki, up: SocketAddr, timeouts: &str, limits: &str) -> Proxy {
    OneSite::new()
        .host(HOST)
        .top(&format!("[timeouts]\n{timeouts}\n[limits]\n{limits}"))
        .upstream(up)
        .start(pki)
        .await
}

/// An HTTP/1.1 keep-alive connection to the proxy, and its connection task
/// (abort it to drop the connection).
async fn h1_client(
    proxy: &Proxy,
    pki: &Pki,
) -> (
    http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tls = timeout(
        WAIT,
        common::tls_connect(proxy.https, HOST, pki.client_config(&[b"http/1.1"])),
    )
    .await
    .expect("TLS handshake with the proxy within the limit")
    .expect("TLS handshake with the proxy");
    let (send, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn get_req(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", HOST)
        .body(Empty::new())
        .unwrap()
}

/// `GET path` on a keep-alive connection: status and whole body.
async fn h1_get(send: &mut http1::SendRequest<Empty<Bytes>>, path: &str) -> (u16, Bytes) {
    let exchange = async {
        send.ready().await.expect("client connection usable");
        let resp = send.send_request(get_req(path)).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    };
    timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no whole response within {WAIT:?}"))
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let proxy = start_proxy(&pki, up, "", "").await;
    let (mut send, _conn) = h1_client(&proxy, &pki).await;
    for i in 0..20 {
        let (status, body) = h1_get(&mut send, "/small").await;
        assert_eq!(status, 200, "request {i}: {body:?}");
        assert_eq!(body, SMALL, "request {i}");
    }
    assert_eq!(
        ev.accepted(),
        1,
        "20 sequential requests should share one pooled connection"
    );
    assert_eq!(ev.paths(0).len(), 20);
    assert!(ev.closed().is_empty(), "the pooled connection was closed");
}

#[tokio::test]
async fn a_response_body_dropped_early_takes_its_connection_and_leaves_the_pool_clean() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let proxy = start_proxy(&pki, up, "", "").await;

    // Read the head of the big response only, then drop the connection.
    let (mut send, conn) = h1_client(&proxy, &pki).await;
    let resp = timeout(WAIT, send.send_request(get_req("/big")))
        .await
        .expect("response head of /big within the limit")
        .expect("response head of /big");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        BIG.to_string().as_str(),
        "the proxy should pass the Content-Length on"
    );
    drop(resp);
    drop(send);
    conn.abort();

    // Had the half-read connection gone back to the pool, these would
    // read the rest of the big body as their response.
    let (mut send, _conn) = h1_client(&proxy, &pki).await;
    for i in 0..20 {
        let (status, body) = h1_get(&mut send, "/small").await;
        assert_eq!(status, 200, "request {i} after the dropped body: {body:?}");
        assert_eq!(
            body,
            SMALL,
            "request {i} after the dropped body: {} bytes",
            body.len()
        );
    }

    // The connection of the dropped body is closed, never reused.
    ev.expect("the proxy closes the connection of the dropped body", |e| {
        e.closed().contains(&0)
    })
    .await;
    assert_eq!(ev.paths(0), ["/big"], "connection 0 was reused");
    let small: usize = (1..ev.accepted()).map(|id| ev.paths(id).len()).sum();
    assert_eq!(small, 20);
}

#[tokio::test]
async fn an_upstream_closing_after_each_response_never_causes_a_502() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::CloseEach).await;
    // One upstream: the forwarder has nowhere to retry, so a closed
    // connection handed out by the pool would be a 502 here.
    let proxy = start_proxy(&pki, up, "", "").await;
    let (mut send, _conn) = h1_client(&proxy, &pki).await;
    for i in 0..20 {
        let (status, body) = h1_get(&mut send, "/small").await;
        assert_eq!(
            status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(body, SMALL, "request {i}");
    }
    assert_eq!(ev.accepted(), 20, "one connection per request");
    for id in 0..20 {
        assert_eq!(ev.paths(id), ["/small"], "connection {id}");
    }
}

#[tokio::test]
async fn an_idle_pooled_connection_is_closed_after_the_upstream_idle_timeout() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let proxy = start_proxy(&pki, up, "upstream_idle = \"1s\"", "").await;
    let (mut send, _conn) = h1_client(&proxy, &pki).await;
    let (status, body) = h1_get(&mut send, "/small").await;
    assert_eq!((status, &body[..]), (200, SMALL));
    let answered = Instant::now();

    ev.expect("the proxy closes the idle connection", |e| {
        e.closed() == [0]
    })
    .await;
    let idle = answered.elapsed();
    // The connection went back to the pool before the client had the
    // body, so it has been idle at least this long when it closes; a close
    // sooner would mean it was never pooled or the timeout is not honoured.
    assert!(
        idle >= Duration::from_secs(1) - SLACK,
        "closed after {idle:?} idle, before the 1 s timeout"
    );

    // The next request dials a new connection.
    let (status, body) = h1_get(&mut send, "/small").await;
    assert_eq!((status, &body[..]), (200, SMALL));
    assert_eq!(ev.accepted(), 2);
}

#[tokio::test]
async fn only_max_idle_connections_stay_pooled_after_a_burst() {
    const BURST: usize = 8;
    const MAX_IDLE: usize = 2;
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let proxy = start_proxy(
        &pki,
        up,
        "",
        &format!("max_upstream_idle_per_host = {MAX_IDLE}"),
    )
    .await;

    // BURST requests at once on one HTTP/2 connection; the upstream holds
    // each until all have arrived, so the proxy has BURST connections open.
    let tls = timeout(
        WAIT,
        common::tls_connect(proxy.https, HOST, pki.client_config(&[b"h2"])),
    )
    .await
    .expect("TLS handshake within the limit")
    .unwrap();
    let (send, conn) = timeout(
        WAIT,
        http2::handshake(TokioExecutor::new(), TokioIo::new(tls)),
    )
    .await
    .expect("HTTP/2 handshake within the limit")
    .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for _ in 0..BURST {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("https://{HOST}/hold"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            send.ready().await.map_err(|e| e.to_string())?;
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        }));
    }
    ev.expect("all held requests arrive", |e| e.holding() == BURST)
        .await;
    assert_eq!(ev.accepted(), BURST, "one connection per held request");
    assert!(ev.closed().is_empty());

    ev.released.store(true, Ordering::SeqCst);
    ev.changed();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = timeout(WAIT, t)
            .await
            .unwrap_or_else(|_| panic!("response {i} within {WAIT:?}"))
            .unwrap()
            .unwrap_or_else(|e| panic!("response {i}: {e}"));
        assert_eq!((status, &body[..]), (200, SMALL), "response {i}");
    }

    // Every body has been read: MAX_IDLE connections stay, the rest close.
    let extra = BURST - MAX_IDLE;
    ev.expect("the proxy closes the connections beyond max idle", |e| {
        e.closed().len() >= extra
    })
    .await;
    // And no more than those: a further close within this window fails.
    let more = ev
        .until(Duration::from_millis(500), |e| e.closed().len() > extra)
        .await;
    assert!(!more, "closed {:?}, want {extra} closes", ev.closed());
    assert_eq!(ev.closed().len(), extra);

    // The kept connections serve the next request: no new dial.
    let mut send = send;
    let req = Request::builder()
        .uri(format!("https://{HOST}/small"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = timeout(WAIT, send.send_request(req))
        .await
        .expect("response within the limit")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body within the limit")
        .unwrap()
        .to_bytes();
    assert_eq!(body, SMALL);
    assert_eq!(ev.accepted(), BURST, "a pooled connection should be reused");
}

#[tokio::test]
async fn health_checks_reach_the_upstream_in_origin_form() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let _proxy = OneSite::new()
        .host(HOST)
        .route(&format!(
            "upstream = \"http://{up}\"\n[sites.routes.health_check]\npath = \"/small\"\ninterval = \"100ms\""
        ))
        .start(&pki)
        .await;
    ev.expect("a health check reaches the upstream", |e| {
        e.accepted() > 0 && !e.paths(0).is_empty()
    })
    .await;
    // The request-target as sent: a path, not `http://host:port/small`.
    assert_eq!(ev.paths(0)[0], "/small");
}

/// A client's malformed chunk is the client's fault: it gets `400` (not
/// `502`), the upstream request it was streaming into is aborted, and that
/// upstream connection is never reused: the next request dials afresh.
#[tokio::test]
async fn a_malformed_client_chunk_gets_400_and_its_upstream_connection_is_not_reused() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let proxy = start_proxy(&pki, up, "", "").await;

    let mut tls = timeout(
        WAIT,
        common::tls_connect(proxy.https, HOST, pki.client_config(&[b"http/1.1"])),
    )
    .await
    .expect("TLS handshake within the limit")
    .unwrap();
    // A good first chunk (so the upstream request is under way), then a
    // chunk size that is not hex.
    tls.write_all(
        format!(
            "POST /hold HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let read = timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within {WAIT:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "a malformed chunk is a client error, got: {text:?}"
    );
    ev.expect("the held request reached the upstream", |e| {
        e.accepted() == 1 && e.paths(0) == ["/hold"]
    })
    .await;
    // The held upstream may answer now: nobody reads it any more.
    ev.released.store(true, Ordering::SeqCst);
    ev.changed();

    let (mut send, _conn) = h1_client(&proxy, &pki).await;
    assert_eq!(
        h1_get(&mut send, "/small").await,
        (200, Bytes::from_static(SMALL))
    );
    assert_eq!(
        ev.accepted(),
        2,
        "the aborted connection must not be reused"
    );
    assert_eq!(ev.paths(1), ["/small"]);
}

/// An upstream response with ambiguous framing (CL with TE, a TE other than
/// chunked, conflicting CLs) gets `502` over HTTP/1.1 and HTTP/2, is never
/// relayed with a length it does not have, and its connection is never
/// reused.
#[tokio::test]
async fn ambiguous_upstream_framing_gets_502_and_its_connection_is_not_reused() {
    let pki = Pki::new();
    let (up, ev) = start_upstream(Style::KeepAlive).await;
    let proxy = start_proxy(&pki, up, "", "").await;
    let mut dialled = 0;
    for path in ["/cl-te", "/te-gzip", "/two-cl"] {
        for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
            let got = common::get(proxy.https, HOST, path, pki.client_config(&[alpn])).await;
            assert_eq!(
                got.status,
                502,
                "{path} over {}: {:?}",
                String::from_utf8_lossy(alpn),
                got.body
            );
            dialled += 1;
            // The next request goes out on a new connection.
            let got = common::get(proxy.https, HOST, "/small", pki.client_config(&[alpn])).await;
            assert_eq!((got.status, &got.body[..]), (200, SMALL));
            dialled += 1;
            assert_eq!(
                ev.accepted(),
                dialled,
                "after {path}: the connection that carried it must not be reused"
            );
            // Keep the /small connection out of the next round: it is
            // pooled, and the next bad response would take it.
            dialled -= 1;
        }
    }
}
