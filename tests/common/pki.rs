//! The one test PKI: a root and an intermediate made by rcgen at run time,
//! leaves for the proxy (server, with dates and keys chosen by the test),
//! server and client certificates for TLS upstreams, and the rustls client
//! and server configs around them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Key algorithm for a test leaf.
#[derive(Clone, Copy, Debug)]
pub enum Alg {
    Ecdsa,
    Rsa,
}

/// A root CA and an intermediate, both made by rcgen in memory.
pub struct Pki {
    pub root_der: CertificateDer<'static>,
    pub root_pem: String,
    root: Issuer<'static, KeyPair>,
    pub inter_der: CertificateDer<'static>,
    pub inter_pem: String,
    inter: Issuer<'static, KeyPair>,
}

/// A leaf certificate: the PEM chain (leaf + intermediate) and key.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
    pub leaf_der: CertificateDer<'static>,
    /// Serial as lower-case hex (as the proxy reports it).
    pub serial: String,
    pub not_after: time::OffsetDateTime,
}

/// A certificate for a TLS upstream (server) or for the proxy as its client,
/// in the forms both a config file and an in-test rustls config want.
pub struct Issued {
    /// Leaf and intermediate, PEM.
    pub cert_pem: String,
    pub key_pem: String,
    /// Leaf and intermediate, DER.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

/// What a leaf is for, and how it is made.
struct LeafSpec<'a> {
    names: &'a [&'a str],
    cn: &'a str,
    usage: ExtendedKeyUsagePurpose,
    key: KeyPair,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
}

fn new_key(alg: Alg) -> KeyPair {
    match alg {
        Alg::Ecdsa => KeyPair::generate().unwrap(),
        Alg::Rsa => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap()
        }
    }
}

fn default_dates() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(90),
    )
}

impl Pki {
    pub fn new() -> Pki {
        let now = time::OffsetDateTime::now_utc();
        Pki::with_intermediate(
            "portcullis test root",
            "portcullis test intermediate",
            &rand_serial(),
            now - time::Duration::days(1),
            now + time::Duration::days(3650),
        )
    }

    /// Like [`Pki::new`], with the intermediate's validity and serial chosen
    /// by the test (whole seconds), and the CNs given.
    pub fn with_intermediate(
        root_cn: &str,
        inter_cn: &str,
        inter_serial: &[u8],
        inter_not_before: time::OffsetDateTime,
        inter_not_after: time::OffsetDateTime,
    ) -> Pki {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params(root_cn);
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = Issuer::new(root_params, root_key);
        let inter_key = KeyPair::generate().unwrap();
        let mut inter_params = ca_params(inter_cn);
        inter_params.use_authority_key_identifier_extension = true;
        inter_params.not_before = inter_not_before;
        inter_params.not_after = inter_not_after;
        inter_params.serial_number = Some(rcgen::SerialNumber::from_slice(inter_serial));
        let inter_cert = inter_params.signed_by(&inter_key, &root).unwrap();
        let inter = Issuer::new(inter_params, inter_key);
        Pki {
            root_der: root_cert.der().clone(),
            root_pem: root_cert.pem(),
            root,
            inter_der: inter_cert.der().clone(),
            inter_pem: inter_cert.pem(),
            inter,
        }
    }

