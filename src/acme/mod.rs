//! Automatic certificates from an ACME CA (RFC 8555) with `instant-acme`.
//! Control path only: nothing here runs during a handshake or a request.
//!
//! - [`Manager`]: one task per site with `tls = "acme"` / `tls = { acme = ... }`,
//!   started by [`crate::Server::run`], re-synced on config reload, stopped
//!   on shutdown. Admin renew/revoke go to the site's task.
//! - Each task loads the stored certificate (already published by the
//!   certificate store at start), decides when to renew — the CA's renewal
//!   window (ARI, RFC 9773) when it offers one, else when a third of the
//!   lifetime is left — orders with a fresh key, validates the result like
//!   a certificate file, stores it (temp -> fsync -> rename) and publishes
//!   it into the site's slot. On failure: exponential backoff with jitter,
//!   `Retry-After` honoured, faster retries in the last 1/50 of the
//!   lifetime; the current certificate keeps serving.
//! - [`order`]: one order; [`client`]: HTTP, account, `badNonce` retries;
//!   [`storage`]: files under `state_dir/acme/`; [`schedule`]: the timing policy.

pub(crate) mod client;
mod error;
pub(crate) mod order;
pub(crate) mod schedule;
pub(crate) mod storage;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{Account, CertificateIdentifier, RevocationReason, RevocationRequest};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::certstore::{self, load, CertSource, CertStore, Checks, PublishCause, ServedCert};
use crate::config::{AcmeConfig, ChallengeKind, Config, HostPattern};
use crate::metrics::Metrics;
use client::{retry_nonce, Http};
pub use error::AcmeError;
use storage::{CertMeta, Storage};

/// Counters of one manager (tests, logs).
#[derive(Debug, Default)]
pub struct Stats {
    /// Orders created at the CA.
    pub orders: AtomicU64,
    /// Requests sent again after a `badNonce` refusal.
    pub nonce_retries: AtomicU64,
    /// Certificates issued and put in service.
    pub issued: AtomicU64,
    /// Failed attempts.
    pub failures: AtomicU64,
    /// Renewal-information (ARI) answers received.
    pub ari_checks: AtomicU64,
}

/// A revocation reason (RFC 5280), as the CLI spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// `unspecified`.
    Unspecified,
    /// `key-compromise`.
    KeyCompromise,
    /// `affiliation-changed`.
    AffiliationChanged,
    /// `superseded`.
    Superseded,
    /// `cessation-of-operation`.
    CessationOfOperation,
}

impl RevokeReason {
    /// Parses the CLI / query spelling.
    pub fn parse(s: &str) -> Option<RevokeReason> {
        Some(match s {
            "unspecified" => RevokeReason::Unspecified,
            "key-compromise" | "keyCompromise" => RevokeReason::KeyCompromise,
            "affiliation-changed" => RevokeReason::AffiliationChanged,
            "superseded" => RevokeReason::Superseded,
            "cessation-of-operation" => RevokeReason::CessationOfOperation,
            _ => return None,
        })
    }

    /// Every accepted spelling, for messages.
    pub const NAMES: &'static str =
        "unspecified, key-compromise, affiliation-changed, superseded, cessation-of-operation";

    fn to_lib(self) -> RevocationReason {
        match self {
            RevokeReason::Unspecified => RevocationReason::Unspecified,
            RevokeReason::KeyCompromise => RevocationReason::KeyCompromise,
            RevokeReason::AffiliationChanged => RevocationReason::AffiliationChanged,
            RevokeReason::Superseded => RevocationReason::Superseded,
            RevokeReason::CessationOfOperation => RevocationReason::CessationOfOperation,
        }
    }
}

