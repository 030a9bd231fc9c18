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
//!   (for certificates portcullis issues itself).

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

use crate::certstore::{watch, CertSource};
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
            let force = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "force" || kv == "force=1" || kv == "force=true"));
            renew(state, name, force)
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/certs") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into())
        }
        (_, "/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn renew(state: &AdminState, name: &str, force: bool) -> Response<Full<Bytes>> {
    let store = state.control.certs();
    let Some(slot) = store.slot(name) else {
        return text(StatusCode::NOT_FOUND, format!("no certificate named {name:?}\n"));
    };
    if !force && slot.source == CertSource::Internal {
        let due = slot.current().is_none_or(|c| {
            let now = std::time::SystemTime::now();
            let left = c.info.not_after.duration_since(now).unwrap_or_default();
            let life = c.info.not_after.duration_since(c.info.not_before).unwrap_or_default();
            left < life / 3
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
                    let serial = cert.info.serial.clone();
                    slot.publish(cert);
                    watch::report(store, &slot, &watch::Outcome::Published { serial: serial.clone() });
                    json(StatusCode::OK, &serde_json::json!({ "ok": true, "name": name, "renewed": true, "serial": serial }))
                }
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({ "ok": false, "error": e.to_string() }),
                ),
            },
            None => text(StatusCode::INTERNAL_SERVER_ERROR, "the internal CA is not available\n".into()),
        },
        CertSource::Acme { .. } => text(StatusCode::NOT_IMPLEMENTED, "ACME renewal is not wired yet\n".into()),
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
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}
