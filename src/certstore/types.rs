//! The certificate store's vocabulary: what a validated certificate is,
//! where it comes from, why it could not be loaded, and the events a
//! publish sends. A leaf: the other files of `certstore` use it, it uses
//! none of them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;

use crate::config::{AcmeConfig, Origin};

/// Why a certificate could not be loaded. Each message names the file and
/// says what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The file could not be read.
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    /// The PEM is empty, damaged or holds the wrong thing.
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    /// The key is not the leaf's key.
    #[error("the private key in {} does not match the certificate in {}; install the key that was issued with this certificate", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The leaf does not name a host of the site.
    #[error("{}: the certificate does not cover \"{host}\" (it covers: {}); get a certificate for that name or remove it from hosts", path.display(), sans.join(", "))]
    NotCovering {
        path: PathBuf,
        host: String,
        sans: Vec<String>,
    },
    /// The leaf has expired.
    #[error("{}: the certificate expired at {not_after}; install a renewed certificate", path.display())]
    Expired { path: PathBuf, not_after: String },
    /// The leaf is not valid yet.
    #[error("{}: the certificate is not valid before {not_before}; check the clock or the certificate", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    /// Certificate `index` is not issued by the one after it.
    #[error("{}: the chain is out of order: certificate {index} is issued by \"{issuer}\" but the next one is \"{next_subject}\"; put the leaf first, then each issuer in turn", path.display())]
    ChainOrder {
        path: PathBuf,
        index: usize,
        issuer: String,
        next_subject: String,
    },
    /// The internal CA failed.
    #[error("internal CA: {0}")]
    Internal(String),
    /// An ACME certificate has not been issued yet (nothing stored).
    #[error("{}: no certificate has been issued yet", path.display())]
    NotIssued { path: PathBuf },
}

/// A certificate failure attributed to a line of the configuration.
#[derive(Debug, Clone)]
pub struct SiteCertError {
    /// The site's `tls` value.
    pub origin: Origin,
    /// What went wrong.
    pub error: CertError,
}

impl fmt::Display for SiteCertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.error)
    }
}

/// Where a slot's certificate comes from, as shown in the inventory and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files.
    File {
        /// Chain path.
        cert: PathBuf,
        /// Key path.
        key: PathBuf,
    },
    /// The local CA.
    Internal,
    /// An ACME CA, through the ACME manager, which stores each chain and
    /// its key in one file.
    Acme {
        /// The stored chain and key (`state_dir/acme/certs/NAME/cert.pem`).
        bundle: PathBuf,
        /// The site's ACME settings; a change makes a new slot.
        config: Box<AcmeConfig>,
    },
}

impl CertSource {
    /// `file`, `internal` or `acme` (the metric label).
    pub fn label(&self) -> &'static str {
        match self {
            CertSource::File { .. } => "file",
            CertSource::Internal => "internal",
            CertSource::Acme { .. } => "acme",
        }
    }

    /// Whether portcullis renews it by itself.
    pub fn auto_renew(&self) -> bool {
        matches!(self, CertSource::Internal | CertSource::Acme { .. })
    }
}

/// One certificate of a chain, as the inventory shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// Subject common name (or the whole subject if it has no CN).
    pub subject: String,
    /// Issuer common name.
    pub issuer_cn: String,
    /// Serial, lower-case hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// What is known about a served chain, read once when it is loaded.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// Leaf start of validity.
    pub not_before: SystemTime,
    /// Leaf end of validity.
    pub not_after: SystemTime,
    /// Leaf serial, hex.
    pub serial: String,
    /// Leaf issuer CN.
    pub issuer_cn: String,
    /// Leaf subject CN.
    pub subject: String,
    /// e.g. `ECDSA-P256`, `RSA-2048`.
    pub key_type: String,
    /// DNS (and IP) subject alternative names, lower case.
    pub sans: Vec<String>,
    /// The leaf.
    pub leaf: ChainEntry,
    /// Intermediates, in chain order.
    pub intermediates: Vec<ChainEntry>,
    /// Set for file sources.
    pub cert_path: Option<PathBuf>,
    /// Set for file sources.
    pub key_path: Option<PathBuf>,
}

/// A validated chain and key, ready for handshakes.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// What the inventory shows.
    pub info: CertInfo,
}

/// Something happened to a certificate (for tests, the admin API and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertEvent {
    /// A new certificate went into service.
    Published {
        /// Slot name.
        name: String,
        /// New serial.
        serial: String,
    },
    /// A replacement was refused; the previous certificate stays.
    Rejected {
        /// Slot name.
        name: String,
        /// Why.
        error: String,
    },
}

/// Why a certificate replacement was published (logs; the metric keeps
/// its one `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishCause {
    /// The watcher or a reload found new certificate files.
    File,
    /// An ACME renewal task put a new certificate in service.
    Acme,
    /// `POST /certs/{name}/renew` (or `portcullis renew`).
    AdminRenew,
    /// The internal CA re-issued a certificate before it expires.
    InternalCa,
}

impl PublishCause {
    /// `file`, `acme`, `admin-renew` or `internal-ca` (logs).
    pub fn as_str(self) -> &'static str {
        match self {
            PublishCause::File => "file",
            PublishCause::Acme => "acme",
            PublishCause::AdminRenew => "admin-renew",
            PublishCause::InternalCa => "internal-ca",
        }
    }
}

/// RFC 3339 in UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}
