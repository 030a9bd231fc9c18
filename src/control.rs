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
use crate::proxy::{self, Runtime};

/// One open listener.
struct OpenListener {
    /// As configured (port 0 stays 0, so an unchanged config keeps it).
    config: ListenerConfig,
    /// Where it is bound.
    bound: SocketAddr,
    /// Cancelled to close it.
    stop: CancellationToken,
    /// A second handle on the listening socket. A reload that keeps the
    /// address but changes what is spoken on it (`protocol`, `https_port`)
    /// hands this socket to a new accept loop: binding again would fail
    /// while the old socket is open, and closing it first would refuse
    /// connections in between. Dropped when the listener closes.
    socket: Option<std::net::TcpListener>,
}

/// What a reload does with one listener of the new config.
enum Plan {
    /// Same address and settings: the running accept loop stays.
    Keep,
    /// Same address, other settings: a new accept loop on the same socket
    /// replaces the open listener at this index.
    Reuse(usize, TcpListener),
    /// A new address: a freshly bound socket.
    Open(TcpListener),
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
    /// Listeners that kept their socket but now speak a different protocol
    /// or redirect to a different port.
    pub reconfigured: Vec<String>,
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
    /// Open listeners (control path; never held across an await).
    listeners: Mutex<Vec<OpenListener>>,
    /// Tells the file watcher the set of files changed.
    pub(crate) watch_refresh: Arc<Notify>,
    /// Last reload outcome (admin API).
    status: Mutex<ReloadStatus>,
    /// Parent of every listener's stop token.
    stop_all: CancellationToken,
    /// Who the admin API answers; follows reloads.
    admin_access: arc_swap::ArcSwap<crate::config::AdminAccess>,
}

impl Control {
    pub(crate) fn new(
        config: Config,
        rt: Arc<Runtime>,
        ca: Option<Arc<InternalCa>>,
        acme: Arc<crate::acme::Manager>,
    ) -> Control {
        let config_path = config.source.is_file().then(|| config.source.clone());
        let admin_access = arc_swap::ArcSwap::from_pointee(config.admin_access.clone());
        Control {
            admin_access,
            config_path,
            config: tokio::sync::Mutex::new(config),
            rt,
            ca,
            acme,
            listeners: Mutex::new(Vec::new()),
            watch_refresh: Arc::new(Notify::new()),
            status: Mutex::new(ReloadStatus::default()),
            stop_all: CancellationToken::new(),
        }
    }

