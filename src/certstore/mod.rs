//! Certificates in memory: one slot per configured site, an `ArcSwap`'d SNI
//! map over the slots, and the rustls resolver that reads it.
//!
//! The handshake path (hot) does one `ArcSwap` load of the map, one hash
//! lookup and one `ArcSwap` load of the slot: no lock, no allocation.
//! Everything else here is control path: loading and validating PEM files,
//! the internal CA, publishing a replacement into one slot without touching
//! the others (so swapping one certificate among 10,000 is O(1)).
//!
//! Files, lowest first (each imports only those above it): `types` (what a
//! certificate, a source, an error and an event are), `slot` (a slot and
//! the SNI map), `load` (PEM parsing and validation), `internal` (the
//! local CA), `inventory`; then this file (the store, its one publish
//! path, building a map), and on top `watch` (file reloads) and `renew`
//! (internal-CA re-issues), which publish through the store.

pub mod internal;
pub mod inventory;
pub mod load;
pub(crate) mod renew;
mod slot;
mod types;
pub mod watch;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{Config, Origin, TlsSource, UntilIssued};

pub use internal::InternalCa;
pub use load::Checks;
pub use slot::{CertSlot, SlotStatus, SniMap};
pub use types::{
    rfc3339, CertError, CertEvent, CertInfo, CertSource, ChainEntry, PublishCause, ServedCert,
    SiteCertError,
};

/// Answers to ACME challenges in progress. The ACME manager (control path)
/// adds and removes them; the listeners read them only for requests that
/// ask (`/.well-known/acme-challenge/`, ALPN `acme-tls/1`), with one
/// `ArcSwap` load.
#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token -> key authorization.
    http01: ArcSwap<HashMap<String, String>>,
    /// TLS-ALPN-01: lower-case name -> the `acmeIdentifier` certificate.
    tls_alpn01: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for Challenges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenges")
            .field("http01", &self.http01.load().len())
            .field("tls_alpn01", &self.tls_alpn01.load().len())
            .finish()
    }
}

impl Challenges {
    /// The key authorization for an HTTP-01 token.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.load().get(token).cloned()
    }

    /// Serves `key_auth` at `/.well-known/acme-challenge/{token}`.
    pub fn add_http01(&self, token: &str, key_auth: &str) {
        self.http01.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(token.to_string(), key_auth.to_string());
            m
        });
    }

    /// Stops serving an HTTP-01 token.
    pub fn remove_http01(&self, token: &str) {
        self.http01.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(token);
            m
        });
    }

    /// The TLS-ALPN-01 certificate for an SNI name.
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.tls_alpn01.load();
        if map.is_empty() {
            return None;
        }
        map.get(&name.to_ascii_lowercase()).cloned()
    }

    /// Answers `acme-tls/1` handshakes for `name` with `key`.
    pub fn add_tls_alpn01(&self, name: &str, key: Arc<CertifiedKey>) {
        self.tls_alpn01.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(name.to_ascii_lowercase(), key.clone());
            m
        });
    }

    /// Stops answering `acme-tls/1` for `name`.
    pub fn remove_tls_alpn01(&self, name: &str) {
        self.tls_alpn01.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(&name.to_ascii_lowercase());
            m
        });
    }
}

/// Reload counters, read by the metrics collector.
#[derive(Debug, Default)]
pub struct CertStats {
    /// Replacements put in service.
    pub reloads_ok: AtomicU64,
    /// Replacements refused.
    pub reloads_failed: AtomicU64,
    /// Unix time of the last replacement put in service.
    pub last_success: AtomicU64,
}

