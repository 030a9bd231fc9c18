//! gRPC through the proxy, end to end: a tonic client speaking HTTP/2 over
//! TLS (ALPN h2, trusting the test CA) to the real proxy, which forwards to
//! a tonic server over h2c on loopback. Unary, server-streaming and
//! bidirectional calls arrive intact with their metadata and trailers; an
//! error status travels in the trailers; an upstream that refuses
//! connections or answers too late gives the client a gRPC status
//! (UNAVAILABLE, DEADLINE_EXCEEDED), not a transport error. Request
//! trailers reach the upstream too: over HTTP/2 to an h2c upstream, and as
//! an HTTP/1.1 chunked trailer section to an HTTP/1.1 upstream.
//!
//! No protoc: the message is a hand-written `prost::Message`, the service
//! and the client are written the way tonic-build's generated code calls
//! `tonic::server::Grpc` and `tonic::client::Grpc` with `ProstCodec`.

// tonic's API fixes `tonic::Status` (176 bytes) as the error of every call
// and stream item; boxing it is not an option here.
#![allow(clippy::result_large_err)]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Alg, Pki, Proxy};
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tonic::codec::ProstCodec;
use tonic::codegen::{BoxFuture, BoxStream};
use tonic::server::{ServerStreamingService, StreamingService, UnaryService};
use tonic::{Code, Request, Response, Status, Streaming};

/// Bound on every await that could hang.
const WAIT: Duration = Duration::from_secs(10);

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(uint32, tag = "1")]
    seq: u32,
    #[prost(string, tag = "2")]
    text: String,
}

fn msg(seq: u32, text: &str) -> Msg {
    Msg {
        seq,
        text: text.to_string(),
    }
}

const UNARY: &str = "/test.Echo/Unary";
const COUNT: &str = "/test.Echo/Count";
const PING_PONG: &str = "/test.Echo/PingPong";
const FAIL: &str = "/test.Echo/Fail";
const FAIL_LATE: &str = "/test.Echo/FailLate";
const SLOW: &str = "/test.Echo/Slow";

/// How long `Slow` waits before answering; far past the proxy's
/// `upstream_response` in [`slow_upstream_gets_deadline_exceeded`].
const SLOW_FOR: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- server

/// Unary: answers `seq + 1` and `echo: TEXT`, with an `x-header` response
/// header.
struct Unary;

impl UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;

    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let m = req.into_inner();
            let mut resp = Response::new(msg(m.seq + 1, &format!("echo: {}", m.text)));
            resp.metadata_mut()
                .insert("x-header", "yes".parse().unwrap());
            Ok(resp)
        })
    }
}

/// Server streaming: `seq` messages numbered 0..seq.
struct Count;

impl ServerStreamingService<Msg> for Count {
    type Response = Msg;
    type ResponseStream = BoxStream<Msg>;
    type Future = BoxFuture<Response<BoxStream<Msg>>, Status>;

    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        let n = req.into_inner().seq;
        let s = futures_util::stream::iter((0..n).map(|i| Ok(msg(i, &format!("item {i}")))));
        Box::pin(async move { Ok(Response::new(Box::pin(s) as BoxStream<Msg>)) })
    }
}

/// Bidirectional: each ping is answered with a pong as soon as it arrives.
struct PingPong;

impl StreamingService<Msg> for PingPong {
    type Response = Msg;
    type ResponseStream = BoxStream<Msg>;
    type Future = BoxFuture<Response<BoxStream<Msg>>, Status>;

    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        let pongs = req
            .into_inner()
            .map(|r| r.map(|m| msg(m.seq, &format!("pong {}", m.text))));
        Box::pin(async move { Ok(Response::new(Box::pin(pongs) as BoxStream<Msg>)) })
    }
}

/// Fails with NOT_FOUND (a status that travels in the trailers).
struct Fail;

impl UnaryService<Msg> for Fail {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;

    fn call(&mut self, _: Request<Msg>) -> Self::Future {
        Box::pin(async { Err(Status::not_found("no such thing")) })
    }
}

/// Server streaming: one message, then NOT_FOUND (so the status travels
/// in the trailers, after data).
struct FailLate;

impl ServerStreamingService<Msg> for FailLate {
    type Response = Msg;
    type ResponseStream = BoxStream<Msg>;
    type Future = BoxFuture<Response<BoxStream<Msg>>, Status>;

    fn call(&mut self, _: Request<Msg>) -> Self::Future {
        let s = futures_util::stream::iter([
            Ok(msg(0, "before the error")),
            Err(Status::not_found("gone after one")),
        ]);
        Box::pin(async move { Ok(Response::new(Box::pin(s) as BoxStream<Msg>)) })
    }
}

