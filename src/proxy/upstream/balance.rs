//! Upstream selection. Hot path: a pick reads atomics only (the cursor,
//! and through the caller's closures each upstream's health flag and
//! in-flight count); nothing here locks or allocates.
//!
//! - Round robin walks a precomputed smooth weighted sequence (the one
//!   nginx's algorithm produces: weights 5,1,1 give a a b a c a a, not
//!   a a a a a b c) with one atomic cursor. An upstream that is out is
//!   skipped by a weighted pick among the remaining ones.
//! - Least requests scans every upstream for the lowest in-flight count
//!   divided by weight, starting at a rotating offset so ties spread.
//! - Power of two choices draws two upstreams and takes the less loaded.
//! - Hashing is rendezvous (highest random weight): each upstream scores
//!   `hash(key, upstream)`, weighted as `-w / ln(u)`; the best eligible
//!   one wins. Removing or losing an upstream moves only its own keys.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::LbPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    RoundRobin,
    LeastRequests,
    PowerOfTwo,
    Hash,
}

/// The selection state of one upstream group.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    /// Weight of each upstream.
    weights: Box<[u64]>,
    /// A per-upstream hash of its address (rendezvous hashing).
    ids: Box<[u64]>,
    /// Whether every weight is the same (hashing then skips the float math).
    uniform: bool,
    /// The smooth weighted round-robin sequence of upstream indices.
    seq: Box<[u16]>,
    /// Round-robin position, p2c random stream, least-requests tie offset.
    cursor: AtomicU64,
}

impl Balancer {
    /// A balancer over upstreams with these weights (at least one) and
    /// identities (anything stable per upstream, e.g. a hash of its URL).
    pub fn new(policy: &LbPolicy, weights: &[u32], ids: &[u64]) -> Balancer {
        assert!(
            !weights.is_empty() && weights.len() == ids.len() && weights.len() <= u16::MAX as usize
        );
        let policy = match policy {
            LbPolicy::RoundRobin => Policy::RoundRobin,
            LbPolicy::LeastRequests => Policy::LeastRequests,
            LbPolicy::PowerOfTwo => Policy::PowerOfTwo,
            LbPolicy::HashIp | LbPolicy::HashHeader(_) => Policy::Hash,
        };
        let seq = if policy == Policy::RoundRobin {
            smooth_sequence(weights)
        } else {
            Vec::new()
        };
        Balancer {
            policy,
            weights: weights.iter().map(|&w| u64::from(w.max(1))).collect(),
            ids: ids.iter().map(|&i| mix64(i)).collect(),
            uniform: weights.iter().all(|&w| w == weights[0]),
            seq: seq.into(),
            cursor: AtomicU64::new(0),
        }
    }

    /// Number of upstreams.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Always false (a group has at least one upstream).
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Picks an upstream among those `eligible` accepts (healthy, not yet
    /// tried); `load` is an upstream's requests in flight; `key` is the
    /// request's hash key (hash policies only). `None` when none is eligible.
    #[inline]
    pub fn pick(
        &self,
        key: u64,
        eligible: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        let n = self.weights.len();
        if n == 1 {
            return eligible(0).then_some(0);
        }
        match self.policy {
            Policy::RoundRobin => {
                let c = self.cursor.fetch_add(1, Ordering::Relaxed);
                let i = self.seq[(c % self.seq.len() as u64) as usize] as usize;
                if eligible(i) {
                    Some(i)
                } else {
                    self.weighted_among(c, &eligible)
                }
            }
            Policy::LeastRequests => {
                let start = (self.cursor.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
                self.least_loaded(start, &eligible, &load)
            }
            Policy::PowerOfTwo => {
                let r = mix64(
                    self.cursor
                        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed),
                );
                let a = (((r & 0xffff_ffff) * n as u64) >> 32) as usize;
                let mut b = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
                if b >= a {
                    b += 1;
                }
                match (eligible(a), eligible(b)) {
                    (true, true) => {
                        // load/weight, compared without division.
                        let (la, lb) = (load(a) * self.weights[b], load(b) * self.weights[a]);
                        Some(if lb < la { b } else { a })
                    }
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => self.least_loaded((r % n as u64) as usize, &eligible, &load),
                }
            }
            Policy::Hash => self.rendezvous(key, &eligible),
        }
    }

    /// A weighted pick among the eligible upstreams at position `c`.
    fn weighted_among(&self, c: u64, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..self.weights.len())
            .filter(|&i| eligible(i))
            .map(|i| self.weights[i])
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = c % total;
        for (i, &w) in self.weights.iter().enumerate() {
            if eligible(i) {
                if r < w {
                    return Some(i);
                }
                r -= w;
            }
        }
        None
    }

    fn least_loaded(
        &self,
        start: usize,
        eligible: &impl Fn(usize) -> bool,
        load: &impl Fn(usize) -> u64,
    ) -> Option<usize> {
        let n = self.weights.len();
        let mut best: Option<(usize, u64)> = None;
        for k in 0..n {
            let mut i = start + k;
            if i >= n {
                i -= n;
            }
            if !eligible(i) {
                continue;
            }
            let l = load(i);
            match best {
                Some((b, bl)) if bl * self.weights[i] <= l * self.weights[b] => {}
                _ => best = Some((i, l)),
            }
        }
        best.map(|(i, _)| i)
    }

