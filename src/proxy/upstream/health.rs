//! Upstream health: the per-upstream state read by selection (atomics
//! only), passive checks fed by real traffic, and the active checks (one
//! control-path task per group, stopped by a `CancellationToken`).
//!
//! An upstream is in service when the active checks have not taken it out
//! (or there are none) and it is not inside a passive cool-down. Every
//! change of state is logged once, by whoever made it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, StatusCode};
use tokio_util::sync::CancellationToken;

use super::client::UpstreamBody;
use super::{Group, Upstream};
use crate::config::{HealthCheck, PassiveHealth};

/// Milliseconds on the process-wide health clock (monotonic; shared by
/// every snapshot so carried-over cool-downs stay meaningful).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Status classes counted per upstream: 1xx..5xx, then transport errors.
pub(crate) const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// What is known about one upstream; carried across reloads for as long
/// as the upstream stays in its route.
#[derive(Debug)]
pub struct UpstreamState {
    /// Requests sent and not finished (response body included).
    pub in_flight: AtomicU64,
    /// The active checks' verdict (true when there are none).
    active_up: AtomicBool,
    /// End of the passive cool-down on the health clock; 0: not in one.
    down_until: AtomicU64,
    /// Consecutive failures in the current window.
    fails: AtomicU32,
    /// When the current failure window started.
    window_start: AtomicU64,
    /// Consecutive passed / failed active checks.
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Attempts by status class ([`CLASSES`]).
    pub(crate) counts: [AtomicU64; 6],
    /// Retries made after an attempt on this upstream failed.
    pub(crate) retried: AtomicU64,
}

impl Default for UpstreamState {
    fn default() -> Self {
        UpstreamState {
            in_flight: AtomicU64::new(0),
            active_up: AtomicBool::new(true),
            down_until: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            window_start: AtomicU64::new(0),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            counts: Default::default(),
            retried: AtomicU64::new(0),
        }
    }
}

impl UpstreamState {
    /// Whether selection may send a request here at `now`.
    #[inline]
    pub fn in_service(&self, now: u64) -> bool {
        self.active_up.load(Ordering::Relaxed) && self.down_until.load(Ordering::Relaxed) <= now
    }

    /// Whether the active checks hold it out.
    pub fn actively_down(&self) -> bool {
        !self.active_up.load(Ordering::Relaxed)
    }

    /// Milliseconds left of the passive cool-down at `now` (0 if none).
    pub fn cooldown_left(&self, now: u64) -> u64 {
        self.down_until.load(Ordering::Relaxed).saturating_sub(now)
    }

    /// Counts an attempt that got a response with `status`.
    #[inline]
    pub(crate) fn count_status(&self, status: StatusCode) {
        let i = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an attempt that failed without a response.
    #[inline]
    pub(crate) fn count_error(&self) {
        self.counts[5].fetch_add(1, Ordering::Relaxed);
    }

    /// A request failed here (connect error, timeout, reset, 5xx). After
    /// `failures` of them in a row within `window`, the upstream is out for
    /// `cooldown`; then it is tried again, and one more failure right after
    /// puts it back out.
    pub(crate) fn passive_failure(
        &self,
        p: &PassiveHealth,
        now: u64,
        who: &Upstream,
        group: &Group,
    ) {
        if p.failures == 0 {
            return;
        }
        let window = p.window.as_millis() as u64;
        let start = self.window_start.load(Ordering::Relaxed);
        let n = if now.saturating_sub(start) > window {
            self.window_start.store(now, Ordering::Relaxed);
            self.fails.store(1, Ordering::Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if n < p.failures {
            return;
        }
        let prev = self.down_until.load(Ordering::Relaxed);
        if prev > now {
            return; // already out
        }
        let until = now + p.cooldown.as_millis() as u64;
        if self
            .down_until
            .compare_exchange(prev, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // On probation once the cool-down ends: one failure is enough.
            self.fails.store(p.failures - 1, Ordering::Relaxed);
            self.window_start.store(until, Ordering::Relaxed);
            tracing::warn!(
                site = %group.site, route = %group.route, upstream = %who.label,
                failures = n, cooldown = ?p.cooldown,
                "upstream out of service (passive check): consecutive failures"
            );
        }
    }

    /// A request succeeded here: the failure streak ends, and an upstream
    /// back from its cool-down is fully in service again.
    #[inline]
    pub(crate) fn passive_success(&self, now: u64, who: &Upstream, group: &Group) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
        let until = self.down_until.load(Ordering::Relaxed);
        if until != 0
            && until <= now
            && self
                .down_until
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                site = %group.site, route = %group.route, upstream = %who.label,
                "upstream back in service (passive check): a request succeeded after the cool-down"
            );
        }
    }

