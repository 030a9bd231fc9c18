//! `tls = "internal"`: a local CA kept in `state_dir/internal-ca/`, which
//! issues short-lived leaf certificates for a site's names at start and
//! re-issues them before they expire. Control path only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

use super::{load, CertError, CertSource, CertStore, Checks, PublishCause, ServedCert};
use crate::config::HostPattern;
use crate::fsutil;

/// How long an internal leaf certificate lives.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the CA lives.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often the renewer looks at internal certificates.
const CHECK_EVERY: Duration = Duration::from_secs(3600);

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
pub fn renew_at(info: &super::CertInfo) -> SystemTime {
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or(LEAF_LIFETIME);
    info.not_after - life / 3
}

/// Re-issues internal certificates when a third of their life is left,
/// looking every hour.
pub fn spawn_renewer(store: Arc<CertStore>, ca: Arc<InternalCa>, shutdown: CancellationToken) {
    spawn_renewer_every(store, ca, CHECK_EVERY, shutdown);
}

/// [`spawn_renewer`], looking every `every` (tests use a short period).
pub(crate) fn spawn_renewer_every(
    store: Arc<CertStore>,
    ca: Arc<InternalCa>,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            renew_due(&store, &ca).await;
        }
    });
}

/// One pass of the renewer: re-issues every internal certificate that is
/// due and publishes it through [`CertStore::publish`]. Key generation and
/// signing run on a blocking thread. Returns how many were re-issued.
async fn renew_due(store: &CertStore, ca: &Arc<InternalCa>) -> usize {
    let mut renewed = 0;
    for slot in store.slots() {
        if slot.source != CertSource::Internal {
            continue;
        }
        let due = slot
            .current()
            .is_none_or(|c| SystemTime::now() >= renew_at(&c.info));
        if !due {
            continue;
        }
        let (ca, hosts) = (ca.clone(), slot.hosts.clone());
        let issued = tokio::task::spawn_blocking(move || ca.issue(&hosts))
            .await
            .unwrap_or_else(|e| Err(CertError::Internal(format!("issuing failed: {e}"))));
        match issued {
            Ok(cert) => {
                store.publish(&slot, cert, PublishCause::InternalCa);
                renewed += 1;
            }
            Err(e) => {
                if slot.record_error(&e.to_string()) {
                    tracing::warn!(site = %slot.name, error = %e, "keeping previous certificate");
                }
            }
        }
    }
    renewed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certstore::{CertEvent, CertSlot, SniMap};

    /// A background re-issue goes through the one publish path: it is
    /// counted in `portcullis_tls_cert_reloads_total` and announced.
    #[tokio::test]
    async fn internal_ca_reissue_is_counted_and_announced() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(InternalCa::load_or_create(dir.path()).unwrap());
        let hosts = vec![HostPattern::Exact("internal.test".into())];
        let slot = Arc::new(CertSlot::new(
            "inner".into(),
            hosts.clone(),
            CertSource::Internal,
            false,
        ));
        // Issued five minutes ago for six minutes: past two thirds of its
        // life, so due now.
        let old = ca.issue_for(&hosts, Duration::from_secs(60)).unwrap();
        let old_serial = old.info.serial.clone();
        slot.install(old);
        let store = Arc::new(CertStore::new());
        store.replace_map(SniMap::new(vec![slot.clone()]));
        let mut events = store.subscribe();
        let metrics = crate::metrics::Metrics::new();
        let reloads = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("portcullis_tls_cert_reloads_total{result=\"success\"}"))
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(reloads(&metrics.render(&store)).as_deref(), Some("0"));

        let stop = CancellationToken::new();
        spawn_renewer_every(
            store.clone(),
            ca.clone(),
            Duration::from_millis(20),
            stop.clone(),
        );
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no event within 10 s")
            .unwrap();
        stop.cancel();
        let CertEvent::Published { name, serial } = ev else {
            panic!("{ev:?}");
        };
        assert_eq!(name, "inner");
        assert_ne!(serial, old_serial);
        assert_eq!(slot.current().unwrap().info.serial, serial);
        assert_eq!(reloads(&metrics.render(&store)).as_deref(), Some("1"));
        assert!(slot.status().last_loaded.is_some());
    }
}
