//! The admin listener (default 127.0.0.1:9901, never public by default).
//! Control path.
//!
//! - `GET /healthz`: the process is up.
//! - `GET /readyz`: listeners are open and certificates loaded; 503 as soon
//!   as shutdown starts, so a load balancer drains us.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /certs`: the certificate inventory (JSON), pending errors included.
//! - `POST /reload`: re-read the config and certificate files.
//! - `POST /certs/{name}/renew`: issue a fresh certificate with a new key now
//!   (for certificates portcullis issues itself: internal CA or ACME);
//!   without `force`, only when it is due.
//! - `POST /certs/{name}/revoke?reason=key-compromise`: ACME only; order a
//!   replacement with a new key, put it in service, then revoke the old one.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderName;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certstore::{CertSource, PublishCause};
use crate::config::AdminAccess;
use crate::control::{Control, ReloadReport, ReloadStatus};
use crate::metrics::Metrics;
use crate::proxy::server::accept_loop;

/// State the admin API reports on.
pub struct AdminState {
    /// True once every listener is accepting; false again when shutting down.
    pub ready: AtomicBool,
    /// The running server's control plane.
    control: Arc<Control>,
    /// Metrics to render.
    metrics: Arc<Metrics>,
}

impl AdminState {
    /// State over a server's control plane and metrics.
    pub fn new(control: Arc<Control>, metrics: Arc<Metrics>) -> Self {
        AdminState {
            ready: AtomicBool::new(false),
            control,
            metrics,
        }
    }
}

/// Connections the admin listener serves at once. Its own budget, not
/// the proxy's: a saturated proxy can still be scraped, reloaded and
/// drained.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the admin API until `stop` is cancelled, through the proxy's
/// accept loop with a budget of [`MAX_CONNECTIONS`]; a request head must
/// arrive within `timeouts.request_header`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    accept_loop(listener, slots, None, tracker, stop, |tcp, _peer| {
        let state = state.clone();
        let header_timeout = state
            .control
            .runtime()
            .snapshot
            .load()
            .timeouts
            .request_header;
        async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await;
}

/// What an admin request asks for; worked out from the method and path
/// alone, so it can be tested on any input.
#[derive(Debug, PartialEq, Eq)]
enum Call<'a> {
    Healthz,
    Readyz,
    Metrics,
    Certs,
    Reload,
    Renew(&'a str),
    Revoke(&'a str),
    /// Known path, wrong method: the method to use.
    WrongMethod(&'static str),
    /// `/certs/{name}/...` with an empty or nested name.
    BadName,
    NotFound,
}

fn route<'a>(method: &Method, path: &'a str) -> Call<'a> {
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let read = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/healthz" if read => return Call::Healthz,
        "/readyz" if read => return Call::Readyz,
        "/metrics" if *method == Method::GET => return Call::Metrics,
        "/certs" if *method == Method::GET => return Call::Certs,
        "/reload" if *method == Method::POST => return Call::Reload,
        "/healthz" | "/readyz" | "/metrics" | "/certs" => return Call::WrongMethod("GET"),
        "/reload" => return Call::WrongMethod("POST"),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/certs/") else {
        return Call::NotFound;
    };
    let (name, action) = match rest.rsplit_once('/') {
        Some((name, a @ ("renew" | "revoke"))) => (name, a),
        _ => return Call::NotFound,
    };
    if name.is_empty() || name.contains('/') {
        return Call::BadName;
    }
    if *method != Method::POST {
        return Call::WrongMethod("POST");
    }
    if action == "renew" {
        Call::Renew(name)
    } else {
        Call::Revoke(name)
    }
}

/// `GET /certs` body.
#[derive(Serialize)]
struct CertsBody<'a> {
    certificates: Vec<crate::certstore::inventory::CertReport>,
    config_reload: &'a ReloadStatus,
}

