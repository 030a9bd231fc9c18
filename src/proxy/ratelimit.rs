//! Per-route rate limits (GCRA, through `governor`'s keyed limiter).
//!
//! Hot path: a check is one `DashMap` shard lookup and a CAS on the key's
//! state; the client address is read from the socket unless the peer is a
//! trusted proxy. Memory is bounded: idle keys are purged on a timer, and
//! past `max_keys` new clients share one overflow bucket until the purge
//! makes room (logged once and counted).

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, QuantaClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use http::header::{HeaderMap, HeaderValue};

use crate::config::{LimitKey, RateLimitConfig};

/// What a limit is keyed on, per request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A client address.
    Ip(IpAddr),
    /// Hash of a header value (the value itself is never stored).
    Header(u64),
    /// The header was absent.
    NoHeader,
    /// The whole route.
    Route,
    /// Shared by new clients while the key table is full.
    Overflow,
}

type Keyed<C> = RateLimiter<Key, Table, C, StateInformationMiddleware>;

/// The key table, shared by governor's limiter and [`Limiter::check`],
/// which must know whether a client is already tracked once the table is
/// full (a tracked client keeps its own bucket; only new ones overflow).
#[derive(Clone, Default)]
struct Table(Arc<DashMapStateStore<Key>>);

impl StateStore for Table {
    type Key = Key;

    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Key> for Table {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `remaining` more requests fit in the burst now.
    Allow {
        /// Requests left in the burst.
        remaining: u32,
    },
    /// Over the limit; retry after this long.
    Deny {
        /// Time until one request would be admitted.
        retry_after: Duration,
    },
}

/// One configured limit and its state.
pub struct Limiter<C: Clock = QuantaClock> {
    /// As configured (identity across reloads).
    pub config: RateLimitConfig,
    keyed: Keyed<C>,
    /// The same table as `keyed`'s, for membership checks.
    table: Table,
    clock: C,
    /// Seconds for a full burst to refill (the `w` of `RateLimit-Policy`).
    window_secs: u64,
    /// Precomputed `RateLimit-Policy` value.
    policy: HeaderValue,
    max_keys: usize,
    /// Set while the key table is full.
    full: AtomicBool,
    /// Checks since the table size was last looked at.
    since_len: AtomicU64,
    /// Keyed by a process-random hasher so header hashes are not predictable.
    hasher: std::collections::hash_map::RandomState,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The GCRA quota for a config: one cell every `per / count`, burst `burst`.
pub fn quota(c: &RateLimitConfig) -> Quota {
    let period = (c.per / c.count.get()).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .expect("period is non-zero")
        .allow_burst(c.burst)
}

impl Limiter<QuantaClock> {
    /// A limiter on the real clock.
    pub fn new(config: RateLimitConfig, max_keys: usize) -> Self {
        Limiter::with_clock(config, max_keys, QuantaClock::default())
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// A limiter on `clock` (tests use governor's fake clock).
    pub fn with_clock(config: RateLimitConfig, max_keys: usize, clock: C) -> Self {
        let q = quota(&config);
        let table = Table::default();
        let keyed = RateLimiter::new(q, table.clone(), clock.clone());
        let window = q.burst_size_replenished_in();
        let window_secs = window.as_secs() + u64::from(window.subsec_nanos() > 0);
        let policy = HeaderValue::try_from(format!(
            "\"{}\";q={};w={}",
            config.name,
            config.burst.get(),
            window_secs.max(1)
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("\"limit\""));
        Limiter {
            config,
            keyed,
            table,
            clock,
            window_secs: window_secs.max(1),
            policy,
            max_keys,
            full: AtomicBool::new(false),
            since_len: AtomicU64::new(0),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The key of a request.
    pub fn key(&self, client: IpAddr, headers: &HeaderMap) -> Key {
        match &self.config.key {
            LimitKey::ClientIp => Key::Ip(client),
            LimitKey::Route => Key::Route,
            LimitKey::Header(h) => match headers.get(h) {
                Some(v) => Key::Header(self.hasher.hash_one(v.as_bytes())),
                None => Key::NoHeader,
            },
        }
    }

    /// Checks (and on admission, spends) one request for `key`.
    pub fn check(&self, key: Key) -> Decision {
        if self.since_len.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.full
                .store(self.keyed.len() >= self.max_keys, Ordering::Relaxed);
        }
        // Full table: clients already tracked keep their own bucket; new
        // ones share the overflow bucket (one extra lookup, only while full).
        let key = if self.full.load(Ordering::Relaxed)
            && matches!(key, Key::Ip(_) | Key::Header(_))
            && !self.table.0.contains_key(&key)
        {
            Key::Overflow
        } else {
            key
        };
        match self.keyed.check_key(&key) {
            Ok(snapshot) => Decision::Allow {
                remaining: snapshot.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Deny {
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// Drops idle keys and recomputes the full flag; returns the keys left.
    pub fn purge(&self) -> usize {
        self.keyed.retain_recent();
        self.keyed.shrink_to_fit();
        let len = self.keyed.len();
        let full = len >= self.max_keys;
        if full && !self.full.load(Ordering::Relaxed) {
            tracing::warn!(
                limit = %self.config.name,
                max_keys = self.max_keys,
                "rate limit key table full; new clients share one bucket until idle keys expire"
            );
        }
        self.full.store(full, Ordering::Relaxed);
        len
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.keyed.len()
    }

    /// `RateLimit-Policy` value.
    pub fn policy_header(&self) -> &HeaderValue {
        &self.policy
    }

    /// `RateLimit` value for a decision.
    pub fn state_header(&self, d: &Decision) -> HeaderValue {
        let (r, t) = match d {
            Decision::Allow { remaining } => {
                // Time until the burst is whole again, at most one window.
                let missing = u64::from(self.config.burst.get().saturating_sub(*remaining));
                let per_cell = quota(&self.config).replenish_interval();
                let t = (per_cell * missing as u32).as_secs_f64().ceil() as u64;
                (*remaining, t.min(self.window_secs))
            }
            Decision::Deny { retry_after } => (0, retry_secs(*retry_after)),
        };
        HeaderValue::try_from(format!("\"{}\";r={r};t={t}", self.config.name))
            .unwrap_or_else(|_| HeaderValue::from_static("\"limit\""))
    }
}

/// `Retry-After` seconds: rounded up, at least 1.
pub fn retry_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

/// Purges every limiter in service on a timer and exports the key counts
/// (control path). `limiters` lists `(site, route, limiter)`.
pub fn spawn_purger(
    limiters: impl Fn() -> Vec<(Arc<str>, String, Arc<Limiter>)> + Send + 'static,
    every: Duration,
    tracked: prometheus::IntGaugeVec,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            tracked.reset();
            for (site, route, lim) in limiters() {
                let n = lim.purge();
                tracked
                    .with_label_values(&[&*site, route.as_str(), lim.config.name.as_str()])
                    .add(n as i64);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn cfg(count: u32, per: Duration, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            name: "ip".into(),
            count: nz(count),
            per,
            burst: nz(burst),
            key: LimitKey::ClientIp,
            shadow: false,
        }
    }

    fn ip(n: u8) -> Key {
        Key::Ip(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn burst_admitted_then_next_rejected() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(cfg(10, Duration::from_secs(1), 5), 100, clock.clone());
        for i in 0..5 {
            assert_eq!(
                l.check(ip(1)),
                Decision::Allow { remaining: 4 - i },
                "request {i}"
            );
        }
        assert!(matches!(l.check(ip(1)), Decision::Deny { .. }));
        // Another client is independent.
        assert!(matches!(l.check(ip(2)), Decision::Allow { .. }));
    }

    #[test]
    fn refill_timing_and_retry_after_are_exact() {
        let clock = FakeRelativeClock::default();
        // 1 request per 2 s, burst 1.
        let l = Limiter::with_clock(cfg(1, Duration::from_secs(2), 1), 100, clock.clone());
        assert!(matches!(l.check(ip(1)), Decision::Allow { remaining: 0 }));
        match l.check(ip(1)) {
            Decision::Deny { retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(2));
                assert_eq!(retry_secs(retry_after), 2);
            }
            d => panic!("expected deny, got {d:?}"),
        }
        clock.advance(Duration::from_millis(1500));
        match l.check(ip(1)) {
            Decision::Deny { retry_after } => {
                assert_eq!(retry_after, Duration::from_millis(500));
                assert_eq!(retry_secs(retry_after), 1, "rounded up, never 0");
            }
            d => panic!("expected deny, got {d:?}"),
        }
        clock.advance(Duration::from_millis(500));
        assert!(matches!(l.check(ip(1)), Decision::Allow { .. }));
    }

    #[test]
    fn headers_follow_the_ietf_draft() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(cfg(100, Duration::from_secs(60), 100), 100, clock);
        assert_eq!(l.policy_header(), "\"ip\";q=100;w=60");
        let d = l.check(ip(1));
        assert_eq!(l.state_header(&d), "\"ip\";r=99;t=1");
        let deny = Decision::Deny {
            retry_after: Duration::from_millis(2500),
        };
        assert_eq!(l.state_header(&deny), "\"ip\";r=0;t=3");
    }

    #[test]
    fn full_key_table_sends_new_clients_to_one_bucket() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(cfg(1, Duration::from_secs(60), 1), 10, clock);
        for i in 0..10 {
            assert!(matches!(l.check(ip(i)), Decision::Allow { .. }));
        }
        assert_eq!(l.purge(), 10, "keys are recent, none purged");
        // Table full: two new clients share the overflow bucket (burst 1).
        assert!(matches!(l.check(ip(100)), Decision::Allow { .. }));
        assert!(matches!(l.check(ip(101)), Decision::Deny { .. }));
        assert!(l.tracked() <= 11);
    }

    #[test]
    fn full_key_table_keeps_tracked_clients_in_their_own_bucket() {
        let clock = FakeRelativeClock::default();
        // Burst 2: a tracked client has one request left in its own bucket.
        let l = Limiter::with_clock(cfg(1, Duration::from_secs(60), 2), 10, clock);
        for i in 0..10 {
            assert!(matches!(l.check(ip(i)), Decision::Allow { remaining: 1 }));
        }
        l.purge();
        // New clients drain the overflow bucket...
        assert!(matches!(l.check(ip(100)), Decision::Allow { .. }));
        assert!(matches!(l.check(ip(101)), Decision::Allow { .. }));
        assert!(matches!(l.check(ip(102)), Decision::Deny { .. }));
        // ...but a client tracked before the table filled is not thrown in
        // with them: it still has its own last request, then its own 429.
        assert_eq!(l.check(ip(3)), Decision::Allow { remaining: 0 });
        assert!(matches!(l.check(ip(3)), Decision::Deny { .. }));
        assert_eq!(l.check(ip(4)), Decision::Allow { remaining: 0 });
    }

    #[test]
    fn million_distinct_keys_stay_under_the_bound() {
        // Purged every 100k inserts, capped at 50k keys: the table never
        // grows past cap + one check window, whatever the key count.
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(cfg(1, Duration::from_millis(1), 1), 50_000, clock.clone());
        let mut peak = 0;
        for i in 0u32..1_000_000 {
            let a = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            let _ = l.check(Key::Ip(a));
            if i % 100_000 == 99_999 {
                clock.advance(Duration::from_millis(10));
                peak = peak.max(l.tracked());
                l.purge();
            }
        }
        assert!(peak <= 50_000 + 1024, "peak keys {peak}");
    }
}