/// The certificates in service.
#[derive(Debug)]
pub struct CertStore {
    /// The current map; handshakes load it once.
    map: ArcSwap<SniMap>,
    /// Publishes and rejections, for whoever listens.
    pub(crate) events: tokio::sync::broadcast::Sender<CertEvent>,
    /// Counters.
    pub stats: CertStats,
    /// ACME challenge answers in progress.
    pub challenges: Challenges,
    /// Serialises file re-reads (watcher, poll, config reload): without
    /// it, an attempt that read older bytes could publish after one that
    /// read newer bytes. Held across the blocking read only, on the
    /// control path; handshakes never see it.
    file_reloads: tokio::sync::Mutex<()>,
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore {
            map: ArcSwap::default(),
            events: tokio::sync::broadcast::channel(1024).0,
            stats: CertStats::default(),
            challenges: Challenges::default(),
            file_reloads: tokio::sync::Mutex::new(()),
        }
    }
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        CertStore::default()
    }

    /// Puts a validated replacement in service: the one publish path, for
    /// file reloads, ACME renewals, admin renewals and internal-CA
    /// re-issues. Stores it in the slot (one `ArcSwap` store), clears the
    /// slot's pending error, counts it, logs it and announces it. Returns
    /// the serial. A [`ServedCert`] only exists once validated, so a bad
    /// certificate never gets here: the previous one stays.
    pub fn publish(&self, slot: &CertSlot, cert: ServedCert, cause: PublishCause) -> String {
        let serial = cert.info.serial.clone();
        let not_after = cert.info.not_after;
        slot.install(cert);
        self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.stats.last_success.store(unix_now(), Ordering::Relaxed);
        tracing::info!(site = %slot.name, %serial, not_after = %rfc3339(not_after), cause = cause.as_str(), "certificate replaced");
        let _ = self.events.send(CertEvent::Published {
            name: slot.name.clone(),
            serial: serial.clone(),
        });
        serial
    }

    /// Refuses a replacement that failed validation: the previous
    /// certificate stays. Counts it, records it on the slot, logs each
    /// distinct failure once and announces it.
    pub(crate) fn reject(&self, slot: &CertSlot, error: &str, cause: PublishCause) {
        self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
        if slot.record_error(error) {
            tracing::warn!(site = %slot.name, %error, cause = cause.as_str(), "keeping previous certificate");
        }
        let _ = self.events.send(CertEvent::Rejected {
            name: slot.name.clone(),
            error: error.to_string(),
        });
    }

    /// Serialises file re-reads; see the field.
    pub(crate) async fn lock_file_reloads(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.file_reloads.lock().await
    }

    /// Receives every publish and rejection from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CertEvent> {
        self.events.subscribe()
    }

    /// Builds the slots for `config`, reusing `previous` slots whose source
    /// and names did not change (their certificates are not re-read).
    /// Nothing is published; all failures are returned together.
    pub(crate) fn build_map(
        config: &Config,
        ca: Option<&InternalCa>,
        previous: Option<&SniMap>,
    ) -> Result<SniMap, Vec<SiteCertError>> {
        let mut errors = Vec::new();
        let mut slots = Vec::new();
        for site in &config.sites {
            let (source, origin) = site_source(config, site);
            let fresh = CertSlot::new(site.name.clone(), site.hosts.clone(), source, site.default);
            if let Some(old) =
                previous.and_then(|m| m.slots().iter().find(|s| s.same_source(&fresh)))
            {
                // An ACME slot is kept even while empty: its manager task
                // publishes into it.
                if old.current().is_some() || matches!(old.source, CertSource::Acme { .. }) {
                    slots.push(old.clone());
                    continue;
                }
            }
            let slot = Arc::new(fresh);
            match obtain(
                &slot,
                ca,
                Checks {
                    allow_expired: true,
                },
            ) {
                Ok(cert) => {
                    if SystemTime::now() > cert.info.not_after {
                        tracing::warn!(site = %site.name, not_after = %rfc3339(cert.info.not_after), "serving an expired certificate; install a renewed one");
                    }
                    slot.install(cert);
                }
                // An ACME certificate that is missing or unusable is not a
                // reason to refuse the config: the manager orders one.
                Err(error) if matches!(slot.source, CertSource::Acme { .. }) => {
                    if !matches!(error, CertError::NotIssued { .. }) {
                        tracing::warn!(site = %site.name, %error, "the stored ACME certificate cannot be used; a new one will be ordered");
                        slot.record_error(&error.to_string());
                    }
                    let fallback = matches!(&site.tls, TlsSource::Acme(a) if a.until_issued == UntilIssued::Internal);
                    if let (true, Some(ca)) = (fallback, ca) {
                        match ca.issue(&slot.hosts) {
                            Ok(cert) => slot.install(cert),
                            Err(error) => errors.push(SiteCertError { origin, error }),
                        }
                    }
                }
                Err(error) => errors.push(SiteCertError { origin, error }),
            }
            slots.push(slot);
        }
        if errors.is_empty() {
            Ok(SniMap::new(slots))
        } else {
            Err(errors)
        }
    }

    /// Loads every site's certificate. All failures are returned together.
    pub(crate) fn load(
        config: &Config,
        ca: Option<&InternalCa>,
    ) -> Result<CertStore, Vec<SiteCertError>> {
        let store = CertStore::new();
        store
            .map
            .store(Arc::new(CertStore::build_map(config, ca, None)?));
        Ok(store)
    }

    /// The current map.
    pub fn map(&self) -> arc_swap::Guard<Arc<SniMap>> {
        self.map.load()
    }

    /// The current map, owned (to hand to a blocking task).
    pub(crate) fn map_full(&self) -> Arc<SniMap> {
        self.map.load_full()
    }

    /// Replaces the whole map (a config reload that changes the set of sites).
    pub fn replace_map(&self, map: SniMap) {
        self.map.store(Arc::new(map));
    }

    /// Every slot in service.
    pub fn slots(&self) -> Vec<Arc<CertSlot>> {
        self.map.load().slots().to_vec()
    }

    /// The inventory of every certificate in service.
    pub fn inventory(&self) -> Vec<inventory::CertReport> {
        let now = SystemTime::now();
        self.map
            .load()
            .slots()
            .iter()
            .map(|s| inventory::report(s, now))
            .collect()
    }

    /// The slot named `name`.
    pub fn slot(&self, name: &str) -> Option<Arc<CertSlot>> {
        self.map
            .load()
            .slots()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    /// Whether an SNI name has a certificate to serve (hot path).
    #[inline]
    pub fn has_cert_for(&self, sni: Option<&str>) -> bool {
        self.map
            .load()
            .lookup(sni)
            .is_some_and(|slot| slot.has_cert())
    }
}

