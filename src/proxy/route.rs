//! The route table: building the snapshot a request reads (sites by host,
//! routes by prefix, their limiters, upstream groups and metric handles)
//! from a validated config. Control path; the hot path only reads what it
//! builds. A reload builds a new [`Snapshot`] carrying over the state
//! (limiter buckets, upstream health and pools) of what did not change.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;

use super::ratelimit;
use super::upstream;
use crate::config::{Config, Limits, RouteAction, Timeouts};
use crate::hostmap::HostMap;
use crate::metrics::{Metrics, RouteMetrics};

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
    pub metrics: RouteMetrics,
    /// `portcullis_ratelimit_limited_total` of each limit (same order as
    /// `limits`), resolved when the route is built.
    pub limited: Vec<IntCounter>,
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
    pub fn from_config(
        config: &Config,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Snapshot {
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
                        let limits: Vec<Arc<ratelimit::Limiter>> = r
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
                        let limited = limits
                            .iter()
                            .map(|l| {
                                let mode = if l.config.shadow { "shadow" } else { "enforce" };
                                metrics.ratelimit_limited.with_label_values(&[
                                    &name,
                                    r.path.as_str(),
                                    l.config.name.as_str(),
                                    mode,
                                ])
                            })
                            .collect();
                        Route {
                            prefix: r.path.clone(),
                            action: r.action.clone(),
                            limits,
                            upstream,
                            metrics: Default::default(),
                            limited,
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
