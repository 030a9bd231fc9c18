//! The pooled client of one upstream, built around its
//! [`Connector`](super::connector::Connector): our own pool for HTTP/1.1
//! (see [`super::pool`]), hyper-util's for HTTP/2, whose connections are
//! shared.
//!
//! Clients are built on the control path (when a snapshot is built) and
//! reused across reloads while their settings are unchanged, so pools
//! survive. The connector and body run on the hot path.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connector::{Connector, TlsSetup};
use super::pool::{H1Pool, UpstreamError};
use crate::config::{UpstreamProtocol, UpstreamTarget, UpstreamTls};
use crate::proxy::body::{UpstreamBody, UpstreamIncoming};

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
                connector: tokio_rustls::TlsConnector::from(tls_client(t, self.protocol)),
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

/// The rustls client of `https://` upstreams: the roots and client
/// certificate the config read and checked, ALPN for `protocol`. The
/// config checked everything this needs; should it still fail, the client
/// trusts no root, so every handshake fails (closed, never open) and the
/// reason is logged.
fn tls_client(t: &UpstreamTls, protocol: UpstreamProtocol) -> Arc<rustls::ClientConfig> {
    let build = || -> Result<rustls::ClientConfig, rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(t.roots.iter().cloned());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store);
        Ok(match &t.client_auth {
            Some(a) => builder.with_client_auth_cert(a.chain.clone(), a.key.clone_key())?,
            None => builder.with_no_client_auth(),
        })
    };
    let mut cfg = build().unwrap_or_else(|e| {
        tracing::error!(ca = %t.ca.display(), error = %e, "upstream TLS client cannot be built; its handshakes will fail");
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    });
    cfg.alpn_protocols = match protocol {
        UpstreamProtocol::H2 => vec![b"h2".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    Arc::new(cfg)
}

fn fmt_host(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}
