//! Talking to the CA: the HTTPS client instant-acme sends through (a
//! per-request timeout, the CA's own TLS trust, `Retry-After` remembered
//! from error answers), the account (created once, stored, reused,
//! re-created when the CA has forgotten it), and the retry of requests the
//! CA refused with `badNonce` beyond instant-acme's own two retries.
//! Control path only.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, Error as AcmeLibError,
    ExternalAccountKey, HttpClient, NewAccount,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::error::AcmeError;
pub use super::error::Problem;
pub(crate) use super::error::{chain, problem};
use super::storage::{account_slug, Storage, StoredAccount};
use crate::certstore::load::provider;
use crate::config::AcmeConfig;

/// Longest wait for one answer from the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a request refused with `badNonce` is sent again, on top
/// of instant-acme's own two retries (each with a fresh nonce).
pub const NONCE_RETRIES: u32 = 12;

/// The HTTPS client of one site's ACME traffic.
#[derive(Clone)]
pub struct Http {
    /// hyper over rustls, trusting the system roots or `ca_root`.
    client: HyperClient<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    /// The last `Retry-After` seen on an error answer (rate limits, 503).
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl Http {
    /// A client trusting the system's roots, or only those in `ca_root`.
    pub fn new(ca_root: Option<&Path>) -> Result<Http, AcmeError> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_root {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    AcmeError::Config(format!("ca_root {}: cannot read it: {e}", path.display()))
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| {
                        AcmeError::Config(format!(
                            "ca_root {}: the PEM is damaged ({e})",
                            path.display()
                        ))
                    })?;
                    roots.add(cert).map_err(|e| {
                        AcmeError::Config(format!(
                            "ca_root {}: not a usable CA certificate ({e})",
                            path.display()
                        ))
                    })?;
                }
                if roots.is_empty() {
                    return Err(AcmeError::Config(format!(
                        "ca_root {}: holds no \"-----BEGIN CERTIFICATE-----\" block",
                        path.display()
                    )));
                }
                let tls = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| AcmeError::Config(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(tls)
            }
            None => builder
                .with_provider_and_platform_verifier(provider())
                .map_err(|e| {
                    AcmeError::Config(format!("cannot load the system's root certificates: {e}"))
                })?,
        };
        let connector = builder.https_only().enable_http1().enable_http2().build();
        let client = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Http {
            client,
            retry_after: Arc::new(Mutex::new(None)),
        })
    }

    /// The `Retry-After` of the last error answer, once.
    pub fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl HttpClient for Http {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, AcmeLibError>> + Send>> {
        let uri = req.uri().clone();
        let fut = HttpClient::request(&self.client, req);
        let slot = self.retry_after.clone();
        Box::pin(async move {
            let rsp = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(rsp)) => rsp,
                Ok(Err(e)) => {
                    return Err(AcmeLibError::Other(format!("{uri}: {}", chain(&e)).into()))
                }
                Err(_) => {
                    return Err(AcmeLibError::Other(
                        format!("{uri}: no answer within {}s", REQUEST_TIMEOUT.as_secs()).into(),
                    ))
                }
            };
            if rsp.parts.status.as_u16() >= 400 {
                if let Some(at) = retry_after(&rsp.parts.headers) {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
                }
            }
            Ok(rsp)
        })
    }
}

/// `Retry-After: SECONDS` or an HTTP date.
pub fn retry_after(headers: &http::HeaderMap) -> Option<SystemTime> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(SystemTime::now() + Duration::from_secs(secs));
    }
    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822)
        .ok()
        .map(SystemTime::from)
}

/// Whether the CA refused the request's nonce (the request was not processed).
pub(crate) fn is_bad_nonce(e: &AcmeLibError) -> bool {
    problem(e) == Some(Problem::BadNonce)
}

/// Runs an instant-acme call again while the CA answers `badNonce` (up to
/// [`NONCE_RETRIES`] times): such a request was refused before it was
/// processed, so sending it again is safe. Counts each retry in `retries`.
macro_rules! retry_nonce {
    ($retries:expr, $call:expr) => {{
        let mut tries = 0u32;
        loop {
            match $call {
                Err(e)
                    if $crate::acme::client::is_bad_nonce(&e)
                        && tries < $crate::acme::client::NONCE_RETRIES =>
                {
                    tries += 1;
                    $retries.fetch_add(1, ::std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(attempt = tries, "the CA refused a nonce; sending again");
                    tokio::time::sleep(::std::time::Duration::from_millis(20 * u64::from(tries)))
                        .await;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use retry_nonce;

/// Loads the account for `config`'s CA from `storage`, or creates and
/// stores it. Callers hold the account's lock so two sites never create two.
pub async fn account(
    storage: &Storage,
    config: &AcmeConfig,
    http: &Http,
    nonce_retries: &AtomicU64,
) -> Result<Account, AcmeError> {
    let slug = account_slug(
        &config.directory,
        config.eab.as_ref().map(|e| e.kid.as_str()),
    );
    if let Some(stored) = storage.load_account(&slug)? {
        let creds: AccountCredentials = serde_json::from_value(stored.credentials.clone())
            .map_err(|e| {
                AcmeError::Storage(format!(
                    "account {slug}: {e}; move it away to create a new account"
                ))
            })?;
        let account = Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(creds)
            .await
            .map_err(|e| AcmeError::from_lib("loading the ACME directory", &config.directory, e))?;
        if stored.contacts != config.contacts {
            let contacts: Vec<&str> = config.contacts.iter().map(String::as_str).collect();
            retry_nonce!(nonce_retries, account.update_contacts(&contacts).await).map_err(|e| {
                AcmeError::from_lib("updating the account's contacts", &config.directory, e)
            })?;
            let mut updated = stored;
            updated.contacts = config.contacts.clone();
            storage.save_account(&slug, &updated)?;
            tracing::info!(directory = %config.directory, contacts = ?config.contacts, "ACME account contacts updated");
        }
        return Ok(account);
    }
    let contacts: Vec<&str> = config.contacts.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let eab = config
        .eab
        .as_ref()
        .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
    let (account, creds) = retry_nonce!(
        nonce_retries,
        Account::builder_with_http(Box::new(http.clone()))
            .create(&new, config.directory.clone(), eab.as_ref())
            .await
    )
    .map_err(|e| AcmeError::from_lib("creating the ACME account", &config.directory, e))?;
    let stored = StoredAccount {
        credentials: serde_json::to_value(&creds).map_err(|e| AcmeError::Storage(e.to_string()))?,
        contacts: config.contacts.clone(),
        created: crate::certstore::rfc3339(SystemTime::now()),
    };
    storage.save_account(&slug, &stored)?;
    tracing::info!(directory = %config.directory, account = %account.id(), "ACME account created");
    Ok(account)
}

/// Forgets an account the CA no longer knows (a CA that lost its state,
/// e.g. a test CA restarted); the next [`account`] creates a new one.
pub fn forget_account(storage: &Storage, config: &AcmeConfig) -> Result<(), AcmeError> {
    let slug = account_slug(
        &config.directory,
        config.eab.as_ref().map(|e| e.kid.as_str()),
    );
    tracing::warn!(directory = %config.directory, "the CA does not know the stored ACME account; creating a new one");
    Ok(storage.retire_account(&slug)?)
}

/// Whether an error says the account does not exist (any more).
pub(crate) fn is_account_gone(e: &AcmeLibError) -> bool {
    problem(e) == Some(Problem::AccountDoesNotExist)
}

/// Counts an order (for tests and the inventory).
pub fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
