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
//! - [`admin`]: the admin listener (health and readiness).
//! - [`shutdown`]: signals.
//! - [`hostmap`]: exact / wildcard / default name lookup shared by SNI and
//!   routing.
//!
//! The binary (`main.rs`) parses the command line, sets up logging, loads the
//! config and calls [`Server::bind`] then [`Server::run`]. Tests do the same
//! with `127.0.0.1:0` addresses and read the bound ports back.

#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod certstore;
pub mod config;
pub mod fsutil;
pub mod hostmap;
pub mod proxy;
pub mod shutdown;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use certstore::{CertError, CertStore, InternalCa, SiteCertError};
use config::{Config, ListenerProtocol, TlsSource};

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
}

/// A bound, ready-to-run server.
pub struct Server {
    config: Config,
    rt: Arc<proxy::Runtime>,
    listeners: Vec<(ListenerProtocol, TcpListener)>,
    admin: Option<TcpListener>,
    admin_state: Arc<admin::AdminState>,
    ca: Option<Arc<InternalCa>>,
    shutdown: CancellationToken,
}

impl Server {
    /// Loads certificates and binds every socket; nothing is served yet.
    /// `shutdown` starts a graceful stop of [`Server::run`] when cancelled.
    pub async fn bind(config: Config, shutdown: CancellationToken) -> Result<Server, Error> {
        let needs_ca = config.sites.iter().any(|s| s.tls == TlsSource::Internal);
        let ca = if needs_ca {
            Some(Arc::new(InternalCa::load_or_create(&config.state_dir).map_err(Error::InternalCa)?))
        } else {
            None
        };
        let certs = Arc::new(CertStore::load(&config, ca.as_deref()).map_err(Error::Certs)?);
        let rt = proxy::Runtime::new(&config, certs, shutdown.clone())?;
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let sock = bind(l.addr)?;
            listeners.push((l.protocol, sock));
        }
        let admin = match config.admin {
            Some(a) => Some(bind(a)?),
            None => None,
        };
        Ok(Server {
            config,
            rt,
            listeners,
            admin,
            admin_state: Arc::new(admin::AdminState::default()),
            ca,
            shutdown,
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
            .filter(|(p, _)| f(*p))
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
        self.rt.certs.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting,
    /// lets in-flight requests finish for up to the grace period, and returns.
    pub async fn run(self) -> Result<(), Error> {
        let stop = CancellationToken::new();
        for (protocol, listener) in self.listeners {
            let addr = listener.local_addr().ok();
            let (rt, stop) = (self.rt.clone(), stop.clone());
            match protocol {
                ListenerProtocol::Https => {
                    tracing::info!(protocol = "https", addr = %fmt_addr(addr), "listening");
                    tokio::spawn(proxy::serve_https(listener, rt, stop));
                }
                ListenerProtocol::Http { https_port } => {
                    tracing::info!(protocol = "http", addr = %fmt_addr(addr), "listening");
                    tokio::spawn(proxy::redirect::serve_http(listener, rt, https_port, stop));
                }
            }
        }
        if let Some(admin) = self.admin {
            tracing::info!(protocol = "admin", addr = %fmt_addr(admin.local_addr().ok()), "listening");
            tokio::spawn(admin::serve(admin, self.admin_state.clone(), stop.clone()));
        }
        if let Some(ca) = &self.ca {
            certstore::internal::spawn_renewer(self.rt.certs.clone(), ca.clone(), stop.clone());
        }
        self.admin_state.ready.store(true, Ordering::Release);

        self.shutdown.cancelled().await;
        self.admin_state.ready.store(false, Ordering::Release);
        stop.cancel();
        self.rt.tracker.close();
        let grace = self.config.timeouts.shutdown_grace;
        if tokio::time::timeout(grace, self.rt.tracker.wait()).await.is_err() {
            tracing::warn!(
                grace = ?grace,
                open = self.rt.tracker.len(),
                "grace period over; closing the remaining connections"
            );
        } else {
            tracing::info!("all connections finished");
        }
        Ok(())
    }
}

fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "?".into())
}

/// Binds with `SO_REUSEADDR` and a deep backlog.
fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
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