/// `POST /reload` body.
#[derive(Serialize)]
struct ReloadBody {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<ReloadReport>,
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let call = route(req.method(), req.uri().path());
    if let Some(refused) = check_access(&state.control.admin_access(), &req, &call) {
        return refused;
    }
    match call {
        Call::Healthz => text(StatusCode::OK, "ok\n".into()),
        Call::Readyz => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        Call::Metrics => {
            let body = state.metrics.render(state.control.certs());
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Call::Certs => {
            let status = state.control.status();
            json(
                StatusCode::OK,
                &CertsBody {
                    certificates: state.control.certs().inventory(),
                    config_reload: &status,
                },
            )
        }
        Call::Reload => match state.control.reload().await {
            Ok(report) => json(
                StatusCode::OK,
                &ReloadBody {
                    ok: true,
                    error: None,
                    report: Some(report),
                },
            ),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &ReloadBody {
                    ok: false,
                    error: Some(e),
                    report: None,
                },
            ),
        },
        Call::Renew(name) => {
            let force = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv == "force" || kv == "force=1" || kv == "force=true")
            });
            if state.control.acme().manages(name) {
                let (acme, n) = (state.control.acme().clone(), name.to_string());
                return acme_action(name, async move { acme.renew(&n, force).await }).await;
            }
            renew(state, name, force)
        }
        Call::Revoke(name) => {
            let reason = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("reason=")))
                .unwrap_or("");
            let Some(reason) = crate::acme::RevokeReason::parse(reason) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "give a reason: ?reason=key-compromise (one of: {})\n",
                        crate::acme::RevokeReason::NAMES
                    ),
                );
            };
            if state.control.certs().slot(name).is_none() {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("no certificate named {name:?}\n"),
                );
            }
            if !state.control.acme().manages(name) {
                return text(
                    StatusCode::CONFLICT,
                    format!("{name:?} is not an ACME certificate; revoke it with the CA or tool that issued it\n"),
                );
            }
            let (acme, n) = (state.control.acme().clone(), name.to_string());
            acme_action(name, async move { acme.revoke(&n, reason).await }).await
        }
        Call::WrongMethod(m) => text(StatusCode::METHOD_NOT_ALLOWED, format!("use {m}\n")),
        Call::BadName => text(
            StatusCode::BAD_REQUEST,
            "name the certificate: /certs/{name}/renew or /certs/{name}/revoke\n".into(),
        ),
        Call::NotFound => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Whether `host` (a `Host` or `Origin` host, port stripped) names this
/// admin API: an IP literal (a browser that sent one was pointed at the
/// address itself, which DNS rebinding cannot do), `localhost`, or a name
/// from `admin.hosts`.
fn host_allowed(access: &AdminAccess, host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || access.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// The host of a `Host` value or of an `Origin` URL, port stripped.
fn host_of(value: &str) -> Option<&str> {
    let authority = match value.split_once("://") {
        Some((_, rest)) => rest.split('/').next()?,
        None => value,
    };
    crate::proxy::headers::strip_port(authority)
}

/// The refusal (if any) of requests for a foreign `Host` (DNS rebinding), state changes
/// from a cross-site page (`Origin`), and requests without the bearer
/// token when one is configured (`/healthz` and `/readyz` need none: they
/// tell nothing and probes seldom carry credentials).
fn check_access(
    access: &AdminAccess,
    req: &Request<Incoming>,
    call: &Call<'_>,
) -> Option<Response<Full<Bytes>>> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header(header::HOST).or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !host
        .and_then(host_of)
        .is_some_and(|h| host_allowed(access, h))
    {
        return Some(text(
            StatusCode::FORBIDDEN,
            "this admin API answers only for its address, localhost and admin.hosts (Host refused)\n".into(),
        ));
    }
    if *req.method() != Method::GET && *req.method() != Method::HEAD {
        let cross_site = header(header::ORIGIN)
            .is_some_and(|o| !host_of(o).is_some_and(|h| host_allowed(access, h)))
            || header(HeaderName::from_static("sec-fetch-site")).is_some_and(|s| s == "cross-site");
        if cross_site {
            return Some(text(
                StatusCode::FORBIDDEN,
                "cross-site requests cannot change state (Origin refused)\n".into(),
            ));
        }
    }
    if let Some(token) = &access.token {
        if matches!(call, Call::Healthz | Call::Readyz) {
            return None;
        }
        let given = header(header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required: Authorization: Bearer <the token in admin.token_file>\n".into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"portcullis admin\""),
            );
            return Some(r);
        }
    }
    None
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long an admin request waits for an ACME order before answering 202
/// (the CLI's own timeout is 120 s); the order goes on either way.
const ACME_WAIT: std::time::Duration = std::time::Duration::from_secs(100);

