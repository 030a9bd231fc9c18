//! HTTP behaviour of the TLS listener: both downstream protocols reach an
//! HTTP/1.1 upstream, forwarding headers, hop-by-hop stripping both ways,
//! upstream failures (502, 504), routing (`respond`, `redirect`, longest
//! prefix, `strip_prefix`, 404) and the refusal of ambiguous requests
//! before they can reach an upstream. Also the plain-HTTP 308 listener.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Starts the proxy with one site, `api.test`, whose routes are `routes`;
/// `top` is added before the site (e.g. a `[timeouts]` table).
async fn start(pki: &Pki, top: &str, routes: &str) -> Proxy {
    OneSite::new().top(top).routes(routes).start(pki).await
}

fn h1(pki: &Pki) -> Arc<rustls::ClientConfig> {
    pki.client_config(&[b"http/1.1"])
}

fn h2(pki: &Pki) -> Arc<rustls::ClientConfig> {
    pki.client_config(&[b"h2"])
}

/// An echo upstream (same JSON as `echo_upstream`) that counts requests.
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>, CancellationToken) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let (addr, stop) = upstream(move |req: Request<Incoming>| {
        h.fetch_add(1, Ordering::SeqCst);
        echo(req)
    })
    .await;
    (addr, hits, stop)
}

/// An upstream that answers `{tag} {path-and-query}`.
async fn tagged(tag: &'static str) -> (SocketAddr, CancellationToken) {
    upstream(move |req: Request<Incoming>| async move {
        Response::new(full(format!("{tag} {}", req.uri())))
    })
    .await
}

/// Sends `req` with Host `api.test` (h1) or authority `api.test` (h2).
async fn send(proxy: &Proxy, cfg: Arc<rustls::ClientConfig>, req: http::request::Builder) -> Got {
    request(
        proxy.https,
        "api.test",
        cfg,
        req.body(Full::new(Bytes::new())).unwrap(),
    )
    .await
    .unwrap()
}

/// A request builder for `https://api.test{path}`, with `Host` on HTTP/1.1.
fn req(cfg: &rustls::ClientConfig, path: &str) -> http::request::Builder {
    let b = Request::builder().uri(format!("https://api.test{path}"));
    if cfg.alpn_protocols.first().map(Vec::as_slice) == Some(b"h2") {
        b
    } else {
        b.header("host", "api.test")
    }
}

/// Writes `bytes` to `io` and reads until the peer closes (or 10 s pass).
/// Returns what was read and whether the peer closed the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, bytes: &[u8]) -> (String, bool) {
    io.write_all(bytes).await.unwrap();
    io.flush().await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Raw HTTP/1.1 bytes over TLS (ALPN http/1.1, SNI api.test).
async fn raw_tls(proxy: &Proxy, pki: &Pki, bytes: &[u8]) -> (String, bool) {
    let tls = tls_connect(proxy.https, "api.test", h1(pki)).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    exchange(tls, bytes).await
}

fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {response:?}"))
}

fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------
// Protocols and forwarding headers

