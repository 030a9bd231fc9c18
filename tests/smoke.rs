mod common;

use common::*;

#[tokio::test]
async fn proxies_over_h1_and_h2_with_forwarded_headers() {
    let pki = Pki::new();
    let (up, _stop) = echo_upstream().await;
    let proxy = OneSite::new().upstream(up).start(&pki).await;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let got = get(
            proxy.https,
            "api.test",
            "/x?y=1",
            pki.client_config(&[alpn]),
        )
        .await;
        assert_eq!(got.status, 200);
        let seen = got.seen();
        assert_eq!(seen[":path"], "/x?y=1");
        assert_eq!(seen["host"], "api.test");
        assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
        assert_eq!(seen["x-forwarded-proto"], "https");
        assert!(seen["via"].contains("portcullis"), "{seen:?}");
    }
}
