//! portcullis: a TLS-terminating reverse proxy that keeps its certificates
//! alive.
//!
//! # Layout
//!
//! - [`config`]: the TOML file -> a validated [`config::Config`]; errors name
//!   file, line and field. Control path.
//! - [`certstore`]: certificates in memory (one swappable slot per site, an
//!   `ArcSwap`'d SNI map), the rustls resolver, PEM validation, the internal
//!   CA. Knows rustls, not hyper.
//! - [`proxy`]: listeners, TLS accept, the hyper server, routing, the
//!   upstream client, header rules, the plain-HTTP redirect. Hot path: reads
//!   snapshots, takes no lock.
//! - [`acme`]: automatic certificates from an ACME CA: one renewal task per
//!   site, challenges answered through the certificate store, state kept in
//!   `state_dir/acme/`. Control path; hands certificates to `certstore`.
//! - [`control`]: config reload and listener management of a running server.
//! - [`admin`]: the admin listener (health, readiness, metrics, inventory, reload).
//! - [`metrics`]: the Prometheus registry and the certificate expiry series.
//! - [`ops`]: on-call commands (`certs`, `inspect`, admin requests).
//! - [`shutdown`]: the signals that stop or reload the server, or reopen
//!   the access log.
//! - [`accesslog`]: the access log: requests queue formatted lines without
//!   blocking (full queue: dropped and counted), one writer thread writes
//!   them to a file, stderr or stdout.
//! - [`hostmap`]: exact / wildcard / default name lookup shared by SNI and
//!   routing.
//!
//! The binary (`main.rs`) parses the command line, sets up logging, loads the
//! config and calls [`Server::bind`] then [`Server::run`]. Tests do the same
//! with `127.0.0.1:0` addresses and read the bound ports back.

#![forbid(unsafe_code)]

pub mod accesslog;
pub mod acme;
pub mod admin;
pub mod certstore;
pub mod config;
pub mod control;
pub mod fsutil;
pub mod hostmap;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod shutdown;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use certstore::{CertError, CertStore, InternalCa, SiteCertError};
use config::{Config, ListenerProtocol};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates failed to load.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Certs(Vec<SiteCertError>),
    /// The internal CA could not be loaded or created.
    #[error("{0}")]
    InternalCa(CertError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}; is another process using it?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// An ACME setting cannot be used (e.g. an unreadable `ca_root`).
    #[error("{0}")]
    Acme(String),
    /// The access log file cannot be opened.
    #[error("{0}")]
    AccessLog(#[from] accesslog::AccessLogError),
}

/// A bound, ready-to-run server.
pub struct Server {
    control: Arc<control::Control>,
    listeners: Vec<(config::ListenerConfig, TcpListener)>,
    admin: Option<TcpListener>,
    admin_state: Arc<admin::AdminState>,
    ca: Option<Arc<InternalCa>>,
    shutdown: CancellationToken,
    grace: std::time::Duration,
    poll_interval: std::time::Duration,
}

impl Server {
    /// Loads certificates and binds every socket; nothing is served yet.
    /// `shutdown` starts a graceful stop of [`Server::run`] when cancelled.
    pub async fn bind(config: Config, shutdown: CancellationToken) -> Result<Server, Error> {
        acme::preflight(&config).map_err(Error::Acme)?;
        let needs_ca = config.sites.iter().any(|s| s.tls.needs_internal_ca());
        let ca = if needs_ca {
            Some(Arc::new(
                InternalCa::load_or_create(&config.state_dir).map_err(Error::InternalCa)?,
            ))
        } else {
            None
        };
        let certs = Arc::new(CertStore::load(&config, ca.as_deref()).map_err(Error::Certs)?);
        let metrics = Arc::new(metrics::Metrics::new());
        let access_log = accesslog::Output::open(&config.access_log)?;
        let rt = proxy::Runtime::new(&config, certs, metrics.clone(), shutdown.clone())?;
        rt.access_log.switch(access_log);
        let mut listeners = Vec::new();
        for l in &config.listeners {
            listeners.push((l.clone(), bind(l.addr)?));
        }
        let admin = match config.admin {
            Some(a) => Some(bind(a)?),
            None => None,
        };
        let grace = config.timeouts.shutdown_grace;
        let poll_interval = config.cert_poll_interval;
        let acme = Arc::new(acme::Manager::new(
            &config,
            rt.certs.clone(),
            metrics.clone(),
        ));
        let control = Arc::new(control::Control::new(config, rt, ca.clone(), acme));
        Ok(Server {
            admin_state: Arc::new(admin::AdminState::new(control.clone(), metrics)),
            control,
            listeners,
            admin,
            ca,
            shutdown,
            grace,
            poll_interval,
        })
    }

