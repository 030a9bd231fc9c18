//! Shared settings of the property tests (`tests/fuzz_*.rs`).

use proptest::prelude::ProptestConfig;

/// `cases` per property, or `PROPTEST_CASES` from the environment for a
/// longer job; failing runs shrink for at most 2048 iterations.
pub fn proptest_config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}
