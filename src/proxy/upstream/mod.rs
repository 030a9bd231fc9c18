//! Upstreams: groups of them per route, their clients and pools, health,
//! the forwarding with retries, and the per-upstream metrics.
//!
//! Inside, the arrows point one way:
//! `connector` <- `pool` <- `client` <- `group` (with `balance`, `state`)
//! <- `health`, `collector` <- `forward`. Everything here depends only on
//! the proxy's leaves (body, clock, context, error, headers) and on config.

pub mod balance;
pub mod client;
pub mod collector;
pub mod connector;
pub(crate) mod forward;
pub mod group;
pub mod health;
pub mod pool;
pub mod state;

pub use balance::Balancer;
pub use client::{ClientSettings, UpstreamClient};
pub use collector::{names, Collector};
pub use forward::{forward, ForwardCtx, Forwarded};
pub use group::{Group, Upstream};
pub use health::HealthChecks;
pub use pool::UpstreamError;
pub use state::{InFlight, UpstreamState};
