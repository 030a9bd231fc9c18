//! Harness of the upstream tests: real backend servers on loopback that
//! can be killed (listener closed, every connection dropped) and revived
//! on the same port, speaking HTTP/1.1, h2c, or TLS (with ALPN h2 or
//! http/1.1, optionally requiring a client certificate); a private CA for
//! backend and client certificates; the proxy config around them; an h2
//! client to drive load; and `/metrics` readers to await health states.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::{self, Alg, Pki, Proxy};

/// What a backend speaks.
#[derive(Clone)]
pub enum Mode {
    /// HTTP/1.1 over TCP.
    H1,
    /// HTTP/2 with prior knowledge over TCP.
    H2c,
    /// TLS; HTTP/2 when ALPN picks h2, else HTTP/1.1.
    Tls(Arc<rustls::ServerConfig>),
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    /// `Host`, or the URI authority (HTTP/2 `:authority`).
    pub host: String,
    pub body_len: usize,
    /// TLS: the SNI the proxy sent and the client certificate's CN.
    pub sni: Option<String>,
    pub client_cn: Option<String>,
}

/// Per-connection TLS facts handed to the request handler.
#[derive(Clone, Default)]
struct ConnInfo {
    sni: Option<String>,
    client_cn: Option<String>,
}

/// State shared by a backend's tasks.
pub struct Shared {
    pub name: String,
    /// Requests other than health checks.
    pub hits: AtomicUsize,
    /// Health-check requests (`/health`).
    pub health_hits: AtomicUsize,
    /// `/health` answers 200 while true, 503 while false.
    pub healthy: AtomicBool,
    /// Requests held on `/hold` right now.
    pub holding: AtomicUsize,
    /// Opens `/hold`.
    pub gate: tokio::sync::watch::Sender<bool>,
    /// Every non-health request.
    pub seen: Mutex<Vec<Seen>>,
    /// HTTP version of every health-check request.
    pub health_versions: Mutex<Vec<http::Version>>,
}

/// A backend server on 127.0.0.1.
pub struct Backend {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    mode: Mode,
    stop: CancellationToken,
}

impl Backend {
    /// Starts `name` on a free port.
    pub async fn start(name: &str, mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (gate, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            hits: AtomicUsize::new(0),
            health_hits: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            holding: AtomicUsize::new(0),
            gate,
            seen: Mutex::new(Vec::new()),
            health_versions: Mutex::new(Vec::new()),
        });
        let mut b = Backend {
            addr: listener.local_addr().unwrap(),
            shared,
            mode,
            stop: CancellationToken::new(),
        };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        self.stop = stop.clone();
        let shared = self.shared.clone();
        let mode = self.mode.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (shared, mode, stop) = (shared.clone(), mode.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        // Killed: the connection is dropped mid-whatever.
                        _ = stop.cancelled() => {}
                        _ = serve_conn(tcp, shared, mode) => {}
                    }
                });
            }
        });
    }

    /// Stops accepting and drops every open connection.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    /// Listens again on the same port.
    pub async fn revive(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn health_versions(&self) -> Vec<http::Version> {
        self.shared.health_versions.lock().unwrap().clone()
    }

    pub fn holding(&self) -> usize {
        self.shared.holding.load(Ordering::SeqCst)
    }

    /// Lets every held `/hold` request (and later ones) finish.
    pub fn open_gate(&self) {
        self.shared.gate.send_replace(true);
    }

    pub fn set_healthy(&self, ok: bool) {
        self.shared.healthy.store(ok, Ordering::SeqCst);
    }

    /// `host:port`, the upstream label in metrics.
    pub fn label(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_conn(tcp: tokio::net::TcpStream, shared: Arc<Shared>, mode: Mode) {
    let _ = tcp.set_nodelay(true);
    let service = |shared: Arc<Shared>, info: ConnInfo| {
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(handle(shared, info, req).await) }
        })
    };
    match mode {
        Mode::H1 => {
            let svc = service(shared, ConnInfo::default());
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
        Mode::H2c => {
            let svc = service(shared, ConnInfo::default());
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
        Mode::Tls(cfg) => {
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                return;
            };
            let (_, conn) = tls.get_ref();
            let info = ConnInfo {
                sni: conn.server_name().map(str::to_string),
                client_cn: conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| cn_of(c)),
            };
            let h2 = conn.alpn_protocol() == Some(b"h2");
            let svc = service(shared, info);
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        }
    }
}

fn cn_of(der: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}

