//! Connections to one upstream: the connector (TCP to the configured
//! address, then TLS with SNI and ALPN for `https://`), the pooled client
//! built around it (our own pool for HTTP/1.1, see [`super::pool`];
//! hyper-util's for HTTP/2, whose connections are shared), and the request
//! body that can be handed back for a retry when the upstream never read
//! it.
//!
//! Clients are built on the control path (when a snapshot is built) and
//! reused across reloads while their settings are unchanged, so pools
//! survive. The connector and body run on the hot path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::pool::{H1Pool, UpstreamError, UpstreamIncoming};
use crate::config::{UpstreamProtocol, UpstreamTarget, UpstreamTls};
use crate::proxy::body::{BoxError, RequestBody};

/// A pooled client to one upstream. Cloning shares the pool.
#[derive(Clone)]
pub enum UpstreamClient {
    /// HTTP/1.1: one request per connection at a time.
    Http1(Arc<H1Pool>),
    /// HTTP/2 (h2c or h2 over TLS): one multiplexed connection.
    Http2(Box<Client<Connector, UpstreamBody>>),
}

impl UpstreamClient {
    /// Sends `req`. Over HTTP/1.1 its URI is sent as it is (origin-form,
    /// with a `Host` header); HTTP/2 needs scheme and authority.
    pub async fn request(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamIncoming>, UpstreamError> {
        match self {
            UpstreamClient::Http1(pool) => pool.request(req).await,
            UpstreamClient::Http2(c) => match c.request(req).await {
                Ok(r) => Ok(r.map(UpstreamIncoming::shared)),
                Err(e) => Err(UpstreamError::Http2(e)),
            },
        }
    }
}

/// Everything a client is built from; a reload that leaves it equal keeps
/// the client (and its pool of connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// `http(s)://host:port/` of the upstream.
    pub uri: Uri,
    /// HTTP version.
    pub protocol: UpstreamProtocol,
    /// TLS settings for `https://`.
    pub tls: Option<UpstreamTls>,
    /// TCP connect timeout (a TLS handshake gets the same again).
    pub connect_timeout: Duration,
    /// Idle pooled connections close after this.
    pub idle_timeout: Duration,
    /// Idle connections kept.
    pub max_idle: usize,
}

impl ClientSettings {
    /// The settings of `target` in a group.
    pub fn new(
        target: &UpstreamTarget,
        protocol: UpstreamProtocol,
        tls: Option<&UpstreamTls>,
        t: &crate::config::Timeouts,
        l: &crate::config::Limits,
    ) -> ClientSettings {
        ClientSettings {
            uri: target.uri.clone(),
            protocol,
            tls: if target.is_https() {
                tls.cloned()
            } else {
                None
            },
            connect_timeout: t.upstream_connect,
            idle_timeout: t.upstream_idle,
            max_idle: l.max_upstream_idle_per_host,
        }
    }

    /// Builds the pooled client.
    pub fn build(&self) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = self.tls.as_ref().map(|t| {
            let name = match &t.server_name {
                Some(n) => rustls::pki_types::ServerName::try_from(n.clone()).ok(),
                None => crate::config::server_name_of(&self.uri),
            };
            TlsSetup {
                connector: tokio_rustls::TlsConnector::from(t.client_config.clone()),
                // Validated with the config; the fallback never verifies.
                server_name: name.unwrap_or_else(|| {
                    rustls::pki_types::ServerName::try_from("invalid.").unwrap()
                }),
                handshake_timeout: self.connect_timeout,
                require_h2: self.protocol == UpstreamProtocol::H2,
            }
        });
        let host = self
            .uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        // The connector ignores the request URI (which may carry the
        // client's Host for HTTP/2's :authority) and dials this.
        let target: Uri = format!("http://{}:{port}/", fmt_host(host))
            .parse()
            .unwrap_or_else(|_| self.uri.clone());
        let connector = Connector {
            http,
            target,
            tls: tls.map(Arc::new),
        };
        if self.protocol == UpstreamProtocol::Http1 {
            return UpstreamClient::Http1(Arc::new(H1Pool::new(
                connector,
                self.max_idle,
                self.idle_timeout,
            )));
        }
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle)
            .set_host(false);
        b.http2_only(true)
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_keep_alive_timeout(Duration::from_secs(20));
        UpstreamClient::Http2(Box::new(b.build(connector)))
    }
}

fn fmt_host(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

/// TLS on top of the TCP connection.
struct TlsSetup {
    connector: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
    handshake_timeout: Duration,
    /// `protocol = "h2"`: an upstream that does not pick `h2` is an error.
    require_h2: bool,
}

/// Dials one upstream whatever the request URI says.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    target: Uri,
    tls: Option<Arc<TlsSetup>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let target = self.target.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = tower_service::Service::call(&mut http, target).await?;
            let Some(tls) = tls else {
                return Ok(Conn::Plain(tcp));
            };
            let handshake = tls
                .connector
                .connect(tls.server_name.clone(), tcp.into_inner());
            let stream = tokio::time::timeout(tls.handshake_timeout, handshake)
                .await
                .map_err(|_| BoxError::from("TLS handshake with the upstream timed out"))??;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            if tls.require_h2 && !h2 {
                return Err("the upstream did not agree to HTTP/2 (ALPN h2)".into());
            }
            Ok(Conn::Tls(Box::new(TokioIo::new(stream)), h2))
        })
    }
}

/// A connection to an upstream.
pub enum Conn {
    /// Cleartext.
    Plain(TokioIo<TcpStream>),
    /// TLS; `true` when ALPN picked `h2`.
    Tls(
        Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
        bool,
    ),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain(s) => s.connected(),
            Conn::Tls(s, h2) => {
                let c = s.inner().get_ref().0.connected();
                if *h2 {
                    c.negotiated_h2()
                } else {
                    c
                }
            }
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}

/// The body of a request sent upstream.
///
/// Request bodies stream: once the upstream client has read a frame, the
/// bytes are gone and the request cannot be sent again. So a retry is only
/// possible when the body was never polled. This type makes that
/// observable: when it is dropped unpolled (the connect failed, or the
/// connection closed before the request was written), the client body is
/// handed back through a oneshot channel and the next attempt can send it.
/// The first poll gives up the way back. A bodyless request has nothing to
/// hand back and can always be sent again.
pub struct UpstreamBody {
    inner: Option<RequestBody>,
    back: Option<oneshot::Sender<RequestBody>>,
}

impl UpstreamBody {
    /// No body.
    pub fn empty() -> UpstreamBody {
        UpstreamBody {
            inner: None,
            back: None,
        }
    }

    /// Streams `body`; the receiver gets it back if it is dropped unread.
    pub fn returnable(body: RequestBody) -> (UpstreamBody, oneshot::Receiver<RequestBody>) {
        let (tx, rx) = oneshot::channel();
        (
            UpstreamBody {
                inner: Some(body),
                back: Some(tx),
            },
            rx,
        )
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let (Some(tx), Some(body)) = (self.back.take(), self.inner.take()) {
            let _ = tx.send(body);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // From the first read on, the body cannot be sent again.
        this.back = None;
        match &mut this.inner {
            None => Poll::Ready(None),
            Some(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}
