//! PEM files -> a validated [`ServedCert`]: chain parses, key parses and
//! matches the leaf, the leaf covers the site's names, the chain is in order,
//! the dates are sane. Control path only.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::*;

use super::types::{rfc3339, CertError, CertInfo, ChainEntry, ServedCert};
use crate::config::HostPattern;

/// What to check besides parsing.
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    /// Accept a leaf whose `not_after` has passed. True at start-up (serving
    /// an expired certificate beats serving nothing, and the inventory will
    /// say so); false for a replacement, which must never be worse.
    pub allow_expired: bool,
}

/// Reads and validates a certificate chain and key from files.
pub fn load_files(
    cert_path: &Path,
    key_path: &Path,
    hosts: &[HostPattern],
    checks: Checks,
) -> Result<ServedCert, CertError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    from_pem(&cert_pem, cert_path, &key_pem, key_path, hosts, checks)
}

/// Reads a whole file; the error says what to do.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Read {
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_string(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied; make it readable by the user portcullis runs as".to_string()
            }
            _ => e.to_string(),
        },
    })
}

/// Validates PEM text (already read).
pub fn from_pem(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
    hosts: &[HostPattern],
    checks: Checks,
) -> Result<ServedCert, CertError> {
    let chain = parse_chain(cert_pem, cert_path)?;
    let key = parse_key(key_pem, key_path)?;
    build(chain, key, cert_path, key_path, hosts, checks)
}

/// Parses every `CERTIFICATE` block; other blocks (a key in the same file) are skipped.
pub fn parse_chain(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        match item {
            Ok(c) => chain.push(c),
            Err(e) => {
                return Err(CertError::Pem {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the PEM is damaged or truncated ({}); copy the complete file again",
                        describe_pem(&e)
                    ),
                })
            }
        }
    }
    if chain.is_empty() {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            reason: "no \"-----BEGIN CERTIFICATE-----\" block found".into(),
        });
    }
    Ok(chain)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key found (expected \"-----BEGIN PRIVATE KEY-----\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")".into()
            }
            other => format!(
                "the private key PEM is damaged or truncated ({}); copy the complete file again",
                describe_pem(&other)
            ),
        },
    })
}

/// A PEM parse error in words (the library's own message prints bytes).
fn describe_pem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => {
            format!(
                "\"-----END {}-----\" is missing",
                String::from_utf8_lossy(end_marker)
            )
        }
        E::IllegalSectionStart { line } => {
            format!("bad line \"{}\"", String::from_utf8_lossy(line).trim())
        }
        other => other.to_string(),
    }
}

/// Validates DER parts and builds the served form.
pub fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
    hosts: &[HostPattern],
    checks: Checks,
) -> Result<ServedCert, CertError> {
    let info = inspect_chain(&chain, cert_path)?;
    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Pem {
            path: key_path.to_path_buf(),
            reason: format!("the private key cannot be used ({e})"),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(CertError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
    }
    for h in hosts {
        if !covers(&info.sans, h) {
            return Err(CertError::NotCovering {
                path: cert_path.to_path_buf(),
                host: h.to_string(),
                sans: info.sans.clone(),
            });
        }
    }
    let now = SystemTime::now();
    if now < info.not_before {
        return Err(CertError::NotYetValid {
            path: cert_path.to_path_buf(),
            not_before: rfc3339(info.not_before),
        });
    }
    if now > info.not_after && !checks.allow_expired {
        return Err(CertError::Expired {
            path: cert_path.to_path_buf(),
            not_after: rfc3339(info.not_after),
        });
    }
    Ok(ServedCert {
        key: Arc::new(certified),
        info,
    })
}

/// The process-wide crypto provider (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Whether the certificate's DNS SANs cover `host`.
pub fn covers(sans: &[String], host: &HostPattern) -> bool {
    sans.iter().any(|san| match host {
        HostPattern::Exact(h) => {
            san == h
                || san
                    .strip_prefix("*.")
                    .is_some_and(|suffix| h.split_once('.').is_some_and(|(_, rest)| rest == suffix))
        }
        HostPattern::Wildcard(s) => san.strip_prefix("*.") == Some(s.as_str()),
    })
}

/// Reads dates, names and issuers from every certificate of a chain and
/// checks each one is issued by the next.
pub fn inspect_chain(chain: &[CertificateDer<'_>], path: &Path) -> Result<CertInfo, CertError> {
    let mut entries = Vec::with_capacity(chain.len());
    let mut parsed = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            reason: format!(
                "certificate {} of the chain is not valid X.509 ({e})",
                i + 1
            ),
        })?;
        parsed.push(cert);
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            return Err(CertError::ChainOrder {
                path: path.to_path_buf(),
                index: i + 1,
                issuer: pair[0].issuer().to_string(),
                next_subject: pair[1].subject().to_string(),
            });
        }
    }
    for cert in &parsed {
        entries.push(chain_entry(cert));
    }
    let leaf = &parsed[0];
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = leaf.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_from_bytes(b) {
                        sans.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let first = entries.remove(0);
    Ok(CertInfo {
        not_before: first.not_before,
        not_after: first.not_after,
        serial: first.serial.clone(),
        issuer_cn: first.issuer_cn.clone(),
        subject: first.subject.clone(),
        key_type: key_type(leaf),
        sans,
        leaf: first,
        intermediates: entries,
        cert_path: None,
        key_path: None,
    })
}

fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn chain_entry(cert: &X509Certificate<'_>) -> ChainEntry {
    let cn = |name: &X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| name.to_string())
    };
    ChainEntry {
        subject: cn(cert.subject()),
        issuer_cn: cn(cert.issuer()),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
    }
}

fn to_system(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA-{}", rsa.key_size()),
        Ok(PublicKey::EC(ec)) => match ec.key_size() {
            256 => "ECDSA-P256".into(),
            384 => "ECDSA-P384".into(),
            521 => "ECDSA-P521".into(),
            n => format!("ECDSA-{n}"),
        },
        Ok(_) => {
            let oid = &cert.public_key().algorithm.algorithm;
            if oid.to_id_string() == "1.3.101.112" {
                "Ed25519".into()
            } else {
                oid.to_id_string()
            }
        }
        Err(_) => "unknown".into(),
    }
}

/// A hash of a certificate file and its key file, so unchanged files are
/// not parsed again.
pub(crate) fn content_hash(cert: &[u8], key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cert.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}
