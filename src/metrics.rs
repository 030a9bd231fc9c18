//! Metrics: one place, one `Registry` per server (tests stay isolated),
//! names are constants, labels are bounded (config names, status classes,
//! fixed reasons; never client addresses, paths or SNI from the network).
//!
//! Certificate series are not stored: they are rendered at scrape time from
//! the certificate store, so a replaced certificate's series disappear in
//! the same scrape the new ones appear, and `*_expiry_seconds` is exact.
//! Traffic counters are updated on the hot path (atomic adds only).

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::certstore::{CertStore, ChainEntry};

/// Metric names.
pub mod names {
    /// Leaf/intermediate end of validity.
    pub const CERT_NOT_AFTER: &str = "portcullis_tls_cert_not_after_timestamp_seconds";
    /// Leaf/intermediate start of validity.
    pub const CERT_NOT_BEFORE: &str = "portcullis_tls_cert_not_before_timestamp_seconds";
    /// Seconds left, computed at scrape time.
    pub const CERT_EXPIRY: &str = "portcullis_tls_cert_expiry_seconds";
    /// Certificate reload outcomes.
    pub const CERT_RELOADS: &str = "portcullis_tls_cert_reloads_total";
    /// Last successful certificate replacement.
    pub const CERT_LAST_RELOAD: &str = "portcullis_tls_cert_last_reload_success_timestamp_seconds";
    /// 1 while the file on disk differs from what is served and could not be loaded.
    pub const CERT_RELOAD_PENDING: &str = "portcullis_tls_cert_reload_pending_error";
    /// ACME orders by site and result.
    pub const ACME_RENEWALS: &str = "portcullis_acme_renewals_total";
    /// When each ACME certificate will next be renewed (or retried).
    pub const ACME_NEXT_RENEWAL: &str = "portcullis_acme_next_renewal_timestamp_seconds";
    /// Access-log lines lost: the queue to the writer was full, or the write failed.
    pub const ACCESS_LOG_DROPPED: &str = "portcullis_access_log_dropped_total";
}

