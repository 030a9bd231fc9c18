//! Active health checks: one control-path task per group that has them,
//! stopped by a `CancellationToken`, and the `Retry-After` of a group with
//! no upstream in service.
//!
//! An upstream is in service when the active checks have not taken it out
//! (or there are none) and it is not inside a passive cool-down
//! ([`super::state`]). Every change of state is logged once, by whoever
//! made it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderValue, Method, Request};
use tokio_util::sync::CancellationToken;

use super::group::{Group, Upstream};
use crate::config::HealthCheck;
use crate::proxy::body::UpstreamBody;
use crate::proxy::error::error_chain;

/// One check of one upstream: `GET path` with the upstream's authority
/// as Host, a response head with the expected status within the timeout.
async fn check_once(up: &Upstream, hc: &HealthCheck) -> Result<(), String> {
    let host = up.tls_host().unwrap_or_else(|| up.label.to_string());
    let uri = format!(
        "{}://{}{}",
        up.target.uri.scheme_str().unwrap_or("http"),
        up.label,
        hc.path
    );
    let mut req = Request::new(UpstreamBody::empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri
        .parse()
        .map_err(|e| format!("bad check URI {uri}: {e}"))?;
    if up.settings.protocol == crate::config::UpstreamProtocol::Http1 {
        if let Ok(h) = HeaderValue::from_str(&host) {
            req.headers_mut().insert(header::HOST, h);
        }
    }
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("portcullis-health-check"),
    );
    let resp = match tokio::time::timeout(hc.timeout, up.client.request(req)).await {
        Err(_) => return Err(format!("no response within {:?}", hc.timeout)),
        Ok(Err(e)) => return Err(error_chain(&e)),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    // Drain a little of the body so the connection can be reused.
    let _ = tokio::time::timeout(hc.timeout, async {
        use http_body_util::BodyExt;
        let mut body = resp.into_body();
        let mut left = 64 * 1024usize;
        while let Some(Ok(f)) = body.frame().await {
            left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len()));
            if left == 0 {
                break;
            }
        }
    })
    .await;
    let ok = match hc.status {
        Some(want) => status == want,
        None => status.is_success(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

/// Checks every upstream of `group` each interval until `stop`.
async fn run_checks(group: Arc<Group>, hc: HealthCheck, stop: CancellationToken) {
    let hc = &hc;
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let checks = group.upstreams.iter().map(|up| async move {
            let r = check_once(up, hc).await;
            (up, r)
        });
        let results = tokio::select! {
            _ = stop.cancelled() => return,
            r = futures_util::future::join_all(checks) => r,
        };
        if stop.is_cancelled() {
            return;
        }
        for (up, r) in results {
            match (up.state.active_result(r.is_ok(), hc), r) {
                (Some(true), _) => tracing::info!(
                    site = %group.site, route = %group.route, upstream = %up.label,
                    passed = hc.healthy_threshold.get(),
                    "upstream back in service (active check)"
                ),
                (Some(false), Err(e)) => tracing::warn!(
                    site = %group.site, route = %group.route, upstream = %up.label,
                    failed = hc.unhealthy_threshold.get(), error = %e,
                    "upstream out of service (active check)"
                ),
                (_, Err(e)) => {
                    tracing::debug!(upstream = %up.label, error = %e, "health check failed")
                }
                _ => {}
            }
        }
    }
}

/// The running health-check tasks, one per group that has active checks.
/// Control path: the map is only touched when a snapshot is published.
#[derive(Default)]
pub struct HealthChecks {
    running: Mutex<HashMap<GroupKey, (Arc<Group>, CancellationToken)>>,
}

/// (site, route prefix): a group's identity across reloads.
type GroupKey = (Arc<str>, Arc<str>);

impl std::fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecks").finish_non_exhaustive()
    }
}

impl HealthChecks {
    /// Makes the running tasks match `groups`: a group that is the same
    /// object as before keeps its task; a new or changed one gets a new
    /// task (the old one is cancelled); tasks of groups that went away
    /// stop. Tasks are children of `parent` (the server's shutdown).
    /// Without a Tokio runtime (benchmarks, unit tests) nothing starts.
    pub fn sync<'a>(
        &self,
        groups: impl Iterator<Item = &'a Arc<Group>>,
        parent: &CancellationToken,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::new();
        for g in groups {
            let key = (g.site.clone(), g.route.clone());
            let Some(hc) = g.config.health_check.clone() else {
                // Checks removed: nothing may stay out on their account.
                if let Some((_, stop)) = running.remove(&key) {
                    stop.cancel();
                    g.upstreams.iter().for_each(|up| up.state.clear_active());
                }
                continue;
            };
            match running.remove(&key) {
                Some((old, stop)) if Arc::ptr_eq(&old, g) => {
                    next.insert(key, (old, stop));
                }
                old => {
                    if let Some((_, stop)) = old {
                        stop.cancel();
                    }
                    let stop = parent.child_token();
                    handle.spawn(run_checks(g.clone(), hc, stop.clone()));
                    next.insert(key, (g.clone(), stop));
                }
            }
        }
        for (_, (_, stop)) in running.drain() {
            stop.cancel();
        }
        *running = next;
    }

    /// Number of running check tasks.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Seconds a client should wait before trying a group that is all out:
/// the shortest passive cool-down left, or one active-check interval.
pub(crate) fn retry_after(group: &Group, now: u64) -> u64 {
    let mut best: Option<u64> = None;
    for up in group.upstreams.iter() {
        let ms = if up.state.actively_down() {
            group
                .config
                .health_check
                .as_ref()
                .map_or(1000, |h| h.interval.as_millis() as u64)
        } else {
            up.state.cooldown_left(now)
        };
        best = Some(best.map_or(ms, |b| b.min(ms)));
    }
    Duration::from_millis(best.unwrap_or(1000))
        .as_secs_f64()
        .ceil()
        .max(1.0) as u64
}