fn site_source(config: &Config, site: &crate::config::SiteConfig) -> (CertSource, Origin) {
    match &site.tls {
        TlsSource::Files { cert, key, origin } => (
            CertSource::File {
                cert: cert.clone(),
                key: key.clone(),
            },
            origin.clone(),
        ),
        TlsSource::Internal => (
            CertSource::Internal,
            Origin {
                file: config.source.clone(),
                line: 0,
                field: format!("sites.{}.tls", site.name),
            },
        ),
        TlsSource::Acme(acme) => (
            CertSource::Acme {
                bundle: crate::acme::storage::bundle_path(&config.state_dir, &site.name),
                config: acme.clone(),
            },
            acme.origin.clone(),
        ),
    }
}

/// The certificate source of a configured site.
pub(crate) fn source_of(config: &Config, site: &crate::config::SiteConfig) -> CertSource {
    site_source(config, site).0
}

/// Produces a certificate for a slot from its source.
pub(crate) fn obtain(
    slot: &CertSlot,
    ca: Option<&InternalCa>,
    checks: Checks,
) -> Result<ServedCert, CertError> {
    match &slot.source {
        CertSource::File { cert, key } => {
            let (c, k) = (load::read(cert)?, load::read(key)?);
            let mut served = load::from_pem(&c, cert, &k, key, &slot.hosts, checks)?;
            slot.last_hash
                .store(load::content_hash(&c, &k), Ordering::Release);
            served.info.cert_path = Some(cert.clone());
            served.info.key_path = Some(key.clone());
            Ok(served)
        }
        CertSource::Internal => {
            let ca =
                ca.ok_or_else(|| CertError::Internal("the internal CA is not available".into()))?;
            ca.issue(&slot.hosts)
        }
        CertSource::Acme { bundle, .. } => {
            let pem = match std::fs::read(bundle) {
                Ok(pem) => pem,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CertError::NotIssued {
                        path: bundle.clone(),
                    })
                }
                Err(_) => load::read(bundle)?,
            };
            let mut served = load::from_pem(&pem, bundle, &pem, bundle, &slot.hosts, checks)?;
            served.info.cert_path = Some(bundle.clone());
            served.info.key_path = Some(bundle.clone());
            Ok(served)
        }
    }
}

/// The rustls resolver: reads the swapped map on every handshake.
#[derive(Debug)]
pub struct Resolver {
    /// Shared with the control path, which swaps certificates in.
    store: Arc<CertStore>,
}

impl Resolver {
    /// A resolver over `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Resolver { store }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store
            .map
            .load()
            .lookup(hello.server_name())?
            .certified_key()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
