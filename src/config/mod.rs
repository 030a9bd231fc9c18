//! Configuration: the TOML file turned into a validated, typed [`Config`].
//!
//! Control path only. Parsing happens in two layers: serde structs that
//! reject unknown keys and keep spans ([`raw`]), then [`validate`] which reads
//! *every* value and reports all problems at once, each naming the file, the
//! line, the field and what to do. Nothing here knows about TLS or HTTP
//! machinery; certificate files are only named here and checked by the
//! certificate store.

mod acme;
mod duration;
mod origin;
mod raw;
mod upstream;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Uri};

pub use acme::{
    AcmeConfig, AcmeKeyType, ChallengeKind, ExternalAccount, RenewBefore, UntilIssued, LETSENCRYPT,
    LETSENCRYPT_STAGING,
};
pub use duration::parse_duration;
pub use origin::Origin;
pub use upstream::{
    server_name_of, HealthCheck, LbPolicy, PassiveHealth, UpstreamProtocol, UpstreamTarget,
    UpstreamTls, MAX_RETRIES, MAX_UPSTREAMS, MAX_WEIGHT, SYSTEM_ROOTS,
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages (`<cli>` when built in memory).
    pub source: PathBuf,
    /// Where the internal CA and other state live.
    pub state_dir: PathBuf,
    /// The admin listener; `None` when disabled.
    pub admin: Option<SocketAddr>,
    /// Who the admin API answers.
    pub admin_access: AdminAccess,
    /// Sockets to accept on.
    pub listeners: Vec<ListenerConfig>,
    /// Virtual hosts, in file order.
    pub sites: Vec<SiteConfig>,
    /// Timeouts applied to every connection.
    pub timeouts: Timeouts,
    /// Size and count limits.
    pub limits: Limits,
    /// Period of the content-hash check of certificate files (the fallback
    /// when the filesystem sends no change events).
    pub cert_poll_interval: Duration,
    /// Settings shared by every rate limit.
    pub rate_limit: RateLimitSettings,
    /// Where the access log goes, and its format.
    pub access_log: AccessLogConfig,
}

/// The access log's destination and format (`access_log`,
/// `access_log_format`).
#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    /// Where lines go.
    pub target: AccessLogTarget,
    /// The line format; `None` when the file does not say, so the process
    /// default applies (`json` under `--log-format json`, else `combined`).
    pub format: Option<AccessLogFormat>,
    /// The `access_log` value in the file, for error messages (opening the
    /// file happens later).
    pub origin: Origin,
}

impl AccessLogConfig {
    /// Whether `other` writes the same lines to the same place (the origin
    /// may differ: a reload that only moved the line keeps the open file).
    pub fn same_output(&self, other: &AccessLogConfig) -> bool {
        self.target == other.target && self.format == other.format
    }
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            target: AccessLogTarget::Stderr,
            format: None,
            origin: Origin {
                file: PathBuf::new(),
                line: 0,
                field: "access_log".into(),
            },
        }
    }
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Not written; nothing is gathered per request.
    Off,
    /// The process's standard error (the default).
    Stderr,
    /// The process's standard output.
    Stdout,
    /// Appended to this file; `SIGUSR1` reopens it (log rotation).
    File(PathBuf),
}

/// The format of an access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// NCSA common log format (`$remote_addr - - [$time] "$request" $status $bytes`).
    Common,
    /// Common plus `"$http_referer" "$http_user_agent"` (nginx's default).
    Combined,
}

/// Settings shared by every rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Peers whose `X-Forwarded-For` / `Forwarded` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Most keys tracked per limit; past it, new clients share one bucket.
    pub max_keys: usize,
    /// How often idle keys are purged.
    pub purge_interval: Duration,
    /// Body of a 429.
    pub body: String,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            trusted_proxies: Vec::new(),
            max_keys: 1_000_000,
            purge_interval: Duration::from_secs(10),
            body: "too many requests\n".into(),
        }
    }
}

/// An address block, e.g. `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// One rate limit on a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitConfig {
    /// Policy name (the `RateLimit-Policy` name and log field).
    pub name: String,
    /// Requests per `per`.
    pub count: std::num::NonZeroU32,
    /// The period of `count`.
    pub per: Duration,
    /// Requests allowed at once above the steady rate.
    pub burst: std::num::NonZeroU32,
    /// What is limited.
    pub key: LimitKey,
    /// Log and count, never reject.
    pub shadow: bool,
}

