//! The rustls server configuration (built once per process) and the TLS
//! accept step. Hot path.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{Acceptor, ServerSessionMemoryCache};
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::certstore::{load::provider, CertStore, Resolver};

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Builds the one `ServerConfig` of the process: TLS 1.2 and 1.3, ALPN h2
/// then http/1.1, a session cache and one ticketer for the life of the
/// process (so tickets survive every certificate and config reload), and
/// the resolver over the swapped certificate map.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver::new(store)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = ServerSessionMemoryCache::new(64 * 1024);
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    cfg.send_tls13_tickets = 2;
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// Why a handshake did not complete (a bounded metric/log label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No certificate for the SNI name and no default.
    UnknownName,
    /// Took longer than the handshake timeout.
    Timeout,
    /// Not TLS, or TLS we do not speak.
    Protocol,
    /// The peer went away.
    Io,
    /// A TLS-ALPN-01 validation: answered with the challenge certificate,
    /// then closed (not an error, but no HTTP follows).
    AcmeChallenge,
}

impl HandshakeFailure {
    /// Every reason, in label-index order (`reason as usize`).
    pub const ALL: [HandshakeFailure; 5] = [
        HandshakeFailure::UnknownName,
        HandshakeFailure::Timeout,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
        HandshakeFailure::AcmeChallenge,
    ];

    /// A short label.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::UnknownName => "unknown_name",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
            HandshakeFailure::AcmeChallenge => "acme_challenge",
        }
    }
}

/// A fatal `unrecognized_name` alert record (RFC 6066 §3), sent in the clear
/// before any handshake message.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// Reads the ClientHello, answers ACME TLS-ALPN-01 validations, refuses
/// unknown names with `unrecognized_name`, and completes the handshake
/// within `timeout`.
pub async fn accept(
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
    store: &CertStore,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeFailure> {
    let fut = async {
        let mut lazy = LazyConfigAcceptor::new(Acceptor::default(), tcp);
        let start = match (&mut lazy).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(mut io) = lazy.take_io() {
                    let _ = io.shutdown().await;
                }
                return Err(if e.kind() == std::io::ErrorKind::InvalidData {
                    HandshakeFailure::Protocol
                } else {
                    HandshakeFailure::Io
                });
            }
        };
        // TLS-ALPN-01 (RFC 8737): a CA asking for `acme-tls/1` for a name
        // whose challenge is in progress gets the challenge certificate and
        // nothing else. Checked first: the name may have no certificate yet.
        let hello = start.client_hello();
        let acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN))
            .then(|| {
                hello
                    .server_name()
                    .and_then(|n| store.challenges.tls_alpn01(n))
            })
            .flatten();
        if let Some(key) = acme {
            let cfg = acme_tls_config(key).map_err(|_| HandshakeFailure::Protocol)?;
            let mut tls = start
                .into_stream(cfg)
                .await
                .map_err(|_| HandshakeFailure::Io)?;
            let _ = tls.shutdown().await;
            return Err(HandshakeFailure::AcmeChallenge);
        }
        if !store.has_cert_for(start.client_hello().server_name()) {
            // Hand the socket back to send the alert ourselves.
            // The resolver finds nothing either, so rustls stops before
            // writing anything and hands the socket back.
            let mut io = start.into_stream(config.clone());
            if let Some(tcp) = io.get_mut() {
                let _ = tcp.write_all(&UNRECOGNIZED_NAME_ALERT).await;
                let _ = tcp.shutdown().await;
            }
            return Err(HandshakeFailure::UnknownName);
        }
        start.into_stream(config.clone()).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                HandshakeFailure::Protocol
            } else {
                HandshakeFailure::Io
            }
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeFailure::Timeout),
    }
}

/// Serves one certificate whatever the name (the TLS-ALPN-01 answer).
#[derive(Debug)]
struct OneCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A one-off config for a TLS-ALPN-01 validation handshake: only
/// `acme-tls/1`, only the challenge certificate. Built per validation
/// (a handful per order), never on the request path.
fn acme_tls_config(
    key: Arc<rustls::sign::CertifiedKey>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(key)));
    cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}