    /// Records one active check; returns the new state when it changed.
    fn active_result(&self, ok: bool, hc: &HealthCheck) -> Option<bool> {
        if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let n = self.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= hc.healthy_threshold.get() && !self.active_up.swap(true, Ordering::AcqRel) {
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let n = self.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= hc.unhealthy_threshold.get() && self.active_up.swap(false, Ordering::AcqRel) {
                return Some(false);
            }
        }
        None
    }

    /// Back in service with no history: a group that drops its active
    /// checks must not keep an upstream out on their last verdict.
    pub(crate) fn clear_active(&self) {
        self.active_up.store(true, Ordering::Release);
        self.ok_streak.store(0, Ordering::Relaxed);
        self.fail_streak.store(0, Ordering::Relaxed);
    }
}

/// Counts an upstream request in flight until dropped (the response body
/// holds it, so least-requests sees streaming responses as load).
#[derive(Debug)]
pub struct InFlight(Arc<UpstreamState>);

impl InFlight {
    pub(crate) fn start(state: &Arc<UpstreamState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

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
        Ok(Err(e)) => return Err(super::forward::error_chain(&e)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, Timeouts, UpstreamConfig, UpstreamTarget};

    fn group() -> Arc<Group> {
        let mut cfg = UpstreamConfig::single("http://127.0.0.1:1/".parse().unwrap());
        cfg.targets.push(UpstreamTarget {
            uri: "http://127.0.0.1:2/".parse().unwrap(),
            weight: std::num::NonZeroU32::MIN,
        });
        Group::reuse_or_build(
            &"s".into(),
            "/",
            &cfg,
            &Timeouts::default(),
            &Limits::default(),
            None,
        )
    }

    const P: PassiveHealth = PassiveHealth {
        failures: 3,
        window: Duration::from_secs(10),
        cooldown: Duration::from_secs(1),
    };

    #[test]
    fn passive_out_after_consecutive_failures_then_probation_after_the_cooldown() {
        let g = group();
        let up = &g.upstreams[0];
        let st = &up.state;
        st.passive_failure(&P, 1_000, up, &g);
        st.passive_failure(&P, 1_100, up, &g);
        assert!(st.in_service(1_100));
        st.passive_failure(&P, 1_200, up, &g);
        assert!(!st.in_service(1_200));
        assert!(!st.in_service(2_199));
        assert_eq!(st.cooldown_left(1_700), 500);
        // Cool-down over: in service again, and one failure takes it out.
        assert!(st.in_service(2_200));
        st.passive_failure(&P, 2_300, up, &g);
        assert!(!st.in_service(2_300));
        // After the next cool-down a success clears the streak: three
        // failures are needed again.
        st.passive_success(3_400, up, &g);
        assert!(st.in_service(3_400));
        st.passive_failure(&P, 3_500, up, &g);
        st.passive_failure(&P, 3_600, up, &g);
        assert!(st.in_service(3_600));
    }

    #[test]
    fn passive_failures_outside_the_window_do_not_add_up() {
        let g = group();
        let up = &g.upstreams[0];
        for t in [0u64, 11_000, 22_000, 33_000] {
            up.state.passive_failure(&P, t + 1, up, &g);
            up.state.passive_failure(&P, t + 2, up, &g);
        }
        assert!(up.state.in_service(33_003));
        // A 5xx on one upstream does not touch the other.
        assert!(g.upstreams[1].state.in_service(33_003));
        let off = PassiveHealth { failures: 0, ..P };
        for t in 0..10 {
            g.upstreams[1]
                .state
                .passive_failure(&off, t, &g.upstreams[1], &g);
        }
        assert!(g.upstreams[1].state.in_service(10));
    }

    #[test]
    fn active_thresholds_count_consecutive_results() {
        let hc = HealthCheck {
            path: "/".into(),
            status: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: std::num::NonZeroU32::new(2).unwrap(),
            unhealthy_threshold: std::num::NonZeroU32::new(3).unwrap(),
        };
        let st = UpstreamState::default();
        assert_eq!(st.active_result(false, &hc), None);
        assert_eq!(st.active_result(false, &hc), None);
        assert_eq!(st.active_result(true, &hc), None); // streak broken
        assert_eq!(st.active_result(false, &hc), None);
        assert_eq!(st.active_result(false, &hc), None);
        assert_eq!(st.active_result(false, &hc), Some(false));
        assert!(st.actively_down() && !st.in_service(0));
        assert_eq!(st.active_result(false, &hc), None); // logged once
        assert_eq!(st.active_result(true, &hc), None);
        assert_eq!(st.active_result(true, &hc), Some(true));
        assert_eq!(st.active_result(true, &hc), None);
        assert!(st.in_service(0));
    }
}