/// What a limit counts by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client address (after trusted proxies).
    ClientIp,
    /// A request header's value (e.g. an API key); absent header = one shared key.
    Header(http::HeaderName),
    /// The whole route shares one bucket.
    Route,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address to bind.
    pub addr: SocketAddr,
    /// What is spoken on it.
    pub protocol: ListenerProtocol,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// TLS, then HTTP/1.1 or HTTP/2 chosen by ALPN.
    Https,
    /// Plain HTTP that answers everything with a 308 to HTTPS.
    Http {
        /// Port to put in the redirect; `None` means the default 443.
        https_port: Option<u16>,
    },
}

/// A host name a site answers for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.example.com` (stored lower case).
    Exact(String),
    /// `*.example.com`: stored as the suffix `example.com`; matches exactly
    /// one more label.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (lower case, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => match host.split_once('.') {
                Some((label, rest)) => !label.is_empty() && rest == suffix,
                None => false,
            },
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// A virtual host.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// Stable name used in logs, metrics and the certificate inventory.
    pub name: String,
    /// Names this site answers for.
    pub hosts: Vec<HostPattern>,
    /// Where its certificate comes from.
    pub tls: TlsSource,
    /// Whether this site's certificate and routes serve unknown names.
    pub default: bool,
    /// Routes, matched by longest path prefix.
    pub routes: Vec<RouteConfig>,
}

/// Where a site's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files on disk (full chain, private key).
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
        /// The `tls` value in the config, for error messages.
        origin: Origin,
    },
    /// Issued by the local CA kept in `state_dir`.
    Internal,
    /// Obtained and renewed from an ACME CA; kept in `state_dir/acme/`.
    Acme(Box<AcmeConfig>),
}

impl TlsSource {
    /// Whether this source needs the internal CA (directly, or until an
    /// ACME certificate is issued).
    pub fn needs_internal_ca(&self) -> bool {
        match self {
            TlsSource::Internal => true,
            TlsSource::Acme(a) => a.until_issued == UntilIssued::Internal,
            TlsSource::Files { .. } => false,
        }
    }
}

/// One route of a site.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Path prefix, starting with `/`.
    pub path: String,
    /// What to do with a matching request.
    pub action: RouteAction,
    /// Rate limits, all of which must admit a request.
    pub limits: Vec<RateLimitConfig>,
}

/// What a route does.
#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Forward to an upstream group (boxed: it is much larger than the
    /// other actions).
    Proxy(Box<UpstreamConfig>),
    /// Answer directly.
    Respond {
        /// Status code.
        status: StatusCode,
        /// Body sent as is.
        body: Bytes,
        /// `Content-Type` of the body.
        content_type: String,
    },
    /// Redirect; `{uri}` in `to` is replaced by the request path and query.
    Redirect {
        /// Target.
        to: String,
        /// 301, 302, 303, 307 or 308.
        status: StatusCode,
    },
}

/// The upstream group a route forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The upstreams (at least one), in file order.
    pub targets: Vec<UpstreamTarget>,
    /// Remove the route prefix from the path before forwarding.
    pub strip_prefix: bool,
    /// Send the client's `Host` upstream (default) instead of the upstream's.
    pub preserve_host: bool,
    /// How a request picks its upstream.
    pub lb: LbPolicy,
    /// HTTP version spoken to the upstreams.
    pub protocol: UpstreamProtocol,
    /// TLS settings, when any upstream is `https://`.
    pub tls: Option<UpstreamTls>,
    /// Active health checks, when configured.
    pub health_check: Option<HealthCheck>,
    /// Passive health checks on real traffic.
    pub passive: PassiveHealth,
    /// Retries on another upstream after a connect failure or a reset
    /// before any response (idempotent methods, or nothing sent).
    pub retries: u32,
    /// No retry starts later than this after the request's first attempt.
    pub retry_budget: Duration,
}

impl UpstreamConfig {
    /// One plain-HTTP/1.1 upstream with every default (`reverse-proxy`).
    pub fn single(uri: Uri) -> UpstreamConfig {
        UpstreamConfig {
            targets: vec![UpstreamTarget {
                uri,
                weight: std::num::NonZeroU32::MIN,
            }],
            strip_prefix: false,
            preserve_host: true,
            lb: LbPolicy::RoundRobin,
            protocol: UpstreamProtocol::Http1,
            tls: None,
            health_check: None,
            passive: PassiveHealth::OFF,
            retries: 2,
            retry_budget: Duration::from_secs(10),
        }
    }
}