    /// Who the admin API answers (hosts, token), as of the last reload.
    pub fn admin_access(&self) -> Arc<crate::config::AdminAccess> {
        self.admin_access.load_full()
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
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bound addresses of open listeners of a kind.
    pub fn bound(&self, https: bool) -> Vec<SocketAddr> {
        self.open_listeners()
            .iter()
            .filter(|l| (l.config.protocol == ListenerProtocol::Https) == https)
            .map(|l| l.bound)
            .collect()
    }

    fn open_listeners(&self) -> std::sync::MutexGuard<'_, Vec<OpenListener>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts serving on an already bound socket.
    pub(crate) fn open(&self, config: ListenerConfig, listener: TcpListener) {
        let bound = listener.local_addr().unwrap_or(config.addr);
        let socket = match socket2::SockRef::from(&listener).try_clone() {
            Ok(s) => Some(std::net::TcpListener::from(s)),
            Err(e) => {
                tracing::warn!(addr = %bound, error = %e, "cannot keep a second handle on the socket; changing its protocol will need a restart");
                None
            }
        };
        if self.stop_all.is_cancelled() {
            return;
        }
        let stop = self.stop_all.child_token();
        let rt = self.rt.clone();
        match config.protocol {
            ListenerProtocol::Https => {
                tracing::info!(protocol = "https", addr = %bound, "listening");
                tokio::spawn(proxy::server::serve_https(listener, rt, stop.clone()));
            }
            ListenerProtocol::Http { https_port } => {
                tracing::info!(protocol = "http", addr = %bound, "listening");
                tokio::spawn(proxy::server::serve_http(
                    listener,
                    rt,
                    https_port,
                    stop.clone(),
                ));
            }
        }
        self.open_listeners().push(OpenListener {
            config,
            bound,
            stop,
            socket,
        });
    }

    /// Stops accepting on every listener.
    pub(crate) fn close_all(&self) {
        self.stop_all.cancel();
        // The spare handles keep sockets open; drop them so connections are refused.
        self.open_listeners().clear();
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
            let (changed, failed) = certstore::watch::reload_all(&self.rt.certs, false).await;
            report.certificates_replaced = changed;
            report.certificates_failed = failed;
            return Ok(report);
        };
        let new = Config::load(path).map_err(|e| e.to_string())?;
        crate::acme::preflight(&new)?;
        let has_acme = |c: &Config| {
            c.sites
                .iter()
                .any(|s| matches!(s.tls, crate::config::TlsSource::Acme(_)))
        };
        if new.state_dir != current.state_dir
            && (self.ca.is_some() || has_acme(&current) || has_acme(&new))
        {
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
        // The access log: a new destination is opened before anything changes.
        let access_log = if new.access_log.same_output(&current.access_log) {
            None
        } else {
            Some(crate::accesslog::Output::open(&new.access_log).map_err(|e| e.to_string())?)
        };
        // Certificates: new/changed sites load now; unchanged ones keep their slot.
        // Reading and parsing certificate files blocks: not on an async worker.
        let (old_map, ca) = (self.rt.certs.map_full(), self.ca.clone());
        let (new, map) = tokio::task::spawn_blocking(move || {
            let map = CertStore::build_map(&new, ca.as_deref(), Some(&old_map));
            (new, map)
        })
        .await
        .map_err(|e| format!("loading the certificates failed: {e}"))?;
        let map = map.map_err(|errs| {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?;

        // Listeners: pair each new one with an open one (same settings
        // first, then same address), and bind the rest, before changing
        // anything. Pairing is one to one: two `127.0.0.1:0` listeners are
        // two sockets. The lock is held until the swap so the pairing stays
        // true (reloads are serialised anyway; shutdown may clear the list).
        let to_open = {
            let mut listeners = self.open_listeners();
            let mut claimed = vec![false; listeners.len()];
            let mut plans: Vec<Option<Plan>> = Vec::with_capacity(new.listeners.len());
            for l in &new.listeners {
                let same = (0..listeners.len()).find(|&i| !claimed[i] && listeners[i].config == *l);
                plans.push(same.map(|i| {
                    claimed[i] = true;
                    Plan::Keep
                }));
            }
            for (l, plan) in new.listeners.iter().zip(plans.iter_mut()) {
                if plan.is_some() {
                    continue;
                }
                let same_addr = (l.addr.port() != 0)
                    .then(|| {
                        (0..listeners.len())
                            .find(|&i| !claimed[i] && listeners[i].config.addr == l.addr)
                    })
                    .flatten();
                *plan = Some(match same_addr {
                    Some(i) => {
                        claimed[i] = true;
                        let sock = listeners[i]
                            .socket
                            .as_ref()
                            .ok_or_else(|| std::io::Error::other("no spare handle on the socket"))
                            .and_then(std::net::TcpListener::try_clone)
                            .and_then(TcpListener::from_std)
                            .map_err(|e| {
                                format!(
                                    "{}: listener {}: cannot change its settings without a restart: {e}",
                                    path.display(),
                                    l.addr
                                )
                            })?;
                        Plan::Reuse(i, sock)
                    }
                    None => Plan::Open(crate::bind(l.addr).map_err(|e| e.to_string())?),
                });
            }
            // Upstream connect/idle timeouts and pool sizes are client settings:
            // the snapshot built below rebuilds the clients whose settings changed.
            if current.limits.max_connections != new.limits.max_connections
                || current.admin != new.admin
            {
                tracing::warn!(
                    "limits.max_connections and admin.listen take effect after a restart"
                );
            }

            // Publish: certificates, then routes (one swap each).
            self.rt.certs.replace_map(map);
            // ACME tasks follow the new sites (their slots are in service now).
            self.acme.sync(&new);
            self.rt.publish(self.rt.build(&new));
            if let Some(out) = access_log {
                self.rt.access_log.switch(out);
            }

            // Close listeners that went away (or change settings); open the new ones.
            let mut to_open = Vec::new();
            let mut reused = vec![false; listeners.len()];
            for (cfg, plan) in new.listeners.iter().zip(plans.into_iter().flatten()) {
                match plan {
                    Plan::Keep => {}
                    Plan::Reuse(i, sock) => {
                        reused[i] = true;
                        claimed[i] = false;
                        to_open.push((cfg.clone(), sock, true));
                    }
                    Plan::Open(sock) => to_open.push((cfg.clone(), sock, false)),
                }
            }
            let mut i = 0;
            listeners.retain(|o| {
                let (keep, reuse) = (claimed[i], reused[i]);
                i += 1;
                if !keep {
                    if reuse {
                        tracing::info!(addr = %o.bound, "listener keeps its socket with new settings");
                        report.reconfigured.push(o.bound.to_string());
                    } else {
                        tracing::info!(addr = %o.bound, "closing listener");
                        report.closed.push(o.bound.to_string());
                    }
                    o.stop.cancel();
                }
                keep
            });
            to_open
        };
        for (cfg, sock, reuse) in to_open {
            if !reuse {
                if let Ok(a) = sock.local_addr() {
                    report.opened.push(a.to_string());
                }
            }
            self.open(cfg, sock);
        }
        self.admin_access.store(Arc::new(new.admin_access.clone()));
        *current = new;
        drop(current);

        let (changed, failed) = certstore::watch::reload_all(&self.rt.certs, false).await;
        report.certificates_replaced = changed;
        report.certificates_failed = failed;
        self.watch_refresh.notify_one();
        Ok(report)
    }
}
