//! The admin listener against hostile input: paths that once made it
//! panic, encoded NULs, empty and oversized names (each gets a 4xx and the
//! listener keeps answering); a foreign `Host` (DNS rebinding), a
//! cross-site `Origin`, a missing bearer token, and a request head that
//! never ends.

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

async fn admin_proxy(pki: &Pki, admin_lines: &str, extra: &[(&str, &str)]) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["admin.test"], Alg::Ecdsa).write(dir.path(), "");
    for (name, contents) in extra {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    Proxy::start_in(
        dir,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{admin_lines}\n\
             [timeouts]\nrequest_header = \"1s\"\n\
             [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
             [[sites]]\nhosts = [\"admin.test\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\
             [[sites.routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n"
        ),
    )
    .await
}

#[tokio::test]
async fn a_foreign_host_is_refused_and_ip_literals_localhost_and_admin_hosts_are_served() {
    let pki = Pki::new();
    let proxy = admin_proxy(&pki, "hosts = [\"admin.internal\"]", &[]).await;
    let admin = proxy.admin.unwrap();
    let get = |host: &str| format!("GET /metrics HTTP/1.1\r\nhost: {host}\r\n\r\n");
    // DNS rebinding: a page of evil.example whose name now points here.
    assert_eq!(raw(admin, &get("evil.example")).await, 403);
    assert_eq!(raw(admin, &get("evil.example:9901")).await, 403);
    for ok in [
        "127.0.0.1",
        "127.0.0.1:9901",
        "[::1]:9901",
        "localhost:9901",
        "admin.internal",
    ] {
        assert_eq!(raw(admin, &get(ok)).await, 200, "Host: {ok}");
    }
}

#[tokio::test]
async fn a_cross_site_origin_cannot_change_state() {
    let pki = Pki::new();
    let proxy = admin_proxy(&pki, "", &[]).await;
    let admin = proxy.admin.unwrap();
    let post = |origin: &str| {
        format!(
            "POST /reload HTTP/1.1\r\nhost: 127.0.0.1\r\norigin: {origin}\r\ncontent-length: 0\r\n\r\n"
        )
    };
    // A browser on another site posting to the loopback admin.
    assert_eq!(raw(admin, &post("https://evil.example")).await, 403);
    assert_eq!(raw(admin, &post("null")).await, 403);
    // The admin's own origin, and no Origin at all (curl, the CLI), may.
    assert_eq!(raw(admin, &post("http://127.0.0.1:9901")).await, 200);
    assert_eq!(
        raw(
            admin,
            "POST /reload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n"
        )
        .await,
        200
    );
    // Reads are not state changes.
    assert_eq!(
        raw(
            admin,
            "GET /certs HTTP/1.1\r\nhost: 127.0.0.1\r\norigin: https://evil.example\r\n\r\n"
        )
        .await,
        200
    );
}

#[tokio::test]
async fn with_a_token_file_every_call_but_health_needs_the_bearer_token() {
    let pki = Pki::new();
    let token = "3f7a9c0e5b1d4e2f8a6b";
    let proxy = admin_proxy(
        &pki,
        "token_file = \"admin-token\"",
        &[("admin-token", &format!("{token}\n"))],
    )
    .await;
    let admin = proxy.admin.unwrap();
    let get =
        |path: &str, auth: &str| format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}\r\n");
    assert_eq!(raw(admin, &get("/healthz", "")).await, 200);
    assert_eq!(raw(admin, &get("/readyz", "")).await, 200);
    assert_eq!(raw(admin, &get("/metrics", "")).await, 401);
    assert_eq!(
        raw(admin, &get("/metrics", "authorization: Bearer wrong\r\n")).await,
        401
    );
    assert_eq!(
        raw(
            admin,
            &get("/metrics", &format!("authorization: Bearer {token}\r\n"))
        )
        .await,
        200
    );
    assert_eq!(
        raw(
            admin,
            "POST /reload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n"
        )
        .await,
        401
    );
    // The CLI sends the token named by PORTCULLIS_ADMIN_TOKEN_FILE.
    let url = format!("http://{admin}");
    let token_file = proxy.dir.join("admin-token");
    let without = common::cli(
        ["reload", "--admin", url.as_str()],
        &[("PORTCULLIS_ADMIN_TOKEN_FILE", None)],
    )
    .await;
    assert_ne!(without.code, Some(0));
    assert!(
        without.stderr.contains("PORTCULLIS_ADMIN_TOKEN_FILE"),
        "{}",
        without.stderr
    );
    let with = common::cli(
        ["reload", "--admin", url.as_str()],
        &[("PORTCULLIS_ADMIN_TOKEN_FILE", token_file.to_str())],
    )
    .await;
    assert_eq!(with.code, Some(0), "{}", with.stderr);
}

#[tokio::test]
async fn a_non_loopback_admin_without_a_token_is_refused_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.leaf(&["admin.test"], Alg::Ecdsa).write(dir.path(), "");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(
        &path,
        "[admin]\nlisten = \"0.0.0.0:9901\"\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
         [[sites]]\nhosts = [\"admin.test\"]\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n\
         [[sites.routes]]\nrespond = { status = 200, body = \"ok\" }\n",
    )
    .unwrap();
    let err = portcullis::config::Config::load(&path)
        .expect_err("a public admin without a token must be refused")
        .to_string();
    assert!(
        err.contains("portcullis.toml:2: admin.listen") && err.contains("token_file"),
        "{err}"
    );
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_and_the_admin_keeps_answering() {
    let pki = Pki::new();
    let proxy = admin_proxy(&pki, "", &[]).await;
    let admin = proxy.admin.unwrap();
    let mut stalled = TcpStream::connect(admin).await.unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: 127")
        .await
        .unwrap();
    // Meanwhile others are served.
    assert_eq!(
        raw(admin, "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await,
        200
    );
    // timeouts.request_header is 1 s here: closed well within WAIT.
    let closed = timeout(WAIT, async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stalled.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled admin request head was never cut");
}