    /// The one place a leaf is signed (by the intermediate).
    fn sign(&self, spec: LeafSpec<'_>) -> (Leaf, KeyPair) {
        let names: Vec<String> = spec.names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, spec.cn);
        p.extended_key_usages = vec![spec.usage];
        p.use_authority_key_identifier_extension = true;
        p.not_before = spec.not_before;
        p.not_after = spec.not_after;
        let serial = rand_serial();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = p.signed_by(&spec.key, &self.inter).unwrap();
        let leaf = Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.inter_pem),
            key_pem: spec.key.serialize_pem(),
            leaf_der: cert.der().clone(),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after: spec.not_after,
        };
        (leaf, spec.key)
    }

    fn server_leaf(
        &self,
        names: &[&str],
        key: KeyPair,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let usage = ExtendedKeyUsagePurpose::ServerAuth;
        let cn = names[0];
        self.sign(LeafSpec {
            names,
            cn,
            usage,
            key,
            not_before,
            not_after,
        })
        .0
    }

    /// A leaf for `names`, valid from yesterday for 90 days.
    pub fn leaf(&self, names: &[&str], alg: Alg) -> Leaf {
        let (not_before, not_after) = default_dates();
        self.leaf_with_dates(names, alg, not_before, not_after)
    }

    /// A leaf with explicit validity dates.
    pub fn leaf_with_dates(
        &self,
        names: &[&str],
        alg: Alg,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        self.server_leaf(names, new_key(alg), not_before, not_after)
    }

    /// A leaf for `names` with an existing private key (PEM), as certbot's
    /// `--reuse-key` does: a replacement then changes only the chain file.
    pub fn leaf_with_key(
        &self,
        names: &[&str],
        key_pem: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        self.server_leaf(
            names,
            KeyPair::from_pem(key_pem).unwrap(),
            not_before,
            not_after,
        )
    }

    fn issue(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let (not_before, not_after) = default_dates();
        let (leaf, key) = self.sign(LeafSpec {
            names,
            cn,
            usage,
            key: new_key(Alg::Ecdsa),
            not_before,
            not_after,
        });
        Issued {
            cert_pem: leaf.chain_pem,
            key_pem: leaf.key_pem,
            chain: vec![leaf.leaf_der, self.inter_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A server certificate for a TLS upstream, for `names` (DNS names or
    /// IP addresses).
    pub fn server_cert(&self, names: &[&str]) -> Issued {
        self.issue(names[0], names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn client_cert(&self, cn: &str) -> Issued {
        self.issue(cn, &[cn], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A root store holding this PKI's root.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root_der.clone()).unwrap();
        roots
    }

    /// A client config trusting the test root, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config_trusting(self.root_store(), alpn)
    }
}

/// A client config trusting `roots`, offering `alpn`.
pub fn client_config_trusting(
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS upstream's server config: `cert`, ALPN `alpn`, and when `clients`
/// is set a client certificate from that PKI is required.
pub fn backend_tls(
    cert: &Issued,
    alpn: &[&[u8]],
    clients: Option<&Pki>,
) -> Arc<rustls::ServerConfig> {
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match clients {
        Some(pki) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(pki.root_store()),
                provider(),
            )
            .build()
            .unwrap();
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    let mut cfg = b
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// A positive 8-byte serial, random enough that two leaves never share one.
fn rand_serial() -> [u8; 8] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    let mut out = h.finish().to_be_bytes();
    out[0] &= 0x7f;
    out[0] |= 0x10;
    out
}

impl Leaf {
    /// Writes `cert.pem` and `key.pem` into `dir` with a prefix; returns the paths.
    pub fn write(&self, dir: &Path, prefix: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{prefix}cert.pem"));
        let k = dir.join(format!("{prefix}key.pem"));
        std::fs::write(&c, &self.chain_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }
}

/// The common name of a DER certificate's subject ("" when it has none).
pub fn cn_of(der: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}

/// Serial (lower-case hex) of a DER certificate.
pub fn serial_of(der: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    c.raw_serial_as_string().replace(':', "")
}

/// Re-encodes a PKCS#8 key as PKCS#1 (RSA) or SEC1 (EC) with openssl.
pub fn traditional_key(pkcs8_pem: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.pem");
    std::fs::write(&input, pkcs8_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-traditional", "-in"])
        .arg(&input)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Unix seconds as an `OffsetDateTime` (whole seconds, so DER dates and
/// exported timestamps compare exactly).
pub fn at_unix(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

/// Now, in whole Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
