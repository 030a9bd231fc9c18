//! The request handler of TLS listeners: check, route, then answer,
//! redirect or forward. Hot path. Sits above `upstream` and the route
//! table; the connection's [`ConnCtx`] and the request's resolved
//! [`Client`] are what every step reads.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::body::{short, Finish, ResponseBody, TrackedBody};
use super::clock::now_ms;
use super::context::{Client, Peer};
use super::error::ProxyError;
use super::headers::{self, Reject};
use super::io::ConnShared;
use super::ratelimit::{self, Decision};
use super::route::{Route, Site, Snapshot};
use super::runtime::Runtime;
use super::upstream::{self, ForwardCtx, InFlight as UpstreamInFlight};
use crate::config::{LimitKey, RouteAction};

/// Per-connection context shared by its requests.
pub(crate) struct ConnCtx {
    /// Shared runtime.
    pub rt: Arc<Runtime>,
    /// Who is on the other end.
    pub peer: Peer,
    /// Counters shared with the byte stream and the connection driver.
    pub shared: Arc<ConnShared>,
}

/// The access-log facts of a request; only gathered while the access log
/// is on (`rt.access_log.enabled()`), the headers only when its format
/// prints them.
struct AccessLine {
    start: Instant,
    method: Method,
    host: String,
    /// Path and query.
    target: String,
    upstream: Option<Arc<str>>,
    status: u16,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

/// Where routing sent a request.
#[derive(Default)]
struct Routed {
    /// The site and route index that served it (metric labels).
    route: Option<(Arc<Site>, usize)>,
    /// The upstream that answered (or failed last).
    upstream: Option<Arc<str>>,
    /// Counts the request on its upstream until the response body ends.
    upstream_in_flight: Option<UpstreamInFlight>,
}

/// What a request holds until its response body is done (or dropped):
/// the in-flight counts of its connection and upstream, and its access-log
/// line, written with the byte count.
pub(crate) struct RequestDone {
    in_flight: InFlight,
    _upstream_in_flight: Option<UpstreamInFlight>,
    log: Option<Box<AccessLine>>,
}

impl Finish for RequestDone {
    /// The response body sent `bytes` bytes and is over.
    fn finish(self, bytes: u64) {
        let Some(a) = self.log else { return };
        let ctx = &self.in_flight.0;
        ctx.rt.access_log.log(&crate::accesslog::Entry {
            client: ctx.peer.addr.ip(),
            host: &a.host,
            sni: ctx.peer.sni.as_deref(),
            method: a.method.as_str(),
            target: &a.target,
            version: a.version,
            status: a.status,
            bytes,
            duration: a.start.elapsed(),
            upstream: a.upstream.as_deref(),
            referer: a.referer.as_ref().map(HeaderValue::as_bytes),
            user_agent: a.user_agent.as_ref().map(HeaderValue::as_bytes),
        });
    }
}

/// Serves one request; never fails (errors become responses).
pub(crate) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<TrackedBody<RequestDone>>, Infallible> {
    let index = ctx.shared.requests.fetch_add(1, Ordering::AcqRel);
    let in_flight = InFlight::start(ctx.clone());
    let start = Instant::now();
    let method = req.method().clone();
    let mut log = ctx.rt.access_log.enabled().then(|| {
        let headers = ctx.rt.access_log.needs_headers();
        let keep = |name| headers.then(|| req.headers().get(name).cloned()).flatten();
        Box::new(AccessLine {
            start,
            method: method.clone(),
            host: String::new(),
            target: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            upstream: None,
            status: 0,
            version: req.version(),
            referer: keep(header::REFERER),
            user_agent: keep(header::USER_AGENT),
        })
    });
    let mut routed = Routed::default();
    let resp = route_plain(&ctx, req, index, &mut routed, log.as_deref_mut()).await;
    let status = resp.status().as_u16();
    record(&ctx.rt, &routed, &method, status, start);
    if let Some(a) = &mut log {
        a.status = status;
        a.upstream = routed.upstream;
    }
    let (parts, body) = resp.into_parts();
    let done = RequestDone {
        in_flight,
        _upstream_in_flight: routed.upstream_in_flight,
        log,
    };
    Ok(Response::from_parts(parts, TrackedBody::new(body, done)))
}

/// Counts one request as in flight on its connection until dropped. It
/// lives in the handler future, then in the response body's
/// [`RequestDone`], so the count comes back down even when hyper drops the
/// future before any response exists (an HTTP/2 stream reset while the
/// upstream is slow); otherwise the connection would look busy forever and
/// never go idle.
struct InFlight(Arc<ConnCtx>);

impl InFlight {
    fn start(ctx: Arc<ConnCtx>) -> InFlight {
        ctx.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        ctx.rt.metrics.in_flight.inc();
        InFlight(ctx)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.rt.metrics.in_flight.dec();
        let shared = &self.0.shared;
        shared.last_done_ms.store(now_ms(), Ordering::Release);
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response whose body is not yet tracked.
type Plain = Response<ResponseBody>;

/// Counts a request and its time to response head (handles resolved
/// with the route; no label lookup here).
fn record(rt: &Runtime, routed: &Routed, method: &Method, status: u16, start: Instant) {
    let (m, unrouted) = (&*rt.metrics, &rt.counters.unrouted);
    let seconds = start.elapsed().as_secs_f64();
    match &routed.route {
        Some((site, i)) => {
            let route = &site.routes[*i];
            route
                .metrics
                .record(m, &site.name, &route.prefix, method, status, seconds);
        }
        None => unrouted.record(m, "-", "-", method, status, seconds),
    }
    if status == 400 {
        m.bad_requests.inc();
    }
}

/// Applies a route's rate limits. `Err` is the 429 to send (boxed: rare, and
/// large next to `Ok`); `Ok` carries the `RateLimit-Policy` / `RateLimit`
/// headers of the tightest limit.
fn check_limits(
    client: Client,
    snap: &Snapshot,
    site: &Site,
    route: &Route,
    headers: &http::HeaderMap,
) -> Result<Option<(HeaderValue, HeaderValue)>, Box<Plain>> {
    let client = client.ip;
    let mut tightest: Option<(u32, &ratelimit::Limiter, Decision)> = None;
    // Per-client limits first: a client over its own limit is refused before
    // it spends from a limit the whole route shares, so one client cannot
    // drain everyone's budget with requests that are refused anyway.
    let shared = |(_, l): &(usize, &Arc<ratelimit::Limiter>)| l.config.key == LimitKey::Route;
    let ordered = route
        .limits
        .iter()
        .enumerate()
        .filter(|l| !shared(l))
        .chain(route.limits.iter().enumerate().filter(shared));
    for (i, lim) in ordered {
        let d = lim.check(lim.key(client, headers));
        match d {
            Decision::Deny { retry_after } => {
                route.limited[i].inc();
                if lim.config.shadow {
                    tracing::info!(site = %site.name, route = %route.prefix, limit = %lim.config.name, %client, "rate limit exceeded (shadow mode: allowed)");
                    continue;
                }
                tracing::debug!(site = %site.name, route = %route.prefix, limit = %lim.config.name, %client, "rate limited");
                let mut r = Response::new(ResponseBody::full(snap.limited_body.clone()));
                *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                let h = r.headers_mut();
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(ratelimit::retry_secs(retry_after)),
                );
                h.insert(RATELIMIT_POLICY, lim.policy_header().clone());
                h.insert(RATELIMIT, lim.state_header(&d));
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                return Err(Box::new(r));
            }
            Decision::Allow { remaining } if !lim.config.shadow => {
                if tightest.as_ref().is_none_or(|(r, _, _)| remaining < *r) {
                    tightest = Some((remaining, lim, d));
                }
            }
            Decision::Allow { .. } => {}
        }
    }
    Ok(tightest.map(|(_, lim, d)| (lim.policy_header().clone(), lim.state_header(&d))))
}

const RATELIMIT_POLICY: header::HeaderName = header::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit");

async fn route_plain(
    ctx: &ConnCtx,
    req: Request<Incoming>,
    index: u64,
    routed: &mut Routed,
    log: Option<&mut AccessLine>,
) -> Plain {
    if ctx.shared.first_bad_head.load(Ordering::Acquire) == index {
        return bad_request(Reject::LengthAndEncoding);
    }
    let host = match headers::check_request(&req) {
        Ok(h) => h,
        Err(r) => return bad_request(r),
    };
    if let Err(r) = headers::check_path(req.uri().path()) {
        return bad_request(r);
    }
    let snap = ctx.rt.snapshot.load_full();
    // HTTP/1.1 heads are held to this by hyper; HTTP/2 ones here.
    if req.headers().len() > snap.limits.max_headers {
        return short(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many header fields\n",
        );
    }
    if let Some(a) = log {
        a.host = host.unwrap_or_default().to_string();
    }
    if req.method() == Method::CONNECT {
        return short(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
    }
    let Some(site) = snap.sites.lookup(host).cloned() else {
        return short(
            StatusCode::MISDIRECTED_REQUEST,
            "no site is configured for this host\n",
        );
    };
    let Some(route_index) = site.route_index(req.uri().path()) else {
        return short(StatusCode::NOT_FOUND, "not found\n");
    };
    routed.route = Some((site.clone(), route_index));
    let route = &site.routes[route_index];
    let client = Client::resolve(&ctx.peer, req.headers(), &snap.trusted_proxies);
    let limit_headers = if route.limits.is_empty() {
        None
    } else {
        match check_limits(client, &snap, &site, route, req.headers()) {
            Ok(h) => h,
            Err(resp) => return *resp,
        }
    };
    let mut resp = match &route.action {
        RouteAction::Respond {
            status,
            body,
            content_type,
        } => {
            let mut r = Response::new(ResponseBody::full(body.clone()));
            *r.status_mut() = *status;
            if let Ok(v) = HeaderValue::from_str(content_type) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        RouteAction::Redirect { to, status } => {
            let uri = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let target = to.replace("{uri}", uri);
            let mut r = Response::new(ResponseBody::Empty);
            *r.status_mut() = *status;
            match HeaderValue::try_from(target) {
                Ok(v) => {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                Err(_) => return bad_request(Reject::HeaderBytes),
            }
            r
        }
        RouteAction::Proxy(_) => {
            let Some(group) = &route.upstream else {
                return short(StatusCode::BAD_GATEWAY, "upstream unavailable\n");
            };
            let fwd = ForwardCtx {
                client,
                peer: &ctx.peer,
                timeouts: &snap.timeouts,
                errors: &ctx.rt.counters.upstream_errors,
                tunnels: &ctx.rt.tracker,
                shutdown: &ctx.rt.shutdown,
            };
            // Boxed: forwarding is most of a request's state (3 KiB). In
            // place, every HTTP/2 stream task would be spawned, moved and
            // polled with it: callgrind counts 2.8% fewer instructions per
            // HTTP/2 request boxed, 1% more per HTTP/1.1 one.
            let grpc = headers::is_grpc(req.headers());
            match Box::pin(upstream::forward(req, &fwd, group)).await {
                Ok(out) => {
                    routed.upstream = Some(out.upstream);
                    routed.upstream_in_flight = Some(out.in_flight);
                    out.resp
                }
                Err(e) => {
                    routed.upstream = e.upstream.clone();
                    return if grpc {
                        grpc_error_response(&e)
                    } else {
                        error_response(&e)
                    };
                }
            }
        }
    };
    if let Some((policy, state)) = limit_headers {
        resp.headers_mut().insert(RATELIMIT_POLICY, policy);
        resp.headers_mut().insert(RATELIMIT, state);
    }
    resp
}

fn bad_request(r: Reject) -> Plain {
    let mut resp = short(StatusCode::BAD_REQUEST, r.message());
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The answer to a request the proxy could not forward: the one place a
/// [`ProxyError`] becomes a status, a body and its headers.
fn error_response(e: &ProxyError) -> Plain {
    let mut r = short(e.status(), e.message());
    if let super::error::ErrorKind::NoUpstream { retry_after } = e.kind {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    if e.closes_connection() {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The answer to a gRPC request the proxy could not forward: a
/// "Trailers-Only" response (HTTP 200, the status in `grpc-status`), which
/// gRPC clients read as a call status instead of a transport failure.
fn grpc_error_response(e: &ProxyError) -> Plain {
    let mut r = Response::new(ResponseBody::Empty);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(e.grpc_status()),
    );
    h.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static(e.grpc_message()),
    );
    r
}
