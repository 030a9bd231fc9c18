//! The shipped quickstart config and the `reverse-proxy` one-liner work as
//! a new user would run them: HTTPS with the internal CA, verified by a
//! client that trusts only the CA file the proxy created.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A client that trusts only `ca_pem`, offering `alpn`.
fn client_trusting(ca_pem: &Path, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn quickstart_config_serves_https_with_the_internal_ca_over_h2_and_http11() {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml"),
    )
    .unwrap();
    // Same file, free ports, state in the test's directory.
    let toml = shipped
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("state_dir = \"../state\"", "state_dir = \"state\"");
    assert_ne!(
        toml, shipped,
        "the quickstart's addresses changed; update this test"
    );
    let proxy = Proxy::start(&toml).await;
    let ca = proxy.dir.as_path().join("state/internal-ca/ca.pem");
    assert!(ca.exists(), "the internal CA is created on first run");
    let key = proxy.dir.as_path().join("state/internal-ca/ca.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let cfg = client_trusting(&ca, alpn);
        let tls = tls_connect(proxy.https, "localhost", cfg.clone())
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        drop(tls);
        let got = get(proxy.https, "localhost", "/", cfg).await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"hello from portcullis\n");
    }
    // The plain listener redirects to the HTTPS port written in the file.
    let http = proxy.http.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /x HTTP/1.1\r\nHost: localhost:8080\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf.starts_with("HTTP/1.1 308"), "{buf}");
    assert!(
        buf.to_ascii_lowercase()
            .contains("location: https://localhost:8443/x"),
        "{buf}"
    );
}

#[tokio::test]
async fn reverse_proxy_one_liner_proxies_with_an_internal_certificate() {
    let (up, _stop) = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let to = format!("http://{up}");
    let proxy = BinProxy::spawn(
        dir,
        [
            "reverse-proxy".as_ref(),
            "--from".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--host".as_ref(),
            "localhost".as_ref(),
            "--admin".as_ref(),
            "off".as_ref(),
            "--to".as_ref(),
            std::ffi::OsStr::new(&to),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ],
    );
    let addr = proxy.https;
    let ca = state.join("internal-ca/ca.pem");
    let got = get(addr, "localhost", "/hello?x=1", client_trusting(&ca, b"h2")).await;
    assert_eq!(got.status, 200);
    let seen = got.seen();
    assert_eq!(seen[":path"], "/hello?x=1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    drop(proxy);
}
