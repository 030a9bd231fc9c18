//! SNI certificate selection and the TLS features a client sees: exact and
//! wildcard names, the default site, the `unrecognized_name` alert, RSA and
//! ECDSA keys in every PEM encoding, the full chain, TLS 1.2 and 1.3, ALPN
//! and session resumption.

mod common;

use std::sync::Arc;

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, DigitallySignedStruct, HandshakeKind, ProtocolVersion, SignatureScheme,
};
use tokio::net::TcpStream;

/// Accepts any certificate, so a test can look at what the server sent for a
/// name the certificate does not cover (the default site's answer to an
/// unknown name). Signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that does not verify the server's certificate; `sni = false`
/// sends no server_name extension at all.
fn any_cert_client(sni: bool) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.enable_sni = sni;
    Arc::new(cfg)
}

/// A verifying client limited to one TLS version.
fn client_for_version(
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root_der.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(cfg)
}

/// The rustls error inside a failed handshake.
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The leaf's public key algorithm as x509-parser names it.
fn leaf_key_kind(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> &'static str {
    use x509_parser::public_key::PublicKey;
    let der = peer_leaf(stream);
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    match cert.public_key().parsed().unwrap() {
        PublicKey::RSA(rsa) if rsa.key_size() == 2048 => "RSA-2048",
        PublicKey::EC(_) => "EC",
        _ => "other",
    }
}

fn site(hosts: &str, prefix: &str, default: bool) -> String {
    respond_site(None, hosts, prefix, default, prefix)
}

/// Three sites: `a.test` (exact, ECDSA), `*.example.test` (RSA) and,
/// when `with_default`, `default.test` as the default site.
struct Sites {
    pki: Pki,
    proxy: Proxy,
    exact: Leaf,
    wildcard: Leaf,
    default: Option<Leaf>,
}

impl Sites {
    /// The serial of the leaf served for `sni` to a client with `cfg`.
    async fn served(&self, sni: &str, cfg: std::sync::Arc<rustls::ClientConfig>) -> String {
        let tls = tls_connect(self.proxy.https, sni, cfg)
            .await
            .unwrap_or_else(|e| panic!("handshake for {sni}: {e}"));
        serial_of(&peer_leaf(&tls))
    }
}

