//! The control plane of a running server: config reload (SIGHUP, admin
//! `POST /reload`, `portcullis reload`), certificate re-checks, and the set
//! of open listeners. Reloads are serialised; each one validates the whole
//! new config and every new certificate before publishing anything, then
//! swaps routes, limits and certificates and opens/closes only the
//! listeners whose address changed. Control path only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::certstore::{self, CertStore, InternalCa};
use crate::config::{Config, ListenerConfig, ListenerProtocol};
use crate::proxy::{self, Runtime, Snapshot};

/// One open listener.
struct OpenListener {
    /// As configured (port 0 stays 0, so an unchanged config keeps it).
    config: ListenerConfig,
    /// Where it is bound.
    bound: SocketAddr,
    /// Cancelled to close it.
    stop: CancellationToken,
}

/// Outcome of the last config reload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    /// When the last successful reload happened (RFC 3339).
    pub last_success: Option<String>,
    /// The last reload's error, if it failed (cleared by a success).
    pub last_error: Option<String>,
    /// Successful reloads since start.
    pub reloads: u64,
}

/// What a successful reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// Listeners opened.
    pub opened: Vec<String>,
    /// Listeners closed.
    pub closed: Vec<String>,
    /// Certificates replaced after re-reading their files.
    pub certificates_replaced: usize,
    /// Certificates whose files could not be loaded (previous kept).
    pub certificates_failed: usize,
}

/// Handle on a running server's control plane.
pub struct Control {
    /// The config file, when there is one to re-read.
    config_path: Option<PathBuf>,
    /// The config in service.
    config: tokio::sync::Mutex<Config>,
    /// The shared runtime.
    rt: Arc<Runtime>,
    /// The internal CA, if any site uses it.
    ca: Option<Arc<InternalCa>>,
    /// Renews ACME certificates; follows every reload.
    acme: Arc<crate::acme::Manager>,
    /// Open listeners.
    listeners: tokio::sync::Mutex<Vec<OpenListener>>,
    /// Tells the file watcher the set of files changed.
    pub(crate) watch_refresh: Arc<Notify>,
    /// Last reload outcome (admin API).
    status: Mutex<ReloadStatus>,
    /// Parent of every listener's stop token.
    stop_all: CancellationToken,
}

impl Control {
    pub(crate) fn new(
        config: Config,
        rt: Arc<Runtime>,
        ca: Option<Arc<InternalCa>>,
        acme: Arc<crate::acme::Manager>,
    ) -> Control {
        let config_path = config.source.is_file().then(|| config.source.clone());
        Control {
            config_path,
            config: tokio::sync::Mutex::new(config),
            rt,
            ca,
            acme,
            listeners: tokio::sync::Mutex::new(Vec::new()),
            watch_refresh: Arc::new(Notify::new()),
            status: Mutex::new(ReloadStatus::default()),
            stop_all: CancellationToken::new(),
        }
    }

    /// The certificate store.
    pub fn certs(&self) -> &Arc<CertStore> {
        &self.rt.certs
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// The internal CA, if a site uses it.
    pub fn internal_ca(&self) -> Option<&Arc<InternalCa>> {
        self.ca.as_ref()
    }

    /// The ACME manager.
    pub fn acme(&self) -> &Arc<crate::acme::Manager> {
        &self.acme
    }

    /// Last reload outcome.
    pub fn status(&self) -> ReloadStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bound addresses of open listeners of a kind.
    pub async fn bound(&self, https: bool) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .await
            .iter()
            .filter(|l| (l.config.protocol == ListenerProtocol::Https) == https)
            .map(|l| l.bound)
            .collect()
    }

    /// Starts serving on an already bound socket.
    pub(crate) async fn open(&self, config: ListenerConfig, listener: TcpListener) {
        let bound = listener.local_addr().unwrap_or(config.addr);
        let stop = self.stop_all.child_token();
        let rt = self.rt.clone();
        match config.protocol {
            ListenerProtocol::Https => {
                tracing::info!(protocol = "https", addr = %bound, "listening");
                tokio::spawn(proxy::serve_https(listener, rt, stop.clone()));
            }
            ListenerProtocol::Http { https_port } => {
                tracing::info!(protocol = "http", addr = %bound, "listening");
                tokio::spawn(proxy::redirect::serve_http(listener, rt, https_port, stop.clone()));
            }
        }
        self.listeners.lock().await.push(OpenListener { config, bound, stop });
    }