/// Answers after [`SLOW_FOR`].
struct Slow;

impl UnaryService<Msg> for Slow {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;

    fn call(&mut self, _: Request<Msg>) -> Self::Future {
        Box::pin(async {
            // The slowness is the behaviour under test (the proxy's
            // upstream_response timeout), not a synchronisation.
            tokio::time::sleep(SLOW_FOR).await;
            Ok(Response::new(msg(0, "too late")))
        })
    }
}

/// One gRPC request to the test service, dispatched on the path like
/// tonic-build's generated server does. Every response gets an
/// `x-trailer: yes` trailer (what `SetTrailer` does in other gRPC servers).
async fn serve_grpc(req: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
    let mut grpc = tonic::server::Grpc::new(codec());
    let resp = match req.uri().path() {
        UNARY => grpc.unary(Unary, req).await,
        COUNT => grpc.server_streaming(Count, req).await,
        PING_PONG => grpc.streaming(PingPong, req).await,
        FAIL => grpc.unary(Fail, req).await,
        FAIL_LATE => grpc.server_streaming(FailLate, req).await,
        SLOW => grpc.unary(Slow, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    };
    resp.map(|body| {
        tonic::body::Body::new(body.map_frame(|mut f| {
            if let Some(t) = f.trailers_mut() {
                t.insert("x-trailer", http::HeaderValue::from_static("yes"));
            }
            f
        }))
    })
}

/// An h2c (HTTP/2 prior knowledge) server on 127.0.0.1:0 running `f` per
/// request; it stops when the test's runtime does.
async fn h2c_server<F, Fut, B>(f: F) -> SocketAddr
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- client

/// A `tower::Service` around one HTTP/2 connection to the proxy, which is
/// all `tonic::client::Grpc` needs.
#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

type Client = tonic::client::Grpc<H2>;

/// A TLS (ALPN h2) connection to the proxy as `api.test`, trusting the
/// test CA, wrapped as a tonic client.
async fn grpc_client(proxy: &Proxy, pki: &Pki) -> Client {
    let tls = timeout(
        WAIT,
        common::tls_connect(proxy.https, "api.test", pki.client_config(&[b"h2"])),
    )
    .await
    .expect("TLS connect in time")
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = timeout(
        WAIT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)),
    )
    .await
    .expect("h2 handshake in time")
    .unwrap();
    tokio::spawn(conn);
    let mut client =
        tonic::client::Grpc::with_origin(H2(send), "https://api.test".parse().unwrap());
    timeout(WAIT, client.ready())
        .await
        .expect("ready in time")
        .unwrap();
    client
}

/// The codec of every call: [`Msg`] both ways.
fn codec() -> ProstCodec<Msg, Msg> {
    ProstCodec::default()
}

fn path(p: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(p)
}

async fn unary(client: &mut Client, method: &'static str, m: Msg) -> Result<Response<Msg>, Status> {
    timeout(WAIT, client.unary(Request::new(m), path(method), codec()))
        .await
        .expect("gRPC call answered in time")
}

// ---------------------------------------------------------------- proxy

/// The proxy serving `api.test` with `routes`, `top` before the sites.
async fn proxy(pki: &Pki, top: &str, routes: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["api.test"], Alg::Ecdsa).write(dir.path(), "");
    Proxy::start_in(
        dir,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n{top}\n\
             [[sites]]\nhosts = [\"api.test\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n{routes}"
        ),
    )
    .await
}

/// A proxy whose one route goes to `upstream` over h2c.
async fn h2c_proxy(pki: &Pki, top: &str, upstream: SocketAddr) -> Proxy {
    proxy(
        pki,
        top,
        &format!("[[sites.routes]]\nupstream = \"http://{upstream}\"\nprotocol = \"h2c\"\n"),
    )
    .await
}