/// Traffic and control-plane metrics of one server.
pub struct Metrics {
    registry: Registry,
    /// Requests by site, route, method, status class.
    pub requests: IntCounterVec,
    /// Latency (to response head) by site and route.
    pub latency: HistogramVec,
    /// Requests being served.
    pub in_flight: IntGauge,
    /// Open downstream connections.
    pub connections: IntGauge,
    /// Completed TLS handshakes by protocol version.
    pub handshakes: IntCounterVec,
    /// Failed TLS handshakes by reason.
    pub handshake_failures: IntCounterVec,
    /// Upstream failures by kind (`connect`, `timeout`, `protocol`).
    pub upstream_errors: IntCounterVec,
    /// Config reloads by result.
    pub config_reloads: IntCounterVec,
    /// Requests refused before routing (malformed/ambiguous).
    pub bad_requests: IntCounter,
    /// Connections closed as soon as accepted, by reason (per-address and
    /// handshake budgets).
    pub connections_refused: IntCounterVec,
    /// Idle keep-alive connections closed to admit new ones at the
    /// connection cap.
    pub connections_shed: IntCounter,
    /// Requests over a rate limit, by site, route, limit and mode
    /// (`enforce`: rejected with 429; `shadow`: logged only).
    pub ratelimit_limited: IntCounterVec,
    /// Keys tracked per limit (after the last purge).
    pub ratelimit_tracked: IntGaugeVec,
    /// ACME orders by site and result (`success`, `failure`); both series
    /// exist from the start for every ACME site.
    pub acme_renewals: IntCounterVec,
    /// Access-log lines lost (queue full or write failed); 0 under normal load.
    pub access_log_dropped: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "portcullis_http_requests_total",
                "HTTP requests by site, route, method and status class",
            ),
            &["site", "route", "method", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "portcullis_http_request_duration_seconds",
                "Time from request received to response head sent, by site and route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["site", "route"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new(
            "portcullis_http_requests_in_flight",
            "Requests being served",
        )
        .expect("valid metric");
        let connections =
            IntGauge::new("portcullis_connections_open", "Open downstream connections")
                .expect("valid metric");
        let handshakes = IntCounterVec::new(
            Opts::new(
                "portcullis_tls_handshakes_total",
                "Completed TLS handshakes by protocol version",
            ),
            &["version"],
        )
        .expect("valid metric");
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "portcullis_tls_handshake_failures_total",
                "Failed TLS handshakes by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "portcullis_upstream_errors_total",
                "Upstream failures by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "portcullis_config_reloads_total",
                "Configuration reloads by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let bad_requests = IntCounter::new(
            "portcullis_http_bad_requests_total",
            "Requests refused with 400 before routing (ambiguous framing, bad Host)",
        )
        .expect("valid metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "portcullis_connections_refused_total",
                "Connections closed as soon as accepted, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let connections_shed = IntCounter::new(
            "portcullis_connections_shed_total",
            "Idle keep-alive connections closed to admit new ones at the connection cap",
        )
        .expect("valid metric");
        let ratelimit_limited = IntCounterVec::new(
            Opts::new(
                "portcullis_ratelimit_limited_total",
                "Requests over a rate limit by site, route, limit and mode",
            ),
            &["site", "route", "limit", "mode"],
        )
        .expect("valid metric");
        let ratelimit_tracked = IntGaugeVec::new(
            Opts::new(
                "portcullis_ratelimit_tracked_keys",
                "Keys tracked per rate limit (after the last purge)",
            ),
            &["site", "route", "limit"],
        )
        .expect("valid metric");
        let acme_renewals = IntCounterVec::new(
            Opts::new(
                names::ACME_RENEWALS,
                "ACME certificate orders by site and result",
            ),
            &["name", "result"],
        )
        .expect("valid metric");
        let access_log_dropped = IntCounter::new(
            names::ACCESS_LOG_DROPPED,
            "Access-log lines lost because the queue to the writer was full or the write failed",
        )
        .expect("valid metric");
        for c in [
            Box::new(acme_renewals.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(access_log_dropped.clone()),
            Box::new(ratelimit_limited.clone()),
            Box::new(ratelimit_tracked.clone()),
            Box::new(requests.clone()),
            Box::new(latency.clone()),
            Box::new(in_flight.clone()),
            Box::new(connections.clone()),
            Box::new(handshakes.clone()),
            Box::new(handshake_failures.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(config_reloads.clone()),
            Box::new(bad_requests.clone()),
            Box::new(connections_refused.clone()),
            Box::new(connections_shed.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "portcullis",
            );
            let _ = registry.register(Box::new(pc));
        }
        Metrics {
            registry,
            requests,
            latency,
            in_flight,
            connections,
            handshakes,
            handshake_failures,
            upstream_errors,
            config_reloads,
            bad_requests,
            connections_refused,
            connections_shed,
            ratelimit_limited,
            ratelimit_tracked,
            acme_renewals,
            access_log_dropped,
        }
    }

    /// Adds a collector whose series are computed at scrape time (the
    /// per-upstream series read the snapshot in service).
    pub fn register_collector(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "metric collector not registered");
        }
    }

    /// The Prometheus text exposition of everything, certificates included.
    pub fn render(&self, certs: &CertStore) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut out = String::from_utf8(buf).unwrap_or_default();
        render_certs(&mut out, certs, SystemTime::now());
        out
    }
}

