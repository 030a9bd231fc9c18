//! Real upstreams (origins) on 127.0.0.1:0: [`upstream`] runs a closure per
//! request (HTTP/1.1), [`echo_upstream`] answers with what it received, and
//! [`Backend`] is a named server that speaks HTTP/1.1, h2c or TLS (ALPN h2 or
//! http/1.1, optionally requiring a client certificate), counts hits, answers
//! `/health`, holds `/hold`, and can be killed (connections refused) and
//! revived on the same port without ever releasing it. [`Refusing`] is an
//! address that refuses connections for as long as it lives.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::common::pki::cn_of;
/// What the echo upstream saw.
pub type Seen = BTreeMap<String, String>;

/// Starts a hyper HTTP/1.1 upstream on 127.0.0.1:0 running `f` per request.
pub async fn upstream<F, Fut>(f: F) -> (SocketAddr, CancellationToken)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>>
        + Send
        + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop2.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, stop)
}

/// Boxes a fixed body.
pub fn full(b: impl Into<Bytes>) -> http_body_util::combinators::BoxBody<Bytes, Infallible> {
    Full::new(b.into()).boxed()
}

/// An upstream that answers with a JSON object of the request line and
/// headers it received (`:method`, `:path`, `:version`, then each header;
/// repeated headers joined with `, `).
pub async fn echo_upstream() -> (SocketAddr, CancellationToken) {
    upstream(echo).await
}

/// The echo upstream's answer to `req` (for upstreams that also count or
/// record what they see).
pub async fn echo(
    req: Request<Incoming>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    let mut seen = Seen::new();
    seen.insert(":method".into(), req.method().to_string());
    seen.insert(":path".into(), req.uri().to_string());
    seen.insert(":version".into(), format!("{:?}", req.version()));
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        seen.entry(k.to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.insert(":body-len".into(), body.len().to_string());
    Response::new(full(serde_json::to_vec(&seen).unwrap()))
}

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
pub struct Hit {
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
    pub seen: Mutex<Vec<Hit>>,
    /// HTTP version of every health-check request.
    pub health_versions: Mutex<Vec<http::Version>>,
}

/// A backend server on 127.0.0.1.
pub struct Backend {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    mode: Mode,
    stop: CancellationToken,
    /// While killed: the port, bound and not listening (so refusing).
    held: Mutex<Option<TcpSocket>>,
}

impl Backend {
    /// Starts `name` on a free port.
    pub async fn start(name: &str, mode: Mode) -> Backend {
        let socket = reusable_socket();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1024).unwrap();
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
            held: Mutex::new(None),
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

    /// Stops accepting and drops every open connection; connections are
    /// refused from then on. The port is never given back: a second socket
    /// bound to it (SO_REUSEPORT, not listening) holds it until
    /// [`Backend::revive`] listens on that same socket.
    pub fn kill(&self) {
        let mut held = self.held.lock().unwrap();
        if held.is_none() {
            let socket = reusable_socket();
            socket.bind(self.addr).unwrap();
            *held = Some(socket);
        }
        self.stop.cancel();
    }

    /// Listens again on the same port (the socket [`Backend::kill`] kept).
    pub async fn revive(&mut self) {
        let socket = self.held.lock().unwrap().take().expect("revive after kill");
        let listener = socket.listen(1024).unwrap();
        self.serve(listener);
    }

    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Hit> {
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
    shared.seen.lock().unwrap().push(Hit {
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

/// The WebSocket echo: if `req` asks for a WebSocket upgrade, answers 101
/// and echoes every data message of the upgraded connection (at most
/// `max_messages`, so the task is bounded); otherwise None.
pub fn ws_echo(
    req: &mut Request<Incoming>,
    max_messages: usize,
) -> Option<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>> {
    use futures_util::{SinkExt, StreamExt};
    use http::{header, HeaderValue, StatusCode};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;

    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = req
        .headers()
        .get("sec-websocket-key")
        .filter(|_| is_ws)?
        .clone();
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        for _ in 0..max_messages {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    });
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap(),
    );
    Some(resp)
}

/// A loopback port for a child that cannot bind `:0` and report its port.
///
/// Residual race, documented: the port is bound, then released before the
/// child binds it, so another process could take it in between; every
/// caller retries or reports a lost race. Used only where `:0` cannot be:
/// Pebble and pebble-challtestsrv print the configured address, not the
/// bound one, and the proxy's config must name Pebble's directory URL
/// before Pebble can start (Pebble must know the proxy's ports); and a
/// proxy listener that a reload must reconfigure in place (matched by its
/// configured address). Prefer binding `:0` and reading the port back.
pub fn unreserved_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP socket that may share its port with a second one of ours
/// (SO_REUSEPORT), so a port can be held while its listener goes away.
fn reusable_socket() -> TcpSocket {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket
}

/// An address that refuses every connection while this value lives: a
/// socket bound to a loopback port and never listening. Nothing else can
/// take the port meanwhile (unlike a listener bound and dropped).
pub struct Refusing {
    pub addr: SocketAddr,
    _socket: TcpSocket,
}

impl Refusing {
    pub fn new() -> Refusing {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Refusing {
            addr: socket.local_addr().unwrap(),
            _socket: socket,
        }
    }
}

impl std::fmt::Display for Refusing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}
