//! HTTP/2 control-frame floods: a client that sends SETTINGS or PING
//! frames by the thousand (and never reads the answers) is disconnected
//! within a few seconds, instead of holding its connection until the
//! write timeout. An invalid connection preface is closed at once.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use common::{Alg, Pki, Proxy};

const HOST: &str = "floods.test";

async fn start(pki: &Pki) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&[HOST], Alg::Ecdsa).write(dir.path(), "");
    Proxy::start_in(
        dir,
        &format!(
            "[admin]\nlisten = \"off\"\n\
             [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
             [[sites]]\nhosts = [\"{HOST}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\
             [[sites.routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
        ),
    )
    .await
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: [u8; 9] = [0, 0, 0, 0x04, 0, 0, 0, 0, 0];
const PING: [u8; 17] = [0, 0, 8, 0x06, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];

/// Sends `frame` over and over (never reading) for at most `limit`;
/// returns how long until the proxy's close made a write fail or the
/// connection read EOF.
async fn flood(pki: &Pki, proxy: &Proxy, frame: &[u8], limit: Duration) -> Option<Duration> {
    let mut tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&SETTINGS).await.unwrap();
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 256)
        .collect();
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed() < limit {
        match timeout(Duration::from_millis(200), tls.write_all(&batch)).await {
            Ok(Ok(())) => sent += 256,
            // Written nothing for 200 ms: the proxy stopped reading.
            Err(_) => break,
            Ok(Err(_)) => return Some(start.elapsed()),
        }
        if sent > 1_000_000 {
            break;
        }
    }
    // Closed yet? Drain what the proxy wrote; EOF means it hung up.
    let drain = async {
        let mut buf = [0u8; 65536];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let left = limit.saturating_sub(start.elapsed()) + Duration::from_secs(1);
    timeout(left, drain).await.ok().map(|_| start.elapsed())
}

#[tokio::test]
async fn a_ping_flood_is_disconnected_within_seconds() {
    let pki = Pki::new();
    let proxy = start(&pki).await;
    let took = flood(&pki, &proxy, &PING, Duration::from_secs(5)).await;
    assert!(took.is_some(), "a PING flood was still connected after 6 s");
    // The proxy still serves others.
    let got = common::get(proxy.https, HOST, "/", pki.client_config(&[b"h2"])).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn a_settings_flood_is_disconnected_within_seconds() {
    let pki = Pki::new();
    let proxy = start(&pki).await;
    let took = flood(&pki, &proxy, &SETTINGS, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "a SETTINGS flood was still connected after 6 s"
    );
}

#[tokio::test]
async fn a_few_pings_are_answered_and_the_connection_stays() {
    let pki = Pki::new();
    let proxy = start(&pki).await;
    let mut tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&SETTINGS).await.unwrap();
    for _ in 0..10 {
        tls.write_all(&PING).await.unwrap();
    }
    // Ten PING ACKs come back (type 0x6, flag ACK) among the server's frames.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let acks = |b: &[u8]| {
        let mut n = 0;
        let mut i = 0;
        while i + 9 <= b.len() {
            let len = (b[i] as usize) << 16 | (b[i + 1] as usize) << 8 | b[i + 2] as usize;
            if b[i + 3] == 0x06 && b[i + 4] & 1 == 1 {
                n += 1;
            }
            i += 9 + len;
        }
        n
    };
    let read = timeout(Duration::from_secs(5), async {
        while acks(&got) < 10 {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed a connection that sent ten PINGs");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "ten PING ACKs not received");
}

/// An invalid preface ends the connection at once. (No GOAWAY: hyper's h2
/// server drops a connection whose preface is wrong without writing one,
/// and the proxy cannot write a frame past it; see the README's Security
/// section.)
#[tokio::test]
async fn an_invalid_preface_is_closed_at_once() {
    let pki = Pki::new();
    let proxy = start(&pki).await;
    let mut tls = common::tls_connect(proxy.https, HOST, pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: floods.test\r\n\r\n")
        .await
        .unwrap();
    let closed = timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection with an invalid preface stayed open"
    );
}
