//! What is known about one upstream (health, load, counters), read by
//! selection with atomics only, and the passive checks fed by real
//! traffic. Hot path. Carried across reloads for as long as the upstream
//! stays in its route.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use http::StatusCode;

use crate::config::{HealthCheck, PassiveHealth};

/// Names of an upstream in logs.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a> {
    /// Site name.
    pub site: &'a str,
    /// Route prefix.
    pub route: &'a str,
    /// `host:port` of the upstream.
    pub upstream: &'a str,
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
    pub(crate) fn passive_failure(&self, p: &PassiveHealth, now: u64, who: &Labels<'_>) {
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
                site = %who.site, route = %who.route, upstream = %who.upstream,
                failures = n, cooldown = ?p.cooldown,
                "upstream out of service (passive check): consecutive failures"
            );
        }
    }

    /// A request succeeded here: the failure streak ends, and an upstream
    /// back from its cool-down is fully in service again.
    #[inline]
    pub(crate) fn passive_success(&self, now: u64, who: &Labels<'_>) {
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
                site = %who.site, route = %who.route, upstream = %who.upstream,
                "upstream back in service (passive check): a request succeeded after the cool-down"
            );
        }
    }

    /// Records one active check; returns the new state when it changed.
    pub(crate) fn active_result(&self, ok: bool, hc: &HealthCheck) -> Option<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WHO: Labels<'static> = Labels {
        site: "s",
        route: "/",
        upstream: "127.0.0.1:1",
    };

    const P: PassiveHealth = PassiveHealth {
        failures: 3,
        window: Duration::from_secs(10),
        cooldown: Duration::from_secs(1),
    };

    #[test]
    fn passive_out_after_consecutive_failures_then_probation_after_the_cooldown() {
        let st = UpstreamState::default();
        st.passive_failure(&P, 1_000, &WHO);
        st.passive_failure(&P, 1_100, &WHO);
        assert!(st.in_service(1_100));
        st.passive_failure(&P, 1_200, &WHO);
        assert!(!st.in_service(1_200));
        assert!(!st.in_service(2_199));
        assert_eq!(st.cooldown_left(1_700), 500);
        // Cool-down over: in service again, and one failure takes it out.
        assert!(st.in_service(2_200));
        st.passive_failure(&P, 2_300, &WHO);
        assert!(!st.in_service(2_300));
        // After the next cool-down a success clears the streak: three
        // failures are needed again.
        st.passive_success(3_400, &WHO);
        assert!(st.in_service(3_400));
        st.passive_failure(&P, 3_500, &WHO);
        st.passive_failure(&P, 3_600, &WHO);
        assert!(st.in_service(3_600));
    }

    #[test]
    fn passive_failures_outside_the_window_do_not_add_up() {
        let (a, b) = (UpstreamState::default(), UpstreamState::default());
        for t in [0u64, 11_000, 22_000, 33_000] {
            a.passive_failure(&P, t + 1, &WHO);
            a.passive_failure(&P, t + 2, &WHO);
        }
        assert!(a.in_service(33_003));
        // A 5xx on one upstream does not touch the other.
        assert!(b.in_service(33_003));
        let off = PassiveHealth { failures: 0, ..P };
        for t in 0..10 {
            b.passive_failure(&off, t, &WHO);
        }
        assert!(b.in_service(10));
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
