//! The one test client: real rustls TLS (optionally from a chosen local
//! loopback address, to play several clients), hyper h1 or h2 by ALPN,
//! a reusable h2 connection for load, and plain-HTTP calls to the admin API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::origin::Seen;
use crate::common::pki::{serial_of, Pki};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Any request body the client can send (a stream too).
pub trait ReqBody:
    hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> ReqBody for B where
    B: hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// A TLS connection to `addr` with `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls_over(tcp, sni, cfg).await
}

/// A TLS connection to `addr` from the local address `from`: every address
/// of 127.0.0.0/8 is on the loopback interface, so one test can play several
/// clients (127.0.0.2, 127.0.0.3, ...) against a proxy on 127.0.0.1.
pub async fn tls_connect_from(
    from: IpAddr,
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let sock = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(from, 0))?;
    let tcp = sock.connect(addr).await?;
    tls_over(tcp, sni, cfg).await
}

async fn tls_over(
    tcp: TcpStream,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// A simple response: status, headers, body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Got {
    /// The echo upstream's JSON.
    pub fn seen(&self) -> Seen {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not echo JSON: {:?}", self.body))
    }

    /// Reads a whole response.
    pub async fn read(resp: Response<Incoming>) -> Result<Got, BoxError> {
        let status = resp.status().as_u16();
        let version = resp.version();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Got {
            status,
            headers,
            body,
            version,
        })
    }
}

/// Sends `req` over an established TLS connection, h2 when ALPN chose it,
/// and returns the response with its body unread.
pub async fn send_over<B: ReqBody>(
    tls: TlsStream<TcpStream>,
    req: Request<B>,
) -> Result<Response<Incoming>, BoxError> {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Ok(send.send_request(req).await?)
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(send.send_request(req).await?)
    }
}

/// Sends `req` (any body, e.g. a stream) over a fresh TLS connection with
/// ALPN from `cfg` and returns the response with its body unread. For h1 the
/// request should carry a Host header; for h2 an absolute URI.
pub async fn send<B: ReqBody>(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<B>,
) -> Result<Response<Incoming>, BoxError> {
    send_over(tls_connect(addr, sni, cfg).await?, req).await
}

/// Sends one request over a fresh TLS connection with ALPN `h2` or
/// `http/1.1` and reads the whole response.
pub async fn request<B: ReqBody>(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<B>,
) -> Result<Got, BoxError> {
    Got::read(send(addr, sni, cfg, req).await?).await
}

/// Like [`request`], over a fresh connection from the local address `from`.
pub async fn request_from(
    from: IpAddr,
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> Result<Got, BoxError> {
    let tls = tls_connect_from(from, addr, sni, cfg).await?;
    Got::read(send_over(tls, req).await?).await
}

/// `GET https://{host}{path}` (Host = host) over a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str, cfg: Arc<rustls::ClientConfig>) -> Got {
    let alpn = cfg.alpn_protocols.first().cloned().unwrap_or_default();
    let req = req_builder(&alpn, host, path)
        .body(Full::new(Bytes::new()))
        .unwrap();
    request(addr, host, cfg, req)
        .await
        .unwrap_or_else(|e| panic!("GET https://{host}{path}: {e}"))
}

/// A request builder for `https://{host}{path}` that suits both h1 (Host
/// header) and h2 (absolute URI; hyper turns it into `:authority`).
pub fn req_builder(alpn: &[u8], host: &str, path: &str) -> http::request::Builder {
    if alpn == b"h2" {
        Request::builder().uri(format!("https://{host}{path}"))
    } else {
        Request::builder().uri(path).header("host", host)
    }
}

/// `method path` (empty body) on a plain-HTTP/1.1 endpoint (the admin
/// API): status and body.
pub async fn admin_call(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = plain_request(addr, req).await;
    (got.status, String::from_utf8(got.body.to_vec()).unwrap())
}

/// One request over a fresh plain-TCP HTTP/1.1 connection (the admin API,
/// a plain-HTTP listener); at most 20 s.
pub async fn plain_request(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Got::read(send.send_request(req).await?).await
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer from {addr} within 20 s"))
        .unwrap_or_else(|e| panic!("plain HTTP to {addr}: {e}"))
}

/// `GET path` on the admin API: status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_call(addr, "GET", path).await
}

/// `POST path` (empty body) on the admin API: status and body.
pub async fn admin_post(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_call(addr, "POST", path).await
}

/// The `GET /certs` entry of the certificate `name`.
pub async fn cert_report(admin_addr: SocketAddr, name: &str) -> serde_json::Value {
    let (status, body) = admin_get(admin_addr, "/certs").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no certificate {name} in {body}"))
}

/// A client config trusting the test root that never resumes a session:
/// every handshake is a full one, so the server presents the certificate
/// in service (a resumed session carries the certificate of the session
/// it resumes).
pub fn full_handshake_config(pki: &Pki, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = (*pki.client_config(alpn)).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// The serial a full handshake for `sni` gets now (the chain is verified).
pub async fn served_serial(addr: SocketAddr, sni: &str, pki: &Pki) -> String {
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tls_connect(addr, sni, full_handshake_config(pki, &[])),
    )
    .await
    .unwrap_or_else(|_| panic!("handshake for {sni} timed out"))
    .unwrap_or_else(|e| panic!("handshake for {sni}: {e}"));
    serial_of(&peer_leaf(&tls))
}

/// One HTTP/1.1 keep-alive connection to `addr` for `sni`.
pub async fn h1_client<B: ReqBody>(
    addr: SocketAddr,
    sni: &str,
    pki: &Pki,
) -> hyper::client::conn::http1::SendRequest<B> {
    let tls = tls_connect(addr, sni, pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr} for {sni}: {e}"));
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// One HTTP/2 connection to `addr` for `sni`; clone the sender per task.
pub async fn h2_client(
    addr: SocketAddr,
    sni: &str,
    pki: &Pki,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tls = tls_connect(addr, sni, pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A GET of `https://api.test{path}` through an h2 connection: status and
/// body (or the error).
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
    let got = Got::read(resp).await.map_err(|e| e.to_string())?;
    Ok((got.status, String::from_utf8_lossy(&got.body).into_owned()))
}
