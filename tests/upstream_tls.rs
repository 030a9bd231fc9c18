//! TLS and HTTP/2 to upstreams, against real backends on loopback:
//! `https://` verified against a private CA (rcgen) with SNI from
//! `tls_server_name` or the URL's IP, refused against the system roots or
//! the wrong name; mTLS to a backend that requires a client certificate;
//! h2c (prior knowledge) and h2 over TLS (ALPN) upstreams, with the
//! client's host as `:authority`.

mod common;

use std::time::Duration;

use common::origin::*;
use common::*;

const WAIT: Duration = Duration::from_secs(15);
const HEALTH_CHECK: &str = "[sites.routes.health_check]\npath = \"/health\"\ninterval = \"50ms\"\ntimeout = \"50ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n";

#[tokio::test]
async fn https_upstream_is_verified_against_the_configured_ca_with_sni() {
    let pki = Pki::new();
    let ca = Pki::new(); // upstream test CA
    let named = Backend::start(
        "named",
        Mode::Tls(backend_tls(
            &ca.server_cert(&["backend.test"]),
            &[b"http/1.1"],
            None,
        )),
    )
    .await;
    let by_ip = Backend::start(
        "by-ip",
        Mode::Tls(backend_tls(
            &ca.server_cert(&["127.0.0.1"]),
            &[b"http/1.1"],
            None,
        )),
    )
    .await;
    let routes = format!(
        "[[sites.routes]]\npath = \"/named\"\nupstream = \"https://{named}\"\nca = \"upstream-ca.pem\"\ntls_server_name = \"backend.test\"\n\
         [[sites.routes]]\npath = \"/ip\"\nupstream = \"https://{ip}\"\nca = \"upstream-ca.pem\"\n\
         [[sites.routes]]\npath = \"/wrong-name\"\nupstream = \"https://{named}\"\nca = \"upstream-ca.pem\"\ntls_server_name = \"other.test\"\n\
         [[sites.routes]]\npath = \"/system-roots\"\nupstream = \"https://{named}\"\ntls_server_name = \"backend.test\"\n",
        named = named.addr,
        ip = by_ip.addr,
    );
    let proxy = OneSite::new()
        .admin()
        .routes(&routes)
        .file("upstream-ca.pem", &ca.root_pem)
        .start(&pki)
        .await;
    let mut send = h2_client(proxy.https, "api.test", &pki).await;

    assert_eq!(
        h2_get(&mut send, "/named", &[]).await.unwrap(),
        (200, "named".into())
    );
    let seen = named.seen();
    assert_eq!(seen[0].sni.as_deref(), Some("backend.test"));
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[0].host, "api.test", "the client's Host is preserved");

    assert_eq!(
        h2_get(&mut send, "/ip", &[]).await.unwrap(),
        (200, "by-ip".into())
    );
    assert_eq!(by_ip.seen()[0].sni, None, "no SNI for an IP address");

    // A certificate for another name, or one the system roots do not know.
    for path in ["/wrong-name", "/system-roots"] {
        let (status, body) = h2_get(&mut send, path, &[]).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (502, "upstream unavailable\n"),
            "{path}"
        );
    }
    assert_eq!(named.hits(), 1, "a request reached an unverified upstream");
}

#[tokio::test]
async fn mtls_upstream_gets_the_configured_client_certificate() {
    let pki = Pki::new();
    let ca = Pki::new(); // upstream test CA
    let clients = Pki::new(); // upstream client CA
    let client = clients.client_cert("portcullis-proxy");
    let backend = Backend::start(
        "mtls",
        Mode::Tls(backend_tls(
            &ca.server_cert(&["backend.test"]),
            &[b"http/1.1"],
            Some(&clients),
        )),
    )
    .await;
    let routes = format!(
        "[[sites.routes]]\npath = \"/with-cert\"\nupstream = \"https://{a}\"\nca = \"ca.pem\"\ntls_server_name = \"backend.test\"\n\
         client_cert = \"client.pem\"\nclient_key = \"client.key\"\n\
         {check}\
         [[sites.routes]]\npath = \"/without-cert\"\nupstream = \"https://{a}\"\nca = \"ca.pem\"\ntls_server_name = \"backend.test\"\n\
         [[sites.routes]]\npath = \"/checked-without-cert\"\nupstream = \"https://{a}\"\nca = \"ca.pem\"\ntls_server_name = \"backend.test\"\n\
         {check}",
        a = backend.addr,
        check = HEALTH_CHECK,
    );
    let proxy = OneSite::new()
        .admin()
        .routes(&routes)
        .file("ca.pem", &ca.root_pem)
        .file("client.pem", &client.cert_pem)
        .file("client.key", &client.key_pem)
        .start(&pki)
        .await;
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    assert_eq!(
        h2_get(&mut send, "/with-cert", &[]).await.unwrap(),
        (200, "mtls".into())
    );
    assert_eq!(
        backend.seen()[0].client_cn.as_deref(),
        Some("portcullis-proxy")
    );
    assert_eq!(
        h2_get(&mut send, "/without-cert", &[]).await.unwrap().0,
        502
    );
    assert_eq!(backend.hits(), 1);
    // Health checks go over the same TLS client: with the certificate
    // they pass, without it the handshake fails and the upstream is out.
    let label = backend.label();
    wait_until(
        WAIT,
        "health checks with and without a client certificate",
        || async {
            healthy(&proxy, "/with-cert", &label).await == Some(1.0)
                && healthy(&proxy, "/checked-without-cert", &label).await == Some(0.0)
                && backend
                    .shared
                    .health_hits
                    .load(std::sync::atomic::Ordering::SeqCst)
                    >= 2
        },
    )
    .await;
}

