//! The one bounded wait: poll a condition (sync or async) until it holds or
//! a deadline passes. Use it for what has no event to await (a metric, a
//! count); await the event itself (a channel, a log line, a close) when
//! there is one.

use std::future::Future;
use std::time::Duration;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);

/// Polls `f` every 10 ms until it returns true (then true) or `limit`
/// passes (then false, after one last poll).
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    f().await
}

/// Like [`eventually`], and fails the test with `what` on timeout.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        eventually(limit, f).await,
        "timed out after {limit:?} waiting for: {what}"
    );
}

/// Polls `f` until it returns `Some` (then that value); fails the test
/// with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