/// What a renewal or revocation request did (the admin API's answer).
#[derive(Debug, Clone, Serialize)]
pub struct ActionReport {
    /// The site.
    pub name: String,
    /// Whether a new certificate went into service.
    pub renewed: bool,
    /// Its serial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The serial revoked, for a revocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
    /// Why nothing was renewed, or what failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the admin API asks of a site's task (it owns the schedule, so
/// every order of a site goes through it, one at a time).
enum Command {
    /// Order now (with `force`), or only when due.
    Renew {
        /// Order even if not due.
        force: bool,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<ActionReport, AcmeError>>,
    },
    /// Replace, then revoke the replaced certificate.
    Revoke {
        /// RFC 5280 reason sent to the CA.
        reason: RevokeReason,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<ActionReport, AcmeError>>,
    },
}

/// What a site's task is started with; a change restarts the task.
#[derive(Debug, Clone, PartialEq)]
struct SiteSpec {
    /// The site (and slot) name.
    name: String,
    /// Names ordered; the certificate must cover them all.
    hosts: Vec<HostPattern>,
    /// The site's merged ACME settings.
    config: AcmeConfig,
    /// Where its certificate is stored (the slot's source names the same file).
    bundle: PathBuf,
}

/// A started task.
struct Running {
    /// What it was started with, to tell whether a reload changed it.
    spec: SiteSpec,
    /// Admin requests to it.
    commands: mpsc::Sender<Command>,
    /// Cancelled when the site goes away or changes.
    stop: CancellationToken,
}

/// The manager's mutable part (control path; never held across an await).
struct Inner {
    /// Set by [`Manager::start`]; tasks are children of it.
    parent: Option<CancellationToken>,
    /// Sites with ACME certificates in the config in service.
    wanted: Vec<SiteSpec>,
    /// Started tasks by site name.
    running: HashMap<String, Running>,
}

/// Runs one renewal task per ACME site.
pub struct Manager {
    /// `state_dir/acme/`.
    storage: Storage,
    /// Where certificates are published and challenge answers put.
    store: Arc<CertStore>,
    /// Renewal counters.
    metrics: Arc<Metrics>,
    /// One lock per account, so two sites never both create it.
    account_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Wanted and running tasks.
    inner: Mutex<Inner>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Checks what can be checked before serving: every `ca_root` is readable
/// and holds a certificate. Errors name the config line.
pub fn preflight(config: &Config) -> Result<(), String> {
    let mut errors = Vec::new();
    for site in &config.sites {
        if let crate::config::TlsSource::Acme(a) = &site.tls {
            if let Some(root) = &a.ca_root {
                if let Err(e) = Http::new(Some(root)) {
                    errors.push(format!("{}: {e}", a.origin));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

fn specs(config: &Config) -> Vec<SiteSpec> {
    config
        .sites
        .iter()
        .filter_map(|s| match &s.tls {
            crate::config::TlsSource::Acme(a) => Some(SiteSpec {
                name: s.name.clone(),
                hosts: s.hosts.clone(),
                config: (**a).clone(),
                bundle: storage::bundle_path(&config.state_dir, &s.name),
            }),
            _ => None,
        })
        .collect()
}

impl Manager {
    /// A manager for `config`'s ACME sites; nothing runs until [`Manager::start`].
    pub fn new(config: &Config, store: Arc<CertStore>, metrics: Arc<Metrics>) -> Manager {
        let m = Manager {
            storage: Storage::new(&config.state_dir),
            store,
            metrics,
            account_locks: Mutex::new(HashMap::new()),
            inner: Mutex::new(Inner {
                parent: None,
                wanted: Vec::new(),
                running: HashMap::new(),
            }),
            stats: Arc::new(Stats::default()),
        };
        m.sync(config);
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the tasks; they stop when `stop` is cancelled.
    pub fn start(&self, stop: CancellationToken) {
        let mut inner = self.lock();
        inner.parent = Some(stop);
        let wanted = inner.wanted.clone();
        for spec in wanted {
            self.spawn(&mut inner, spec);
        }
    }

    /// Follows a new config: starts tasks for new or changed ACME sites and
    /// stops those of removed ones; unchanged sites keep their task (and
    /// its schedule, backoff and renewal information).
    pub fn sync(&self, config: &Config) {
        let wanted = specs(config);
        let mut inner = self.lock();
        for s in &wanted {
            for result in ["success", "failure"] {
                self.metrics
                    .acme_renewals
                    .with_label_values(&[s.name.as_str(), result]);
            }
        }
        let gone: Vec<String> = inner
            .running
            .keys()
            .filter(|n| !wanted.iter().any(|w| &w.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = inner.running.remove(&name) {
                r.stop.cancel();
            }
            for result in ["success", "failure"] {
                let _ = self
                    .metrics
                    .acme_renewals
                    .remove_label_values(&[name.as_str(), result]);
            }
        }
        if inner.parent.is_some() {
            for spec in &wanted {
                let same = inner
                    .running
                    .get(&spec.name)
                    .is_some_and(|r| r.spec == *spec);
                if !same {
                    if let Some(old) = inner.running.remove(&spec.name) {
                        old.stop.cancel();
                    }
                    self.spawn(&mut inner, spec.clone());
                }
            }
        }
        inner.wanted = wanted;
    }

    fn spawn(&self, inner: &mut Inner, spec: SiteSpec) {
        let Some(parent) = &inner.parent else { return };
        let stop = parent.child_token();
        let (tx, rx) = mpsc::channel(8);
        let slug = storage::account_slug(
            &spec.config.directory,
            spec.config.eab.as_ref().map(|e| e.kid.as_str()),
        );
        let account_lock = self
            .account_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(slug)
            .or_default()
            .clone();
        let http = match Http::new(spec.config.ca_root.as_deref()) {
            Ok(h) => h,
            Err(e) => {
                // preflight() refuses such a config; a file that changed
                // since is reported on the certificate.
                tracing::error!(site = %spec.name, error = %e, "ACME disabled for this site");
                if let Some(slot) = self.store.slot(&spec.name) {
                    slot.record_error(&e.to_string());
                }
                return;
            }
        };
        let task = RenewalTask {
            spec: spec.clone(),
            storage: self.storage.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            stats: self.stats.clone(),
            http,
            account_lock,
            account: None,
        };
        tokio::spawn(task.run(rx, stop.clone()));
        inner.running.insert(
            spec.name.clone(),
            Running {
                spec,
                commands: tx,
                stop,
            },
        );
    }

    /// Whether `name` is an ACME site.
    pub fn manages(&self, name: &str) -> bool {
        self.lock().wanted.iter().any(|s| s.name == name)
    }

    async fn send(
        &self,
        name: &str,
        make: impl FnOnce(oneshot::Sender<Result<ActionReport, AcmeError>>) -> Command,
    ) -> Result<ActionReport, AcmeError> {
        let tx = self
            .lock()
            .running
            .get(name)
            .map(|r| r.commands.clone())
            .ok_or_else(|| AcmeError::NotFound(format!("{name:?} has no running ACME task")))?;
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply))
            .await
            .map_err(|_| AcmeError::NotFound(format!("{name:?}: its ACME task has stopped")))?;
        rx.await.map_err(|_| {
            AcmeError::NotFound(format!("{name:?}: its ACME task stopped before answering"))
        })?
    }

    /// Orders a new certificate (fresh key) for `name` now; without
    /// `force`, only if it is due (or has none, or its last attempt failed).
    pub async fn renew(&self, name: &str, force: bool) -> Result<ActionReport, AcmeError> {
        self.send(name, |reply| Command::Renew { force, reply })
            .await
    }

    /// Orders a replacement (fresh key), puts it in service, then revokes
    /// the certificate it replaced with `reason`.
    pub async fn revoke(
        &self,
        name: &str,
        reason: RevokeReason,
    ) -> Result<ActionReport, AcmeError> {
        self.send(name, |reply| Command::Revoke { reason, reply })
            .await
    }
}

/// The ACME certificate a task is responsible for.
#[derive(Clone)]
struct Current {
    /// Leaf dates, serial, names.
    info: certstore::CertInfo,
    /// The leaf, for its ARI identifier and for revocation.
    leaf: CertificateDer<'static>,
    /// The CA that issued it (from the stored metadata).
    directory: Option<String>,
}

/// The CA's renewal window for the current certificate.
#[derive(Clone, Copy)]
enum Ari {
    /// Not asked yet.
    Unknown,
    /// The CA offers no renewal information; asked again at this time.
    Unsupported { recheck: SystemTime },
    /// A time picked in the CA's window, and when to ask again.
    Window {
        /// Start of the CA's window.
        start: SystemTime,
        /// End of the CA's window.
        end: SystemTime,
        /// The random time in it (kept while the window does not move).
        picked: SystemTime,
        /// When to ask the CA again (its `Retry-After`).
        recheck: SystemTime,
    },
    /// Asking failed; asked again at this time.
    Failed { recheck: SystemTime },
}

/// One site's renewal task: owns its schedule, backoff and renewal
/// information, and every order of the site goes through it.
struct RenewalTask {
    /// What it renews.
    spec: SiteSpec,
    /// Account and certificate files.
    storage: Storage,
    /// Publishing and challenge answers.
    store: Arc<CertStore>,
    /// Renewal counters.
    metrics: Arc<Metrics>,
    /// The manager's counters.
    stats: Arc<Stats>,
    /// Its own HTTPS client, so a `Retry-After` is this site's.
    http: Http,
    /// Shared with every site of the same account.
    account_lock: Arc<tokio::sync::Mutex<()>>,
    /// The account, once loaded (reloaded after the CA forgets it).
    account: Option<Account>,
}

/// Mutable scheduling state of a task.
struct State {
    /// The ACME certificate it renews (none before the first).
    current: Option<Current>,
    /// The CA's renewal window for it.
    ari: Ari,
    /// Failed attempts in a row.
    failures: u32,
    /// When to try again after a failure.
    retry_at: Option<SystemTime>,
    /// Rotates the challenge order after a challenge failure.
    rotation: usize,
}

/// The stored certificate of a site, if it is usable for its names.
/// Blocking (reads and parses a file): runs on a blocking thread.
fn load_current(storage: &Storage, bundle: &Path, hosts: &[HostPattern]) -> Option<Current> {
    let pem = std::fs::read(bundle).ok()?;
    let served = load::from_pem(
        &pem,
        bundle,
        &pem,
        bundle,
        hosts,
        Checks {
            allow_expired: true,
        },
    )
    .ok()?;
    let meta = storage.load_meta(bundle);
    Some(Current {
        leaf: served.key.cert[0].clone(),
        info: served.info,
        directory: meta.map(|m| m.directory),
    })
}

/// Renewal information is never asked for more often than this.
const ARI_MIN_RECHECK: Duration = Duration::from_secs(60);
/// A CA without renewal information is asked again this often.
const ARI_UNSUPPORTED_RECHECK: Duration = Duration::from_secs(24 * 3600);

impl RenewalTask {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn cfg(&self) -> &AcmeConfig {
        &self.spec.config
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        let (storage, bundle, hosts) = (
            self.storage.clone(),
            self.spec.bundle.clone(),
            self.spec.hosts.clone(),
        );
        let current = tokio::task::spawn_blocking(move || load_current(&storage, &bundle, &hosts))
            .await
            .ok()
            .flatten();
        let mut st = State {
            current,
            ari: Ari::Unknown,
            failures: 0,
            retry_at: None,
            rotation: 0,
        };
        match &st.current {
            Some(c) => {
                tracing::info!(site = %self.name(), serial = %c.info.serial, not_after = %certstore::rfc3339(c.info.not_after), "ACME certificate loaded from storage")
            }
            None => {
                tracing::info!(site = %self.name(), "no ACME certificate stored yet; ordering one")
            }
        }
        loop {
            let now = SystemTime::now();
            if st.retry_at.is_none() && st.current.is_some() && self.ari_due(&st, now) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = self.refresh_ari(&mut st) => {}
                }
                continue;
            }
            let due = self.due_at(&st);
            let wake = match st.ari {
                Ari::Unsupported { recheck }
                | Ari::Failed { recheck }
                | Ari::Window { recheck, .. }
                    if st.retry_at.is_none() && st.current.is_some() =>
                {
                    due.min(recheck)
                }
                _ => due,
            };
            self.spec_slot_status(Some(due));
            let sleep = wake.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                _ = stop.cancelled() => return,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Renew { force, reply }) => {
                        let now = SystemTime::now();
                        let due_now = self.due_at(&st) <= now || st.failures > 0 || st.current.is_none();
                        if !force && !due_now {
                            let _ = reply.send(Ok(ActionReport {
                                name: self.name().to_string(),
                                renewed: false,
                                serial: None,
                                revoked: None,
                                reason: Some(format!(
                                    "not due until {}; use force to renew now",
                                    certstore::rfc3339(self.due_at(&st))
                                )),
                            }));
                            continue;
                        }
                        // Shutdown abandons an order under way (its challenge
                        // answers are withdrawn when dropped).
                        let r = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = self.attempt(&mut st, PublishCause::AdminRenew) => r,
                        };
                        let r = r.map(|serial| ActionReport {
                            name: self.name().to_string(),
                            renewed: true,
                            serial: Some(serial),
                            revoked: None,
                            reason: None,
                        });
                        let _ = reply.send(r);
                    }
                    Some(Command::Revoke { reason, reply }) => {
                        let r = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = self.revoke(&mut st, reason) => r,
                        };
                        let _ = reply.send(r);
                    }
                },
                _ = tokio::time::sleep(sleep) => {
                    if SystemTime::now() >= due {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = self.attempt(&mut st, PublishCause::Acme) => {}
                        }
                    }
                }
            }
        }
    }

    fn spec_slot_status(&self, next: Option<SystemTime>) {
        if let Some(slot) = self.slot() {
            slot.set_next_renewal(next);
        }
    }

    /// The slot of this site in the map in service, if it is still this
    /// task's (a reload may have replaced it).
    fn slot(&self) -> Option<Arc<certstore::CertSlot>> {
        self.store.slot(self.name()).filter(
            |s| matches!(&s.source, CertSource::Acme { bundle, .. } if *bundle == self.spec.bundle),
        )
    }

    /// When the next attempt is due.
    fn due_at(&self, st: &State) -> SystemTime {
        if let Some(r) = st.retry_at {
            return r;
        }
        let Some(cur) = &st.current else {
            return SystemTime::now();
        };
        if cur
            .directory
            .as_deref()
            .is_some_and(|d| d != self.cfg().directory)
        {
            // The config now names another CA: replace the certificate now.
            return SystemTime::now();
        }
        let fallback = schedule::renewal_time(
            cur.info.not_before,
            cur.info.not_after,
            self.cfg().renew_before,
        );
        match st.ari {
            // The CA's window, but never later than the certificate's own
            // fallback time would allow to be safe.
            Ari::Window { picked, .. } => picked.min(cur.info.not_after),
            _ => fallback,
        }
    }

    fn ari_due(&self, st: &State, now: SystemTime) -> bool {
        match st.ari {
            Ari::Unknown => true,
            Ari::Unsupported { recheck }
            | Ari::Failed { recheck }
            | Ari::Window { recheck, .. } => now >= recheck,
        }
    }

    async fn ensure_account(&mut self) -> Result<Account, AcmeError> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let _guard = self.account_lock.lock().await;
        let a = client::account(
            &self.storage,
            &self.spec.config,
            &self.http,
            &self.stats.nonce_retries,
        )
        .await?;
        self.account = Some(a.clone());
        Ok(a)
    }

    /// Asks the CA for the current certificate's renewal window (ARI).
    async fn refresh_ari(&mut self, st: &mut State) {
        let Some(cur) = st.current.clone() else {
            return;
        };
        let now = SystemTime::now();
        // Asking failed: ask again in ten retry periods (at most 10 min).
        let failed = Ari::Failed {
            recheck: now + self.cfg().retry_base.min(ARI_MIN_RECHECK) * 10,
        };
        let id = match CertificateIdentifier::try_from(&cur.leaf) {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(site = %self.name(), error = %e, "no renewal information for this certificate");
                st.ari = Ari::Unsupported {
                    recheck: now + ARI_UNSUPPORTED_RECHECK,
                };
                return;
            }
        };
        let account = match self.ensure_account().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(site = %self.name(), error = %e, "cannot ask for renewal information now");
                st.ari = failed;
                return;
            }
        };
        match account.renewal_info(&id).await {
            Ok((info, retry)) => {
                self.stats.ari_checks.fetch_add(1, Ordering::Relaxed);
                let start = SystemTime::from(info.suggested_window.start);
                let end = SystemTime::from(info.suggested_window.end);
                let recheck = now
                    + retry.clamp(
                        self.cfg().retry_base.min(ARI_MIN_RECHECK),
                        Duration::from_secs(24 * 3600),
                    );
                let picked = match st.ari {
                    Ari::Window {
                        start: s,
                        end: e,
                        picked,
                        ..
                    } if s == start && e == end => picked,
                    _ => schedule::pick_in_window(start, end, now, schedule::random_unit()),
                };
                tracing::info!(
                    site = %self.name(),
                    window_start = %certstore::rfc3339(start),
                    window_end = %certstore::rfc3339(end),
                    renew_at = %certstore::rfc3339(picked),
                    "renewal window from the CA (ARI)"
                );
                st.ari = Ari::Window {
                    start,
                    end,
                    picked,
                    recheck,
                };
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                st.ari = Ari::Unsupported {
                    recheck: now + ARI_UNSUPPORTED_RECHECK,
                };
            }
            Err(e) => {
                tracing::warn!(site = %self.name(), error = %client::chain(&e), "renewal information unavailable; using the certificate's lifetime");
                st.ari = failed;
            }
        }
    }

    /// One order. On success the new certificate is stored and in service.
    async fn attempt(&mut self, st: &mut State, cause: PublishCause) -> Result<String, AcmeError> {
        let result = self.order(st, cause).await;
        let now = SystemTime::now();
        match &result {
            Ok(serial) => {
                self.metrics
                    .acme_renewals
                    .with_label_values(&[self.name(), "success"])
                    .inc();
                self.stats.issued.fetch_add(1, Ordering::Relaxed);
                st.failures = 0;
                st.retry_at = None;
                st.ari = Ari::Unknown;
                tracing::info!(site = %self.name(), %serial, "ACME certificate in service");
            }
            Err(e) => {
                self.metrics
                    .acme_renewals
                    .with_label_values(&[self.name(), "failure"])
                    .inc();
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                st.failures = st.failures.saturating_add(1);
                if matches!(e, AcmeError::Challenge { .. }) && self.cfg().challenges.len() > 1 {
                    st.rotation += 1;
                }
                if matches!(e, AcmeError::AccountGone | AcmeError::Ca { .. }) {
                    // Load the account again next time (the CA may have been reset).
                    self.account = None;
                }
                let left = st.current.as_ref().and_then(|c| {
                    schedule::in_emergency(c.info.not_before, c.info.not_after, now)
                        .then(|| c.info.not_after.duration_since(now).unwrap_or_default())
                });
                let cfg = self.cfg();
                let mut delay = schedule::backoff(
                    st.failures,
                    cfg.retry_base,
                    cfg.retry_max,
                    left,
                    schedule::random_unit(),
                );
                if e.rate_limited() {
                    delay = delay.max(cfg.retry_max.min(Duration::from_secs(3600)));
                }
                let mut at = now + delay;
                if let Some(ra) = self.http.take_retry_after() {
                    // The CA said when; never sooner.
                    at = at.max(ra);
                }
                st.retry_at = Some(at);
                let msg = e.to_string();
                if let Some(slot) = self.slot() {
                    slot.record_error(&msg);
                }
                tracing::warn!(
                    site = %self.name(),
                    error = %msg,
                    failures = st.failures,
                    retry_at = %certstore::rfc3339(at),
                    "ACME order failed; the current certificate stays in service"
                );
            }
        }
        self.spec_slot_status(Some(self.due_at(st)));
        result
    }

    async fn order(&mut self, st: &mut State, cause: PublishCause) -> Result<String, AcmeError> {
        let mut challenges: Vec<ChallengeKind> = self.cfg().challenges.clone();
        if !challenges.is_empty() {
            let n = st.rotation % challenges.len();
            challenges.rotate_left(n);
        }
        let replaces = match (&st.ari, &st.current) {
            (Ari::Window { .. }, Some(cur)) => CertificateIdentifier::try_from(&cur.leaf)
                .ok()
                .map(|i| i.into_owned()),
            _ => None,
        };
        let timeout = self.cfg().order_timeout;
        let mut retried = false;
        let issued = loop {
            let account = self.ensure_account().await?;
            let input = order::OrderInput {
                config: &self.spec.config,
                hosts: &self.spec.hosts,
                store: &self.store,
                challenges: &challenges,
                replaces: replaces.clone(),
                nonce_retries: &self.stats.nonce_retries,
                orders: &self.stats.orders,
                bundle: &self.spec.bundle,
            };
            let r = match tokio::time::timeout(
                timeout + Duration::from_secs(30),
                order::issue(&account, input),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(AcmeError::Timeout(format!(
                    "the order did not finish within {}s (order_timeout)",
                    timeout.as_secs()
                ))),
            };
            match r {
                Err(AcmeError::AccountGone) if !retried => {
                    retried = true;
                    client::forget_account(&self.storage, self.cfg())?;
                    self.account = None;
                }
                other => break other?,
            }
        };
        let meta = CertMeta {
            directory: self.cfg().directory.clone(),
            names: self.spec.hosts.iter().map(ToString::to_string).collect(),
            issued: certstore::rfc3339(SystemTime::now()),
            serial: issued.served.info.serial.clone(),
            key_type: self.cfg().key_type.as_str().to_string(),
        };
        self.storage
            .save_cert(&self.spec.bundle, &issued.chain_pem, &issued.key_pem, &meta)?;
        let serial = issued.served.info.serial.clone();
        st.current = Some(Current {
            leaf: issued.served.key.cert[0].clone(),
            info: issued.served.info.clone(),
            directory: Some(meta.directory),
        });
        self.publish(issued.served, cause);
        Ok(serial)
    }

    /// Puts a validated certificate in service through the store's one
    /// publish path.
    fn publish(&self, served: ServedCert, cause: PublishCause) {
        let Some(slot) = self.slot() else {
            tracing::warn!(site = %self.name(), "the site is no longer configured for ACME; the certificate is stored only");
            return;
        };
        self.store.publish(&slot, served, cause);
    }

    /// Replacement first (so what is served is never the revoked one when
    /// the CA can issue), then revocation.
    async fn revoke(
        &mut self,
        st: &mut State,
        reason: RevokeReason,
    ) -> Result<ActionReport, AcmeError> {
        let Some(old) = st.current.clone() else {
            return Err(AcmeError::NotFound(format!(
                "{:?} has no ACME certificate to revoke",
                self.name()
            )));
        };
        let replacement = self.attempt(st, PublishCause::AdminRenew).await;
        let account = self.ensure_account().await?;
        let req = RevocationRequest {
            certificate: &old.leaf,
            reason: Some(reason.to_lib()),
        };
        retry_nonce!(self.stats.nonce_retries, account.revoke(&req).await).map_err(|e| {
            AcmeError::from_lib("revoking the certificate", &self.cfg().directory, e)
        })?;
        tracing::warn!(site = %self.name(), serial = %old.info.serial, ?reason, "ACME certificate revoked");
        if replacement.is_err()
            && st
                .current
                .as_ref()
                .is_some_and(|c| c.info.serial == old.info.serial)
        {
            // What is served is now revoked: keep trying to replace it.
            st.retry_at = Some(SystemTime::now() + self.cfg().retry_base);
        }
        Ok(ActionReport {
            name: self.name().to_string(),
            renewed: replacement.is_ok(),
            serial: replacement.as_ref().ok().cloned(),
            revoked: Some(old.info.serial.clone()),
            reason: replacement
                .err()
                .map(|e| format!("revoked, but the replacement failed: {e}")),
        })
    }
}