/// The test service behind the proxy, and a client connected to the proxy.
async fn grpc_setup(top: &str) -> (Proxy, Client) {
    let pki = Pki::new();
    let upstream = h2c_server(serve_grpc).await;
    let proxy = h2c_proxy(&pki, top, upstream).await;
    let client = grpc_client(&proxy, &pki).await;
    (proxy, client)
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn unary_call_keeps_messages_metadata_and_trailers() {
    let (_proxy, mut client) = grpc_setup("").await;
    let mut req = Request::new(msg(41, "hello"));
    req.metadata_mut()
        .insert("x-request", "from-client".parse().unwrap());
    let resp = timeout(WAIT, client.unary(req, path(UNARY), codec()))
        .await
        .expect("answered in time")
        .expect("OK status");
    let meta = resp.metadata().clone();
    assert_eq!(resp.into_inner(), msg(42, "echo: hello"));
    assert_eq!(meta.get("x-header").unwrap(), "yes", "response header");
    // `unary` merges the trailers into the metadata; the server sets
    // `x-trailer` only as a trailer.
    assert_eq!(meta.get("x-trailer").unwrap(), "yes", "response trailer");
}

#[tokio::test]
async fn server_streaming_delivers_every_message_in_order_then_trailers() {
    const N: u32 = 100;
    let (_proxy, mut client) = grpc_setup("").await;
    let resp = timeout(
        WAIT,
        client.server_streaming(Request::new(msg(N, "")), path(COUNT), codec()),
    )
    .await
    .expect("answered in time")
    .expect("OK status");
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    while let Some(m) = timeout(WAIT, stream.message())
        .await
        .expect("message in time")
        .expect("no error status")
    {
        got.push(m);
    }
    let want: Vec<Msg> = (0..N).map(|i| msg(i, &format!("item {i}"))).collect();
    assert_eq!(got, want);
    let trailers = timeout(WAIT, stream.trailers())
        .await
        .expect("trailers in time")
        .expect("OK status")
        .expect("trailers present");
    assert_eq!(trailers.get("x-trailer").unwrap(), "yes");
}

#[tokio::test]
async fn bidirectional_streaming_ping_pong_is_not_buffered() {
    const N: u32 = 50;
    let (_proxy, mut client) = grpc_setup("").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let pings =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let resp = timeout(
        WAIT,
        client.streaming(Request::new(pings), path(PING_PONG), codec()),
    )
    .await
    .expect("response head in time")
    .expect("OK status");
    let mut pongs = resp.into_inner();
    // Ping i+1 is only sent once pong i came back: a proxy that waited for
    // the whole request body (or the whole response) would stall here.
    for i in 0..N {
        tx.send(msg(i, &i.to_string())).await.unwrap();
        let pong = timeout(WAIT, pongs.message())
            .await
            .unwrap_or_else(|_| panic!("pong {i} in time"))
            .expect("no error status")
            .expect("a pong, not the end");
        assert_eq!(pong, msg(i, &format!("pong {i}")));
    }
    drop(tx);
    let end = timeout(WAIT, pongs.message())
        .await
        .expect("end of stream in time")
        .expect("OK status");
    assert_eq!(end, None);
    let trailers = timeout(WAIT, pongs.trailers())
        .await
        .expect("trailers in time")
        .expect("OK status")
        .expect("trailers present");
    assert_eq!(trailers.get("x-trailer").unwrap(), "yes");
}

#[tokio::test]
async fn error_status_from_the_server_reaches_the_client() {
    let (_proxy, mut client) = grpc_setup("").await;
    // Failing before any message: tonic answers Trailers-Only (the status
    // in the response head).
    let status = unary(&mut client, FAIL, msg(1, "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    // Failing after a message: the status is in the trailers, after data.
    let resp = timeout(
        WAIT,
        client.server_streaming(Request::new(msg(1, "x")), path(FAIL_LATE), codec()),
    )
    .await
    .expect("answered in time")
    .expect("OK head");
    let mut stream = resp.into_inner();
    let first = timeout(WAIT, stream.message())
        .await
        .expect("message in time")
        .expect("the message comes before the status");
    assert_eq!(first, Some(msg(0, "before the error")));
    let status = timeout(WAIT, stream.message())
        .await
        .expect("status in time")
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "gone after one");
    assert_eq!(status.metadata().get("x-trailer").unwrap(), "yes");
}

#[tokio::test]
async fn unreachable_upstream_gives_unavailable_status() {
    // Bound but not listening: the port stays reserved for the whole test
    // and a connect to it is refused (RST) at once, deterministically.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let dead = reserved.local_addr().unwrap().as_socket().unwrap();
    let pki = Pki::new();
    let proxy = h2c_proxy(&pki, "", dead).await;
    let mut client = grpc_client(&proxy, &pki).await;
    let status = unary(&mut client, UNARY, msg(1, "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The proxy's own grpc-message: a Trailers-Only answer, not an HTTP
    // 502 (which tonic would also map to UNAVAILABLE, with another message).
    assert_eq!(status.message(), "upstream unavailable", "{status:?}");
    drop(reserved);
}

#[tokio::test]
async fn slow_upstream_gives_deadline_exceeded_status() {
    let (_proxy, mut client) = grpc_setup("[timeouts]\nupstream_response = \"300ms\"\n").await;
    let started = tokio::time::Instant::now();
    let status = unary(&mut client, SLOW, msg(1, "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "upstream timed out", "{status:?}");
    assert!(
        started.elapsed() < SLOW_FOR,
        "answered by the proxy's timeout, not after the upstream: {:?}",
        started.elapsed()
    );
    // The connection stays usable for the next call.
    let resp = unary(&mut client, UNARY, msg(1, "again")).await.unwrap();
    assert_eq!(resp.into_inner(), msg(2, "echo: again"));
}

// ------------------------------------------------------- request trailers

/// tonic's client never sends request trailers, so they are checked with
/// hyper: an HTTP/2 request body ending in a trailers frame reaches an h2c
/// upstream's `Incoming` as trailers.
#[tokio::test]
async fn http2_request_trailers_reach_an_h2c_upstream() {
    let upstream = h2c_server(|req: http::Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .and_then(|t| t.get("x-check"))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| "none".into());
        let body = format!("body={:?} x-check={trailers}", collected.to_bytes());
        http::Response::new(http_body_util::Full::new(Bytes::from(body)))
    })
    .await;
    let pki = Pki::new();
    let proxy = h2c_proxy(&pki, "", upstream).await;
    let tls = timeout(
        WAIT,
        common::tls_connect(proxy.https, "api.test", pki.client_config(&[b"h2"])),
    )
    .await
    .unwrap()
    .unwrap();
    let (mut send, conn) = timeout(
        WAIT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-check", http::HeaderValue::from_static("yes"));
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post("https://api.test/trailers")
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = timeout(WAIT, send.send_request(req))
        .await
        .expect("answered in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"body=b\"hello\" x-check=yes");
}

/// What the raw HTTP/1.1 upstream saw of one chunked request.
#[derive(Debug, PartialEq)]
struct ChunkedSeen {
    /// The `Trailer` header, if any.
    trailer_header: Option<String>,
    /// The body, de-chunked.
    body: String,
    /// The trailer section's lines, lower-cased.
    trailer_lines: Vec<String>,
}

/// A raw HTTP/1.1 upstream that reads one chunked request, reports what it
/// saw on the channel and answers 200.
async fn chunked_upstream() -> (SocketAddr, tokio::sync::mpsc::Receiver<ChunkedSeen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(tcp);
                let mut line = String::new();
                let mut trailer_header = None;
                let mut chunked = false;
                // Request line and headers.
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                        if k == "trailer" {
                            trailer_header = Some(v);
                        } else if k == "transfer-encoding" {
                            chunked = v.eq_ignore_ascii_case("chunked");
                        }
                    }
                }
                assert!(chunked, "the upstream request is chunked");
                // Chunks, then the trailer section.
                let mut body = Vec::new();
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    let size = line.trim_end().split(';').next().unwrap();
                    let size = usize::from_str_radix(size, 16).unwrap();
                    if size == 0 {
                        break;
                    }
                    let mut chunk = vec![0; size + 2];
                    r.read_exact(&mut chunk).await.unwrap();
                    body.extend_from_slice(&chunk[..size]);
                }
                let mut trailer_lines = Vec::new();
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    trailer_lines.push(l.to_ascii_lowercase());
                }
                let _ = tx
                    .send(ChunkedSeen {
                        trailer_header,
                        body: String::from_utf8_lossy(&body).into_owned(),
                        trailer_lines,
                    })
                    .await;
                let mut tcp = r.into_inner();
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, rx)
}

