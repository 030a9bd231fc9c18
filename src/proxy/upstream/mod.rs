//! Upstream groups: the upstreams of a route with their pooled clients,
//! their health state and the balancer that picks one per request; the
//! forwarding with retries; active and passive health checks; and the
//! per-upstream metrics.
//!
//! A [`Group`] is built on the control path when a snapshot is built and
//! is immutable afterwards except for atomics. The state of an upstream
//! (health, in-flight count, counters) and its client (with its pool of
//! connections) are carried into the next snapshot for as long as the
//! upstream stays in its route, the same way rate limiters are. The hot
//! path (`Group::pick`, [`forward`]) reads atomics only.

pub mod balance;
pub mod client;
pub(crate) mod forward;
pub mod health;
pub mod pool;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use http::HeaderValue;
use prometheus::core::Desc;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

pub use balance::Balancer;
pub use client::{ClientSettings, UpstreamBody, UpstreamClient};
pub use health::{HealthChecks, InFlight, UpstreamState};
pub use pool::{UpstreamError, UpstreamIncoming};

use crate::config::{Limits, Timeouts, UpstreamConfig, UpstreamProtocol, UpstreamTarget};

/// One upstream of a group.
pub struct Upstream {
    /// `host:port` as configured: metric label and access-log field.
    pub label: Arc<str>,
    /// Address and weight.
    pub target: UpstreamTarget,
    /// What its client was built from (compared on reload).
    pub settings: ClientSettings,
    /// Pooled connections to it.
    pub client: UpstreamClient,
    /// Health, load and counters; survives reloads.
    pub state: Arc<UpstreamState>,
    /// `host:port` as a header value: the `Host` (or `:authority`) sent
    /// when the route does not preserve the client's.
    pub authority: HeaderValue,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The host a health check names: the TLS server name when one is
    /// configured (a virtual-hosted upstream), else `host:port`.
    pub(crate) fn tls_host(&self) -> Option<String> {
        self.settings
            .tls
            .as_ref()
            .and_then(|t| t.server_name.clone())
    }
}

