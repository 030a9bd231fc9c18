//! Memory of one rate limit fed 1,000,000 distinct client addresses, then
//! 1,000,000 more: resident memory (VmRSS, and the peak VmHWM that includes
//! the key table's growth) measured around the real [`Limiter`] on the real
//! clock, in its own process so nothing else moves the figures.
//!
//! Stated bound: with `max_keys = 1_000_000` a limit tracks at most
//! 1,000,000 + 1,024 keys (the table size is looked at every 1,024 checks)
//! and they take at most `BOUND_BYTES_PER_KEY` bytes each, peak included:
//! under 96 MiB per limit whatever the number of distinct clients. Past the
//! cap new clients share one overflow bucket, so the second million adds
//! no memory. Idle keys are then purged.
//!
//! cargo bench --bench ratelimit_memory
//! (`cargo test --benches` runs it too: the figures hold in debug builds.)

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use portcullis::config::{LimitKey, RateLimitConfig};
use portcullis::proxy::ratelimit::{Decision, Key, Limiter};

const KEYS: u32 = 1_000_000;
/// The stated bound, bytes per tracked key, peak included.
const BOUND_BYTES_PER_KEY: u64 = 96;

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    kb * 1024
}

fn addr(i: u32) -> Key {
    // 10.0.0.0 upwards, then 11.x: all distinct.
    Key::Ip(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    // A production-like limit: 100/s, burst 200, per client address.
    let cfg = RateLimitConfig {
        name: "ip".into(),
        count: NonZeroU32::new(100).unwrap(),
        per: Duration::from_secs(1),
        burst: NonZeroU32::new(200).unwrap(),
        key: LimitKey::ClientIp,
        shadow: false,
    };
    let rss0 = status("VmRSS");
    let hwm0 = status("VmHWM");
    let lim = Limiter::new(cfg, KEYS as usize);

    let t = Instant::now();
    for i in 0..KEYS {
        assert!(matches!(lim.check(addr(i)), Decision::Allow { .. }));
    }
    let fill = t.elapsed();
    let keys = lim.tracked() as u64;
    let rss1 = status("VmRSS");
    let hwm1 = status("VmHWM");
    let per_key = (rss1 - rss0) / keys;
    let peak_per_key = (hwm1.max(rss1) - rss0) / keys;

    // A second million distinct addresses: the table is full, they share
    // the overflow bucket (most of them get 429s) and add no keys.
    let t = Instant::now();
    let mut limited = 0u32;
    for i in KEYS..2 * KEYS {
        if matches!(lim.check(addr(i)), Decision::Deny { .. }) {
            limited += 1;
        }
    }
    let overflow = t.elapsed();
    let keys2 = lim.tracked() as u64;
    let rss2 = status("VmRSS");
    let hwm2 = status("VmHWM");

    // Every client key has been idle longer than its bucket takes to
    // refill: the purger's pass drops them and gives the table back.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let left = lim.purge();
    let purge = t.elapsed();
    let rss3 = status("VmRSS");

    println!("ratelimit_memory: one limit (100/s, burst 200, key = ip), max_keys = {KEYS}");
    println!(
        "  {KEYS} distinct addresses: {keys} keys, VmRSS +{:.1} MiB = {per_key} bytes/key; \
         peak (VmHWM) +{:.1} MiB = {peak_per_key} bytes/key; {:.0} ns/check while inserting",
        mib(rss1 - rss0),
        mib(hwm1.max(rss1) - rss0),
        fill.as_nanos() as f64 / f64::from(KEYS),
    );
    println!(
        "  {KEYS} more distinct addresses (table full): {keys2} keys, VmRSS +{:.1} MiB since the first million, \
         peak +{:.1} MiB; {limited} of them limited in the shared overflow bucket; {:.0} ns/check",
        mib(rss2.saturating_sub(rss1)),
        mib(hwm2.saturating_sub(hwm1)),
        overflow.as_nanos() as f64 / f64::from(KEYS),
    );
    println!(
        "  purge after idling: {left} keys left in {:.0} ms, VmRSS {:.1} MiB above the start",
        purge.as_secs_f64() * 1000.0,
        mib(rss3.saturating_sub(rss0)),
    );
    println!(
        "  bound: <= {} keys and <= {BOUND_BYTES_PER_KEY} bytes/key (peak {:.1} MiB for 1M keys; start VmHWM {:.1} MiB)",
        KEYS + 1024,
        mib(BOUND_BYTES_PER_KEY * u64::from(KEYS)),
        mib(hwm0),
    );

    assert!(
        keys >= u64::from(KEYS) - 1 && keys <= u64::from(KEYS) + 1024,
        "keys {keys}"
    );
    assert!(
        keys2 <= u64::from(KEYS) + 1024,
        "the cap holds: {keys2} keys"
    );
    assert!(
        limited > KEYS / 2,
        "new clients past the cap share one bucket: {limited} limited"
    );
    assert!(
        peak_per_key <= BOUND_BYTES_PER_KEY,
        "{peak_per_key} bytes/key at peak is over the stated {BOUND_BYTES_PER_KEY}"
    );
    assert!(
        hwm2.saturating_sub(hwm1) <= 8 << 20,
        "the second million raised the peak by {:.1} MiB",
        mib(hwm2 - hwm1)
    );
    // Only the overflow bucket may stay: it is still refilling.
    assert!(left <= 1, "idle keys are purged: {left} left");
}
