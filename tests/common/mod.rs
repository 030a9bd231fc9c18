//! The one test harness every integration test (and three benches) uses.
//!
//! - [`pki`]: an rcgen PKI made at run time (root, intermediate, server and
//!   client leaves) and the client configs that trust it.
//! - [`client`]: a real rustls + hyper client (h1 and h2), admin GET/POST.
//! - [`origin`]: real upstreams on 127.0.0.1:0 — a closure server, the echo
//!   upstream, and [`origin::Backend`] (killable, h1/h2c/TLS, health, hold).
//! - [`proxy`]: the real proxy in process ([`Proxy`]) or as the binary
//!   ([`BinProxy`]), and [`OneSite`], the one-site config builder.
//! - [`wait`]: [`eventually`] / [`wait_until`], the one bounded poll.
//! - [`metrics`]: the one `/metrics` parser ([`Scrape`]).
//! - [`reload`]: certificate files replaced the way deploy tools do, and
//!   certificate events to await.
//! - [`cli`]: the `portcullis` CLI and the on-call fixture.
//! - [`acme`]: a real Pebble, ACME config text, the ARI front.
//! - [`fuzz`]: the property tests' shared settings.
// Each test binary uses part of the harness: unused helpers and
// re-exports are expected there.
#![allow(dead_code, unused_imports)]

pub mod acme;
pub mod cli;
pub mod client;
pub mod fuzz;
pub mod metrics;
pub mod origin;
pub mod pki;
pub mod proxy;
pub mod reload;
pub mod wait;

pub use cli::*;
pub use client::*;
pub use metrics::*;
pub use origin::{echo, echo_upstream, full, upstream, ws_echo, Refusing, Seen};
pub use pki::*;
pub use proxy::*;
pub use reload::*;
pub use wait::*;