/// The upstreams of one route.
pub struct Group {
    /// Site name (metric label).
    pub site: Arc<str>,
    /// Route prefix (metric label).
    pub route: Arc<str>,
    /// The validated settings it was built from.
    pub config: UpstreamConfig,
    /// The upstreams, in config order.
    pub upstreams: Box<[Upstream]>,
    /// Picks one per request.
    pub balancer: Balancer,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("site", &self.site)
            .field("route", &self.route)
            .field("upstreams", &self.upstreams)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// The group of a route. `previous` is the same route's group in the
    /// snapshot being replaced: when nothing changed it is returned as is
    /// (its health-check task keeps running); otherwise upstreams that
    /// remain keep their state, and their client when its settings are
    /// the same.
    pub fn reuse_or_build(
        site: &Arc<str>,
        route: &str,
        config: &UpstreamConfig,
        timeouts: &Timeouts,
        limits: &Limits,
        previous: Option<&Arc<Group>>,
    ) -> Arc<Group> {
        let settings = |t: &UpstreamTarget| {
            ClientSettings::new(t, config.protocol, config.tls.as_ref(), timeouts, limits)
        };
        if let Some(p) = previous {
            if p.config == *config
                && p.upstreams
                    .iter()
                    .zip(&config.targets)
                    .all(|(u, t)| u.settings == settings(t))
            {
                return p.clone();
            }
        }
        let upstreams: Vec<Upstream> = config
            .targets
            .iter()
            .map(|t| {
                let settings = settings(t);
                let old = previous.and_then(|p| p.upstreams.iter().find(|u| u.target.uri == t.uri));
                let client = match old {
                    Some(o) if o.settings == settings => o.client.clone(),
                    _ => settings.build(),
                };
                let label: Arc<str> = t.label().into();
                Upstream {
                    authority: HeaderValue::from_str(&label)
                        .unwrap_or(HeaderValue::from_static("invalid")),
                    label,
                    target: t.clone(),
                    settings,
                    client,
                    state: old.map(|o| o.state.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let weights: Vec<u32> = config.targets.iter().map(|t| t.weight.get()).collect();
        let ids: Vec<u64> = upstreams
            .iter()
            .map(|u| balance::hash_bytes(u.label.as_bytes()))
            .collect();
        Arc::new(Group {
            site: site.clone(),
            route: route.into(),
            balancer: Balancer::new(&config.lb, &weights, &ids),
            config: config.clone(),
            upstreams: upstreams.into(),
        })
    }

    /// Picks an upstream in service and not in `tried`, for a request
    /// whose hash key is `key`. `None`: every candidate is out.
    #[inline]
    pub fn pick(&self, key: u64, tried: &[usize], now: u64) -> Option<usize> {
        self.balancer.pick(
            key,
            |i| self.upstreams[i].state.in_service(now) && !tried.contains(&i),
            |i| self.upstreams[i].state.in_flight.load(Ordering::Relaxed),
        )
    }

    /// Whether requests are sent as HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.config.protocol != UpstreamProtocol::Http1
    }
}

/// Renders the per-upstream series at scrape time from the snapshot in
/// service, so upstreams removed by a reload disappear from `/metrics`
/// and a cool-down that ended shows as healthy without any event.
pub struct Collector {
    rt: Weak<crate::proxy::Runtime>,
    descs: Vec<Desc>,
}

/// Metric names.
pub mod names {
    /// 1 while an upstream is in service, 0 while out.
    pub const HEALTHY: &str = "portcullis_upstream_healthy";
    /// Attempts by upstream and status class (`error`: no response).
    pub const REQUESTS: &str = "portcullis_upstream_requests_total";
    /// Requests in flight per upstream.
    pub const IN_FLIGHT: &str = "portcullis_upstream_in_flight";
    /// Retries made after an attempt on an upstream failed.
    pub const RETRIES: &str = "portcullis_upstream_retries_total";
}

const FAMILIES: [(&str, &str, bool); 4] = [
    (
        names::HEALTHY,
        "1 while an upstream is in service (active and passive checks), 0 while out",
        false,
    ),
    (
        names::REQUESTS,
        "Requests sent to each upstream by status class (error: no response)",
        true,
    ),
    (names::IN_FLIGHT, "Requests in flight per upstream", false),
    (
        names::RETRIES,
        "Retries made on another upstream after an attempt on this one failed",
        true,
    ),
];

impl Collector {
    /// A collector over the runtime's current snapshot.
    pub fn new(rt: Weak<crate::proxy::Runtime>) -> Collector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                let mut labels = vec![
                    "site".to_string(),
                    "route".to_string(),
                    "upstream".to_string(),
                ];
                if *name == names::REQUESTS {
                    labels.push("status".into());
                }
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels,
                    Default::default(),
                )
                .expect("valid metric")
            })
            .collect();
        Collector { rt, descs }
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

impl prometheus::core::Collector for Collector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(rt) = self.rt.upgrade() else {
            return Vec::new();
        };
        let snap = rt.snapshot.load();
        let now = health::now_ms();
        let mut series: [Vec<Metric>; 4] = Default::default();
        for site in &snap.site_list {
            for route in &site.routes {
                let Some(g) = &route.upstream else { continue };
                for up in g.upstreams.iter() {
                    let base = || {
                        vec![
                            label("site", &g.site),
                            label("route", &g.route),
                            label("upstream", &up.label),
                        ]
                    };
                    let gauge = |labels: Vec<LabelPair>, v: f64| {
                        let mut m = Metric::from_label(labels);
                        let mut x = Gauge::default();
                        x.set_value(v);
                        m.set_gauge(x);
                        m
                    };
                    let counter = |labels: Vec<LabelPair>, v: u64| {
                        let mut m = Metric::from_label(labels);
                        let mut x = Counter::default();
                        x.set_value(v as f64);
                        m.set_counter(x);
                        m
                    };
                    let st = &up.state;
                    series[0].push(gauge(base(), if st.in_service(now) { 1.0 } else { 0.0 }));
                    for (i, class) in health::CLASSES.iter().enumerate() {
                        let mut l = base();
                        l.push(label("status", class));
                        series[1].push(counter(l, st.counts[i].load(Ordering::Relaxed)));
                    }
                    series[2].push(gauge(base(), st.in_flight.load(Ordering::Relaxed) as f64));
                    series[3].push(counter(base(), st.retried.load(Ordering::Relaxed)));
                }
            }
        }
        FAMILIES
            .iter()
            .zip(series)
            .map(|((name, help, is_counter), metrics)| {
                let mut f = MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(if *is_counter {
                    MetricType::COUNTER
                } else {
                    MetricType::GAUGE
                });
                f.set_metric(metrics);
                f
            })
            .collect()
    }
}