type Resp = Response<Full<Bytes>>;

async fn handle(shared: Arc<Shared>, info: ConnInfo, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    if path == "/health" {
        shared.health_hits.fetch_add(1, Ordering::SeqCst);
        shared.health_versions.lock().unwrap().push(req.version());
        let status = if shared.healthy.load(Ordering::SeqCst) {
            200
        } else {
            503
        };
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::from("health\n")))
            .unwrap();
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let method = req.method().to_string();
    let version = req.version();
    let body_len = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    shared.hits.fetch_add(1, Ordering::SeqCst);
    shared.seen.lock().unwrap().push(Seen {
        method,
        path: path.clone(),
        version,
        host,
        body_len,
        sni: info.sni,
        client_cn: info.client_cn,
    });
    if path == "/hold" {
        shared.holding.fetch_add(1, Ordering::SeqCst);
        let mut rx = shared.gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
        shared.holding.fetch_sub(1, Ordering::SeqCst);
    }
    if path == "/fail" {
        return Response::builder()
            .status(500)
            .body(Full::new(Bytes::from("fail\n")))
            .unwrap();
    }
    Response::builder()
        .header("x-backend", shared.name.as_str())
        .body(Full::new(Bytes::from(shared.name.clone())))
        .unwrap()
}

// ---------------------------------------------------------------------------
// A private CA for backend (server) and proxy (client) certificates.

pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn issue(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Issued {
        self.issue(names[0], names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(cn, &[cn], ExtendedKeyUsagePurpose::ClientAuth)
    }

    pub fn root_store(&self) -> rustls::RootCertStore {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        roots
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A backend TLS config: `cert`, ALPN `alpn`, and when `clients` is set a
/// client certificate from that CA is required.
pub fn backend_tls(
    cert: &Issued,
    alpn: &[&[u8]],
    clients: Option<&Ca>,
) -> Arc<rustls::ServerConfig> {
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match clients {
        Some(ca) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.root_store()),
                provider(),
            )
            .build()
            .unwrap();
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    let mut cfg = b
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

// ---------------------------------------------------------------------------
// The proxy in front of the backends.

/// The proxy with the admin API on, one site `api.test`, and `routes`
/// (TOML of `[[sites.routes]]`). `files` are written next to the config.
pub async fn proxy(pki: &Pki, top: &str, routes: &str, files: &[(&str, &str)]) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["api.test"], Alg::Ecdsa).write(dir.path(), "");
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    Proxy::start_in(dir, &config_text(top, routes)).await
}

/// The config text [`proxy`] writes.
pub fn config_text(top: &str, routes: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n{top}\n[[sites]]\nhosts = [\"api.test\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n{routes}"
    )
}

/// Rewrites the config (same listeners) and reloads through the admin API.
pub async fn reload(proxy: &Proxy, top: &str, routes: &str) {
    let text = config_text(top, routes);
    // Keep the bound ports: a listener on :0 would be a new socket anyway,
    // and the reload keeps sockets whose configured address is unchanged.
    std::fs::write(proxy.dir.path().join("portcullis.toml"), text).unwrap();
    let (status, body) = common::admin_post(proxy.admin.unwrap(), "/reload").await;
    assert_eq!(status, 200, "reload: {body}");
}

/// An HTTP/2 connection to the proxy; clone the sender per task.
pub async fn h2_client(
    proxy: &Proxy,
    pki: &Pki,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tls = common::tls_connect(proxy.https, "api.test", pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A GET through an h2 connection: status and body (or the error).
pub async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut b = Request::builder().uri(format!("https://api.test{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send_req(send, b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Sends any request through an h2 connection: status and body.
pub async fn send_req(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(u16, String), String> {
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Every sample of `name` on `/metrics`, keyed by its label text.
pub async fn metric(proxy: &Proxy, name: &str) -> HashMap<String, f64> {
    let (status, text) = common::admin_get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        out.insert(labels.to_string(), value.trim().parse().unwrap());
    }
    out
}

/// `portcullis_upstream_healthy` of `upstream` on route `route` of `api.test`.
pub async fn healthy(proxy: &Proxy, route: &str, upstream: &str) -> Option<f64> {
    let key = format!("site=\"api.test\",route=\"{route}\",upstream=\"{upstream}\"");
    metric(proxy, "portcullis_upstream_healthy")
        .await
        .get(&key)
        .copied()
}

/// Polls `f` every 20 ms until it is true; panics after `limit` with `what`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