    fn rendezvous(&self, key: u64, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        let mut best_raw: Option<(usize, u64)> = None;
        for i in 0..self.weights.len() {
            if !eligible(i) {
                continue;
            }
            let h = mix64(key ^ self.ids[i]);
            if self.uniform {
                if best_raw.is_none_or(|(_, b)| h > b) {
                    best_raw = Some((i, h));
                }
            } else {
                // u in (0, 1); -w/ln(u) is the weighted rendezvous score.
                let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let score = -(self.weights[i] as f64) / u.ln();
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((i, score));
                }
            }
        }
        best_raw.map(|(i, _)| i).or(best.map(|(i, _)| i))
    }
}

/// nginx's smooth weighted round robin, run once over a whole period
/// (weights divided by their gcd), as a sequence of indices.
fn smooth_sequence(weights: &[u32]) -> Vec<u16> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w.max(1))));
    let w: Vec<i64> = weights
        .iter()
        .map(|&w| (u64::from(w.max(1)) / g) as i64)
        .collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u16);
    }
    seq
}

/// splitmix64's finaliser: a cheap, well-mixed 64-bit hash of a 64-bit value.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of bytes, then mixed: the hash key of an address or header value.
#[inline]
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The hash key of a client address.
#[inline]
pub fn hash_ip(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(&v4.octets()),
            None => hash_bytes(&v6.octets()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(b: &Balancer, n: usize, picks: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; n];
        for k in 0..picks {
            c[b.pick(hash_bytes(&k.to_le_bytes()), &eligible, |_| 0)
                .unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_sequence_interleaves_like_nginx() {
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[2, 2, 2]), vec![0, 1, 2]);
        assert_eq!(smooth_sequence(&[3, 1]), vec![0, 0, 1, 0]);
    }

    #[test]
    fn weighted_round_robin_is_exact_over_a_period_and_skips_the_down() {
        let b = Balancer::new(&LbPolicy::RoundRobin, &[3, 1, 1], &[1, 2, 3]);
        assert_eq!(count(&b, 3, 500, |_| true), vec![300, 100, 100]);
        // Upstream 0 out: the others share its traffic by weight.
        assert_eq!(count(&b, 3, 500, |i| i != 0), vec![0, 250, 250]);
        assert_eq!(b.pick(0, |_| false, |_| 0), None);
    }

    #[test]
    fn least_requests_prefers_the_idle_and_spreads_ties() {
        let b = Balancer::new(&LbPolicy::LeastRequests, &[1, 1, 1], &[1, 2, 3]);
        let load = [5u64, 0, 3];
        for _ in 0..10 {
            assert_eq!(b.pick(0, |_| true, |i| load[i]), Some(1));
        }
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[b.pick(0, |_| true, |_| 0).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        // Weighted: 4 in flight on weight 4 beats 2 on weight 1.
        let b = Balancer::new(&LbPolicy::LeastRequests, &[4, 1], &[1, 2]);
        let load = [4u64, 2];
        assert_eq!(b.pick(0, |_| true, |i| load[i]), Some(0));
    }

    #[test]
    fn p2c_never_picks_the_busier_of_two() {
        let b = Balancer::new(&LbPolicy::PowerOfTwo, &[1, 1], &[1, 2]);
        let load = [10u64, 0];
        for _ in 0..100 {
            assert_eq!(b.pick(0, |_| true, |i| load[i]), Some(1));
        }
        // With many upstreams it spreads.
        let b = Balancer::new(&LbPolicy::PowerOfTwo, &[1; 8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let c = count(&b, 8, 8000, |_| true);
        assert!(c.iter().all(|&x| x > 700 && x < 1300), "{c:?}");
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_upstream() {
        let b = Balancer::new(&LbPolicy::HashIp, &[1; 5], &[11, 22, 33, 44, 55]);
        let keys: Vec<u64> = (0..2000u64).map(|k| hash_bytes(&k.to_le_bytes())).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| b.pick(k, |_| true, |_| 0).unwrap())
            .collect();
        let after: Vec<usize> = keys
            .iter()
            .map(|&k| b.pick(k, |i| i != 2, |_| 0).unwrap())
            .collect();
        for (x, y) in before.iter().zip(&after) {
            if *x != 2 {
                assert_eq!(x, y, "a key not on the removed upstream moved");
            }
        }
        let c = count(&b, 5, 5000, |_| true);
        assert!(c.iter().all(|&x| x > 800 && x < 1200), "{c:?}");
        // Weighted: shares follow the weights.
        let b = Balancer::new(&LbPolicy::HashIp, &[3, 1], &[1, 2]);
        let c = count(&b, 2, 8000, |_| true);
        assert!((5600..6400).contains(&c[0]), "{c:?}");
    }
}
