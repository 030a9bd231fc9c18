//! Certificates in memory: one slot per configured site, an `ArcSwap`'d SNI
//! map over the slots, and the rustls resolver that reads it.
//!
//! The handshake path (hot) does one `ArcSwap` load of the map, one hash
//! lookup and one `ArcSwap` load of the slot: no lock, no allocation.
//! Everything else here is control path: loading and validating PEM files,
//! the internal CA, publishing a replacement into one slot without touching
//! the others (so swapping one certificate among 10,000 is O(1)).

pub mod internal;
pub mod inventory;
pub mod load;
pub mod watch;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{AcmeConfig, Config, HostPattern, Origin, TlsSource, UntilIssued};
use crate::hostmap::HostMap;

pub use internal::InternalCa;
pub use load::Checks;

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

/// Outcome of the last load attempt of a slot (control path).
#[derive(Debug, Clone, Default)]
pub struct SlotStatus {
    /// When the current certificate was published.
    pub last_loaded: Option<SystemTime>,
    /// The last failure, if it is still pending (cleared by a success).
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_error_at: Option<SystemTime>,
    /// When the certificate will be renewed (automatic sources).
    pub next_renewal: Option<SystemTime>,
}

/// One certificate in service: the unit that is swapped.
pub struct CertSlot {
    /// The site's name.
    pub name: String,
    /// The names it must cover.
    pub hosts: Vec<HostPattern>,
    /// Where it comes from.
    pub source: CertSource,
    /// Whether it serves unknown names.
    pub is_default: bool,
    /// The chain in service; `None` until a first certificate exists.
    current: ArcSwapOption<ServedCert>,
    /// Load outcomes (control path only; never locked during a handshake).
    status: Mutex<SlotStatus>,
    /// Hash of the file bytes last tried, so an unchanged file is not re-parsed.
    pub(crate) last_hash: AtomicU64,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl CertSlot {
    /// A slot with nothing in service yet.
    pub fn new(
        name: String,
        hosts: Vec<HostPattern>,
        source: CertSource,
        is_default: bool,
    ) -> Self {
        CertSlot {
            name,
            hosts,
            source,
            is_default,
            current: ArcSwapOption::empty(),
            status: Mutex::new(SlotStatus::default()),
            last_hash: AtomicU64::new(0),
        }
    }

    /// The chain in service.
    pub fn current(&self) -> Option<Arc<ServedCert>> {
        self.current.load_full()
    }

    /// What a handshake gets (hot path).
    #[inline]
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }

    /// Fills the slot and clears any pending error. Only for a slot being
    /// built (not in a map in service yet: a start, a config reload, the
    /// offline inventory); a replacement goes through [`CertStore::publish`],
    /// which counts, logs and announces it.
    pub(crate) fn install(&self, cert: ServedCert) {
        self.current.store(Some(Arc::new(cert)));
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.last_loaded = Some(SystemTime::now());
        st.last_error = None;
        st.last_error_at = None;
    }

    /// Records a failure; returns true when it differs from the pending one
    /// (so the caller logs each distinct failure once).
    pub fn record_error(&self, error: &str) -> bool {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let new = st.last_error.as_deref() != Some(error);
        st.last_error = Some(error.to_string());
        st.last_error_at = Some(SystemTime::now());
        new
    }

    /// Records when the certificate will next be renewed.
    pub fn set_next_renewal(&self, at: Option<SystemTime>) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_renewal = at;
    }

    /// Clears a pending error (the files are back to what is served).
    pub fn clear_error(&self) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.last_error = None;
        st.last_error_at = None;
    }

    /// Whether `other` describes the same certificate source for the same names.
    pub fn same_source(&self, other: &CertSlot) -> bool {
        self.name == other.name
            && self.hosts == other.hosts
            && self.source == other.source
            && self.is_default == other.is_default
    }

    /// A copy of the status.
    pub fn status(&self) -> SlotStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The SNI map: names to slots. Replaced as a whole only when the set of
/// sites changes; a certificate replacement goes into its slot instead.
#[derive(Debug, Default)]
pub struct SniMap {
    /// Names to slots.
    hosts: HostMap<Arc<CertSlot>>,
    /// Every slot, in config order.
    slots: Vec<Arc<CertSlot>>,
}

impl SniMap {
    /// Builds a map over `slots` (the first `is_default` one is the default).
    pub fn new(slots: Vec<Arc<CertSlot>>) -> Self {
        let mut hosts = HostMap::default();
        for slot in &slots {
            for h in &slot.hosts {
                hosts.insert(h, slot.clone());
            }
            if slot.is_default && hosts.default_value().is_none() {
                hosts.set_default(slot.clone());
            }
        }
        SniMap { hosts, slots }
    }

    /// The slot for an SNI name (hot path).
    #[inline]
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<CertSlot>> {
        self.hosts.lookup(sni)
    }

    /// Every slot.
    pub fn slots(&self) -> &[Arc<CertSlot>] {
        &self.slots
    }
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
    pub fn build_map(
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
    pub fn load(config: &Config, ca: Option<&InternalCa>) -> Result<CertStore, Vec<SiteCertError>> {
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
            .is_some_and(|slot| slot.current.load().is_some())
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
pub fn source_of(config: &Config, site: &crate::config::SiteConfig) -> CertSource {
    site_source(config, site).0
}

/// Produces a certificate for a slot from its source.
pub fn obtain(
    slot: &CertSlot,
    ca: Option<&InternalCa>,
    checks: Checks,
) -> Result<ServedCert, CertError> {
    match &slot.source {
        CertSource::File { cert, key } => {
            let (c, k) = (load::read(cert)?, load::read(key)?);
            let mut served = load::from_pem(&c, cert, &k, key, &slot.hosts, checks)?;
            slot.last_hash
                .store(watch::content_hash(&c, &k), Ordering::Release);
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
