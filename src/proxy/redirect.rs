//! Plain-HTTP listeners: every request gets a `308` to the same URL over
//! HTTPS, except the ACME HTTP-01 answers in progress
//! (`/.well-known/acme-challenge/TOKEN`). Hot path (cheap by design: no
//! routing, no upstream).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::body::{ResponseBody, TrackedBody};
use super::headers::strip_port;
use super::io::{ConnIo, ConnShared};
use super::{drive, Runtime};

/// Accepts plain-HTTP connections until `stop` is cancelled.
pub async fn serve_http(
    listener: TcpListener,
    rt: Arc<Runtime>,
    https_port: Option<u16>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = rt.conn_limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let rt2 = rt.clone();
        rt.tracker.spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let snap = rt2.snapshot.load_full();
            let shared = Arc::new(ConnShared::default());
            shared.last_done_ms.store(rt2.now_ms(), Ordering::Release);
            let io = ConnIo::new(tcp, snap.timeouts.response_write, None);
            let rt3 = rt2.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let rt = rt3.clone();
                async move {
                    if let Some(answer) = acme_http01(&rt.certs, &req) {
                        return Ok::<_, Infallible>(answer);
                    }
                    Ok::<_, Infallible>(redirect(&req, https_port))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(snap.timeouts.request_header)
                .max_buf_size(snap.limits.max_header_bytes.max(8192));
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let conn = std::pin::pin!(conn);
            drive(
                conn,
                |c| c.graceful_shutdown(),
                &rt2,
                &shared,
                snap.timeouts.idle,
            )
            .await;
        });
    }
}

/// Where HTTP-01 answers live (RFC 8555 §8.3).
const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The key authorization for an HTTP-01 token the ACME manager is proving
/// right now; `None` (so the request gets the usual redirect) for anything
/// else, including unknown tokens.
pub fn acme_http01<B>(
    certs: &crate::certstore::CertStore,
    req: &Request<B>,
) -> Option<Response<TrackedBody>> {
    let token = req.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX)?;
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        || token.is_empty()
        || token.contains('/')
    {
        return None;
    }
    let key_auth = certs.challenges.http01(token)?;
    let mut r = Response::new(TrackedBody::plain(ResponseBody::full(Bytes::from(
        key_auth,
    ))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(r)
}

/// The `308` for a plain-HTTP request.
pub fn redirect<B>(req: &Request<B>, https_port: Option<u16>) -> Response<TrackedBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .and_then(strip_port);
    let Some(host) = host else {
        let mut r = Response::new(TrackedBody::plain(ResponseBody::full(Bytes::from_static(
            b"bad request: a Host header is required\n",
        ))));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match https_port {
        None | Some(443) => format!("https://{host}{pq}"),
        Some(p) => format!("https://{host}:{p}{pq}"),
    };
    let mut r = Response::new(TrackedBody::plain(ResponseBody::Empty));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::try_from(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}
