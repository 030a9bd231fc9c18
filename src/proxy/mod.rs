//! Listeners, TLS accept, the hyper server (HTTP/1.1 + HTTP/2), routing and
//! forwarding to upstreams.
//!
//! Hot path. A connection reads the runtime snapshot once per request
//! (`rt.snapshot.load()`); nothing on this path takes a lock. The control
//! path publishes a new [`Snapshot`] to change routes, timeouts or limits.

mod body;
mod handler;
pub mod headers;
pub mod io;
pub mod ratelimit;
pub mod redirect;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use body::{BoxError, RequestBody, ResponseBody, TrackedBody};
use io::{ConnIo, ConnShared};

use crate::certstore::CertStore;
use crate::config::{Config, Limits, RouteAction, Timeouts};
use crate::hostmap::HostMap;

/// One site's routes, longest prefix first.
#[derive(Debug)]
pub struct Site {
    /// The site's name (log and metric label).
    pub name: Arc<str>,
    /// Routes in match order.
    pub routes: Vec<Route>,
}

/// One route.
#[derive(Debug)]
pub struct Route {
    /// Path prefix.
    pub prefix: String,
    /// What it does.
    pub action: RouteAction,
    /// Rate limits; state survives reloads that leave a limit unchanged.
    pub limits: Vec<Arc<ratelimit::Limiter>>,
    /// The upstream group of a forwarding route; its upstreams' health
    /// and clients survive reloads that keep them.
    pub upstream: Option<Arc<upstream::Group>>,
    /// This route's request metrics, looked up once.
    pub metrics: crate::metrics::RouteMetrics,
}

impl Site {
    /// The first route whose prefix matches `path` on a segment boundary.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.route_index(path).map(|i| &self.routes[i])
    }

    /// Index of [`Site::route`]'s answer.
    pub fn route_index(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| prefix_matches(&r.prefix, path))
    }
}

/// `/api` matches `/api`, `/api/`, `/api/x`, not `/apix`; `/api/` matches `/api/x`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// Everything a request needs that a config reload may change, swapped as one.
#[derive(Debug)]
pub struct Snapshot {
    /// Host -> site.
    pub sites: HostMap<Arc<Site>>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Limits.
    pub limits: Limits,
    /// Every site, in config order.
    pub site_list: Vec<Arc<Site>>,
    /// Peers whose forwarding headers name the client.
    pub trusted_proxies: Vec<crate::config::Cidr>,
    /// Body of a 429.
    pub limited_body: bytes::Bytes,
    /// How often idle rate-limit keys are purged.
    pub purge_interval: Duration,
}

impl Snapshot {
    /// Builds the routing snapshot of a validated config. Rate limiters
    /// whose site, route and settings are unchanged from `previous` are
    /// carried over with their state (a reload must not reset buckets).
    pub fn from_config(config: &Config, previous: Option<&Snapshot>) -> Snapshot {
        let mut sites = HostMap::default();
        let mut site_list = Vec::new();
        let max_keys = config.rate_limit.max_keys;
        for s in &config.sites {
            let old_site = previous.and_then(|p| p.site_list.iter().find(|o| *o.name == *s.name));
            let name: Arc<str> = s.name.as_str().into();
            let site = Arc::new(Site {
                name: name.clone(),
                routes: s
                    .routes
                    .iter()
                    .map(|r| {
                        let old_route =
                            old_site.and_then(|o| o.routes.iter().find(|or| or.prefix == r.path));
                        let limits = r
                            .limits
                            .iter()
                            .map(|lc| {
                                old_route
                                    .and_then(|or| or.limits.iter().find(|l| l.config == *lc))
                                    .cloned()
                                    .unwrap_or_else(|| {
                                        Arc::new(ratelimit::Limiter::new(lc.clone(), max_keys))
                                    })
                            })
                            .collect();
                        let upstream = match &r.action {
                            RouteAction::Proxy(up) => Some(upstream::Group::reuse_or_build(
                                &name,
                                &r.path,
                                up,
                                &config.timeouts,
                                &config.limits,
                                old_route.and_then(|or| or.upstream.as_ref()),
                            )),
                            _ => None,
                        };
                        Route {
                            prefix: r.path.clone(),
                            action: r.action.clone(),
                            limits,
                            upstream,
                            metrics: Default::default(),
                        }
                    })
                    .collect(),
            });
            site_list.push(site.clone());
            for h in &s.hosts {
                sites.insert(h, site.clone());
            }
            if s.default {
                sites.set_default(site.clone());
            }
        }
        Snapshot {
            sites,
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            site_list,
            trusted_proxies: config.rate_limit.trusted_proxies.clone(),
            limited_body: bytes::Bytes::from(config.rate_limit.body.clone()),
            purge_interval: config.rate_limit.purge_interval,
        }
    }