/// Runs an ACME renewal or revocation and turns its outcome into a reply.
async fn acme_action(
    name: &str,
    action: impl std::future::Future<Output = Result<crate::acme::ActionReport, crate::acme::AcmeError>>
        + Send
        + 'static,
) -> Response<Full<Bytes>> {
    use crate::acme::AcmeError;
    let task = tokio::spawn(action);
    match tokio::time::timeout(ACME_WAIT, task).await {
        Err(_) => json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "ok": true, "name": name, "pending": true, "reason": "the order is still running; watch GET /certs" }),
        ),
        Ok(Err(e)) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "ok": false, "error": e.to_string() }),
        ),
        Ok(Ok(Ok(report))) => {
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            v["ok"] = serde_json::Value::Bool(true);
            json(StatusCode::OK, &v)
        }
        Ok(Ok(Err(e))) => {
            let status = match e {
                AcmeError::NotFound(_) => StatusCode::CONFLICT,
                AcmeError::Config(_) | AcmeError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_GATEWAY,
            };
            json(
                status,
                &serde_json::json!({ "ok": false, "name": name, "error": e.to_string() }),
            )
        }
    }
}

fn renew(state: &AdminState, name: &str, force: bool) -> Response<Full<Bytes>> {
    let store = state.control.certs();
    let Some(slot) = store.slot(name) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no certificate named {name:?}\n"),
        );
    };
    if !force && slot.source == CertSource::Internal {
        let due = slot.current().is_none_or(|c| {
            std::time::SystemTime::now() >= crate::certstore::internal::renew_at(&c.info)
        });
        if !due {
            return json(
                StatusCode::OK,
                &serde_json::json!({ "ok": true, "name": name, "renewed": false, "reason": "not due yet; use force to renew now" }),
            );
        }
    }
    match &slot.source {
        CertSource::Internal => match state.control.internal_ca() {
            Some(ca) => match ca.issue(&slot.hosts) {
                Ok(cert) => {
                    let serial = store.publish(&slot, cert, PublishCause::AdminRenew);
                    json(StatusCode::OK, &serde_json::json!({ "ok": true, "name": name, "renewed": true, "serial": serial }))
                }
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({ "ok": false, "error": e.to_string() }),
                ),
            },
            None => text(StatusCode::INTERNAL_SERVER_ERROR, "the internal CA is not available\n".into()),
        },
        CertSource::Acme { .. } => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{name:?}: its ACME task is not running (the server is starting or stopping)\n"),
        ),
        CertSource::File { .. } => text(
            StatusCode::CONFLICT,
            format!(
                "{name:?} is served from files; renew it with the tool that writes them (it is picked up automatically), or POST /reload\n"
            ),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_calls_are_routed() {
        assert_eq!(route(&Method::GET, "/healthz"), Call::Healthz);
        assert_eq!(route(&Method::GET, "/metrics/"), Call::Metrics);
        assert_eq!(
            route(&Method::POST, "/certs/a.example/renew"),
            Call::Renew("a.example")
        );
        assert_eq!(
            route(&Method::POST, "/certs/a.example/revoke"),
            Call::Revoke("a.example")
        );
        assert_eq!(route(&Method::POST, "/certs/renew"), Call::NotFound);
        assert_eq!(route(&Method::POST, "/certs//renew"), Call::BadName);
        assert_eq!(route(&Method::POST, "/certs/a/b/renew"), Call::BadName);
        assert_eq!(
            route(&Method::GET, "/certs/a/renew"),
            Call::WrongMethod("POST")
        );
        assert_eq!(route(&Method::DELETE, "/reload"), Call::WrongMethod("POST"));
        assert_eq!(route(&Method::GET, "/"), Call::NotFound);
    }

    /// Arbitrary methods and paths (a fixed-seed generator over the bytes
    /// and fragments that matter): the router answers every one without
    /// panicking, and never names an empty certificate.
    #[test]
    fn arbitrary_methods_and_paths_never_panic() {
        const PIECES: [&str; 16] = [
            "/",
            "//",
            "/certs",
            "/certs/",
            "renew",
            "/renew",
            "revoke",
            "/revoke",
            "%00",
            "%2F",
            "..",
            "é",
            "\u{0}",
            "reload",
            "a.example",
            "?force=1",
        ];
        let methods = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::from_bytes(b"BREW").expect("valid token"),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut path = String::new();
            for _ in 0..(next() % 8) {
                path.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            let method = &methods[(next() % methods.len() as u64) as usize];
            match route(method, &path) {
                Call::Renew(n) | Call::Revoke(n) => {
                    assert!(!n.is_empty() && !n.contains('/'), "{path:?} -> {n:?}")
                }
                _ => {}
            }
        }
        let long = format!("/certs/{}/renew", "a".repeat(10 * 1024));
        assert!(matches!(route(&Method::POST, &long), Call::Renew(_)));
        assert_eq!(route(&Method::GET, &"/".repeat(10 * 1024)), Call::NotFound);
    }
}
