//! The admin listener against hostile input: paths that once made it
//! panic, encoded NULs, empty and oversized names. Each gets a 4xx and the
//! listener keeps answering.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use common::{Alg, Pki, Proxy};

const WAIT: Duration = Duration::from_secs(10);

/// Sends `head` as is on a new connection and returns the status code of
/// the answer (0 if the connection closed without one).
async fn raw(addr: SocketAddr, head: &str) -> u16 {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(2).any(|w| w == b"\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&got).to_string();
        line.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer within {WAIT:?} to {:.60?}", head))
}

#[tokio::test]
async fn hostile_admin_paths_get_4xx_and_the_listener_keeps_answering() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["admin.test"], Alg::Ecdsa).write(dir.path(), "");
    let proxy = Proxy::start_in(
        dir,
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
         [[sites]]\nhosts = [\"admin.test\"]\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n\
         [[sites.routes]]\nrespond = { status = 200, body = \"ok\" }\n",
    )
    .await;
    let admin = proxy.admin.expect("admin listener");
    let long = "a".repeat(10 * 1024);
    let cases = [
        ("POST", "/certs/renew".to_string()),
        ("POST", "/certs/revoke".to_string()),
        ("GET", "/certs/%00".to_string()),
        ("POST", "/certs//renew".to_string()),
        ("POST", "/certs//revoke?reason=key-compromise".to_string()),
        ("POST", format!("/certs/{long}/renew")),
        ("GET", format!("/{long}")),
        ("BREW", "/certs".to_string()),
    ];
    for (method, path) in &cases {
        let status = raw(
            admin,
            &format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n"),
        )
        .await;
        assert!(
            (400..500).contains(&status),
            "{method} {:.40}: want a 4xx, got {status}",
            path
        );
        // Still answering after each one.
        assert_eq!(
            raw(admin, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await,
            200,
            "after {method} {:.40}",
            path
        );
    }
}
