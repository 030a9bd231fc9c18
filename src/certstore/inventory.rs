//! The certificate inventory: what `GET /certs` and `portcullis certs`
//! show for each certificate in service. Control path.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::internal;
use super::slot::CertSlot;
use super::types::{rfc3339, CertSource};

/// `last_result` of a certificate that could not be looked at.
pub const UNKNOWN: &str = "unknown";

/// One certificate of a chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChainReport {
    /// Subject CN.
    pub subject: String,
    /// Issuer CN.
    pub issuer: String,
    /// Serial, hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
}

/// One certificate in service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertReport {
    /// The site's name.
    pub name: String,
    /// Host names the site answers for.
    pub hosts: Vec<String>,
    /// Names in the certificate.
    pub sans: Vec<String>,
    /// `file`, `internal` or `acme`.
    pub source: String,
    /// Chain file, for file sources (the stored bundle for ACME).
    pub cert_path: Option<String>,
    /// Key file, for file sources.
    pub key_path: Option<String>,
    /// Whether it also serves unknown names.
    pub default: bool,
    /// Leaf subject CN.
    pub subject: Option<String>,
    /// Leaf issuer CN.
    pub issuer: Option<String>,
    /// Leaf serial, hex.
    pub serial: Option<String>,
    /// e.g. `ECDSA-P256`.
    pub key_type: Option<String>,
    /// RFC 3339.
    pub not_before: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    /// Unix seconds.
    pub not_after_unix: Option<i64>,
    /// Days until expiry (fractional, negative once expired).
    pub days_left: Option<f64>,
    /// Whether portcullis renews it by itself.
    pub auto_renew: bool,
    /// When it will be renewed (RFC 3339), for automatic sources; for ACME,
    /// the next attempt (after a failure, the backoff's retry time).
    pub next_renewal: Option<String>,
    /// When the certificate in service was loaded (RFC 3339).
    pub last_loaded: Option<String>,
    /// `ok`; `error` while a replacement is pending; [`UNKNOWN`] when there
    /// was no certificate to look at (an internal certificate listed from a
    /// config file: it exists only inside a running proxy).
    pub last_result: String,
    /// The pending error: the files on disk could not be loaded, or the
    /// last ACME order failed.
    pub last_error: Option<String>,
    /// When that error happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// Intermediates, in chain order.
    pub chain: Vec<ChainReport>,
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Builds the report of one slot at `now`.
pub fn report(slot: &CertSlot, now: SystemTime) -> CertReport {
    let cur = slot.current();
    let status = slot.status();
    let (cert_path, key_path) = match &slot.source {
        CertSource::File { cert, key } => (
            Some(cert.display().to_string()),
            Some(key.display().to_string()),
        ),
        CertSource::Internal => (None, None),
        CertSource::Acme { bundle, .. } => (
            Some(bundle.display().to_string()),
            Some(bundle.display().to_string()),
        ),
    };
    let auto_renew = slot.source.auto_renew();
    let info = cur.as_ref().map(|c| &c.info);
    let next_renewal = match (&slot.source, info) {
        // The ACME manager schedules (renewal information, backoff) and says when.
        (CertSource::Acme { .. }, _) => status.next_renewal.map(rfc3339),
        (CertSource::Internal, Some(i)) => Some(rfc3339(internal::renew_at(i))),
        _ => None,
    };
    CertReport {
        name: slot.name.clone(),
        hosts: slot.hosts.iter().map(ToString::to_string).collect(),
        sans: info.map(|i| i.sans.clone()).unwrap_or_default(),
        source: slot.source.label().to_string(),
        cert_path,
        key_path,
        default: slot.is_default,
        subject: info.map(|i| i.subject.clone()),
        issuer: info.map(|i| i.issuer_cn.clone()),
        serial: info.map(|i| i.serial.clone()),
        key_type: info.map(|i| i.key_type.clone()),
        not_before: info.map(|i| rfc3339(i.not_before)),
        not_after: info.map(|i| rfc3339(i.not_after)),
        not_after_unix: info.map(|i| unix(i.not_after)),
        days_left: info.map(|i| (unix(i.not_after) - unix(now)) as f64 / 86_400.0),
        auto_renew,
        next_renewal,
        last_loaded: status.last_loaded.map(rfc3339),
        last_result: if status.last_error.is_some() {
            "error"
        } else {
            "ok"
        }
        .to_string(),
        last_error: status.last_error,
        last_error_at: status.last_error_at.map(rfc3339),
        chain: info
            .map(|i| {
                i.intermediates
                    .iter()
                    .map(|e| ChainReport {
                        subject: e.subject.clone(),
                        issuer: e.issuer_cn.clone(),
                        serial: e.serial.clone(),
                        not_before: rfc3339(e.not_before),
                        not_after: rfc3339(e.not_after),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

impl CertReport {
    /// Whether it expires within `d` of `now`. A certificate that should be
    /// there and is not counts as expiring; one that could not be looked at
    /// (`last_result` [`UNKNOWN`]) does not, or every config with an internal
    /// site would fail `portcullis certs --config F --within 30d`.
    pub fn expires_within(&self, d: Duration, now: SystemTime) -> bool {
        match self.not_after_unix {
            None => self.last_result != UNKNOWN,
            Some(na) => na - unix(now) <= d.as_secs() as i64,
        }
    }
}