fn secs(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as f64,
        Err(e) => -(e.duration().as_secs() as f64),
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends the certificate families, computed from what is in service now.
pub fn render_certs(out: &mut String, certs: &CertStore, now: SystemTime) {
    struct Row<'a> {
        labels: String,
        entry: &'a ChainEntry,
    }
    let slots = certs.slots();
    let served: Vec<_> = slots.iter().map(|s| (s, s.current())).collect();
    let mut rows = Vec::new();
    for (slot, cur) in &served {
        let Some(cur) = cur else { continue };
        let domain = slot
            .hosts
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        let labels = |entry: &'static str, e: &'_ ChainEntry| -> String {
            format!(
                "name=\"{}\",domain=\"{}\",issuer=\"{}\",serial=\"{}\",source=\"{}\",position=\"{}\"",
                escape(&slot.name),
                escape(&domain),
                escape(&e.issuer_cn),
                escape(&e.serial),
                slot.source.label(),
                entry
            )
        };
        rows.push(Row {
            labels: labels("leaf", &cur.info.leaf),
            entry: &cur.info.leaf,
        });
        // A self-signed root sent along is not an intermediate; clients
        // ignore it, and so does expiry alerting.
        for i in cur
            .info
            .intermediates
            .iter()
            .filter(|i| i.subject != i.issuer_cn)
        {
            rows.push(Row {
                labels: labels("intermediate", i),
                entry: i,
            });
        }
    }
    let mut family = |name: &str, help: &str, value: &dyn Fn(&ChainEntry) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for r in &rows {
            let _ = writeln!(out, "{name}{{{}}} {}", r.labels, value(r.entry));
        }
    };
    family(
        names::CERT_NOT_AFTER,
        "End of validity of each certificate in service (leaf and intermediates)",
        &|e| secs(e.not_after),
    );
    family(
        names::CERT_NOT_BEFORE,
        "Start of validity of each certificate in service",
        &|e| secs(e.not_before),
    );
    family(
        names::CERT_EXPIRY,
        "Seconds until each certificate in service expires (negative once expired)",
        &|e| secs(e.not_after) - secs(now),
    );

    let st = &certs.stats;
    let ok = st.reloads_ok.load(std::sync::atomic::Ordering::Relaxed);
    let failed = st.reloads_failed.load(std::sync::atomic::Ordering::Relaxed);
    let last = st.last_success.load(std::sync::atomic::Ordering::Relaxed);
    let n = names::CERT_RELOADS;
    let _ = writeln!(
        out,
        "# HELP {n} Certificate replacements by result\n# TYPE {n} counter\n{n}{{result=\"success\"}} {ok}\n{n}{{result=\"failure\"}} {failed}"
    );
    let n = names::CERT_LAST_RELOAD;
    let _ = writeln!(out, "# HELP {n} Unix time of the last certificate replacement put in service\n# TYPE {n} gauge\n{n} {last}");
    let n = names::CERT_RELOAD_PENDING;
    let _ = writeln!(
        out,
        "# HELP {n} 1 while a certificate's files differ from what is served and cannot be loaded\n# TYPE {n} gauge"
    );
    // Files only: an ACME or internal failure is a renewal problem, counted
    // by its own metrics, not a file on disk that cannot be loaded.
    for (slot, _) in served
        .iter()
        .filter(|(s, _)| matches!(s.source, crate::certstore::CertSource::File { .. }))
    {
        let pending = slot.status().last_error.is_some() as u8;
        let _ = writeln!(
            out,
            "{n}{{name=\"{}\",source=\"{}\"}} {pending}",
            escape(&slot.name),
            slot.source.label()
        );
    }
    let n = names::ACME_NEXT_RENEWAL;
    let _ = writeln!(
        out,
        "# HELP {n} Unix time of the next renewal attempt of each ACME certificate (the retry time after a failure)\n# TYPE {n} gauge"
    );
    for (slot, _) in &served {
        if let (crate::certstore::CertSource::Acme { .. }, Some(at)) =
            (&slot.source, slot.status().next_renewal)
        {
            let _ = writeln!(out, "{n}{{name=\"{}\"}} {}", escape(&slot.name), secs(at));
        }
    }
}

/// The bounded method labels, in [`method_index`] order.
const METHOD_LABELS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];

/// The status class labels, in [`class_index`] order.
const CLASS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

fn class_index(s: u16) -> usize {
    match s {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Bounded method label.
pub fn method_label(m: &http::Method) -> &'static str {
    METHOD_LABELS[method_index(m)]
}

/// `2xx`, `4xx`, ...
pub fn status_class(s: u16) -> &'static str {
    CLASS_LABELS[class_index(s)]
}

/// One route's request counters and latency histogram, each looked up in
/// its vector once (the first time it is used) instead of on every
/// request: `with_label_values` hashes the labels and takes a read lock.
/// A series appears in `/metrics` once it has counted something, as with
/// direct lookups. Built with the route, so a reload starts a fresh cache
/// (the series themselves live on in the registry).
#[derive(Debug)]
pub struct RouteMetrics {
    latency: OnceLock<Histogram>,
    requests: [OnceLock<IntCounter>; METHOD_LABELS.len() * CLASS_LABELS.len()],
}

impl Default for RouteMetrics {
    fn default() -> Self {
        RouteMetrics {
            latency: OnceLock::new(),
            requests: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl RouteMetrics {
    /// Counts one request of `site`/`route` and observes its time to
    /// response head.
    pub fn record(
        &self,
        m: &Metrics,
        site: &str,
        route: &str,
        method: &http::Method,
        status: u16,
        seconds: f64,
    ) {
        let (mi, ci) = (method_index(method), class_index(status));
        self.requests[mi * CLASS_LABELS.len() + ci]
            .get_or_init(|| {
                m.requests
                    .with_label_values(&[site, route, METHOD_LABELS[mi], CLASS_LABELS[ci]])
            })
            .inc();
        self.latency
            .get_or_init(|| m.latency.with_label_values(&[site, route]))
            .observe(seconds);
    }
}
