//! The file format as serde sees it: every table rejects unknown keys, and
//! every value a later check looks at keeps its span so an error can name
//! the line it came from.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// A table of ACME keys, each key and value with its place in the file.
/// Keys are checked by hand (validate/acme.rs) rather than with
/// `deny_unknown_fields`, so an unknown key is reported with every other
/// error instead of stopping the parse.
pub(crate) type RawAcme = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// A site's `tls` value, as written.
#[derive(Debug)]
pub(crate) enum RawTls {
    /// `tls = "internal"`, `tls = "acme"` (or a misspelling).
    Name(String),
    /// `tls = { ... }`: each key with its place.
    Table(Vec<(Spanned<String>, Spanned<RawTlsValue>)>),
    /// A number, a list, ...: not a certificate source.
    Other,
}

/// A value inside `tls = { ... }`.
#[derive(Debug)]
pub(crate) enum RawTlsValue {
    /// `cert = "..."`, `key = "..."`.
    Str(String),
    /// `acme = { ... }`, with the places of its keys.
    Table(RawAcme),
    /// Anything else.
    Other,
}

/// The visitor methods for values that are neither a string nor a table.
macro_rules! loose_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(self.other())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(self.other())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(self.other())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(self.other())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(self.other())
        }
    };
}

struct TlsVisitor;

impl TlsVisitor {
    fn other(&self) -> RawTls {
        RawTls::Other
    }
}

impl<'de> Visitor<'de> for TlsVisitor {
    type Value = RawTls;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"internal\", \"acme\" or a table")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTls, E> {
        Ok(RawTls::Name(v.to_string()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTls, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Spanned<RawTlsValue>>()?;
            out.push((key, value));
        }
        Ok(RawTls::Table(out))
    }

    loose_scalars!();
}

impl<'de> Deserialize<'de> for RawTls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawTls, D::Error> {
        d.deserialize_any(TlsVisitor)
    }
}

struct TlsValueVisitor;

impl TlsValueVisitor {
    fn other(&self) -> RawTlsValue {
        RawTlsValue::Other
    }
}

