//! Sends a request to an upstream group and streams the answer back,
//! retrying on another upstream when that is safe. Hot path.
//!
//! When a retry is safe:
//! - the connect failed (TCP or TLS): nothing was sent, so any method;
//! - the connection was reset or closed before a response head arrived:
//!   idempotent methods only (GET, HEAD, OPTIONS, PUT, DELETE, TRACE);
//! - never once the upstream started answering (a response head, or bytes
//!   that failed to parse as one), and never after the response timeout
//!   (the upstream may still be working on it).
//!
//! Request bodies stream, so a request with a body can only be sent again
//! if the first attempt never read any of it: [`UpstreamBody`] hands an
//! unread body back when the attempt drops it. A body that was read (even
//! partly) makes the request final. A bodyless request can always be
//! rebuilt. Retries go to upstreams not yet tried for this request, at
//! most `retries` of them, and none starts after `retry_budget`.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balance;
use super::group::Group;
use super::health;
use super::state::InFlight;
use crate::config::{LbPolicy, Timeouts, MAX_RETRIES};
use crate::proxy::body::{
    BodyTimeout, ClientBodyError, RequestBody, ResponseBody, UpstreamBody, UpstreamIncoming,
};
use crate::proxy::clock::now_ms;
use crate::proxy::context::{Client, Peer};
use crate::proxy::error::{error_chain, has_source, is_timeout, ErrorKind, ProxyError};
use crate::proxy::headers;

/// What forwarding needs from the request's context.
pub struct ForwardCtx<'a> {
    /// The client, resolved once for the request (hash keys).
    pub client: Client,
    /// The connection's peer (the hop appended to `X-Forwarded-For`).
    pub peer: &'a Peer,
    /// Body, response and shutdown timeouts of the snapshot in service.
    pub timeouts: &'a Timeouts,
    /// `portcullis_upstream_errors_total` by kind, resolved once, indexed
    /// as [`crate::proxy::error::UpstreamErrorKind::ALL`].
    pub errors: &'a [IntCounter; 3],
    /// Where upgraded tunnels run (shutdown waits for them).
    pub tunnels: &'a TaskTracker,
    /// Cancelled when shutdown starts: tunnels then get the grace period.
    pub shutdown: &'a CancellationToken,
}

impl ForwardCtx<'_> {
    fn count(&self, kind: ErrorKind) {
        if let Some(k) = kind.upstream_label() {
            self.errors[k as usize].inc();
        }
    }
}

