//! The HTTP/1.1 connection pool of one upstream. Hot path; takes no lock.
//!
//! Each connection is a hyper `client::conn::http1` pair: the connection
//! future runs in its own task and the request side ([`SendRequest`]) waits
//! in the pool while idle. The idle connections sit in a bounded lock-free
//! queue (`crossbeam_queue::ArrayQueue`): a request takes the one that has
//! waited longest, or dials a new one. (A LIFO stack would keep fewer
//! connections warm at low load, but there is no lock-free one without
//! `unsafe`; the idle timeout bounds how long an unused connection lives
//! either way, and one the upstream closed meanwhile is skipped, or its
//! request re-sent on the next connection when hyper reports it unsent.)
//!
//! The connection goes back to the pool the moment its response body has
//! been read to the end, from the task that read it
//! ([`UpstreamIncoming::pooled`]): no task is spawned per request. A
//! response body dropped before its end, or one that fails, takes its
//! connection with it (hyper closes it; the unread rest cannot be skipped).
//! So does a request whose body failed (a client's malformed chunk): the
//! exchange never completed, so the connection is never handed back.
//!
//! At most `max_idle` connections wait; a return to a full pool closes the
//! oldest. One idle longer than `idle_timeout` is closed by the next
//! checkout that meets it, or by the pool's reaper task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use super::connector::Connector;
use crate::proxy::body::{BoxError, Checkin, UpstreamBody, UpstreamIncoming};
use crate::proxy::clock::now_ms;

/// Why a request to the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (TCP or TLS): nothing was sent.
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection closed before the request was written: nothing was
    /// sent.
    #[error("the upstream connection closed before the request was sent")]
    NotSent(#[source] hyper::Error),
    /// The request was sent (maybe partly) and failed.
    #[error("upstream request failed")]
    Request(#[source] hyper::Error),
    /// Failed in the HTTP/2 client.
    #[error("upstream request failed")]
    Http2(#[source] hyper_util::client::legacy::Error),
    /// The response head frames its body ambiguously; it is not relayed
    /// and its connection is closed.
    #[error("the upstream response's framing is ambiguous: {0}")]
    Framing(Framing),
}

/// Upstream response framing the proxy refuses to relay (RFC 9112 §6.3:
/// a message whose length cannot be known for certain is an error, and
/// the connection cannot be reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Framing {
    /// `Content-Length` and `Transfer-Encoding` together.
    #[error("Content-Length together with Transfer-Encoding")]
    LengthAndEncoding,
    /// A transfer coding other than one final `chunked`.
    #[error("a Transfer-Encoding other than chunked")]
    Coding,
    /// Several `Content-Length` values that disagree.
    #[error("conflicting Content-Length values")]
    Lengths,
}

/// Checks how an HTTP/1.1 response head frames its body.
pub fn check_framing(headers: &http::HeaderMap) -> Result<(), Framing> {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    let mut te = headers.get_all(TRANSFER_ENCODING).iter();
    let has_cl = headers.contains_key(CONTENT_LENGTH);
    if let Some(first) = te.next() {
        if has_cl {
            return Err(Framing::LengthAndEncoding);
        }
        let chunked_only = te.next().is_none()
            && first
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        return if chunked_only {
            Ok(())
        } else {
            Err(Framing::Coding)
        };
    }
    let mut value: Option<&[u8]> = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            match value {
                Some(seen) if seen != part => return Err(Framing::Lengths),
                _ => value = Some(part),
            }
        }
    }
    Ok(())
}

impl UpstreamError {
    /// Whether nothing of the request reached the upstream, so that any
    /// method may be sent again elsewhere.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) | UpstreamError::NotSent(_) => true,
            UpstreamError::Request(_) | UpstreamError::Framing(_) => false,
            UpstreamError::Http2(e) => e.is_connect(),
        }
    }

    /// Whether the upstream started answering (so the request is final):
    /// a response head with ambiguous framing, or bytes that failed to
    /// parse as one.
    pub fn response_started(&self) -> bool {
        matches!(self, UpstreamError::Framing(_))
            || crate::proxy::error::sources(self).any(|err| {
                err.downcast_ref::<hyper::Error>().is_some_and(|h| {
                    h.is_parse()
                        || h.is_parse_status()
                        || h.is_parse_too_large()
                        || h.is_parse_version_h2()
                })
            })
    }
}

/// An idle connection.
struct Idle {
    tx: SendRequest<UpstreamBody>,
    /// When it went idle ([`now_ms`]).
    since: u64,
}

/// Pooled HTTP/1.1 connections to one upstream.
pub struct H1Pool {
    connector: Connector,
    /// `None` when `max_idle` is 0: nothing is kept.
    idle: Option<ArrayQueue<Idle>>,
    idle_timeout: Duration,
    reaper: AtomicBool,
}

impl H1Pool {
    /// An empty pool dialling with `connector`.
    pub fn new(connector: Connector, max_idle: usize, idle_timeout: Duration) -> H1Pool {
        H1Pool {
            connector,
            idle: (max_idle > 0).then(|| ArrayQueue::new(max_idle)),
            idle_timeout,
            reaper: AtomicBool::new(false),
        }
    }

