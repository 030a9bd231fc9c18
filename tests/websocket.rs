//! WebSocket upgrades pass through the proxy: the HTTP/1.1 handshake is
//! forwarded, then frames flow both ways over the upgraded connections.

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use common::*;

/// Bound on every network step of these tests.
const STEP: Duration = Duration::from_secs(10);

/// An upstream that accepts WebSocket upgrades and echoes every data
/// message, and answers plain requests with `plain`.
async fn ws_echo_upstream() -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    // Bounded: the client sends a handful of messages then closes.
    upstream(|mut req: Request<Incoming>| async move {
        ws_echo(&mut req, 1000).unwrap_or_else(|| Response::new(full("plain")))
    })
    .await
}

async fn start(pki: &Pki, up: std::net::SocketAddr) -> Proxy {
    OneSite::new()
        .host("ws.test")
        .route(&format!("path = \"/ws\"\nupstream = \"http://{up}\""))
        .start(pki)
        .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket to `wss://ws.test{path}` through the proxy (over HTTP/1.1).
async fn ws_connect(
    proxy: &Proxy,
    pki: &Pki,
    path: &str,
) -> (
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let tls = tls_connect(proxy.https, "ws.test", pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async(format!("wss://ws.test{path}"), tls),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through the proxy")
}

/// Sends `m` and returns what comes back.
async fn round_trip(ws: &mut Ws, m: Message) -> Message {
    tokio::time::timeout(STEP, ws.send(m))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(STEP, ws.next())
        .await
        .expect("echo in time")
        .expect("stream open")
        .expect("valid frame")
}

#[tokio::test]
async fn websocket_echoes_text_and_binary_through_the_proxy() {
    let pki = Pki::new();
    let (up, _stop) = ws_echo_upstream().await;
    let proxy = start(&pki, up).await;

    let (mut ws, resp) = ws_connect(&proxy, &pki, "/ws/chat").await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let messages = [
        Message::text("hello through portcullis"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
        Message::text("ünïcödé ✓"),
        // Larger than any single TLS record or read buffer.
        Message::binary(big),
    ];
    for m in &messages {
        assert_eq!(&round_trip(&mut ws, m.clone()).await, m);
    }
    tokio::time::timeout(STEP, ws.close(None))
        .await
        .unwrap()
        .unwrap();
    // The close handshake completes: the upstream answered it through the tunnel.
    let end = tokio::time::timeout(STEP, async {
        for _ in 0..10 {
            match ws.next().await {
                None | Some(Err(_)) => return true,
                Some(Ok(Message::Close(_))) => {}
                Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            }
        }
        false
    })
    .await
    .expect("close in time");
    assert!(end, "the tunnel did not end after the close handshake");
}

#[tokio::test]
async fn plain_request_on_a_websocket_route_still_works() {
    let pki = Pki::new();
    let (up, _stop) = ws_echo_upstream().await;
    let proxy = start(&pki, up).await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let got = get(
            proxy.https,
            "ws.test",
            "/ws/chat",
            pki.client_config(&[alpn]),
        )
        .await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"plain");
    }
    // And a WebSocket still upgrades after plain requests on the same route.
    let (mut ws, _) = ws_connect(&proxy, &pki, "/ws").await;
    assert_eq!(
        round_trip(&mut ws, Message::text("again")).await,
        Message::text("again")
    );
}

// An upgraded tunnel gets the shutdown grace period like any connection,
// then closes, so `run()` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnel_is_closed_when_the_shutdown_grace_period_ends() {
    let pki = Pki::new();
    let (up, _stop) = ws_echo_upstream().await;
    let proxy = OneSite::new()
        .host("ws.test")
        .top("[timeouts]\nshutdown_grace = \"1s\"")
        .upstream(up)
        .start(&pki)
        .await;
    let (mut ws, _) = ws_connect(&proxy, &pki, "/ws").await;
    assert_eq!(
        round_trip(&mut ws, Message::text("before")).await,
        Message::text("before")
    );

    let t0 = std::time::Instant::now();
    proxy.shutdown.cancel();
    let done = tokio::time::timeout(STEP, proxy.done)
        .await
        .expect("run() returns")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    // The tunnel does not outlive the grace period: the client sees its end.
    let ended = tokio::time::timeout(STEP, async {
        // Bounded: the server sends nothing on its own but a close.
        for _ in 0..10 {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
        false
    })
    .await;
    assert_eq!(
        ended,
        Ok(true),
        "the WebSocket tunnel was still open {:?} after shutdown started (grace 1s)",
        t0.elapsed()
    );
}