impl<'de> Visitor<'de> for TlsValueVisitor {
    type Value = RawTlsValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a table")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTlsValue, E> {
        Ok(RawTlsValue::Str(v.to_string()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawTlsValue, A::Error> {
        let mut out = RawAcme::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Spanned<toml::Value>>()?;
            out.insert(key, value);
        }
        Ok(RawTlsValue::Table(out))
    }

    loose_scalars!();
}

impl<'de> Deserialize<'de> for RawTlsValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawTlsValue, D::Error> {
        d.deserialize_any(TlsValueVisitor)
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Directory for the internal CA and ACME state.
    pub state_dir: Option<Spanned<String>>,
    /// Access log destination: a path, `"stderr"`, `"stdout"` or `"off"`.
    pub access_log: Option<Spanned<String>>,
    /// Access log format: `"json"`, `"common"` or `"combined"`.
    pub access_log_format: Option<Spanned<String>>,
    /// The admin listener.
    pub admin: Option<RawAdmin>,
    /// Timeouts for downstream and upstream connections.
    pub timeouts: Option<RawTimeouts>,
    /// Size and count limits.
    pub limits: Option<RawLimits>,
    /// Settings shared by every rate limit.
    pub rate_limit: Option<RawRateLimitGlobal>,
    /// How certificate files are watched.
    pub certificates: Option<RawCertificates>,
    /// ACME defaults for every site with `tls = "acme"` or `tls = { acme = ... }`;
    /// read by hand (validate/acme.rs) so messages say what each key expects.
    pub acme: Option<Spanned<RawAcme>>,
    /// Sockets to listen on.
    #[serde(default)]
    pub listeners: Vec<Spanned<RawListener>>,
    /// Virtual hosts.
    #[serde(default)]
    pub sites: Vec<Spanned<RawSite>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    /// `host:port`, or `"off"` to disable the admin listener.
    pub listen: Option<Spanned<String>>,
    /// Extra `Host` names the admin answers.
    pub hosts: Option<Vec<Spanned<String>>>,
    /// A file holding the bearer token.
    pub token_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificates {
    /// Content-hash check of every certificate file, for filesystems
    /// that send no change events.
    pub poll_interval: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub tls_handshake: Option<Spanned<String>>,
    pub request_header: Option<Spanned<String>>,
    pub request_body: Option<Spanned<String>>,
    pub response_write: Option<Spanned<String>>,
    pub idle: Option<Spanned<String>>,
    pub upstream_connect: Option<Spanned<String>>,
    pub upstream_response: Option<Spanned<String>>,
    pub upstream_idle: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_header_bytes: Option<Spanned<i64>>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub max_pending_handshakes: Option<Spanned<i64>>,
    pub max_pending_handshakes_per_ip: Option<Spanned<i64>>,
    pub max_upstream_idle_per_host: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub listen: Spanned<String>,
    /// `"https"` (default) or `"http"`.
    pub protocol: Option<Spanned<String>>,
    /// For `http` listeners: the port the 308 redirect points to.
    pub https_port: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSite {
    pub name: Option<Spanned<String>>,
    pub hosts: Spanned<Vec<Spanned<String>>>,
    /// `"internal"`, `"acme"`, `{ acme = { ... } }` or `{ cert = "...", key = "..." }`;
    /// interpreted by hand so the error says what is expected instead of
    /// "no variant matched".
    pub tls: Option<Spanned<RawTls>>,
    /// Serve this site's certificate (and routes) for unknown names.
    pub default: Option<Spanned<bool>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub path: Option<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub strip_prefix: Option<bool>,
    pub preserve_host: Option<bool>,
    pub respond: Option<Spanned<RawRespond>>,
    pub redirect: Option<Spanned<RawRedirect>>,
    #[serde(default)]
    pub rate_limits: Vec<Spanned<RawLimit>>,
    /// Several upstreams: `"http://host:port"` or `{ url = "...", weight = 3 }`
    /// each; read by hand so each element keeps its line.
    pub upstreams: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    /// `round_robin` (default), `least_requests`, `p2c`, `hash_ip`, `hash_header:NAME`.
    pub lb: Option<Spanned<String>>,
    /// `http1` (default), `h2c` or `h2`.
    pub protocol: Option<Spanned<String>>,
    /// CA bundle for `https://` upstreams (default: the system bundle).
    pub ca: Option<Spanned<String>>,
    /// SNI and verified name for `https://` upstreams (default: the URL host).
    pub tls_server_name: Option<Spanned<String>>,
    /// Client certificate chain for mTLS to the upstreams.
    pub client_cert: Option<Spanned<String>>,
    /// Its private key.
    pub client_key: Option<Spanned<String>>,
    /// Retries on another upstream (connect failure, reset before a response).
    pub retries: Option<Spanned<i64>>,
    /// No retry starts later than this after the first attempt.
    pub retry_budget: Option<Spanned<String>>,
    /// Active health checks of the route's upstreams.
    pub health_check: Option<Spanned<RawHealthCheck>>,
    /// Passive health checks (failures seen on real traffic).
    pub passive_health: Option<Spanned<RawPassiveHealth>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub path: Option<Spanned<String>>,
    pub status: Option<Spanned<i64>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPassiveHealth {
    pub failures: Option<Spanned<i64>>,
    pub window: Option<Spanned<String>>,
    pub cooldown: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    pub name: Option<Spanned<String>>,
    /// `100/s`, `6000/min`, `10/h`.
    pub rate: Spanned<String>,
    pub burst: Option<Spanned<i64>>,
    /// `ip` (default), `header:NAME`, or `route`.
    pub key: Option<Spanned<String>>,
    /// `enforce` (default) or `shadow`.
    pub mode: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimitGlobal {
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub max_keys: Option<Spanned<i64>>,
    pub purge_interval: Option<Spanned<String>>,
    pub body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRespond {
    pub status: Option<Spanned<i64>>,
    pub body: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedirect {
    pub to: Spanned<String>,
    pub status: Option<Spanned<i64>>,
}
