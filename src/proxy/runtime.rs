//! The state shared by every listener and connection: the route snapshot
//! (one `ArcSwap`), the certificates, the process's one TLS config, the
//! connection budget and the task tracker. Built on the control path; the
//! hot path reads it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus::IntCounter;

use super::admission::{Admission, Refusal, Shedder};
use super::error::UpstreamErrorKind;
use super::route::Snapshot;
use super::tls::{self, HandshakeFailure};
use super::upstream::{Collector, HealthChecks};
use crate::certstore::CertStore;
use crate::config::Config;
use crate::metrics::{Metrics, RouteMetrics};

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
    pub health: HealthChecks,
    /// Caps concurrent downstream connections (HTTPS and plain HTTP).
    pub conn_limit: Arc<Semaphore>,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled to start a graceful shutdown of every connection.
    pub shutdown: CancellationToken,
    /// Per-address and handshake budgets.
    pub admission: Arc<Admission>,
    /// Closes idle connections to make room at the connection cap.
    pub shedder: Arc<Shedder>,
    /// Traffic metrics.
    pub metrics: Arc<Metrics>,
    /// The access log (off until [`crate::accesslog::AccessLog::switch`]).
    pub access_log: crate::accesslog::AccessLog,
    /// Per-connection and error counters, resolved once (no label lookup
    /// on the hot path).
    pub counters: Counters,
}

/// Metric handles with fixed label sets, resolved when the runtime is
/// built.
pub struct Counters {
    /// `portcullis_tls_handshakes_total` by version: 1.3, 1.2, other.
    handshakes: [IntCounter; 3],
    /// `portcullis_tls_handshake_failures_total`, indexed as
    /// [`HandshakeFailure::ALL`].
    handshake_failures: [IntCounter; 5],
    /// `portcullis_upstream_errors_total`, indexed as
    /// [`UpstreamErrorKind::ALL`].
    pub upstream_errors: [IntCounter; 3],
    /// Requests that matched no route (labels `-`).
    pub unrouted: RouteMetrics,
    /// `portcullis_connections_refused_total`, indexed as [`Refusal::ALL`].
    refused: [IntCounter; 3],
}

impl Counters {
    fn new(m: &Metrics) -> Counters {
        Counters {
            handshakes: ["TLSv1.3", "TLSv1.2", "other"]
                .map(|v| m.handshakes.with_label_values(&[v])),
            handshake_failures: HandshakeFailure::ALL
                .map(|r| m.handshake_failures.with_label_values(&[r.as_str()])),
            upstream_errors: UpstreamErrorKind::ALL
                .map(|k| m.upstream_errors.with_label_values(&[k.as_str()])),
            unrouted: RouteMetrics::default(),
            refused: Refusal::ALL.map(|r| m.connections_refused.with_label_values(&[r.as_str()])),
        }
    }

    /// Counts a connection refused at accept.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    /// Counts a completed handshake.
    pub fn handshake(&self, version: Option<rustls::ProtocolVersion>) {
        let i = match version {
            Some(rustls::ProtocolVersion::TLSv1_3) => 0,
            Some(rustls::ProtocolVersion::TLSv1_2) => 1,
            _ => 2,
        };
        self.handshakes[i].inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].inc();
    }
}

impl Runtime {
    /// Builds the runtime around loaded certificates.
    pub fn new(
        config: &Config,
        certs: Arc<CertStore>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Runtime>, rustls::Error> {
        let tls = tls::server_config(certs.clone())?;
        let rt = Arc::new(Runtime {
            snapshot: ArcSwap::from_pointee(Snapshot::from_config(config, None, &metrics)),
            certs,
            tls,
            health: HealthChecks::default(),
            conn_limit: Arc::new(Semaphore::new(config.limits.max_connections)),
            tracker: TaskTracker::new(),
            shutdown,
            admission: Default::default(),
            shedder: Default::default(),
            counters: Counters::new(&metrics),
            access_log: crate::accesslog::AccessLog::new(metrics.access_log_dropped.clone()),
            metrics,
        });
        let weak = Arc::downgrade(&rt);
        rt.metrics
            .register_collector(Box::new(Collector::new(Box::new(move || {
                weak.upgrade()
                    .map(|rt| rt.snapshot.load().groups().cloned().collect())
                    .unwrap_or_default()
            }))));
        rt.health.sync(rt.snapshot.load().groups(), &rt.shutdown);
        Ok(rt)
    }

    /// Builds the snapshot of `config`, carrying over the state of what
    /// did not change from the one in service.
    pub fn build(&self, config: &Config) -> Snapshot {
        Snapshot::from_config(config, Some(&self.snapshot.load()), &self.metrics)
    }

    /// Puts `snap` in service (one swap) and restarts the health checks
    /// of the upstream groups that changed.
    pub fn publish(&self, snap: Snapshot) {
        self.snapshot.store(Arc::new(snap));
        self.health
            .sync(self.snapshot.load().groups(), &self.shutdown);
    }
}
