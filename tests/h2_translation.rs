//! HTTP/2 requests held to the same limits as HTTP/1.1 ones, and
//! translated for HTTP/1.1 upstreams as RFC 9113 §8.2.3 asks.

mod common;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use common::{Alg, Pki, Proxy};

const HOST: &str = "h2.test";

async fn proxy_to_echo(pki: &Pki) -> (Proxy, tokio_util::sync::CancellationToken) {
    let (up, stop) = common::echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&[HOST], Alg::Ecdsa).write(dir.path(), "");
    let proxy = Proxy::start_in(
        dir,
        &format!(
            "[admin]\nlisten = \"off\"\n\
             [limits]\nmax_header_bytes = 65536\n\
             [[listeners]]\nlisten = \"127.0.0.1:0\"\n\
             [[sites]]\nhosts = [\"{HOST}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\
             [[sites.routes]]\nupstream = \"http://{up}\"\n"
        ),
    )
    .await;
    (proxy, stop)
}

async fn h2(proxy: &Proxy, pki: &Pki, req: Request<Full<Bytes>>) -> common::Got {
    common::request(proxy.https, HOST, pki.client_config(&[b"h2"]), req)
        .await
        .expect("HTTP/2 exchange")
}

#[tokio::test]
async fn too_many_header_fields_over_http2_get_431() {
    let pki = Pki::new();
    let (proxy, _up) = proxy_to_echo(&pki).await;
    // The default limits.max_headers is 100; the header bytes allow far
    // more, so the count is what refuses it.
    let mut b = Request::builder().uri(format!("https://{HOST}/many"));
    for i in 0..200 {
        b = b.header(format!("x-h{i}"), "v");
    }
    let got = h2(&proxy, &pki, b.body(Full::new(Bytes::new())).unwrap()).await;
    // Refused by the proxy itself, not by the origin (which refuses more
    // than 100 fields with a 431 of its own).
    assert_eq!(
        (got.status, &got.body[..]),
        (431, &b"too many header fields\n"[..])
    );
    // Within the limit: forwarded.
    let mut b = Request::builder().uri(format!("https://{HOST}/some"));
    for i in 0..50 {
        b = b.header(format!("x-h{i}"), "v");
    }
    let got = h2(&proxy, &pki, b.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.seen()["x-h49"], "v");
}

#[tokio::test]
async fn split_cookies_reach_an_http1_upstream_as_one_field() {
    let pki = Pki::new();
    let (proxy, _up) = proxy_to_echo(&pki).await;
    let req = Request::builder()
        .uri(format!("https://{HOST}/c"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = h2(&proxy, &pki, req).await;
    assert_eq!(got.status, 200);
    // The echo upstream joins repeated fields with ", ": one field shows
    // as it was sent.
    assert_eq!(got.seen()["cookie"], "a=1; b=2; c=3");
}

#[tokio::test]
async fn a_scheme_other_than_http_or_https_is_refused() {
    let pki = Pki::new();
    let (proxy, _up) = proxy_to_echo(&pki).await;
    for scheme in ["foo", "ftp"] {
        let req = Request::builder()
            .uri(format!("{scheme}://{HOST}/x"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = h2(&proxy, &pki, req).await;
        assert_eq!(got.status, 400, ":scheme {scheme}");
    }
    let req = Request::builder()
        .uri(format!("https://{HOST}/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2(&proxy, &pki, req).await.status, 200);
}
