//! Body types of the proxy. Bodies stream frame by frame in both directions;
//! nothing here buffers a whole body. Hot path.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::handler::RequestDone;
use super::upstream::UpstreamIncoming;

/// Error type of both bodies.
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
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
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

use std::future::Future;

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

/// A response body that reports, when dropped, that its request is over:
/// the access log line (with the byte count) and the connection's
/// in-flight count both depend on it.
pub struct TrackedBody {
    inner: ResponseBody,
    bytes: u64,
    done: Option<RequestDone>,
}

impl TrackedBody {
    /// Wraps `inner`; `done` finishes once, when the body is dropped.
    pub(crate) fn new(inner: ResponseBody, done: RequestDone) -> Self {
        TrackedBody {
            inner,
            bytes: 0,
            done: Some(done),
        }
    }

    /// Without tracking (admin, redirects).
    pub fn plain(inner: ResponseBody) -> Self {
        TrackedBody {
            inner,
            bytes: 0,
            done: None,
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.finish(self.bytes);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = match &mut this.inner {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream(inc) => Pin::new(inc)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
        };
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                this.bytes += d.len() as u64;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ResponseBody::Empty => true,
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Upstream(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream(inc) => inc.size_hint(),
        }
    }
}

/// A short `text/plain` answer the proxy makes itself (errors, refusals).
pub(crate) fn short(status: http::StatusCode, msg: &'static str) -> http::Response<ResponseBody> {
    let mut r = http::Response::new(ResponseBody::full(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
