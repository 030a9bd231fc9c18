//! Why the proxy answered a request itself instead of relaying an upstream
//! response: one error type that records where the fault came from, mapped
//! to its status code and metric label in one place ([`ProxyError::status`],
//! [`ErrorKind::upstream_label`]). Leaf: imports nothing of the proxy.

use std::error::Error as StdError;
use std::sync::Arc;

use http::StatusCode;

/// Whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client: a malformed or stalled request (4xx).
    Downstream,
    /// The upstream: unreachable, slow or broken (5xx).
    Upstream,
    /// The proxy's configuration cannot serve this request (5xx).
    Internal,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client stopped sending its request body.
    BodyTimeout,
    /// The client's request body is malformed (a bad chunk).
    BadBody,
    /// The request cannot be rewritten for the upstream (bad bytes).
    BadRequest,
    /// No connection could be made to the upstream.
    Connect,
    /// The upstream did not answer in time.
    Timeout,
    /// The connection broke or the upstream's answer was not HTTP.
    Protocol,
    /// Every upstream of the route is out of service; retry after this
    /// many seconds.
    NoUpstream {
        /// `Retry-After` seconds.
        retry_after: u64,
    },
    /// A protocol upgrade (WebSocket) to an HTTP/2 upstream.
    UpgradeToH2,
    /// The upstream answered `101` to a request that asked for no upgrade.
    UnaskedUpgrade,
}

impl ErrorKind {
    /// The `kind` label of `portcullis_upstream_errors_total`, for the
    /// failures counted there (one per failed attempt).
    pub fn upstream_label(self) -> Option<UpstreamErrorKind> {
        match self {
            ErrorKind::Connect => Some(UpstreamErrorKind::Connect),
            ErrorKind::Timeout => Some(UpstreamErrorKind::Timeout),
            ErrorKind::Protocol => Some(UpstreamErrorKind::Protocol),
            _ => None,
        }
    }
}

/// The bounded `kind` label of upstream failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// `connect`
    Connect,
    /// `timeout`
    Timeout,
    /// `protocol`
    Protocol,
}

impl UpstreamErrorKind {
    /// Every kind, in label-index order.
    pub const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
    ];

    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// A request the proxy answers itself.
#[derive(Debug, Clone)]
pub struct ProxyError {
    /// Whose fault.
    pub origin: Origin,
    /// What happened.
    pub kind: ErrorKind,
    /// The upstream involved (last tried), for the access log.
    pub upstream: Option<Arc<str>>,
}

impl ProxyError {
    /// An error of `kind`, with its origin.
    pub fn new(kind: ErrorKind, upstream: Option<Arc<str>>) -> ProxyError {
        let origin = match kind {
            ErrorKind::BodyTimeout | ErrorKind::BadBody | ErrorKind::BadRequest => {
                Origin::Downstream
            }
            ErrorKind::UpgradeToH2 => Origin::Internal,
            _ => Origin::Upstream,
        };
        ProxyError {
            origin,
            kind,
            upstream,
        }
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::BadBody | ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::NoUpstream { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Connect
            | ErrorKind::Protocol
            | ErrorKind::UpgradeToH2
            | ErrorKind::UnaskedUpgrade => StatusCode::BAD_GATEWAY,
        }
    }

    /// The short body sent with [`ProxyError::status`].
    pub fn message(&self) -> &'static str {
        match self.kind {
            ErrorKind::BodyTimeout => "request body timed out\n",
            ErrorKind::BadBody => "bad request: malformed request body\n",
            ErrorKind::BadRequest => "bad request: invalid bytes in the request\n",
            ErrorKind::Timeout => "upstream timed out\n",
            ErrorKind::NoUpstream { .. } => "no upstream is available\n",
            ErrorKind::Connect | ErrorKind::Protocol => "upstream unavailable\n",
            ErrorKind::UpgradeToH2 => "protocol upgrades need an HTTP/1.1 upstream\n",
            ErrorKind::UnaskedUpgrade => "upstream switched protocols unasked\n",
        }
    }

    /// The gRPC status code of the answer to a gRPC call: 4
    /// DEADLINE_EXCEEDED for timeouts, 14 UNAVAILABLE for an upstream that
    /// cannot be reached, 3 INVALID_ARGUMENT for a malformed request, 13
    /// INTERNAL otherwise.
    pub fn grpc_status(&self) -> u16 {
        match self.kind {
            ErrorKind::Timeout | ErrorKind::BodyTimeout => 4,
            ErrorKind::Connect | ErrorKind::Protocol | ErrorKind::NoUpstream { .. } => 14,
            ErrorKind::BadBody | ErrorKind::BadRequest => 3,
            ErrorKind::UpgradeToH2 | ErrorKind::UnaskedUpgrade => 13,
        }
    }

    /// `grpc-message`: [`ProxyError::message`] without its newline.
    pub fn grpc_message(&self) -> &'static str {
        self.message().trim_end()
    }

    /// Whether the client's connection must close after the answer (its
    /// request stream is in an unknown state).
    pub fn closes_connection(&self) -> bool {
        matches!(self.kind, ErrorKind::BadBody | ErrorKind::BodyTimeout)
    }
}

/// Whether `e` or any error it wraps is a `T`.
pub fn has_source<T: StdError + 'static>(e: &(dyn StdError + 'static)) -> bool {
    sources(e).any(|err| err.is::<T>())
}

/// Whether `e` or any error it wraps is an I/O timeout.
pub fn is_timeout(e: &(dyn StdError + 'static)) -> bool {
    sources(e).any(|err| {
        err.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// `e` and its sources, outermost first.
pub fn sources<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |err: &&'a (dyn StdError + 'static)| {
        (*err).source()
    })
}

/// `e: source: source...` on one line, for logs.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = String::new();
    for (i, err) in sources(e).enumerate() {
        if i > 0 {
            s.push_str(": ");
        }
        s.push_str(&err.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_faults_are_4xx_and_upstream_faults_5xx() {
        for kind in [
            ErrorKind::BodyTimeout,
            ErrorKind::BadBody,
            ErrorKind::BadRequest,
        ] {
            let e = ProxyError::new(kind, None);
            assert_eq!(e.origin, Origin::Downstream);
            assert!(e.status().is_client_error(), "{kind:?}");
            assert!(kind.upstream_label().is_none());
        }
        for kind in [
            ErrorKind::Connect,
            ErrorKind::Timeout,
            ErrorKind::Protocol,
            ErrorKind::NoUpstream { retry_after: 1 },
            ErrorKind::UnaskedUpgrade,
        ] {
            let e = ProxyError::new(kind, None);
            assert_eq!(e.origin, Origin::Upstream);
            assert!(e.status().is_server_error(), "{kind:?}");
        }
        assert_eq!(
            ProxyError::new(ErrorKind::Timeout, None).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn timeouts_are_found_by_type_in_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(std::io::ErrorKind::TimedOut, "x"));
        assert!(is_timeout(&e));
        assert!(has_source::<std::io::Error>(&e));
        assert_eq!(error_chain(&e), "outer: x");
        // The text alone does not make a timeout.
        let e = Outer(std::io::Error::other("timed out"));
        assert!(!is_timeout(&e));
    }
}