/// An upstream's answer, ready for the client.
pub struct Forwarded {
    /// The response.
    pub resp: Response<ResponseBody>,
    /// The upstream that answered, for the access log.
    pub upstream: Arc<str>,
    /// Counts the request in flight on its upstream until the response
    /// body is done (held by the caller alongside the body).
    pub in_flight: InFlight,
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The hash key of a request for the hash policies (0 otherwise).
fn hash_key(group: &Group, client: Client, headers: &http::HeaderMap) -> u64 {
    match &group.config.lb {
        LbPolicy::HashIp => balance::hash_ip(client.ip),
        LbPolicy::HashHeader(h) => headers.get(h).map_or_else(
            || balance::hash_ip(client.ip),
            |v| balance::hash_bytes(v.as_bytes()),
        ),
        _ => 0,
    }
}

/// Forwards `req` (already checked and routed) to one of `group`'s
/// upstreams. `Err` is an answer the proxy makes itself; its
/// [`ProxyError::status`] says which.
pub async fn forward(
    mut req: Request<Incoming>,
    ctx: &ForwardCtx<'_>,
    group: &Group,
) -> Result<Forwarded, ProxyError> {
    let cfg = &group.config;
    let prefix: &str = &group.route;
    let upgrade = headers::is_upgrade(&req);
    if upgrade && group.is_h2() {
        return Err(ProxyError::new(ErrorKind::UpgradeToH2, None));
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let upgrade_proto = req.headers().get(header::UPGRADE).cloned();
    let key = hash_key(group, ctx.client, req.headers());
    let (mut parts, body) = req.into_parts();

    // Path (maybe stripped) + query.
    let strip = cfg.strip_prefix && prefix != "/";
    let pq = match parts.uri.path_and_query() {
        Some(pq) if !strip => pq.clone(),
        None if !strip => PathAndQuery::from_static("/"),
        pq => {
            let pq = pq.map_or("/", |p| p.as_str());
            let rest = &pq[prefix.trim_end_matches('/').len().min(pq.len())..];
            let stripped = if rest.starts_with('/') {
                PathAndQuery::try_from(rest)
            } else {
                PathAndQuery::try_from(format!("/{rest}"))
            };
            stripped.map_err(|_| ProxyError::new(ErrorKind::BadRequest, None))?
        }
    };

    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let trailers = headers::accepts_trailers(&parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers::add_forwarded(
        &mut parts.headers,
        &ctx.peer.header,
        original_host.as_ref(),
        parts.version,
    );
    if let (true, Some(proto)) = (upgrade, upgrade_proto) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto);
    }
    // HTTP/2 carries the host as :authority (in the URI), not as Host.
    let h2 = group.is_h2();
    if h2 {
        parts.headers.remove(header::HOST);
    } else {
        headers::join_cookies(&mut parts.headers);
    }
    let preserved = if cfg.preserve_host {
        original_host
    } else {
        None
    };

    // A bodyless request can be rebuilt for every attempt; a body only
    // while it is unread (see the module doc).
    let mut body = (!http_body::Body::is_end_stream(&body))
        .then(|| RequestBody::new(body, ctx.timeouts.request_body));
    let has_body = body.is_some();
    let may_retry = cfg.retries > 0 && group.upstreams.len() > 1;
    let start = Instant::now();
    let mut tried = [0usize; MAX_RETRIES as usize + 1];
    let mut attempts = 0usize;
    loop {
        let now = now_ms();
        let Some(i) = group.pick(key, &tried[..attempts], now) else {
            // Only reached on the first attempt: a retry is only tried
            // after checking that another upstream is in service.
            let retry_after = health::retry_after(group, now);
            tracing::warn!(site = %group.site, route = %group.route, retry_after, "no upstream in service");
            return Err(ProxyError::new(ErrorKind::NoUpstream { retry_after }, None));
        };
        let up = &group.upstreams[i];
        let who = up.labels(group);
        let in_flight = InFlight::start(&up.state);
        let (attempt_body, back) = match body.take() {
            Some(b) => {
                let (b, rx) = UpstreamBody::returnable(b);
                (b, Some(rx))
            }
            None => (UpstreamBody::empty(), None),
        };
        let mut out = Request::new(attempt_body);
        *out.method_mut() = parts.method.clone();
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = if may_retry {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let host = preserved.clone().unwrap_or_else(|| up.authority.clone());
        *out.uri_mut() = if h2 {
            let authority = Authority::try_from(host.as_bytes()).unwrap_or_else(|_| {
                Authority::try_from(up.label.as_bytes())
                    .unwrap_or_else(|_| Authority::from_static("invalid"))
            });
            let scheme = if up.target.is_https() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            };
            Uri::from_parts({
                let mut p = http::uri::Parts::default();
                p.scheme = Some(scheme);
                p.authority = Some(authority);
                p.path_and_query = Some(pq.clone());
                p
            })
            .unwrap_or_else(|_| up.target.uri.clone())
        } else {
            // HTTP/1.1: origin-form, the upstream's name in `Host`.
            out.headers_mut().insert(header::HOST, host);
            Uri::from(pq.clone())
        };

        let result =
            tokio::time::timeout(ctx.timeouts.upstream_response, up.client.request(out)).await;
        let now = now_ms();
        let e = match result {
            Ok(Ok(resp)) => {
                up.state.count_status(resp.status());
                if resp.status().is_server_error() {
                    up.state.passive_failure(&cfg.passive, now, &who);
                } else {
                    up.state.passive_success(now, &who);
                }
                let resp = respond(ctx, resp, downstream_upgrade)
                    .map_err(|kind| ProxyError::new(kind, Some(up.label.clone())))?;
                return Ok(Forwarded {
                    resp,
                    upstream: up.label.clone(),
                    in_flight,
                });
            }
            Err(_) => {
                up.state.count_error();
                up.state.passive_failure(&cfg.passive, now, &who);
                ctx.count(ErrorKind::Timeout);
                tracing::warn!(upstream = %up.label, "upstream did not answer in time");
                return Err(ProxyError::new(ErrorKind::Timeout, Some(up.label.clone())));
            }
            Ok(Err(e)) => e,
        };
        drop(in_flight);
        // The client's faults: a stalled upload, or a malformed body. The
        // upstream request was aborted with it and its connection is not
        // reused (the pool never gets it back).
        if has_source::<BodyTimeout>(&e) {
            return Err(ProxyError::new(
                ErrorKind::BodyTimeout,
                Some(up.label.clone()),
            ));
        }
        if has_source::<ClientBodyError>(&e) {
            tracing::debug!(upstream = %up.label, error = %error_chain(&e), "malformed request body; upstream request aborted");
            return Err(ProxyError::new(ErrorKind::BadBody, Some(up.label.clone())));
        }
        let timed_out = is_timeout(&e);
        let kind = if timed_out {
            ErrorKind::Timeout
        } else if e.is_connect() {
            ErrorKind::Connect
        } else {
            ErrorKind::Protocol
        };
        up.state.count_error();
        up.state.passive_failure(&cfg.passive, now, &who);
        ctx.count(kind);
        // Nothing sent (connect failure): any method. Reset before a
        // response: idempotent methods. Never once the upstream answered.
        let mut retry = may_retry
            && (e.is_connect()
                || (is_idempotent(&parts.method) && !timed_out && !e.response_started()));
        if has_body {
            match back.and_then(|mut rx| rx.try_recv().ok()) {
                Some(b) => body = Some(b),
                // Read, even partly: the request cannot be sent again.
                None => retry = false,
            }
        }
        tried[attempts] = i;
        attempts += 1;
        let retry = retry
            && attempts <= cfg.retries as usize
            && start.elapsed() < cfg.retry_budget
            && group.pick(key, &tried[..attempts], now).is_some();
        let label = kind.upstream_label().map_or("", |k| k.as_str());
        if retry {
            up.state
                .retried
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(upstream = %up.label, kind = label, error = %error_chain(&e), "upstream request failed; retrying on another upstream");
            continue;
        }
        tracing::warn!(upstream = %up.label, kind = label, error = %error_chain(&e), "upstream request failed");
        return Err(ProxyError::new(kind, Some(up.label.clone())));
    }
}

/// The client's response: hop-by-hop headers removed; a `101` becomes a
/// tunnel between the two upgraded connections.
fn respond(
    ctx: &ForwardCtx<'_>,
    mut resp: Response<UpstreamIncoming>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response<ResponseBody>, ErrorKind> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let down = downstream_upgrade.ok_or(ErrorKind::UnaskedUpgrade)?;
        let up_upgrade = hyper::upgrade::on(&mut resp);
        // A tunnel has no requests to finish: on shutdown it gets the
        // grace period, then both ends are closed (dropped).
        let shutdown = ctx.shutdown.clone();
        let grace = ctx.timeouts.shutdown_grace;
        ctx.tunnels.spawn(async move {
            let tunnel = async {
                match tokio::try_join!(down, up_upgrade) {
                    Ok((d, u)) => {
                        let mut d = TokioIo::new(d);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            };
            tokio::select! {
                _ = tunnel => {}
                _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                    tracing::debug!("shutdown grace period over; closing an upgraded connection");
                }
            }
        });
        let (mut parts, _) = resp.into_parts();
        let proto = parts.headers.get(header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = proto {
            parts.headers.insert(header::UPGRADE, p);
        }
        return Ok(Response::from_parts(parts, ResponseBody::Empty));
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, ResponseBody::Upstream(body)))
}
