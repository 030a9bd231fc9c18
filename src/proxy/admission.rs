//! Who may open a connection: per-address budgets of connections and of
//! TLS handshakes under way, a global budget of handshakes, and the idle
//! shedding that makes room at the global connection cap. Hot path (once
//! per connection); lock-free. Leaf: imports nothing of the proxy but the
//! clock.
//!
//! Addresses are counted in a fixed table of atomic counters indexed by a
//! keyed hash of the address (IPv6 by its /64), so memory stays bounded
//! whatever the number of clients. Two addresses that share a bucket share
//! its budget; with 65,536 buckets and a per-process random key, that is
//! rare and cannot be aimed at.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::clock::now_ms;
use crate::config::Limits;

const BUCKETS: usize = 1 << 16;

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address has `max_connections_per_ip` open.
    PerIpConnections,
    /// Its address has `max_pending_handshakes_per_ip` handshakes under way.
    PerIpHandshakes,
    /// `max_pending_handshakes` handshakes are under way.
    Handshakes,
}

impl Refusal {
    /// Every reason, in label-index order (`reason as usize`).
    pub const ALL: [Refusal; 3] = [
        Refusal::PerIpConnections,
        Refusal::PerIpHandshakes,
        Refusal::Handshakes,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerIpConnections => "per_ip_connections",
            Refusal::PerIpHandshakes => "per_ip_handshakes",
            Refusal::Handshakes => "handshakes",
        }
    }
}

/// The admission budgets of a server.
pub struct Admission {
    conns: Box<[AtomicU32]>,
    handshakes: Box<[AtomicU32]>,
    pending: AtomicUsize,
    key: std::collections::hash_map::RandomState,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            conns: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            handshakes: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            pending: AtomicUsize::new(0),
            key: Default::default(),
        }
    }
}

/// Takes one from `counter` unless it is at `max`.
fn take(counter: &AtomicU32, max: usize) -> bool {
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Admission {
    fn bucket(&self, ip: IpAddr) -> usize {
        let key: u128 = match ip {
            IpAddr::V4(v4) => u32::from(v4) as u128,
            // One /64: a host's addresses count as one client.
            IpAddr::V6(v6) => u128::from(v6) >> 64 | 1 << 127,
        };
        (self.key.hash_one(key) as usize) & (BUCKETS - 1)
    }

    /// Admits a connection from `ip` (with a handshake to come when
    /// `tls`), or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, tls: bool, l: &Limits) -> Result<Admitted, Refusal> {
        let b = self.bucket(ip);
        if !take(&self.conns[b], l.max_connections_per_ip) {
            return Err(Refusal::PerIpConnections);
        }
        let mut admitted = Admitted {
            admission: self.clone(),
            bucket: b,
            handshake: false,
        };
        if tls {
            if !take(&self.handshakes[b], l.max_pending_handshakes_per_ip) {
                return Err(Refusal::PerIpHandshakes);
            }
            if self
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < l.max_pending_handshakes).then_some(n + 1)
                })
                .is_err()
            {
                self.handshakes[b].fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Handshakes);
            }
            admitted.handshake = true;
        }
        Ok(admitted)
    }

    /// Handshakes under way.
    pub fn pending_handshakes(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// An admitted connection; gives its budgets back when dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    bucket: usize,
    handshake: bool,
}

impl Admitted {
    /// The handshake is over (done or failed): its budgets are free again.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshake) {
            self.admission.handshakes[self.bucket].fetch_sub(1, Ordering::AcqRel);
            self.admission.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.handshake_done();
        self.admission.conns[self.bucket].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Asks idle keep-alive connections to close, to make room at the global
/// connection cap: those idle since before a cutoff close gracefully. The
/// accept loop moves the cutoff towards now in steps while no slot frees,
/// so the longest idle go first.
#[derive(Default)]
pub struct Shedder {
    /// Connections idle since before this ([`now_ms`]) close.
    cutoff_ms: AtomicU64,
    /// Wakes every connection driver to look at the cutoff.
    notify: Notify,
}

impl Shedder {
    /// Connections idle for at least `idle_ms` close.
    pub fn shed_idle_for(&self, idle_ms: u64) {
        self.cutoff_ms
            .store(now_ms().saturating_sub(idle_ms).max(1), Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Waits for the next shedding request.
    pub async fn requested(&self) {
        self.notify.notified().await
    }

    /// Whether a connection idle since `last_done_ms` should close now.
    pub fn applies_to(&self, last_done_ms: u64) -> bool {
        last_done_ms < self.cutoff_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: usize, hs_ip: usize, hs: usize) -> Limits {
        Limits {
            max_connections_per_ip: per_ip,
            max_pending_handshakes_per_ip: hs_ip,
            max_pending_handshakes: hs,
            ..Limits::default()
        }
    }

    #[test]
    fn budgets_are_per_address_and_come_back() {
        let a = Arc::new(Admission::default());
        let l = limits(3, 2, 100);
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let mut h1 = a.admit(one, true, &l).unwrap();
        let _h2 = a.admit(one, true, &l).unwrap();
        assert_eq!(a.admit(one, true, &l).err(), Some(Refusal::PerIpHandshakes));
        // Another address is untouched.
        assert!(a.admit(two, true, &l).is_ok());
        h1.handshake_done();
        let _h3 = a.admit(one, true, &l).unwrap();
        // Three connections open from `one` now (h1 done, h2 and h3 pending).
        assert_eq!(
            a.admit(one, false, &l).err(),
            Some(Refusal::PerIpConnections)
        );
        drop(h1);
        assert!(a.admit(one, false, &l).is_ok());
    }

    #[test]
    fn the_global_handshake_budget_is_shared() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 100, 2);
        let ips: Vec<IpAddr> = (1..=3)
            .map(|i| format!("198.51.100.{i}").parse().unwrap())
            .collect();
        let _x = a.admit(ips[0], true, &l).unwrap();
        let _y = a.admit(ips[1], true, &l).unwrap();
        assert_eq!(a.admit(ips[2], true, &l).err(), Some(Refusal::Handshakes));
        // A refusal leaves nothing taken.
        assert_eq!(a.pending_handshakes(), 2);
        assert!(a.admit(ips[2], false, &l).is_ok());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let a = Arc::new(Admission::default());
        let l = limits(1, 1, 10);
        let _x = a.admit("2001:db8::1".parse().unwrap(), false, &l).unwrap();
        assert!(a.admit("2001:db8::2".parse().unwrap(), false, &l).is_err());
        assert!(a
            .admit("2001:db8:0:1::1".parse().unwrap(), false, &l)
            .is_ok());
    }
}
