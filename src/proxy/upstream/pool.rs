//! The HTTP/1.1 connection pool of one upstream. Hot path.
//!
//! Each connection is a hyper `client::conn::http1` pair: the connection
//! future runs in its own task and the request side ([`SendRequest`]) lives
//! in the pool while idle. A request takes the most recently used idle
//! connection (LIFO: warm, least likely to have been closed by the
//! upstream), or dials a new one. The connection goes back to the pool the
//! moment its response body has been read to the end, from the task that
//! read it: no task is spawned per request to wait for the connection to
//! become reusable. A response body dropped before its end takes its
//! connection with it (hyper closes it; the unread rest cannot be skipped).
//!
//! At most `max_idle` connections wait in the pool; one idle longer than
//! `idle_timeout` is closed, by the next checkout or return, or by the
//! pool's reaper task when the upstream sees no traffic at all.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use super::client::{Connector, UpstreamBody};
use super::health::now_ms;
use crate::proxy::body::BoxError;

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
}

impl UpstreamError {
    /// Whether nothing of the request reached the upstream, so that any
    /// method may be sent again elsewhere.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) | UpstreamError::NotSent(_) => true,
            UpstreamError::Request(_) => false,
            UpstreamError::Http2(e) => e.is_connect(),
        }
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
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    reaper: AtomicBool,
}

impl H1Pool {
    /// An empty pool dialling with `connector`.
    pub fn new(connector: Connector, max_idle: usize, idle_timeout: Duration) -> H1Pool {
        H1Pool {
            connector,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            reaper: AtomicBool::new(false),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The lock is never held across anything that can panic midway.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expired(&self, idle: &Idle, now: u64) -> bool {
        now.saturating_sub(idle.since) >= self.idle_timeout.as_millis() as u64
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<UpstreamBody>> {
        let now = now_ms();
        let mut idle = self.idle();
        while let Some(c) = idle.pop() {
            if !c.tx.is_closed() && !self.expired(&c, now) {
                return Some(c.tx);
            }
        }
        None
    }

    /// Puts a connection whose response has been read back in the pool.
    fn checkin(&self, tx: SendRequest<UpstreamBody>) {
        if tx.is_closed() || self.max_idle == 0 {
            return;
        }
        let now = now_ms();
        let mut idle = self.idle();
        // The oldest are at the front: drop what has expired or closed.
        let stale = idle
            .iter()
            .take_while(|c| self.expired(c, now) || c.tx.is_closed())
            .count();
        idle.drain(..stale);
        if idle.len() < self.max_idle {
            idle.push(Idle { tx, since: now });
        }
    }

    /// Closes the connections idle for longer than the idle timeout.
    fn reap(&self) {
        let now = now_ms();
        self.idle()
            .retain(|c| !self.expired(c, now) && !c.tx.is_closed());
    }

    /// Dials a new connection and starts its task.
    async fn connect(self: &Arc<Self>) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        if !self.reaper.swap(true, Ordering::Relaxed) {
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
                Ok(resp) => return Ok(self.track(resp, tx)),
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
        let back = (parts.status != StatusCode::SWITCHING_PROTOCOLS).then(|| PoolReturn {
            tx,
            pool: self.clone(),
        });
        let mut body = UpstreamIncoming { inner: body, back };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        Response::from_parts(parts, body)
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

struct PoolReturn {
    tx: SendRequest<UpstreamBody>,
    pool: Arc<H1Pool>,
}

/// A response body from an upstream. Over HTTP/1.1 it returns its
/// connection to the pool once read to the end.
pub struct UpstreamIncoming {
    inner: Incoming,
    back: Option<PoolReturn>,
}

impl UpstreamIncoming {
    /// A body that gives nothing back (HTTP/2: the connection is shared).
    pub fn shared(inner: Incoming) -> UpstreamIncoming {
        UpstreamIncoming { inner, back: None }
    }

    fn give_back(&mut self) {
        if let Some(b) = self.back.take() {
            b.pool.checkin(b.tx);
        }
    }
}

impl Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            // The connection failed; hyper closes it.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