    /// Bound HTTPS addresses, in config order.
    pub fn https_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(|p| p == ListenerProtocol::Https)
    }

    /// Bound plain-HTTP addresses, in config order.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(|p| p != ListenerProtocol::Https)
    }

    fn addrs(&self, f: impl Fn(ListenerProtocol) -> bool) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|(c, _)| f(c.protocol))
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the internal CA certificate is, when a site uses it.
    pub fn internal_ca_path(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|c| c.cert_path().to_path_buf())
    }

    /// The certificates in service.
    pub fn certs(&self) -> Arc<CertStore> {
        self.control.certs().clone()
    }

    /// The ACME manager (renewal tasks of `tls = "acme"` sites).
    pub fn acme(&self) -> Arc<acme::Manager> {
        self.control.acme().clone()
    }

    /// The control plane (reload, listeners).
    pub fn control(&self) -> Arc<control::Control> {
        self.control.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting,
    /// lets in-flight requests finish for up to the grace period, and returns.
    pub async fn run(self) -> Result<(), Error> {
        let control = self.control.clone();
        let rt = control.runtime().clone();
        let background = CancellationToken::new();
        // Before listening: a SIGHUP that arrives once we are reachable reloads.
        shutdown::on_reload_signal(control.clone(), background.clone());
        // Likewise SIGUSR1 (reopen the access log; its default action also kills).
        shutdown::on_reopen_signal(rt.clone(), background.clone());
        for (cfg, listener) in self.listeners {
            control.open(cfg, listener);
        }
        let admin_stop = CancellationToken::new();
        if let Some(admin) = self.admin {
            tracing::info!(protocol = "admin", addr = %fmt_addr(admin.local_addr().ok()), "listening");
            tokio::spawn(admin::serve(
                admin,
                self.admin_state.clone(),
                admin_stop.clone(),
            ));
        }
        if let Some(ca) = &self.ca {
            certstore::renew::spawn_renewer(rt.certs.clone(), ca.clone(), background.clone());
        }
        control.acme().start(background.clone());
        certstore::watch::spawn_watcher(
            rt.certs.clone(),
            control.watch_refresh.clone(),
            self.poll_interval,
            background.clone(),
        );
        {
            let rt2 = rt.clone();
            let every = rt.snapshot.load().purge_interval;
            proxy::ratelimit::spawn_purger(
                move || {
                    let snap = rt2.snapshot.load();
                    let mut out = Vec::new();
                    for site in &snap.site_list {
                        for route in &site.routes {
                            for l in &route.limits {
                                out.push((site.name.clone(), route.prefix.clone(), l.clone()));
                            }
                        }
                    }
                    out
                },
                every,
                rt.metrics.ratelimit_tracked.clone(),
                background.clone(),
            );
        }
        self.admin_state.ready.store(true, Ordering::Release);

        self.shutdown.cancelled().await;
        self.admin_state.ready.store(false, Ordering::Release);
        control.close_all();
        background.cancel();
        rt.tracker.close();
        let grace = self.grace;
        if tokio::time::timeout(grace, rt.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?grace,
                open = rt.tracker.len(),
                "grace period over; closing the remaining connections"
            );
        } else {
            tracing::info!("all connections finished");
        }
        admin_stop.cancel();
        // Every line of the finished requests reaches the log before we return.
        let rt2 = rt.clone();
        let _ = tokio::task::spawn_blocking(move || rt2.access_log.flush_and_close()).await;
        Ok(())
    }
}

fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "?".into())
}

/// Binds with `SO_REUSEADDR` and a deep backlog.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = |source| Error::Bind { addr, source };
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(4096).map_err(err)
}

/// Binds and runs `config` until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    Server::bind(config, shutdown).await?.run().await
}
