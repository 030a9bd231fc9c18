//! Body types of the proxy. Bodies stream frame by frame in both directions;
//! nothing here buffers a whole body. Hot path. Leaf: imports nothing of
//! the proxy.
//!
//! - [`RequestBody`]: the client's body on its way upstream, with the
//!   body timeout; a malformed body surfaces as [`ClientBodyError`].
//! - [`UpstreamBody`]: what the upstream client sends; hands an unread body
//!   back for a retry.
//! - [`UpstreamIncoming`]: an upstream's response body; over HTTP/1.1 it
//!   gives its connection back to the pool ([`Checkin`]) at its end.
//! - [`ResponseBody`]: what the client gets (empty, fixed, or streamed from
//!   an upstream); [`TrackedBody`] adds the end-of-request report.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::oneshot;
use tokio::time::Sleep;

/// Error type of the proxy's bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body travelling upstream; fails when the client goes quiet
/// for longer than the body timeout (slow upload).
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl RequestBody {
    /// Wraps a downstream body.
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        RequestBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

/// The client stopped sending its body.
#[derive(Debug, thiserror::Error)]
#[error("request body timed out: the client sent nothing for {0:?}")]
pub struct BodyTimeout(pub Duration);

/// The client's body could not be read: malformed framing (a bad chunk
/// size) or a connection that ended mid-body. The client's fault.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body is malformed or incomplete")]
pub struct ClientBodyError(#[source] pub hyper::Error);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.sleep = None;
                Poll::Ready(r.map(|r| r.map_err(|e| Box::new(ClientBodyError(e)) as BoxError)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a request sent upstream.
///
/// Request bodies stream: once the upstream client has read a frame, the
/// bytes are gone and the request cannot be sent again. So a retry is only
/// possible when the body was never polled. This type makes that
/// observable: when it is dropped unpolled (the connect failed, or the
/// connection closed before the request was written), the client body is
/// handed back through a oneshot channel and the next attempt can send it.
/// The first poll gives up the way back. A bodyless request has nothing to
/// hand back and can always be sent again.
pub struct UpstreamBody {
    inner: Option<RequestBody>,
    back: Option<oneshot::Sender<RequestBody>>,
}

impl UpstreamBody {
    /// No body.
    pub fn empty() -> UpstreamBody {
        UpstreamBody {
            inner: None,
            back: None,
        }
    }

    /// Streams `body`; the receiver gets it back if it is dropped unread.
    pub fn returnable(body: RequestBody) -> (UpstreamBody, oneshot::Receiver<RequestBody>) {
        let (tx, rx) = oneshot::channel();
        (
            UpstreamBody {
                inner: Some(body),
                back: Some(tx),
            },
            rx,
        )
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let (Some(tx), Some(body)) = (self.back.take(), self.inner.take()) {
            let _ = tx.send(body);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // From the first read on, the body cannot be sent again.
        this.back = None;
        match &mut this.inner {
            None => Poll::Ready(None),
            Some(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Where an HTTP/1.1 upstream connection goes once its response has been
/// read to the end (the upstream pool).
pub trait Checkin: Send + Sync {
    /// Takes back a connection whose exchange is complete.
    fn checkin(&self, tx: SendRequest<UpstreamBody>);
}

struct PoolReturn {
    tx: SendRequest<UpstreamBody>,
    pool: Arc<dyn Checkin>,
}

/// A response body from an upstream. Over HTTP/1.1 it returns its
/// connection to the pool once read to the end; a body dropped before its
/// end, or one that fails, takes its connection with it.
pub struct UpstreamIncoming {
    inner: Incoming,
    back: Option<PoolReturn>,
}

impl UpstreamIncoming {
    /// A body that gives nothing back (HTTP/2: the connection is shared).
    pub fn shared(inner: Incoming) -> UpstreamIncoming {
        UpstreamIncoming { inner, back: None }
    }

    /// A body whose connection `tx` goes back to `pool` at its end (at
    /// once when there is no body).
    pub fn pooled(
        inner: Incoming,
        tx: SendRequest<UpstreamBody>,
        pool: Arc<dyn Checkin>,
    ) -> UpstreamIncoming {
        let mut body = UpstreamIncoming {
            inner,
            back: Some(PoolReturn { tx, pool }),
        };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
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

/// What a response carries.
pub enum ResponseBody {
    /// Nothing.
    Empty,
    /// A fixed body (static responses, errors).
    Full(Option<Bytes>),
    /// Streamed from an upstream.
    Upstream(UpstreamIncoming),
}

impl ResponseBody {
    /// A short fixed body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            ResponseBody::Empty
        } else {
            ResponseBody::Full(Some(b))
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream(inc) => Pin::new(inc)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Upstream(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream(inc) => inc.size_hint(),
        }
    }
}

/// What happens when a response body is over (sent to its end, failed,
/// or dropped): `bytes` is what it carried.
pub trait Finish {
    /// The body is over.
    fn finish(self, bytes: u64);
}

/// A response body that reports, when dropped, that its request is over:
/// the access log line (with the byte count) and the connection's
/// in-flight count both depend on it.
pub struct TrackedBody<D: Finish> {
    inner: ResponseBody,
    bytes: u64,
    done: Option<D>,
}

impl<D: Finish> TrackedBody<D> {
    /// Wraps `inner`; `done` finishes once, when the body is dropped.
    pub fn new(inner: ResponseBody, done: D) -> Self {
        TrackedBody {
            inner,
            bytes: 0,
            done: Some(done),
        }
    }
}

impl<D: Finish> Drop for TrackedBody<D> {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.finish(self.bytes);
        }
    }
}

impl<D: Finish + Unpin> Body for TrackedBody<D> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                this.bytes += d.len() as u64;
            }
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

/// A short `text/plain` answer the proxy makes itself (errors, refusals).
pub fn short(status: http::StatusCode, msg: &'static str) -> http::Response<ResponseBody> {
    let mut r = http::Response::new(ResponseBody::full(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
