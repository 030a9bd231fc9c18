//! The validated settings of an upstream group: its targets and weights,
//! the balancing policy, health checks (active and passive), retries and
//! the TLS / HTTP version spoken to the upstreams. Types only; they are
//! read from the file in `validate/upstream.rs`. Control path.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode, Uri};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Most upstreams one route may name (selection scans them on the hot path).
pub const MAX_UPSTREAMS: usize = 256;
/// Largest weight of one upstream.
pub const MAX_WEIGHT: u32 = 1000;
/// Most retries of one request.
pub const MAX_RETRIES: u32 = 10;
/// The CA bundle `https://` upstreams are verified against unless the
/// route names its own `ca` (`SSL_CERT_FILE` overrides it, as for OpenSSL).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One upstream of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `http://host:port/` or `https://host:port/` (scheme and authority only).
    pub uri: Uri,
    /// Share of the traffic relative to the group's other upstreams.
    pub weight: NonZeroU32,
}

impl UpstreamTarget {
    /// `host:port` as written (the metric label and access-log field).
    pub fn label(&self) -> String {
        self.uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// Whether this upstream is reached over TLS.
    pub fn is_https(&self) -> bool {
        self.uri.scheme_str() == Some("https")
    }
}

/// How a request picks its upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbPolicy {
    /// Smooth weighted round robin (nginx's sequence).
    RoundRobin,
    /// Fewest requests in flight (divided by weight); ties rotate.
    LeastRequests,
    /// Two upstreams drawn at random, the less loaded one wins.
    PowerOfTwo,
    /// Rendezvous hash of the client address: a client sticks to one
    /// upstream, and removing an upstream moves only its clients.
    HashIp,
    /// Rendezvous hash of a request header (the client address when the
    /// header is absent).
    HashHeader(HeaderName),
}

impl LbPolicy {
    /// The name used in the config file.
    pub fn name(&self) -> String {
        match self {
            LbPolicy::RoundRobin => "round_robin".into(),
            LbPolicy::LeastRequests => "least_requests".into(),
            LbPolicy::PowerOfTwo => "p2c".into(),
            LbPolicy::HashIp => "hash_ip".into(),
            LbPolicy::HashHeader(h) => format!("hash_header:{h}"),
        }
    }
}

/// The HTTP version spoken to the upstreams of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections (over TLS for https://).
    Http1,
    /// HTTP/2 over cleartext TCP (prior knowledge); `http://` only.
    H2c,
    /// HTTP/2 over TLS, agreed with ALPN `h2`; `https://` only.
    H2,
}

/// Active health checks of a group: one request per upstream per interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path (and query) requested, starting with `/`.
    pub path: String,
    /// The status that counts as healthy; `None`: any 2xx.
    pub status: Option<StatusCode>,
    /// Time between two checks of an upstream.
    pub interval: Duration,
    /// A check that has no response head within this fails.
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down upstream back.
    pub healthy_threshold: NonZeroU32,
    /// Consecutive failed checks that take an upstream out.
    pub unhealthy_threshold: NonZeroU32,
}

/// Passive health: failures seen on real traffic take an upstream out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive failures (connect errors, timeouts, resets, 5xx) within
    /// `window` that take an upstream out; 0 turns passive checks off.
    pub failures: u32,
    /// The failures must fall within this much time.
    pub window: Duration,
    /// How long the upstream stays out; then it gets traffic again, and
    /// one more failure takes it out again.
    pub cooldown: Duration,
}

impl PassiveHealth {
    /// The default of a group of several upstreams.
    pub const DEFAULT: PassiveHealth = PassiveHealth {
        failures: 3,
        window: Duration::from_secs(10),
        cooldown: Duration::from_secs(10),
    };
    /// Off: the default of a single upstream (taking the only upstream out
    /// would turn its 502s into 503s and hide the cause).
    pub const OFF: PassiveHealth = PassiveHealth {
        failures: 0,
        window: Duration::from_secs(10),
        cooldown: Duration::from_secs(10),
    };
}

/// A client certificate chain and its key, for mTLS to the upstreams.
pub struct ClientAuth {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (checked against it at load).
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// TLS to the `https://` upstreams of a group: the material as read and
/// checked at load. The proxy builds its TLS client from it; this module
/// knows no TLS library.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The CA bundle upstream certificates are verified against (the
    /// system bundle unless `ca` is set).
    pub ca: PathBuf,
    /// Whether `ca` is the system bundle (not configured).
    pub system_roots: bool,
    /// SNI and verified name; `None`: each upstream's host.
    pub server_name: Option<String>,
    /// Client certificate chain and key for mTLS to the upstream.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Digest of every file read (CA, chain, key): a reload that changes a
    /// file builds a new TLS client, one that does not keeps the pool.
    pub material: u64,
    /// The CA certificates of `ca` (DER).
    pub roots: Arc<[CertificateDer<'static>]>,
    /// The client certificate chain and key of `client_cert`.
    pub client_auth: Option<Arc<ClientAuth>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, o: &Self) -> bool {
        self.ca == o.ca
            && self.system_roots == o.system_roots
            && self.server_name == o.server_name
            && self.client_cert == o.client_cert
            && self.material == o.material
    }
}

impl Eq for UpstreamTls {}

/// Reads every certificate of a PEM file.
pub(crate) fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read \"{}\": {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(c) if c.is_empty() => Err(format!(
            "\"{}\" holds no PEM certificate (no BEGIN CERTIFICATE)",
            path.display()
        )),
        Ok(c) => Ok(c),
        Err(e) => Err(format!("\"{}\" is not valid PEM: {e}", path.display())),
    }
}

/// The TLS server name of an upstream URI (its host; IPv6 without brackets).
pub fn server_name_of(uri: &Uri) -> Option<ServerName<'static>> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}