    /// Every upstream group, in config order.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<upstream::Group>> {
        self.site_list
            .iter()
            .flat_map(|s| s.routes.iter())
            .filter_map(|r| r.upstream.as_ref())
    }
}

/// State shared by every listener and connection.
pub struct Runtime {
    /// Routes, timeouts and limits; replaced whole on config reload.
    pub snapshot: ArcSwap<Snapshot>,
    /// Certificates in service.
    pub certs: Arc<CertStore>,
    /// The process's one TLS config.
    pub tls: Arc<ServerConfig>,
    /// Active health-check tasks of the upstream groups in service;
    /// [`Runtime::publish`] keeps them in step with the snapshot.
    pub health: upstream::HealthChecks,
    /// Caps concurrent downstream connections.
    pub conn_limit: Arc<Semaphore>,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled to start a graceful shutdown of every connection.
    pub shutdown: CancellationToken,
    /// Start of the process clock used for idle tracking.
    pub epoch: Instant,
    /// Traffic metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The access log (off until [`crate::accesslog::AccessLog::switch`]).
    pub access_log: crate::accesslog::AccessLog,
}

impl Runtime {
    /// Builds the runtime around loaded certificates.
    pub fn new(
        config: &Config,
        certs: Arc<CertStore>,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Runtime>, rustls::Error> {
        let tls = tls::server_config(certs.clone())?;
        let rt = Arc::new(Runtime {
            snapshot: ArcSwap::from_pointee(Snapshot::from_config(config, None)),
            certs,
            tls,
            health: upstream::HealthChecks::default(),
            conn_limit: Arc::new(Semaphore::new(config.limits.max_connections)),
            tracker: TaskTracker::new(),
            shutdown,
            epoch: Instant::now(),
            access_log: crate::accesslog::AccessLog::new(metrics.access_log_dropped.clone()),
            metrics,
        });
        rt.metrics
            .register_collector(Box::new(upstream::Collector::new(Arc::downgrade(&rt))));
        rt.health.sync(rt.snapshot.load().groups(), &rt.shutdown);
        Ok(rt)
    }

    /// Puts `snap` in service (one swap) and restarts the health checks
    /// of the upstream groups that changed.
    pub fn publish(&self, snap: Snapshot) {
        self.snapshot.store(Arc::new(snap));
        self.health
            .sync(self.snapshot.load().groups(), &self.shutdown);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Accepts TLS connections on `listener` until `stop` is cancelled.
pub async fn serve_https(listener: TcpListener, rt: Arc<Runtime>, stop: CancellationToken) {
    let local = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = rt.conn_limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let rt2 = rt.clone();
        rt.tracker.spawn(async move {
            let _permit = permit;
            serve_tls_conn(tcp, peer, rt2).await;
        });
    }
    tracing::debug!(addr = ?local, "listener closed");
}

/// Keeps `portcullis_connections_open` right however the connection ends.
struct OpenConn(prometheus::IntGauge);

impl OpenConn {
    fn new(g: &prometheus::IntGauge) -> OpenConn {
        g.inc();
        OpenConn(g.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_tls_conn(tcp: TcpStream, peer: SocketAddr, rt: Arc<Runtime>) {
    let _ = tcp.set_nodelay(true);
    let _open = OpenConn::new(&rt.metrics.connections);
    let snap = rt.snapshot.load_full();
    // A handshake still under way when shutdown starts is abandoned: no
    // request has been sent on it yet, and it would otherwise hold the
    // shutdown for up to the handshake timeout.
    let accept = tls::accept(tcp, &rt.tls, &rt.certs, snap.timeouts.tls_handshake);
    let stream = tokio::select! {
        r = accept => match r {
            Ok(s) => s,
            Err(reason) => {
                rt.metrics.handshake_failures.with_label_values(&[reason.as_str()]).inc();
                tracing::debug!(%peer, reason = reason.as_str(), "TLS handshake failed");
                return;
            }
        },
        _ = rt.shutdown.cancelled() => {
            tracing::debug!(%peer, "shutting down; TLS handshake abandoned");
            return;
        }
    };
    let version = match stream.get_ref().1.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "other",
    };
    rt.metrics.handshakes.with_label_values(&[version]).inc();
    let is_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let sni: Option<Arc<str>> = stream.get_ref().1.server_name().map(Into::into);
    let shared = Arc::new(ConnShared::default());
    shared.last_done_ms.store(rt.now_ms(), Ordering::Release);
    let shared_for_idle = shared.clone();
    let io = ConnIo::new(
        stream,
        snap.timeouts.response_write,
        (!is_h2).then(|| (shared.clone(), snap.limits.max_header_bytes)),
    );
    let ctx = Arc::new(handler::ConnCtx::new(rt.clone(), peer, shared, sni));
    let svc = service_fn(move |req: hyper::Request<Incoming>| handler::handle(ctx.clone(), req));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(snap.timeouts.request_header)
        .max_buf_size(snap.limits.max_header_bytes.max(8192))
        .max_headers(snap.limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(snap.limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = if is_h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let conn = conn.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let conn = std::pin::pin!(conn);
    drive(
        conn,
        |c| c.graceful_shutdown(),
        &rt,
        &shared_for_idle,
        snap.timeouts.idle,
    )
    .await;
}

/// Runs a connection until it ends, closing it when it has been idle too
/// long or when shutdown starts (in-flight requests then finish first, for
/// at most `timeouts.shutdown_grace`; then the connection is dropped, so a
/// request that outlives the grace period is cut off instead of living on
/// after [`crate::Server::run`] has returned).
pub(crate) async fn drive<F, E>(
    mut conn: Pin<&mut F>,
    graceful: fn(Pin<&mut F>),
    rt: &Runtime,
    shared: &ConnShared,
    idle: Duration,
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut closing = false;
    // Set when shutdown starts: past it the connection is dropped.
    let mut hard_stop: Option<Instant> = None;
    loop {
        let last = shared.last_done_ms.load(Ordering::Acquire);
        let idle_at = rt.epoch + Duration::from_millis(last) + idle;
        // Never reached while `hard_stop` is unset (that branch is off then).
        let stop_at = hard_stop.unwrap_or(idle_at);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = rt.shutdown.cancelled(), if hard_stop.is_none() => {
                let grace = rt.snapshot.load().timeouts.shutdown_grace;
                hard_stop = Some(Instant::now() + grace);
                if !closing {
                    closing = true;
                    graceful(conn.as_mut());
                }
            }
            _ = tokio::time::sleep_until(stop_at.into()), if hard_stop.is_some() => {
                tracing::debug!(
                    in_flight = shared.in_flight.load(Ordering::Acquire),
                    "shutdown grace period over; dropping the connection"
                );
                return;
            }
            _ = tokio::time::sleep_until(idle_at.into()), if !closing => {
                let quiet = shared.in_flight.load(Ordering::Acquire) == 0
                    && shared.last_done_ms.load(Ordering::Acquire) == last;
                if quiet {
                    closing = true;
                    graceful(conn.as_mut());
                } else if shared.in_flight.load(Ordering::Acquire) > 0 {
                    // Busy: look again one idle period after it ends.
                    shared.last_done_ms.store(rt.now_ms(), Ordering::Release);
                }
            }
        }
    }
}