/// Timeouts; every one has a default an operator would expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP accept to finished TLS handshake.
    pub tls_handshake: Duration,
    /// Whole request head must arrive within this (slowloris).
    pub request_header: Duration,
    /// Longest wait for the next piece of a request body (slow upload).
    pub request_body: Duration,
    /// Longest a response write may stay blocked (slow reader).
    pub response_write: Duration,
    /// Keep-alive connection with nothing in flight is closed after this.
    pub idle: Duration,
    /// TCP connect to an upstream.
    pub upstream_connect: Duration,
    /// Request sent to response head received; past it the client gets 504.
    pub upstream_response: Duration,
    /// Pooled idle upstream connections are closed after this.
    pub upstream_idle: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tls_handshake: Duration::from_secs(10),
            request_header: Duration::from_secs(30),
            request_body: Duration::from_secs(60),
            response_write: Duration::from_secs(60),
            idle: Duration::from_secs(75),
            upstream_connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(90),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Who the admin API answers, beyond its listen address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAccess {
    /// `Host` names accepted besides IP literals and `localhost`
    /// (`admin.hosts`): a request for any other name is refused, which
    /// stops DNS rebinding.
    pub hosts: Vec<String>,
    /// The bearer token every request but `/healthz` and `/readyz` must
    /// carry (`admin.token_file`, read at load); required when the admin
    /// listens on an address that is not loopback.
    pub token: Option<String>,
}

/// Size and count limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line + headers), bytes.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Most concurrent downstream connections; at the cap, the longest
    /// idle keep-alive connections are closed to admit new ones, and new
    /// ones wait in the backlog until a slot frees.
    pub max_connections: usize,
    /// Most concurrent connections from one client address (IPv6: one
    /// /64); more are closed at once.
    pub max_connections_per_ip: usize,
    /// Most TLS handshakes under way at once (a budget of its own, smaller
    /// than `max_connections`, so silent connections cannot take every
    /// slot); more are closed at once.
    pub max_pending_handshakes: usize,
    /// Most TLS handshakes under way from one client address.
    pub max_pending_handshakes_per_ip: usize,
    /// Idle pooled connections kept per upstream.
    pub max_upstream_idle_per_host: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            max_pending_handshakes: 1_000,
            max_pending_handshakes_per_ip: 64,
            max_upstream_idle_per_host: 256,
        }
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where it is.
    pub origin: Origin,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// `Config::load` and `Config::parse` are in `validate.rs`, which reads
// the types declared here: this file imports nothing back from it.
impl Config {
    /// The one-route configuration behind `portcullis reverse-proxy`.
    pub fn reverse_proxy(
        from: SocketAddr,
        hosts: Vec<String>,
        to: Uri,
        tls: TlsSource,
        state_dir: PathBuf,
        admin: Option<SocketAddr>,
    ) -> Config {
        let hosts = hosts
            .into_iter()
            .map(|h| match h.strip_prefix("*.") {
                Some(s) => HostPattern::Wildcard(s.to_ascii_lowercase()),
                None => HostPattern::Exact(h.to_ascii_lowercase()),
            })
            .collect();
        Config {
            source: PathBuf::from("<command line>"),
            state_dir,
            admin,
            admin_access: AdminAccess::default(),
            listeners: vec![ListenerConfig {
                addr: from,
                protocol: ListenerProtocol::Https,
            }],
            sites: vec![SiteConfig {
                name: "reverse-proxy".into(),
                hosts,
                tls,
                default: true,
                routes: vec![RouteConfig {
                    path: "/".into(),
                    action: RouteAction::Proxy(Box::new(UpstreamConfig::single(to))),
                    limits: Vec::new(),
                }],
            }],
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            cert_poll_interval: Duration::from_secs(60),
            rate_limit: RateLimitSettings::default(),
            access_log: AccessLogConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["quickstart.toml", "reference.toml"] {
            let c = Config::load(&root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!c.sites.is_empty(), "{name}");
        }
        let r = Config::load(&root.join("reference.toml")).unwrap();
        let v1 = r.sites[0].routes.iter().find(|r| r.path == "/v1/").unwrap();
        assert_eq!(v1.limits.len(), 3);
        assert_eq!(r.rate_limit.trusted_proxies.len(), 2);
    }
}