    fn usable(&self, idle: &Idle, now: u64) -> bool {
        !idle.tx.is_closed()
            && now.saturating_sub(idle.since) < self.idle_timeout.as_millis() as u64
    }

    /// An idle connection that is still open (expired or closed ones met
    /// on the way are dropped, which closes them).
    fn checkout(&self) -> Option<SendRequest<UpstreamBody>> {
        let idle = self.idle.as_ref()?;
        let now = now_ms();
        while let Some(c) = idle.pop() {
            if self.usable(&c, now) {
                return Some(c.tx);
            }
        }
        None
    }

    /// Closes the connections idle for longer than the idle timeout.
    fn reap(&self) {
        let Some(idle) = &self.idle else { return };
        let now = now_ms();
        for _ in 0..idle.len() {
            let Some(c) = idle.pop() else { return };
            if self.usable(&c, now) {
                // Full again meanwhile: the oldest goes (it is closed).
                drop(idle.force_push(c));
            }
        }
    }

    /// Dials a new connection and starts its task.
    async fn connect(self: &Arc<Self>) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        if self.idle.is_some() && !self.reaper.swap(true, Ordering::Relaxed) {
            tokio::spawn(reaper(Arc::downgrade(self), self.idle_timeout));
        }
        let mut connector = self.connector.clone();
        let io = tower_service::Service::call(&mut connector, http::Uri::default())
            .await
            .map_err(UpstreamError::Connect)?;
        let (tx, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// Sends `req` on a pooled or new connection, in origin-form (an
    /// absolute URI is cut to its path and query: the connection already
    /// goes to the one upstream, named in `Host`).
    ///
    /// A pooled connection can turn out to be closed by the upstream
    /// (its keep-alive timeout) just as it is taken; when hyper reports that
    /// the request was not sent, it goes out on the next connection instead.
    pub async fn request(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamIncoming>, UpstreamError> {
        if req.uri().authority().is_some() {
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
        loop {
            let (mut tx, reused) = match self.checkout() {
                Some(tx) => (tx, true),
                // Boxed: dialling (TCP, TLS, handshake) is the rare path,
                // and would otherwise make every request's future larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            // A pooled connection may still be finishing the response it
            // was returned after (hyper marks it ready a moment later).
            if let Err(e) = tx.ready().await {
                if reused {
                    continue;
                }
                return Err(UpstreamError::NotSent(e));
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    // Dropping the response and `tx` closes the connection.
                    check_framing(resp.headers()).map_err(UpstreamError::Framing)?;
                    return Ok(self.track(resp, tx));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    Some(_) => return Err(UpstreamError::NotSent(e.into_error())),
                    None => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }

    /// The response, whose body hands the connection back at its end.
    fn track(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        tx: SendRequest<UpstreamBody>,
    ) -> Response<UpstreamIncoming> {
        let (parts, body) = resp.into_parts();
        // A 101 hands the connection to the upgrade: it never comes back.
        let body = if parts.status == StatusCode::SWITCHING_PROTOCOLS || self.idle.is_none() {
            UpstreamIncoming::shared(body)
        } else {
            UpstreamIncoming::pooled(body, tx, self.clone())
        };
        Response::from_parts(parts, body)
    }
}

impl Checkin for H1Pool {
    /// Puts a connection whose response has been read back in the pool.
    fn checkin(&self, tx: SendRequest<UpstreamBody>) {
        let Some(idle) = &self.idle else { return };
        if tx.is_closed() {
            return;
        }
        // Full: the connection that has waited longest is closed.
        drop(idle.force_push(Idle {
            tx,
            since: now_ms(),
        }));
    }
}

/// Closes expired idle connections while the pool exists.
async fn reaper(pool: Weak<H1Pool>, every: Duration) {
    let every = every.max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.reap(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in lines {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert_eq!(check_framing(&head(&[])), Ok(()));
        assert_eq!(check_framing(&head(&[("content-length", "3")])), Ok(()));
        assert_eq!(
            check_framing(&head(&[("transfer-encoding", "Chunked")])),
            Ok(())
        );
        assert_eq!(
            check_framing(&head(&[("content-length", "3"), ("content-length", "3")])),
            Ok(())
        );
        assert_eq!(
            check_framing(&head(&[
                ("content-length", "3"),
                ("transfer-encoding", "chunked")
            ])),
            Err(Framing::LengthAndEncoding)
        );
        assert_eq!(
            check_framing(&head(&[("transfer-encoding", "gzip")])),
            Err(Framing::Coding)
        );
        assert_eq!(
            check_framing(&head(&[("transfer-encoding", "gzip, chunked")])),
            Err(Framing::Coding)
        );
        assert_eq!(
            check_framing(&head(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ])),
            Err(Framing::Coding)
        );
        assert_eq!(
            check_framing(&head(&[("content-length", "3, 5")])),
            Err(Framing::Lengths)
        );
        assert_eq!(
            check_framing(&head(&[("content-length", "3"), ("content-length", "4")])),
            Err(Framing::Lengths)
        );
    }
}
