//! An upstream group: the upstreams of a route with their pooled clients,
//! their health state and the balancer that picks one per request.
//!
//! A [`Group`] is built on the control path when a snapshot is built and
//! is immutable afterwards except for atomics. The state of an upstream
//! (health, in-flight count, counters) and its client (with its pool of
//! connections) are carried into the next snapshot for as long as the
//! upstream stays in its route, the same way rate limiters are. The hot
//! path ([`Group::pick`]) reads atomics only.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::HeaderValue;

use super::balance::{self, Balancer};
use super::client::{ClientSettings, UpstreamClient};
use super::state::{Labels, UpstreamState};
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
    /// Its names in logs, within `group`.
    pub(crate) fn labels<'a>(&'a self, group: &'a Group) -> Labels<'a> {
        Labels {
            site: &group.site,
            route: &group.route,
            upstream: &self.label,
        }
    }

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