async fn three_sites(with_default: bool) -> Sites {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let exact = pki.leaf(&["a.test"], Alg::Ecdsa);
    exact.write(dir.path(), "exact-");
    let wildcard = pki.leaf(&["*.example.test"], Alg::Rsa);
    wildcard.write(dir.path(), "wild-");
    let mut toml = format!(
        "{}{}{}",
        sites_head(false, ""),
        site(r#""a.test""#, "exact-", false),
        site(r#""*.example.test""#, "wild-", false)
    );
    let default = with_default.then(|| {
        let leaf = pki.leaf(&["default.test"], Alg::Ecdsa);
        leaf.write(dir.path(), "default-");
        toml.push_str(&site(r#""default.test""#, "default-", true));
        leaf
    });
    let proxy = Proxy::start_in(dir, &toml).await;
    Sites {
        pki,
        proxy,
        exact,
        wildcard,
        default,
    }
}

#[tokio::test]
async fn exact_sni_name_gets_its_own_certificate() {
    let s = three_sites(true).await;
    assert_eq!(
        s.served("a.test", s.pki.client_config(&[])).await,
        s.exact.serial
    );
    // Case does not matter in SNI.
    assert_eq!(
        s.served("A.Test", any_cert_client(true)).await,
        s.exact.serial
    );
}

#[tokio::test]
async fn wildcard_matches_exactly_one_label() {
    let s = three_sites(true).await;
    assert_eq!(
        s.served("a.example.test", s.pki.client_config(&[])).await,
        s.wildcard.serial
    );
    let default = s.default.as_ref().unwrap();
    // Two labels, or none, are not covered by `*.example.test`: the default answers.
    for name in ["a.b.example.test", "example.test"] {
        let tls = tls_connect(s.proxy.https, name, any_cert_client(true))
            .await
            .unwrap();
        assert_eq!(serial_of(&peer_leaf(&tls)), default.serial, "{name}");
    }
}

#[tokio::test]
async fn default_site_certificate_serves_unknown_names_and_no_sni() {
    let s = three_sites(true).await;
    let default = s.default.as_ref().unwrap();
    assert_eq!(
        s.served("unknown.test", any_cert_client(true)).await,
        default.serial
    );
    let tls = tls_connect(s.proxy.https, "a.test", any_cert_client(false))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(
        serial_of(&peer_leaf(&tls)),
        default.serial,
        "no SNI must get the default"
    );
}

#[tokio::test]
async fn unknown_name_without_default_site_gets_unrecognized_name_alert() {
    let s = three_sites(false).await;
    for name in ["unknown.test", "a.b.example.test"] {
        let err = tls_connect(s.proxy.https, name, any_cert_client(true))
            .await
            .unwrap_err();
        assert_eq!(
            tls_error(&err),
            Some(&rustls::Error::AlertReceived(
                AlertDescription::UnrecognisedName
            )),
            "{name}: {err:?}"
        );
    }
    let err = tls_connect(s.proxy.https, "a.test", any_cert_client(false))
        .await
        .unwrap_err();
    assert_eq!(
        tls_error(&err),
        Some(&rustls::Error::AlertReceived(
            AlertDescription::UnrecognisedName
        )),
        "no SNI: {err:?}"
    );
    // Known names still work on the same listener.
    assert_eq!(
        s.served("a.test", s.pki.client_config(&[])).await,
        s.exact.serial
    );
}

#[tokio::test]
async fn rsa_2048_and_ecdsa_certificates_are_both_served() {
    let s = three_sites(false).await;
    let ec = tls_connect(s.proxy.https, "a.test", s.pki.client_config(&[]))
        .await
        .unwrap();
    assert_eq!(leaf_key_kind(&ec), "EC");
    let rsa = tls_connect(s.proxy.https, "x.example.test", s.pki.client_config(&[]))
        .await
        .unwrap();
    assert_eq!(leaf_key_kind(&rsa), "RSA-2048");
    assert_eq!(serial_of(&peer_leaf(&rsa)), s.wildcard.serial);
}

#[tokio::test]
async fn pkcs1_rsa_and_sec1_ec_private_keys_load() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let rsa = pki.leaf(&["rsa.test"], Alg::Rsa);
    let ec = pki.leaf(&["ec.test"], Alg::Ecdsa);
    let rsa_key = traditional_key(&rsa.key_pem);
    let ec_key = traditional_key(&ec.key_pem);
    assert!(
        rsa_key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "{rsa_key}"
    );
    assert!(
        ec_key.starts_with("-----BEGIN EC PRIVATE KEY-----"),
        "{ec_key}"
    );
    rsa.write(dir.path(), "rsa-");
    ec.write(dir.path(), "ec-");
    std::fs::write(dir.path().join("rsa-key.pem"), rsa_key).unwrap();
    std::fs::write(dir.path().join("ec-key.pem"), ec_key).unwrap();
    let toml = format!(
        "{}{}{}",
        sites_head(false, ""),
        site(r#""rsa.test""#, "rsa-", false),
        site(r#""ec.test""#, "ec-", false)
    );
    let proxy = Proxy::start_in(dir, &toml).await;
    for (name, leaf, kind) in [("rsa.test", &rsa, "RSA-2048"), ("ec.test", &ec, "EC")] {
        let tls = tls_connect(proxy.https, name, pki.client_config(&[]))
            .await
            .unwrap();
        assert_eq!(serial_of(&peer_leaf(&tls)), leaf.serial, "{name}");
        assert_eq!(leaf_key_kind(&tls), kind, "{name}");
    }
}

#[tokio::test]
async fn full_chain_leaf_then_intermediate_is_served() {
    let s = three_sites(false).await;
    let tls = tls_connect(s.proxy.https, "a.test", s.pki.client_config(&[]))
        .await
        .unwrap();
    let chain = tls.get_ref().1.peer_certificates().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], s.exact.leaf_der);
    assert_eq!(chain[1], s.pki.inter_der);
}

#[tokio::test]
async fn tls12_only_and_tls13_only_clients_both_connect() {
    let s = three_sites(false).await;
    for (version, expect) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        // Both key types, since TLS 1.2 picks cipher suites by key type.
        for name in ["a.test", "x.example.test"] {
            let tls = tls_connect(s.proxy.https, name, client_for_version(&s.pki, version))
                .await
                .unwrap_or_else(|e| panic!("{expect:?} {name}: {e}"));
            assert_eq!(tls.get_ref().1.protocol_version(), Some(expect), "{name}");
        }
    }
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http11() {
    let s = three_sites(false).await;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let tls = tls_connect(s.proxy.https, "a.test", s.pki.client_config(&[alpn]))
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    }
    // Offering both, the server's preference (h2) wins.
    let tls = tls_connect(
        s.proxy.https,
        "a.test",
        s.pki.client_config(&[b"http/1.1", b"h2"]),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // And HTTP really is spoken that way.
    let got = get(s.proxy.https, "a.test", "/", s.pki.client_config(&[b"h2"])).await;
    assert_eq!((got.status, got.version), (200, http::Version::HTTP_2));
    let got = get(
        s.proxy.https,
        "a.test",
        "/",
        s.pki.client_config(&[b"http/1.1"]),
    )
    .await;
    assert_eq!((got.status, got.version), (200, http::Version::HTTP_11));
}

#[tokio::test]
async fn second_connection_with_same_client_config_resumes_the_session() {
    let s = three_sites(false).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut cfg = (*client_for_version(&s.pki, version)).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        // A full request on the first connection, so TLS 1.3 tickets (sent
        // after the handshake) are read before the second connection.
        let first = get(s.proxy.https, "a.test", "/", cfg.clone()).await;
        assert_eq!(first.status, 200);
        let tls = tls_connect(s.proxy.https, "a.test", cfg.clone())
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{:?}",
            version.version
        );
        assert_eq!(serial_of(&peer_leaf(&tls)), s.exact.serial);
    }
}
