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
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::certstore::{CertSource, PublishCause};
use crate::control::{Control, ReloadReport, ReloadStatus};
use crate::metrics::Metrics;

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

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
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
    let path = req.uri().path().trim_end_matches('/');
    let method = req.method();
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        (&Method::GET, "/metrics") => {
            let body = state.metrics.render(state.control.certs());
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/certs") => {
            let status = state.control.status();
            json(
                StatusCode::OK,
                &CertsBody {
                    certificates: state.control.certs().inventory(),
                    config_reload: &status,
                },
            )
        }
        (&Method::POST, "/reload") => match state.control.reload().await {
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
        (&Method::POST, p) if p.starts_with("/certs/") && p.ends_with("/renew") => {
            let name = &p["/certs/".len()..p.len() - "/renew".len()];
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
        (&Method::POST, p) if p.starts_with("/certs/") && p.ends_with("/revoke") => {
            let name = &p["/certs/".len()..p.len() - "/revoke".len()];
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
        (_, "/healthz" | "/readyz" | "/metrics" | "/certs") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into())
        }
        (_, "/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
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