#[test]
fn client_key_that_does_not_match_its_certificate_is_refused_at_load() {
    let ca = Pki::new(); // upstream test CA
    let one = ca.client_cert("one");
    let two = ca.client_cert("two");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.root_pem).unwrap();
    std::fs::write(dir.path().join("client.pem"), &one.cert_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), &two.key_pem).unwrap();
    let text = OneSite::new().admin().routes(
        "[[sites.routes]]\nupstream = \"https://127.0.0.1:1\"\nca = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n",
    )
    .toml();
    let path = dir.path().join("portcullis.toml");
    let err = portcullis::config::Config::parse(&path, &text)
        .unwrap_err()
        .to_string();
    let want = format!(
        "{}:12: sites[0].routes[0].client_cert: client certificate and key do not work together",
        path.display()
    );
    assert!(err.starts_with(&want), "{err}");
}

#[tokio::test]
async fn h2c_upstream_gets_http2_with_the_client_host_as_authority() {
    let pki = Pki::new();
    let backend = Backend::start("h2c", Mode::H2c).await;
    let routes = format!(
        "[[sites.routes]]\npath = \"/keep\"\nupstream = \"http://{a}\"\nprotocol = \"h2c\"\n\
         [[sites.routes]]\npath = \"/own\"\nupstream = \"http://{a}\"\nprotocol = \"h2c\"\npreserve_host = false\n",
        a = backend.addr
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    // Over h1 and h2 downstream.
    let got = common::get(
        proxy.https,
        "api.test",
        "/keep",
        pki.client_config(&[b"http/1.1"]),
    )
    .await;
    assert_eq!((got.status, &got.body[..]), (200, &b"h2c"[..]));
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    assert_eq!(
        h2_get(&mut send, "/own", &[]).await.unwrap(),
        (200, "h2c".into())
    );
    let seen = backend.seen();
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "{seen:?}"
    );
    assert_eq!(seen[0].host, "api.test");
    assert_eq!(seen[1].host, backend.label());
}

#[tokio::test]
async fn h2_over_tls_is_agreed_with_alpn() {
    let pki = Pki::new();
    let ca = Pki::new(); // upstream test CA
    let cert = ca.server_cert(&["backend.test"]);
    let both = Backend::start(
        "both",
        Mode::Tls(backend_tls(&cert, &[b"h2", b"http/1.1"], None)),
    )
    .await;
    let h1_only = Backend::start(
        "h1-only",
        Mode::Tls(backend_tls(&cert, &[b"http/1.1"], None)),
    )
    .await;
    let tls = "ca = \"ca.pem\"\ntls_server_name = \"backend.test\"\n";
    let routes = format!(
        "[[sites.routes]]\npath = \"/h2\"\nupstream = \"https://{both}\"\nprotocol = \"h2\"\n{tls}\
         [[sites.routes]]\npath = \"/h1\"\nupstream = \"https://{both}\"\n{tls}\
         [[sites.routes]]\npath = \"/h2-refused\"\nupstream = \"https://{h1}\"\nprotocol = \"h2\"\n{tls}\
         [[sites.routes]]\npath = \"/h2-checked\"\nupstream = \"https://{both}\"\nprotocol = \"h2\"\n{tls}{check}\
         [[sites.routes]]\npath = \"/h2-refused-checked\"\nupstream = \"https://{h1}\"\nprotocol = \"h2\"\n{tls}{check}",
        both = both.addr,
        h1 = h1_only.addr,
        check = HEALTH_CHECK,
    );
    let proxy = OneSite::new()
        .admin()
        .routes(&routes)
        .file("ca.pem", &ca.root_pem)
        .start(&pki)
        .await;
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    for _ in 0..3 {
        assert_eq!(
            h2_get(&mut send, "/h2", &[]).await.unwrap(),
            (200, "both".into())
        );
    }
    assert_eq!(
        h2_get(&mut send, "/h1", &[]).await.unwrap(),
        (200, "both".into())
    );
    let versions: Vec<_> = both.seen().iter().map(|s| s.version).collect();
    assert_eq!(
        versions,
        [
            http::Version::HTTP_2,
            http::Version::HTTP_2,
            http::Version::HTTP_2,
            http::Version::HTTP_11
        ]
    );
    assert_eq!(both.seen()[0].host, "api.test");
    // An upstream that does not offer h2 is refused, not spoken to in h1.
    assert_eq!(h2_get(&mut send, "/h2-refused", &[]).await.unwrap().0, 502);
    assert_eq!(h1_only.hits(), 0);
    // Health checks speak h2 too; the upstream without h2 fails them.
    let (l_both, l_h1) = (both.label(), h1_only.label());
    wait_until(WAIT, "h2 health checks", || async {
        healthy(&proxy, "/h2-checked", &l_both).await == Some(1.0)
            && healthy(&proxy, "/h2-refused-checked", &l_h1).await == Some(0.0)
            && both.health_versions().contains(&http::Version::HTTP_2)
    })
    .await;
    assert!(
        h1_only.health_versions().is_empty(),
        "a check reached the h1-only upstream"
    );
}
