//! `tls = "internal"`: a local CA kept in `state_dir/internal-ca/`, which
//! issues short-lived leaf certificates for a site's names at start and
//! re-issues them before they expire. Control path only.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::load::{self, Checks};
use super::types::{CertError, CertInfo, ServedCert};
use crate::config::HostPattern;
use crate::fsutil;

/// How long an internal leaf certificate lives.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the CA lives.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The local CA.
pub struct InternalCa {
    /// Signs leaves.
    issuer: Issuer<'static, KeyPair>,
    /// Where the CA certificate is, to tell users what to trust.
    cert_path: PathBuf,
}

impl std::fmt::Debug for InternalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn err(context: &str, e: impl std::fmt::Display) -> CertError {
    CertError::Internal(format!("{context}: {e}"))
}

impl InternalCa {
    /// Loads the CA from `state_dir/internal-ca/`, creating it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<InternalCa, CertError> {
        let dir = state_dir.join("internal-ca");
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| err(&format!("cannot read {}", cert_path.display()), e))?;
            let key_pem = std::fs::read_to_string(&key_path)
                .map_err(|e| err(&format!("cannot read {}", key_path.display()), e))?;
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| err(&format!("{} is not a usable key", key_path.display()), e))?;
            let chain = load::parse_chain(cert_pem.as_bytes(), &cert_path)?;
            let issuer = Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| {
                err(
                    &format!("{} is not a usable CA certificate", cert_path.display()),
                    e,
                )
            })?;
            return Ok(InternalCa { issuer, cert_path });
        }
        fsutil::ensure_private_dir(&dir)
            .map_err(|e| err(&format!("cannot create {}", dir.display()), e))?;
        let key = KeyPair::generate().map_err(|e| err("key generation", e))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis internal CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "portcullis");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key).map_err(|e| err("CA signing", e))?;
        fsutil::atomic_write(&key_path, key.serialize_pem().as_bytes(), 0o600)
            .map_err(|e| err(&format!("cannot write {}", key_path.display()), e))?;
        fsutil::atomic_write(&cert_path, cert.pem().as_bytes(), 0o644)
            .map_err(|e| err(&format!("cannot write {}", cert_path.display()), e))?;
        tracing::info!(path = %cert_path.display(), "created the internal CA");
        Ok(InternalCa {
            issuer: Issuer::new(params, key),
            cert_path,
        })
    }

    /// Path of the CA certificate (what clients should trust).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Issues a fresh leaf (new key) for `hosts`.
    pub fn issue(&self, hosts: &[HostPattern]) -> Result<ServedCert, CertError> {
        self.issue_for(hosts, LEAF_LIFETIME)
    }

    /// Issues a fresh leaf (new key) for `hosts` that lives `lifetime`.
    pub(crate) fn issue_for(
        &self,
        hosts: &[HostPattern],
        lifetime: Duration,
    ) -> Result<ServedCert, CertError> {
        let names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        let mut params = CertificateParams::new(names.clone()).map_err(|e| err("leaf names", e))?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + lifetime;
        let key = KeyPair::generate().map_err(|e| err("key generation", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err("leaf signing", e))?;
        // The CA is what clients trust; a server does not send the root.
        let chain = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let path = Path::new("<internal CA>");
        load::build(
            chain,
            key,
            path,
            path,
            hosts,
            Checks {
                allow_expired: false,
            },
        )
    }
}

/// When an internal certificate is re-issued: with a third of its life left.
pub(crate) fn renew_at(info: &CertInfo) -> SystemTime {
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or(LEAF_LIFETIME);
    info.not_after - life / 3
}