/// An HTTP/1.1 chunked request with `Trailer: x-check` and an `x-check`
/// trailer reaches an HTTP/1.1 upstream with its trailer section.
#[tokio::test]
async fn http1_chunked_request_trailers_reach_an_http1_upstream() {
    let (upstream, mut seen) = chunked_upstream().await;
    let pki = Pki::new();
    let proxy = proxy(
        &pki,
        "",
        &format!("[[sites.routes]]\nupstream = \"http://{upstream}\"\n"),
    )
    .await;
    let mut tls = timeout(
        WAIT,
        common::tls_connect(proxy.https, "api.test", pki.client_config(&[b"http/1.1"])),
    )
    .await
    .unwrap()
    .unwrap();
    timeout(
        WAIT,
        tls.write_all(
            b"POST /trailers HTTP/1.1\r\nhost: api.test\r\ntransfer-encoding: chunked\r\n\
              trailer: x-check\r\nte: trailers\r\nconnection: close\r\n\r\n\
              5\r\nhello\r\n0\r\nx-check: yes\r\n\r\n",
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let got = timeout(WAIT, seen.recv())
        .await
        .expect("the upstream got the request in time")
        .unwrap();
    assert_eq!(
        got,
        ChunkedSeen {
            trailer_header: Some("x-check".into()),
            body: "hello".into(),
            trailer_lines: vec!["x-check: yes".into()],
        }
    );
    let mut resp = Vec::new();
    timeout(WAIT, tls.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .ok();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}
