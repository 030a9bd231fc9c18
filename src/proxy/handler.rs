//! The request handler of TLS listeners: check, route, then answer,
//! redirect or forward. Hot path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::body::{short, ResponseBody, TrackedBody};
use super::headers::{self, Reject};
use super::io::ConnShared;
use super::ratelimit::{self, Decision, Limiter};
use super::{Route, Site};
use super::{Runtime, Snapshot};
use crate::config::{LimitKey, RouteAction};
use crate::metrics::{method_label, status_class, Metrics};

/// Per-connection context shared by its requests.
pub struct ConnCtx {
    /// Shared runtime.
    pub rt: Arc<Runtime>,
    /// Client address.
    pub peer: SocketAddr,
    /// The client's IP address as a header value (`X-Forwarded-For`),
    /// formatted once per connection.
    pub peer_header: HeaderValue,
    /// Counters shared with the byte stream and the connection driver.
    pub shared: Arc<ConnShared>,
    /// SNI the client sent (for logs).
    pub sni: Option<Arc<str>>,
}

impl ConnCtx {
    /// The context of a connection from `peer`.
    pub fn new(
        rt: Arc<Runtime>,
        peer: SocketAddr,
        shared: Arc<ConnShared>,
        sni: Option<Arc<str>>,
    ) -> ConnCtx {
        let peer_header = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnCtx {
            rt,
            peer,
            peer_header,
            shared,
            sni,
        }
    }
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
    upstream_in_flight: Option<super::upstream::InFlight>,
}

/// What a request holds until its response body is done (or dropped):
/// the in-flight counts of its connection and upstream, and its access-log
/// line, written with the byte count.
pub(crate) struct RequestDone {
    in_flight: InFlight,
    _upstream_in_flight: Option<super::upstream::InFlight>,
    log: Option<Box<AccessLine>>,
}

impl RequestDone {
    /// The response body sent `bytes` bytes and is over.
    pub(crate) fn finish(self, bytes: u64) {
        let Some(a) = self.log else { return };
        let ctx = &self.in_flight.0;
        ctx.rt.access_log.log(&crate::accesslog::Entry {
            client: ctx.peer.ip(),
            host: &a.host,
            sni: ctx.sni.as_deref(),
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
pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<TrackedBody>, Infallible> {
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
    record(&ctx.rt.metrics, &routed, &method, status, start);
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
        shared
            .last_done_ms
            .store(self.0.rt.now_ms(), Ordering::Release);
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response whose body is not yet tracked.
type Plain = Response<ResponseBody>;

/// Counts a request and its time to response head (bounded labels only).
fn record(m: &Metrics, routed: &Routed, method: &Method, status: u16, start: Instant) {
    let seconds = start.elapsed().as_secs_f64();
    match &routed.route {
        Some((site, i)) => {
            let route = &site.routes[*i];
            route
                .metrics
                .record(m, &site.name, &route.prefix, method, status, seconds);
        }
        None => {
            m.requests
                .with_label_values(&["-", "-", method_label(method), status_class(status)])
                .inc();
            m.latency.with_label_values(&["-", "-"]).observe(seconds);
        }
    }
    if status == 400 {
        m.bad_requests.inc();
    }
}

/// Applies a route's rate limits. `Err` is the 429 to send (boxed: rare, and
/// large next to `Ok`); `Ok` carries the `RateLimit-Policy` / `RateLimit`
/// headers of the tightest limit.
fn check_limits(
    ctx: &ConnCtx,
    snap: &Snapshot,
    site: &Site,
    route: &Route,
    headers: &http::HeaderMap,
) -> Result<Option<(HeaderValue, HeaderValue)>, Box<Plain>> {
    let client = ratelimit::client_ip(ctx.peer.ip(), headers, &snap.trusted_proxies);
    let mut tightest: Option<(u32, &Limiter, Decision)> = None;
    // Per-client limits first: a client over its own limit is refused before
    // it spends from a limit the whole route shares, so one client cannot
    // drain everyone's budget with requests that are refused anyway.
    let shared = |l: &&Arc<Limiter>| l.config.key == LimitKey::Route;
    let ordered = route
        .limits
        .iter()
        .filter(|l| !shared(l))
        .chain(route.limits.iter().filter(shared));
    for lim in ordered {
        let d = lim.check(lim.key(client, headers));
        match d {
            Decision::Deny { retry_after } => {
                let mode = if lim.config.shadow {
                    "shadow"
                } else {
                    "enforce"
                };
                ctx.rt
                    .metrics
                    .ratelimit_limited
                    .with_label_values(&[
                        &*site.name,
                        route.prefix.as_str(),
                        lim.config.name.as_str(),
                        mode,
                    ])
                    .inc();
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
    if let Some(a) = log {
        a.host = host.unwrap_or_default().to_string();
    }
    if req.method() == Method::CONNECT {
        return short(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
    }
    let snap = ctx.rt.snapshot.load_full();
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
    let limit_headers = if route.limits.is_empty() {
        None
    } else {
        match check_limits(ctx, &snap, &site, route, req.headers()) {
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
            // Boxed: forwarding is most of a request's state (3 KiB). In
            // place, every HTTP/2 stream task would be spawned, moved and
            // polled with it: callgrind counts 2.8% fewer instructions per
            // HTTP/2 request boxed, 1% more per HTTP/1.1 one.
            let out = Box::pin(super::upstream::forward::forward(ctx, &snap, group, req)).await;
            routed.upstream = out.upstream;
            routed.upstream_in_flight = out.in_flight;
            out.resp
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
