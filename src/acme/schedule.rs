//! When to renew and when to retry: pure functions of the certificate's
//! dates, the CA's renewal window and the failure count, so the policy is
//! unit-tested without a clock. Control path.

use std::time::{Duration, SystemTime};

use crate::config::RenewBefore;

/// Past this fraction of its lifetime left (1/50), a certificate is in
/// emergency: retries come faster.
const EMERGENCY_DIVISOR: u32 = 50;

/// When a certificate without renewal information should be renewed.
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: RenewBefore,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_after - renew_before.lead(lifetime)
}

/// Whether less than 1/50 of the lifetime is left at `now`.
pub fn in_emergency(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let left = not_after.duration_since(now).unwrap_or_default();
    left < lifetime / EMERGENCY_DIVISOR
}

/// Delay before retry number `failures` (1 after the first failure):
/// `base` doubling each time, capped at `max`, spread by ±25 % with `jitter`
/// (a number in [0, 1)). In emergency (`left` = what is left of the
/// certificate's life) the cap shrinks to a tenth of what is left, never
/// below `base`, so the last hours are not spent waiting.
pub fn backoff(
    failures: u32,
    base: Duration,
    max: Duration,
    left: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let mut d = base.saturating_mul(1u32 << exp.min(20)).min(max);
    if let Some(left) = left {
        d = d.min((left / 10).max(base));
    }
    let spread = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
    d.mul_f64(spread).max(Duration::from_millis(100))
}

/// A uniformly random time in the CA's suggested window (`r` in [0, 1)); a
/// window already started means now-or-later, one already over means now.
pub fn pick_in_window(start: SystemTime, end: SystemTime, now: SystemTime, r: f64) -> SystemTime {
    if end <= now {
        return now;
    }
    let start = start.max(now);
    let span = end.duration_since(start).unwrap_or_default();
    start + span.mul_f64(r.clamp(0.0, 1.0))
}

/// A random number in [0, 1) for jitter. Not cryptographic; it only
/// spreads retries so many proxies do not hit a CA at the same instant.
pub fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn renews_when_a_third_is_left_or_a_fixed_lead() {
        let nb = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let na = nb + 90 * DAY;
        assert_eq!(
            renewal_time(nb, na, RenewBefore::Fraction { num: 1, den: 3 }),
            nb + 60 * DAY
        );
        assert_eq!(
            renewal_time(nb, na, RenewBefore::Duration(30 * DAY)),
            nb + 60 * DAY
        );
        // A lead longer than the lifetime means "renew at once".
        assert_eq!(renewal_time(nb, na, RenewBefore::Duration(100 * DAY)), nb);
    }

    #[test]
    fn emergency_is_the_last_fiftieth() {
        let nb = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let na = nb + 50 * DAY;
        assert!(!in_emergency(nb, na, na - 2 * DAY));
        assert!(in_emergency(nb, na, na - DAY / 2));
        assert!(in_emergency(nb, na, na + DAY));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let base = Duration::from_secs(60);
        let max = Duration::from_secs(4 * 3600);
        let mid = |n| backoff(n, base, max, None, 0.5);
        assert_eq!(mid(1), base);
        assert_eq!(mid(2), 2 * base);
        assert_eq!(mid(5), 16 * base);
        assert_eq!(mid(30), max);
        assert_eq!(mid(u32::MAX), max);
        assert_eq!(backoff(3, base, max, None, 0.0), (4 * base).mul_f64(0.75));
        assert!(backoff(3, base, max, None, 0.999_999) < (4 * base).mul_f64(1.25));
        // Emergency: 2 h left caps the delay at 12 min; with 1 min left it
        // is still never below the base.
        assert_eq!(
            backoff(30, base, max, Some(Duration::from_secs(7200)), 0.5),
            Duration::from_secs(720)
        );
        assert_eq!(
            backoff(30, base, max, Some(Duration::from_secs(60)), 0.5),
            base
        );
    }

    #[test]
    fn window_pick_stays_inside_and_handles_the_past() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let (s, e) = (now + DAY, now + 2 * DAY);
        assert_eq!(pick_in_window(s, e, now, 0.0), s);
        assert_eq!(pick_in_window(s, e, now, 0.5), s + DAY / 2);
        assert_eq!(pick_in_window(now - DAY, now + DAY, now, 0.0), now);
        assert_eq!(pick_in_window(now - 2 * DAY, now - DAY, now, 0.7), now);
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
