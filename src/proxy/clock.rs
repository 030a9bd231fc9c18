//! The one process clock of the proxy: milliseconds since the first call,
//! monotonic, shared by every snapshot (so a cool-down or an idle time
//! carried over a reload keeps its meaning). Leaf: imports nothing of the
//! proxy.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds on the process clock; never 0, so 0 can mean "never".
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// The instant of a [`now_ms`] reading.
pub fn instant_of(ms: u64) -> Instant {
    epoch() + Duration::from_millis(ms.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_positive_and_map_back_to_instants() {
        let a = now_ms();
        assert!(a >= 1);
        let at = instant_of(a);
        assert!(at <= Instant::now());
        assert!(now_ms() >= a);
    }
}
