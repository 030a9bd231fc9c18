//! Each timeout does what `config/reference.toml` says, with short
//! configured values: `timeouts.request_header` cuts a request head that
//! is too slow (from its first byte), `timeouts.idle` (not the head
//! timeout) closes an idle keep-alive connection, and an HTTP/2 client
//! that stops reading is dropped within about `timeouts.response_write`.
//!
//! The sleeps here are the idle periods under test, not synchronisation.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use common::{Alg, Pki, Proxy};

const HOST: &str = "timeouts.test";

async fn start(pki: &Pki, timeouts: &str, body_len: usize) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&[HOST], Alg::Ecdsa).write(dir.path(), "");
    let body = "x".repeat(body_len);
    Proxy::start_in(
        dir,
        &format!(
            "[admin]\nlisten = \"off\"\n\
             [timeouts]\n{timeouts}\n\
             [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
             [[sites]]\nhosts = [\"{HOST}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\
             [[sites.routes]]\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        ),
    )
    .await
}

/// Reads until `needle` has been seen (true) or the peer closes (false).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, needle: &[u8]) -> bool {
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
}

/// Reads until the peer closes; how long that took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let drain = async {
        let mut buf = [0u8; 16384];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    timeout(limit, drain).await.ok().map(|_| start.elapsed())
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: timeouts.test\r\n\r\n";

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_head_timeout_until_the_idle_timeout() {
    let pki = Pki::new();
    let proxy = start(&pki, "request_header = \"1s\"\nidle = \"3s\"", 2).await;
    let mut tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    tls.write_all(GET).await.unwrap();
    assert!(read_until(&mut tls, b"\r\n\r\nxx").await);
    // Idle for twice the head timeout: still open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tls.write_all(GET).await.unwrap();
    assert!(
        read_until(&mut tls, b"\r\n\r\nxx").await,
        "a keep-alive connection idle for less than timeouts.idle was closed"
    );
    // Then closed by the idle timeout (3 s), not much later.
    let took = closed_within(&mut tls, Duration::from_secs(6))
        .await
        .expect("idle connection not closed within twice timeouts.idle");
    assert!(
        took >= Duration::from_millis(2_500),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn a_request_head_that_stalls_is_cut_at_the_head_timeout() {
    let pki = Pki::new();
    let proxy = start(&pki, "request_header = \"1s\"\nidle = \"30s\"", 2).await;
    let mut tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    // A first request, answered: the next head's timer starts at its
    // first byte, not at the end of this response.
    tls.write_all(GET).await.unwrap();
    assert!(read_until(&mut tls, b"\r\n\r\nxx").await);
    tls.write_all(b"GET / HTTP/1.1\r\nhost: time")
        .await
        .unwrap();
    let took = closed_within(&mut tls, Duration::from_secs(5))
        .await
        .expect("a stalled head was not cut within 5 s");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
}

/// The HTTP/2 connection preface, an empty SETTINGS frame and a HEADERS
/// frame (stream 1, END_STREAM | END_HEADERS) for `GET https://HOST/`,
/// HPACK-encoded by hand: static-table entries for :method GET (0x82),
/// :scheme https (0x87), :path / (0x84), and :authority as a literal
/// with incremental indexing (0x41).
fn h2_get() -> Vec<u8> {
    let mut block = vec![0x82, 0x87, 0x84, 0x41, HOST.len() as u8];
    block.extend_from_slice(HOST.as_bytes());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]);
    let len = block.len() as u32;
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x01, 0x05]);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&block);
    out
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_is_dropped_within_about_response_write() {
    let pki = Pki::new();
    let proxy = start(&pki, "response_write = \"2s\"", 256 * 1024).await;
    let mut tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    tls.write_all(&h2_get()).await.unwrap();
    // Never read, never acknowledge a SETTINGS or PING, never open the
    // flow-control window: the response stalls after its first 64 KiB.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let took = closed_within(&mut tls, Duration::from_secs(3)).await;
    assert!(
        took.is_some(),
        "a client that stopped reading was still connected 8 s later (response_write = 2s)"
    );
}