    /// Stops accepting on every listener.
    pub(crate) fn close_all(&self) {
        self.stop_all.cancel();
    }

    /// Re-reads the config file (when there is one) and every certificate
    /// file. On any error nothing changes and the error is returned.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let result = self.reload_inner().await;
        let metrics = &self.rt.metrics;
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(report) => {
                metrics.config_reloads.with_label_values(&["success"]).inc();
                st.last_success = Some(certstore::rfc3339(SystemTime::now()));
                st.last_error = None;
                st.reloads += 1;
                tracing::info!(
                    opened = ?report.opened,
                    closed = ?report.closed,
                    certificates_replaced = report.certificates_replaced,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["failure"]).inc();
                st.last_error = Some(e.clone());
                tracing::error!(error = %e, "configuration reload refused; keeping the running configuration");
            }
        }
        result
    }

    async fn reload_inner(&self) -> Result<ReloadReport, String> {
        let mut current = self.config.lock().await;
        let mut report = ReloadReport::default();
        let Some(path) = &self.config_path else {
            // No file (reverse-proxy mode): only certificates can change.
            let (changed, failed) = certstore::watch::reload_all(&self.rt.certs, false);
            report.certificates_replaced = changed;
            report.certificates_failed = failed;
            return Ok(report);
        };
        let new = Config::load(path).map_err(|e| e.to_string())?;
        crate::acme::preflight(&new)?;
        let has_acme = |c: &Config| c.sites.iter().any(|s| matches!(s.tls, crate::config::TlsSource::Acme(_)));
        if new.state_dir != current.state_dir && (self.ca.is_some() || has_acme(&current) || has_acme(&new)) {
            return Err(format!(
                "{}: state_dir: changing the state directory needs a restart",
                path.display()
            ));
        }
        let needs_ca = new.sites.iter().any(|s| s.tls.needs_internal_ca());
        if needs_ca && self.ca.is_none() {
            return Err(format!(
                "{}: a site now uses tls = \"internal\"; enabling the internal CA needs a restart",
                path.display()
            ));
        }
        // Certificates: new/changed sites load now; unchanged ones keep their slot.
        let old_map = self.rt.certs.map();
        let map = CertStore::build_map(&new, self.ca.as_deref(), Some(&old_map))
            .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))?;
        drop(old_map);

        // Listeners: bind the new ones before changing anything.
        let mut listeners = self.listeners.lock().await;
        let mut to_open = Vec::new();
        for l in &new.listeners {
            if !listeners.iter().any(|o| o.config == *l) {
                let sock = crate::bind(l.addr).map_err(|e| e.to_string())?;
                to_open.push((l.clone(), sock));
            }
        }
        // Upstream connect/idle timeouts and pool sizes are client settings:
        // the snapshot built below rebuilds the clients whose settings changed.
        if current.limits.max_connections != new.limits.max_connections || current.admin != new.admin {
            tracing::warn!("limits.max_connections and admin.listen take effect after a restart");
        }

        // Publish: certificates, then routes (one swap each).
        self.rt.certs.replace_map(map);
        // ACME tasks follow the new sites (their slots are in service now).
        self.acme.sync(&new);
        let old_snap = self.rt.snapshot.load_full();
        self.rt.publish(Snapshot::from_config(&new, Some(&old_snap)));

        // Close listeners that went away; open the new ones.
        listeners.retain(|o| {
            let keep = new.listeners.contains(&o.config);
            if !keep {
                tracing::info!(addr = %o.bound, "closing listener");
                report.closed.push(o.bound.to_string());
                o.stop.cancel();
            }
            keep
        });
        drop(listeners);
        for (cfg, sock) in to_open {
            if let Ok(a) = sock.local_addr() {
                report.opened.push(a.to_string());
            }
            self.open(cfg, sock).await;
        }
        *current = new;
        drop(current);

        let (changed, failed) = certstore::watch::reload_all(&self.rt.certs, false);
        report.certificates_replaced = changed;
        report.certificates_failed = failed;
        self.watch_refresh.notify_one();
        Ok(report)
    }
}
