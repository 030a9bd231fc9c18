//! The data plane: listeners, TLS accept, the hyper server (HTTP/1.1 +
//! HTTP/2), routing and forwarding to upstreams. Hot path, except the
//! route table's builder: a request reads the runtime snapshot once
//! (`rt.snapshot.load()`) and takes no lock.
//!
//! # Layering
//!
//! The arrows point one way, down this list; no file imports from one
//! above it, and this file only declares and re-exports.
//!
//! 1. Leaves, which import nothing of the proxy: [`clock`] (the one process
//!    clock), [`body`] (every body type), [`io`] (the connection's byte
//!    stream and its head scanner), [`headers`] (request checks, header
//!    rewriting), [`context`] (the peer, and the client worked out once per
//!    request), [`error`] ([`error::ProxyError`]: origin and kind, mapped to
//!    a status and a metric label in one place), [`admission`] (who may
//!    connect: per-address and handshake budgets, idle shedding).
//! 2. [`ratelimit`] (limiters) and [`upstream`] (groups, pools, health,
//!    forwarding): leaves and config only. `upstream::forward(req,
//!    &ForwardCtx, &Group)` returns the upstream's response or a
//!    `ProxyError`.
//! 3. [`route`]: the route table and [`Snapshot`], built from a config on
//!    the control path, with every metric handle a request needs.
//! 4. [`tls`] (the rustls config and the accept step) and [`runtime`]
//!    ([`Runtime`]: the snapshot, certificates, connection budget).
//! 5. [`handler`] (check, route, limit, answer or forward) and [`redirect`]
//!    (the plain-HTTP answers).
//! 6. [`server`]: the one accept loop (HTTPS, plain HTTP and the admin
//!    listener) and the connection drivers.

pub mod admission;
pub mod body;
pub mod clock;
pub mod context;
pub mod error;
pub mod handler;
pub mod headers;
pub mod io;
pub mod ratelimit;
pub mod redirect;
pub mod route;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod upstream;

pub use route::{prefix_matches, Route, Site, Snapshot};
pub use runtime::Runtime;