#[tokio::test]
async fn h1_and_h2_downstream_both_reach_an_h11_upstream() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    for (cfg, version) in [
        (h1(&pki), http::Version::HTTP_11),
        (h2(&pki), http::Version::HTTP_2),
    ] {
        let r = req(&cfg, "/upload?x=1").method("POST");
        let got = request(
            proxy.https,
            "api.test",
            cfg,
            r.body(Full::new(Bytes::from_static(b"hello"))).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.version, version);
        let seen = got.seen();
        assert_eq!(seen[":version"], "HTTP/1.1", "{version:?}");
        assert_eq!(seen[":method"], "POST");
        assert_eq!(seen[":path"], "/upload?x=1");
        assert_eq!(seen[":body-len"], "5");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn forwarded_headers_are_added_and_x_forwarded_for_is_appended() {
    let pki = Pki::new();
    let (up, _hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    for (cfg, via) in [(h1(&pki), "1.1 portcullis"), (h2(&pki), "2 portcullis")] {
        let r = req(&cfg, "/")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.2")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "spoofed.test")
            .header("via", "1.0 edge");
        let seen = send(&proxy, cfg, r).await.seen();
        assert_eq!(
            seen["x-forwarded-for"], "203.0.113.7, 198.51.100.2, 127.0.0.1",
            "{via}"
        );
        assert_eq!(seen["x-forwarded-proto"], "https");
        assert_eq!(seen["x-forwarded-host"], "api.test");
        assert_eq!(seen["via"], format!("1.0 edge, {via}"));
        assert_eq!(seen["host"], "api.test", "Host is preserved by default");
    }
}

#[tokio::test]
async fn host_with_port_is_preserved_as_sent() {
    let pki = Pki::new();
    let (up, _hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    let r = Request::builder().uri("/p").header("host", "api.test:8443");
    let seen = send(&proxy, h1(&pki), r).await.seen();
    assert_eq!(seen["host"], "api.test:8443");
    assert_eq!(seen["x-forwarded-host"], "api.test:8443");
}

#[tokio::test]
async fn preserve_host_false_sends_the_upstream_authority() {
    let pki = Pki::new();
    let (up, _hits, _stop) = counting_echo().await;
    let proxy = start(
        &pki,
        "",
        &format!("[[sites.routes]]\nupstream = \"http://{up}\"\npreserve_host = false\n"),
    )
    .await;
    for cfg in [h1(&pki), h2(&pki)] {
        let seen = send(&proxy, cfg.clone(), req(&cfg, "/")).await.seen();
        assert_eq!(seen["host"], up.to_string());
        assert_eq!(seen["x-forwarded-host"], "api.test");
    }
}

// ---------------------------------------------------------------------------
// Hop-by-hop headers

/// `Trailer` is not among them: it names trailer fields end to end (RFC
/// 9110 §6.6.2). `TE` is, but its `trailers` value is passed on for gRPC
/// (checked on its own below).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "transfer-encoding",
    "x-named-in-connection",
];

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    // HTTP/1.1 only: HTTP/2 forbids these headers, and hyper's h2 client
    // strips them before sending.
    let r = Request::builder()
        .uri("/")
        .header("host", "api.test")
        .header("connection", "keep-alive, X-Named-In-Connection")
        .header("x-named-in-connection", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("upgrade", "h2c")
        .header("proxy-connection", "keep-alive")
        .header("x-kept", "yes");
    let seen = send(&proxy, h1(&pki), r).await.seen();
    for h in HOP_BY_HOP {
        assert!(!seen.contains_key(h), "{h} reached the upstream: {seen:?}");
    }
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["te"], "trailers", "te: trailers is passed on");
    assert_eq!(seen["trailer"], "x-checksum", "Trailer is end to end");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upgrade_other_than_websocket_is_stripped_not_relayed() {
    let pki = Pki::new();
    let (up, _hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    let r = Request::builder()
        .uri("/")
        .header("host", "api.test")
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA");
    let got = send(&proxy, h1(&pki), r).await;
    assert_eq!(got.status, 200);
    let seen = got.seen();
    for h in ["connection", "upgrade", "http2-settings"] {
        assert!(!seen.contains_key(h), "{h} reached the upstream: {seen:?}");
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_returned() {
    let pki = Pki::new();
    let (up, _stop) = upstream(|_req: Request<Incoming>| async {
        Response::builder()
            .header("connection", "X-Named-In-Connection")
            .header("x-named-in-connection", "secret")
            .header("keep-alive", "timeout=5, max=100")
            .header("proxy-connection", "keep-alive")
            .header("upgrade", "foo/1")
            .header("trailer", "x-checksum")
            .header("te", "trailers")
            .header("x-kept", "yes")
            .body(full("body"))
            .unwrap()
    })
    .await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    for cfg in [h1(&pki), h2(&pki)] {
        let got = send(&proxy, cfg.clone(), req(&cfg, "/")).await;
        assert_eq!(got.status, 200);
        for h in HOP_BY_HOP.iter().chain(&["te"]) {
            assert!(
                !got.headers.contains_key(*h),
                "{h} came back over {:?}: {:?}",
                got.version,
                got.headers
            );
        }
        assert_eq!(got.headers["x-kept"], "yes");
        assert_eq!(got.body, "body");
    }
}

// ---------------------------------------------------------------------------
// Upstream failures

#[tokio::test]
async fn refused_upstream_gives_502_with_a_short_body() {
    let pki = Pki::new();
    // Refuses connections for the whole test (held, never given away).
    let closed = Refusing::new();
    let proxy = OneSite::new().upstream(closed.addr).start(&pki).await;
    for cfg in [h1(&pki), h2(&pki)] {
        let got = send(&proxy, cfg.clone(), req(&cfg, "/")).await;
        assert_eq!(got.status, 502);
        assert_eq!(got.body, "upstream unavailable\n");
        assert_eq!(got.headers["content-type"], "text/plain; charset=utf-8");
    }
}

#[tokio::test]
async fn upstream_slower_than_upstream_response_timeout_gives_504() {
    let pki = Pki::new();
    let (up, hits, _stop) = {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let (addr, stop) = upstream(move |_req: Request<Incoming>| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                // Never answers.
                std::future::pending::<
                    Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>,
                >()
                .await
            }
        })
        .await;
        (addr, hits, stop)
    };
    let proxy = start(
        &pki,
        "[timeouts]\nupstream_response = \"300ms\"\n",
        &format!("[[sites.routes]]\nupstream = \"http://{up}\"\n"),
    )
    .await;
    for cfg in [h1(&pki), h2(&pki)] {
        let started = Instant::now();
        let got = send(&proxy, cfg.clone(), req(&cfg, "/slow")).await;
        let waited = started.elapsed();
        assert_eq!(got.status, 504);
        assert_eq!(got.body, "upstream timed out\n");
        assert!(
            waited >= Duration::from_millis(300),
            "answered after {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "the request did reach the upstream"
    );
}

/// A TCP upstream that answers every request head with `reply` and keeps
/// the connection open; counts accepted connections and request heads.
async fn raw_upstream(reply: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let (c, h) = (conns.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        h.fetch_add(1, Ordering::SeqCst);
                        if tcp.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, conns, heads)
}

#[tokio::test]
async fn malformed_upstream_response_gives_502_and_the_connection_is_not_reused() {
    let pki = Pki::new();
    let (up, conns, heads) = raw_upstream(b"\x00\x01 this is not HTTP \xff\r\n\r\n").await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    for cfg in [h1(&pki), h2(&pki), h1(&pki)] {
        let got = send(&proxy, cfg.clone(), req(&cfg, "/")).await;
        assert_eq!(got.status, 502);
        assert_eq!(got.body, "upstream unavailable\n");
    }
    assert_eq!(heads.load(Ordering::SeqCst), 3);
    assert_eq!(
        conns.load(Ordering::SeqCst),
        3,
        "a connection that sent garbage was used again"
    );
}

// ---------------------------------------------------------------------------
// The plain-HTTP listener

async fn start_with_http_listener(pki: &Pki, https_port: &str) -> Proxy {
    OneSite::new()
        .listener(&format!(
            "listen = \"127.0.0.1:0\"\nprotocol = \"http\"\n{https_port}"
        ))
        .route("respond = { status = 200 }")
        .start(pki)
        .await
}

async fn plain(proxy: &Proxy, bytes: &[u8]) -> String {
    let tcp = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    let (resp, closed) = exchange(tcp, bytes).await;
    assert!(closed, "the connection stayed open: {resp:?}");
    resp
}

#[tokio::test]
async fn plain_http_listener_answers_308_to_https_with_path_and_query() {
    let pki = Pki::new();
    let proxy = start_with_http_listener(&pki, "https_port = 8443").await;
    let resp = plain(
        &proxy,
        b"GET /a/b?c=d&e=f HTTP/1.1\r\nHost: api.test:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 308, "{resp}");
    assert_eq!(
        header_of(&resp, "location"),
        Some("https://api.test:8443/a/b?c=d&e=f")
    );

    let proxy = start_with_http_listener(&pki, "").await;
    let resp = plain(
        &proxy,
        b"GET /x?y HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 308, "{resp}");
    assert_eq!(header_of(&resp, "location"), Some("https://api.test/x?y"));

    let proxy = start_with_http_listener(&pki, "https_port = 443").await;
    let resp = plain(
        &proxy,
        b"GET / HTTP/1.1\r\nHost: api.test:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(header_of(&resp, "location"), Some("https://api.test/"));
    // No Host: nothing to redirect to.
    let resp = plain(&proxy, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&resp), 400, "{resp}");
}

// ---------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn respond_and_redirect_routes_answer_without_an_upstream() {
    let pki = Pki::new();
    let routes = r#"
[[sites.routes]]
path = "/health"
respond = { status = 200, body = "ok\n", content_type = "text/plain" }
[[sites.routes]]
path = "/teapot"
respond = { status = 418 }
[[sites.routes]]
path = "/old"
redirect = { to = "https://new.test{uri}", status = 301 }
[[sites.routes]]
path = "/moved"
redirect = { to = "https://other.test/landing" }
"#;
    let proxy = start(&pki, "", routes).await;
    for cfg in [h1(&pki), h2(&pki)] {
        let got = send(&proxy, cfg.clone(), req(&cfg, "/health")).await;
        assert_eq!((got.status, &got.body[..]), (200, &b"ok\n"[..]));
        assert_eq!(got.headers["content-type"], "text/plain");

        let got = send(&proxy, cfg.clone(), req(&cfg, "/teapot")).await;
        assert_eq!((got.status, got.body.len()), (418, 0));

        let got = send(&proxy, cfg.clone(), req(&cfg, "/old/x?q=1")).await;
        assert_eq!(got.status, 301);
        assert_eq!(got.headers["location"], "https://new.test/old/x?q=1");

        let got = send(&proxy, cfg.clone(), req(&cfg, "/moved/deeper")).await;
        assert_eq!(got.status, 308);
        assert_eq!(got.headers["location"], "https://other.test/landing");
    }
}

#[tokio::test]
async fn longest_prefix_wins_on_segment_boundaries_and_strip_prefix_drops_it() {
    let pki = Pki::new();
    let (root, _s1) = tagged("root").await;
    let (api, _s2) = tagged("api").await;
    let (v2, _s3) = tagged("v2").await;
    let (stat, _s4) = tagged("static").await;
    let routes = format!(
        r#"
[[sites.routes]]
upstream = "http://{root}"
[[sites.routes]]
path = "/api"
upstream = "http://{api}"
strip_prefix = true
[[sites.routes]]
path = "/api/v2"
upstream = "http://{v2}"
[[sites.routes]]
path = "/static/"
upstream = "http://{stat}"
strip_prefix = true
"#
    );
    let proxy = start(&pki, "", &routes).await;
    let cases = [
        ("/", "root /"),
        ("/x?y=1", "root /x?y=1"),
        ("/api", "api /"),
        ("/api/", "api /"),
        ("/api?x=1", "api /?x=1"),
        ("/api/users?id=1", "api /users?id=1"),
        ("/apix", "root /apix"),
        ("/api/v2", "v2 /api/v2"),
        ("/api/v2/z", "v2 /api/v2/z"),
        ("/api/v20", "api /v20"),
        ("/static/css/a.css", "static /css/a.css"),
        ("/static", "root /static"),
    ];
    for cfg in [h1(&pki), h2(&pki)] {
        for (path, expect) in cases {
            let got = send(&proxy, cfg.clone(), req(&cfg, path)).await;
            assert_eq!(got.status, 200, "{path}");
            assert_eq!(String::from_utf8_lossy(&got.body), expect, "{path}");
        }
    }
}

#[tokio::test]
async fn path_without_a_route_gets_404() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = start(
        &pki,
        "",
        &format!("[[sites.routes]]\npath = \"/api\"\nupstream = \"http://{up}\"\n"),
    )
    .await;
    for cfg in [h1(&pki), h2(&pki)] {
        let got = send(&proxy, cfg.clone(), req(&cfg, "/other")).await;
        assert_eq!(got.status, 404);
        assert_eq!(got.body, "not found\n");
        let got = send(&proxy, cfg.clone(), req(&cfg, "/apiary")).await;
        assert_eq!(got.status, 404);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn host_no_site_serves_gets_421() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    let r = Request::builder().uri("/").header("host", "other.test");
    let got = send(&proxy, h1(&pki), r).await;
    assert_eq!(got.status, 421);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------
// Ambiguous requests: 400, and nothing reaches the upstream

/// Sends each raw request on its own connection and asserts a 400 that
/// closes the connection, with no upstream hit.
async fn assert_refused(cases: &[(&str, &[u8])]) {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    // The harness counts: a well-formed request does reach the upstream.
    let (ok, _) = raw_tls(
        &proxy,
        &pki,
        b"GET / HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&ok), 200, "{ok}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    for (name, bytes) in cases {
        let (resp, closed) = raw_tls(&proxy, &pki, bytes).await;
        assert_eq!(status_of(&resp), 400, "{name}: {resp}");
        assert!(closed, "{name}: the connection stayed open after the 400");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "{name} reached the upstream"
        );
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_in_either_order() {
    assert_refused(&[
        (
            "CL then TE",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "TE then CL",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ),
        (
            "CL+TE smuggling a second request",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
              GET /smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n",
        ),
    ])
    .await;
}

#[tokio::test]
async fn repeated_or_non_chunked_transfer_encoding_is_refused() {
    assert_refused(&[
        (
            "two TE lines",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "gzip, chunked",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunked, chunked",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "identity",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: identity\r\nContent-Length: 0\r\n\r\n",
        ),
    ])
    .await;
}

#[tokio::test]
async fn missing_or_repeated_host_is_refused() {
    assert_refused(&[
        ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "two Hosts",
            b"GET / HTTP/1.1\r\nHost: api.test\r\nHost: evil.test\r\n\r\n",
        ),
        (
            "two equal Hosts",
            b"GET / HTTP/1.1\r\nHost: api.test\r\nHost: api.test\r\n\r\n",
        ),
        ("empty Host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n"),
        (
            "absolute URI disagreeing with Host",
            b"GET https://evil.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
        ),
    ])
    .await;
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused() {
    assert_refused(&[(
        "two different lengths",
        b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )])
    .await;
}

#[tokio::test]
async fn h2_authority_and_host_that_disagree_are_refused() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    // hyper's HTTP/2 client sends a `host` header as a regular field next
    // to `:authority`, so the mismatch reaches the server as is.
    let r = Request::builder()
        .uri("https://api.test/")
        .header("host", "evil.test");
    let got = send(&proxy, h2(&pki), r).await;
    assert_eq!(got.status, 400, "{:?}", got.body);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // Agreeing ones (any case) are fine.
    let r = Request::builder()
        .uri("https://api.test/")
        .header("host", "API.test");
    let got = send(&proxy, h2(&pki), r).await;
    assert_eq!(got.status, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn ambiguous_request_pipelined_after_a_good_one_is_refused() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    let (resp, closed) = raw_tls(
        &proxy,
        &pki,
        b"GET /first HTTP/1.1\r\nHost: api.test\r\n\r\n\
          POST /second HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    // The first body has no trailing CRLF: the second response follows it directly.
    let second = &resp[resp[1..]
        .find("HTTP/1.1 ")
        .unwrap_or_else(|| panic!("no second response: {resp:?}"))
        + 1..];
    assert_eq!(status_of(second), 400, "{resp}");
    assert!(closed);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "only the first request is forwarded"
    );
}

#[tokio::test]
async fn dot_segments_cannot_escape_a_route_prefix() {
    let pki = Pki::new();
    let (up, hits, _stop) = counting_echo().await;
    let routes = format!(
        "[[sites.routes]]\npath = \"/admin\"\nrespond = {{ status = 403 }}\n\
         [[sites.routes]]\npath = \"/api\"\nupstream = \"http://{up}\"\nstrip_prefix = true\n"
    );
    let proxy = start(&pki, "", &routes).await;
    for cfg in [h1(&pki), h2(&pki)] {
        for path in ["/api/../admin", "/api/%2e%2e/admin", "/api/./x"] {
            let got = send(&proxy, cfg.clone(), req(&cfg, path)).await;
            assert_eq!(got.status, 400, "{path}");
        }
        let got = send(&proxy, cfg.clone(), req(&cfg, "/api/.well-known/x")).await;
        assert_eq!(got.seen()[":path"], "/.well-known/x");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
