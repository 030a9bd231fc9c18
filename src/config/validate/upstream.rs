//! The upstream keys of a route: `upstream` / `upstreams`, `lb`,
//! `protocol`, the TLS keys (`ca`, `tls_server_name`, `client_cert`,
//! `client_key`), `retries`, `retry_budget`, `[health_check]` and
//! `[passive_health]`. Every value is read and every problem reported, each
//! naming file, line and field. TLS files are read here so a bad CA or a
//! client key that does not match its certificate is refused at load (and
//! at reload), not at the first request. Control path.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use toml::Spanned;

use super::ctx::Ctx;
use crate::config::raw::RawRoute;
use crate::config::upstream::{
    read_certs, server_name_of, ClientAuth, HealthCheck, LbPolicy, PassiveHealth, UpstreamProtocol,
    UpstreamTarget, UpstreamTls, MAX_RETRIES, MAX_UPSTREAMS, MAX_WEIGHT, SYSTEM_ROOTS,
};
use crate::config::UpstreamConfig;

/// Keys that only mean something on a route that forwards.
pub(super) fn has_upstream_only_keys(r: &RawRoute) -> bool {
    r.lb.is_some()
        || r.protocol.is_some()
        || r.ca.is_some()
        || r.tls_server_name.is_some()
        || r.client_cert.is_some()
        || r.client_key.is_some()
        || r.retries.is_some()
        || r.retry_budget.is_some()
        || r.health_check.is_some()
        || r.passive_health.is_some()
}

/// Reads the upstream group of a route that has `upstream` or `upstreams`.
/// `None` when something is wrong (every problem is reported).
pub(super) fn build(
    cx: &mut Ctx<'_>,
    r: &RawRoute,
    route_span: &Range<usize>,
    prefix: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Option<UpstreamConfig> {
    let before = cx.errors.len();
    let targets = targets(cx, r, route_span, prefix);
    let lb = match r.lb.as_ref().map(|v| (v.get_ref().as_str(), v.span())) {
        None | Some(("round_robin", _)) => LbPolicy::RoundRobin,
        Some(("least_requests", _)) => LbPolicy::LeastRequests,
        Some(("p2c", _)) => LbPolicy::PowerOfTwo,
        Some(("hash_ip", _)) => LbPolicy::HashIp,
        Some((other, span)) => match other
            .strip_prefix("hash_header:")
            .map(|h| http::HeaderName::from_bytes(h.trim().as_bytes()))
        {
            Some(Ok(h)) => LbPolicy::HashHeader(h),
            _ => {
                cx.err(
                    &span,
                    &format!("{prefix}.lb"),
                    format!(
                        "\"{other}\" is not a balancing policy; use \"round_robin\", \"least_requests\", \"p2c\", \
                         \"hash_ip\" or \"hash_header:NAME\" (e.g. \"hash_header:x-user-id\")"
                    ),
                );
                LbPolicy::RoundRobin
            }
        },
    };
    let protocol = protocol(cx, r, prefix, &targets);
    let tls = tls(cx, r, prefix, &targets, resolve);
    let retries = match &r.retries {
        None => 2,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) if n <= MAX_RETRIES => n,
            _ => {
                cx.err(
                    &v.span(),
                    &format!("{prefix}.retries"),
                    format!(
                        "{} is out of range; use a value from 0 to {MAX_RETRIES}",
                        v.get_ref()
                    ),
                );
                0
            }
        },
    };
    let retry_budget = cx.duration(
        &r.retry_budget,
        &format!("{prefix}.retry_budget"),
        Duration::from_secs(10),
    );
    let health_check = health_check(cx, r, prefix);
    let passive = passive(cx, r, prefix, targets.len());
    if cx.errors.len() > before || targets.is_empty() {
        return None;
    }
    Some(UpstreamConfig {
        targets: targets.into_iter().map(|(t, _, _)| t).collect(),
        strip_prefix: r.strip_prefix.unwrap_or(false),
        preserve_host: r.preserve_host.unwrap_or(true),
        lb,
        protocol,
        tls,
        health_check,
        passive,
        retries,
        retry_budget,
    })
}

/// The upstreams with the span and field name of each (for later messages).
fn targets(
    cx: &mut Ctx<'_>,
    r: &RawRoute,
    route_span: &Range<usize>,
    prefix: &str,
) -> Vec<(UpstreamTarget, Range<usize>, String)> {
    let mut out = Vec::new();
    match (&r.upstream, &r.upstreams) {
        (Some(_), Some(list)) => {
            cx.err(
                &list.span(),
                &format!("{prefix}.upstreams"),
                "is set together with upstream; keep one of them (upstreams = [...] for several)",
            );
        }
        (Some(u), None) => {
            let field = format!("{prefix}.upstream");
            match parse_url(u.get_ref()) {
                Ok(uri) => out.push((
                    UpstreamTarget {
                        uri,
                        weight: NonZeroU32::MIN,
                    },
                    u.span(),
                    field,
                )),
                Err(e) => cx.err(&u.span(), &field, e),
            }
        }
        (None, Some(list)) => {
            if list.get_ref().is_empty() {
                cx.err(
                    &list.span(),
                    &format!("{prefix}.upstreams"),
                    "is empty; list at least one upstream such as \"http://127.0.0.1:3000\"",
                );
            }
            if list.get_ref().len() > MAX_UPSTREAMS {
                cx.err(
                    &list.span(),
                    &format!("{prefix}.upstreams"),
                    format!(
                        "lists {} upstreams; at most {MAX_UPSTREAMS} are supported per route",
                        list.get_ref().len()
                    ),
                );
                return out;
            }
            let mut seen: HashSet<Uri> = HashSet::new();
            for (k, v) in list.get_ref().iter().enumerate() {
                let field = format!("{prefix}.upstreams[{k}]");
                if let Some(t) = target(cx, v, &field) {
                    if !seen.insert(t.uri.clone()) {
                        cx.err(
                            &v.span(),
                            &field,
                            format!("{} is listed twice; raise its weight instead", t.label()),
                        );
                        continue;
                    }
                    out.push((t, v.span(), field));
                }
            }
        }
        (None, None) => {
            cx.err(route_span, prefix, "has no upstream");
        }
    }
    out
}

/// One element of `upstreams`: `"http://host:port"` or `{ url = "...", weight = N }`.
fn target(cx: &mut Ctx<'_>, v: &Spanned<toml::Value>, field: &str) -> Option<UpstreamTarget> {
    let hint = "write \"http://host:port\" or { url = \"http://host:port\", weight = 2 }";
    match v.get_ref() {
        toml::Value::String(s) => match parse_url(s) {
            Ok(uri) => Some(UpstreamTarget {
                uri,
                weight: NonZeroU32::MIN,
            }),
            Err(e) => {
                cx.err(&v.span(), field, e);
                None
            }
        },
        toml::Value::Table(t) => {
            let mut ok = true;
            let mut uri = None;
            let mut weight = NonZeroU32::MIN;
            for (k, val) in t {
                match (k.as_str(), val) {
                    ("url", toml::Value::String(s)) => match parse_url(s) {
                        Ok(u) => uri = Some(u),
                        Err(e) => {
                            cx.err(&v.span(), &format!("{field}.url"), e);
                            ok = false;
                        }
                    },
                    ("weight", toml::Value::Integer(w)) => {
                        match u32::try_from(*w)
                            .ok()
                            .filter(|w| *w <= MAX_WEIGHT)
                            .and_then(NonZeroU32::new)
                        {
                            Some(w) => weight = w,
                            None => {
                                cx.err(
                                    &v.span(),
                                    &format!("{field}.weight"),
                                    format!(
                                        "{w} is out of range; use a value from 1 to {MAX_WEIGHT}"
                                    ),
                                );
                                ok = false;
                            }
                        }
                    }
                    ("url", _) => {
                        cx.err(
                            &v.span(),
                            &format!("{field}.url"),
                            "must be a string such as \"http://host:port\"",
                        );
                        ok = false;
                    }
                    ("weight", _) => {
                        cx.err(
                            &v.span(),
                            &format!("{field}.weight"),
                            "must be a whole number, without quotes",
                        );
                        ok = false;
                    }
                    (other, _) => {
                        cx.err(
                            &v.span(),
                            &format!("{field}.{other}"),
                            format!("unknown key \"{other}\"; expected url and weight"),
                        );
                        ok = false;
                    }
                }
            }
            match uri {
                Some(uri) if ok => Some(UpstreamTarget { uri, weight }),
                Some(_) => None,
                None => {
                    if ok {
                        cx.err(
                            &v.span(),
                            &format!("{field}.url"),
                            format!("is missing; {hint}"),
                        );
                    }
                    None
                }
            }
        }
        _ => {
            cx.err(&v.span(), field, format!("is not an upstream; {hint}"));
            None
        }
    }
}

/// `http://host:port` or `https://host:port`, with no path, query or credentials.
pub(super) fn parse_url(s: &str) -> Result<Uri, String> {
    let bad = || format!("\"{s}\" is not a URL; write it as \"http://host:port\"");
    let uri: Uri = s.parse().map_err(|_| bad())?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        Some(other) => {
            return Err(format!(
                "\"{s}\": scheme \"{other}\" is not supported; use http:// or https://"
            ))
        }
        None => return Err(bad()),
    };
    let Some(auth) = uri.authority() else {
        return Err(bad());
    };
    if auth.as_str().contains('@') {
        return Err(format!(
            "\"{s}\": credentials in the URL are not supported; remove \"user@\""
        ));
    }
    if auth.host().is_empty() {
        return Err(bad());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "\"{s}\": an upstream URL takes no path; the request path is forwarded as is (use strip_prefix = true to drop the route prefix)"
        ));
    }
    Uri::builder()
        .scheme(scheme)
        .authority(auth.as_str())
        .path_and_query("/")
        .build()
        .map_err(|_| bad())
}

fn protocol(
    cx: &mut Ctx<'_>,
    r: &RawRoute,
    prefix: &str,
    targets: &[(UpstreamTarget, Range<usize>, String)],
) -> UpstreamProtocol {
    let Some(v) = &r.protocol else {
        return UpstreamProtocol::Http1;
    };
    let field = format!("{prefix}.protocol");
    let (p, wrong_scheme, hint) = match v.get_ref().as_str() {
        "http1" | "http/1.1" => return UpstreamProtocol::Http1,
        "h2c" => (
            UpstreamProtocol::H2c,
            "https",
            "\"h2c\" is HTTP/2 over cleartext TCP and needs http:// upstreams; use \"h2\" for HTTP/2 over TLS",
        ),
        "h2" => (
            UpstreamProtocol::H2,
            "http",
            "\"h2\" is HTTP/2 over TLS (ALPN) and needs https:// upstreams; use \"h2c\" for cleartext HTTP/2",
        ),
        other => {
            cx.err(
                &v.span(),
                &field,
                format!("\"{other}\" is not an upstream protocol; use \"http1\" (default), \"h2c\" or \"h2\""),
            );
            return UpstreamProtocol::Http1;
        }
    };
    if let Some((_, _, f)) = targets
        .iter()
        .find(|(t, _, _)| t.uri.scheme_str() == Some(wrong_scheme))
    {
        cx.err(
            &v.span(),
            &field,
            format!("{hint} ({f} is {wrong_scheme}://)"),
        );
    }
    p
}

fn tls(
    cx: &mut Ctx<'_>,
    r: &RawRoute,
    prefix: &str,
    targets: &[(UpstreamTarget, Range<usize>, String)],
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Option<UpstreamTls> {
    let first_https = targets.iter().find(|(t, _, _)| t.is_https());
    let Some((_, https_span, https_field)) = first_https else {
        for (key, v) in [
            ("ca", &r.ca),
            ("tls_server_name", &r.tls_server_name),
            ("client_cert", &r.client_cert),
            ("client_key", &r.client_key),
        ] {
            if let Some(v) = v {
                cx.err(
                    &v.span(),
                    &format!("{prefix}.{key}"),
                    "only applies to https:// upstreams; remove it or write the upstream as https://",
                );
            }
        }
        return None;
    };
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    let mut ok = true;

    // Roots: the configured CA, or the system bundle.
    let (ca, system_roots) = match &r.ca {
        Some(c) => (resolve(c.get_ref()), false),
        None => (
            std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS)),
            true,
        ),
    };
    let roots = match read_certs(&ca) {
        Ok(c) => {
            c.iter().for_each(|d| d.as_ref().hash(&mut digest));
            c
        }
        Err(e) => {
            match &r.ca {
                Some(c) => cx.err(&c.span(), &format!("{prefix}.ca"), e),
                None => cx.err(
                    https_span,
                    https_field,
                    format!("https:// upstreams are verified against the system CA bundle, but {e}; set ca = \"ca.pem\" on the route"),
                ),
            }
            ok = false;
            Vec::new()
        }
    };

    // SNI: tls_server_name, else each upstream's host.
    let server_name = match &r.tls_server_name {
        Some(n) => match rustls_pki_types::ServerName::try_from(n.get_ref().as_str()) {
            Ok(_) => Some(n.get_ref().clone()),
            Err(_) => {
                cx.err(
                    &n.span(),
                    &format!("{prefix}.tls_server_name"),
                    format!("\"{}\" is not a DNS name or IP address", n.get_ref()),
                );
                ok = false;
                None
            }
        },
        None => {
            for (t, span, field) in targets.iter().filter(|(t, _, _)| t.is_https()) {
                if server_name_of(&t.uri).is_none() {
                    cx.err(
                        span,
                        field,
                        format!(
                            "\"{}\" cannot be sent as a TLS server name; set tls_server_name",
                            t.label()
                        ),
                    );
                    ok = false;
                }
            }
            None
        }
    };

    // Client certificate (mTLS to the upstream).
    let client = match (&r.client_cert, &r.client_key) {
        (None, None) => None,
        (Some(c), None) => {
            cx.err(
                &c.span(),
                &format!("{prefix}.client_key"),
                "is missing; set client_cert and client_key together",
            );
            ok = false;
            None
        }
        (None, Some(k)) => {
            cx.err(
                &k.span(),
                &format!("{prefix}.client_cert"),
                "is missing; set client_cert and client_key together",
            );
            ok = false;
            None
        }
        (Some(c), Some(k)) => {
            let cert_path = resolve(c.get_ref());
            let key_path = resolve(k.get_ref());
            let chain = match read_certs(&cert_path) {
                Ok(chain) => Some(chain),
                Err(e) => {
                    cx.err(&c.span(), &format!("{prefix}.client_cert"), e);
                    None
                }
            };
            let key = {
                use rustls_pki_types::pem::PemObject;
                match rustls_pki_types::PrivateKeyDer::from_pem_file(&key_path) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        cx.err(
                            &k.span(),
                            &format!("{prefix}.client_key"),
                            format!(
                                "cannot read a private key from \"{}\": {e}",
                                key_path.display()
                            ),
                        );
                        None
                    }
                }
            };
            match (chain, key) {
                (Some(chain), Some(key)) => {
                    chain.iter().for_each(|d| d.as_ref().hash(&mut digest));
                    key.secret_der().hash(&mut digest);
                    Some(((cert_path, key_path), chain, key, c.span()))
                }
                _ => {
                    ok = false;
                    None
                }
            }
        }
    };
    if !ok {
        return None;
    }
    let (paths, client, client_span) = match client {
        Some((paths, chain, key, span)) => (Some(paths), Some((chain, key)), Some(span)),
        None => (None, None, None),
    };
    let checked = check_roots(&roots).and_then(|()| match &client {
        Some((chain, key)) => check_client(chain, key),
        None => Ok(()),
    });
    match checked {
        Ok(()) => Some(UpstreamTls {
            ca,
            system_roots,
            server_name,
            client_cert: paths,
            material: digest.finish(),
            roots: roots.into(),
            client_auth: client.map(|(chain, key)| Arc::new(ClientAuth { chain, key })),
        }),
        Err(e) => {
            match (client_span, &r.ca) {
                (Some(span), _) if e.starts_with("client") => {
                    cx.err(&span, &format!("{prefix}.client_cert"), e)
                }
                (_, Some(c)) => cx.err(
                    &c.span(),
                    &format!("{prefix}.ca"),
                    format!("\"{}\" {e}", ca.display()),
                ),
                _ => cx.err(
                    https_span,
                    https_field,
                    format!("the system CA bundle \"{}\" {e}", ca.display()),
                ),
            }
            None
        }
    }
}

/// At least one certificate of the bundle parses as X.509.
fn check_roots(roots: &[CertificateDer<'_>]) -> Result<(), String> {
    if roots
        .iter()
        .any(|c| x509_parser::parse_x509_certificate(c.as_ref()).is_ok())
    {
        Ok(())
    } else {
        Err("holds no usable CA certificate".into())
    }
}

/// The key is the leaf certificate's: its public key is the one the
/// certificate carries.
fn check_client(chain: &[CertificateDer<'_>], key: &PrivateKeyDer<'_>) -> Result<(), String> {
    use rcgen::PublicKeyData;
    let bad = |why: String| format!("client certificate and key do not work together: {why}");
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| bad(format!("the certificate does not parse: {e}")))?;
    let pair = rcgen::KeyPair::try_from(key).map_err(|e| {
        bad(format!(
            "the key is not a supported RSA, ECDSA or Ed25519 key: {e}"
        ))
    })?;
    if pair.subject_public_key_info() == cert.tbs_certificate.subject_pki.raw {
        Ok(())
    } else {
        Err(bad("the key is not the certificate's".into()))
    }
}

fn health_check(cx: &mut Ctx<'_>, r: &RawRoute, prefix: &str) -> Option<HealthCheck> {
    let h = r.health_check.as_ref()?;
    let span = h.span();
    let h = h.get_ref();
    let p = format!("{prefix}.health_check");
    let path = match &h.path {
        None => "/".to_string(),
        Some(v) => {
            let s = v.get_ref();
            if !s.starts_with('/')
                || s.parse::<http::uri::PathAndQuery>().is_err()
                || s.contains('#')
            {
                cx.err(
                    &v.span(),
                    &format!("{p}.path"),
                    format!("\"{s}\" is not a path; write e.g. \"/healthz\""),
                );
            }
            s.clone()
        }
    };
    let status = match &h.status {
        None => None,
        Some(v) => match u16::try_from(*v.get_ref())
            .ok()
            .and_then(|c| http::StatusCode::from_u16(c).ok())
        {
            Some(c) if c.as_u16() >= 200 => Some(c),
            _ => {
                cx.err(
                    &v.span(),
                    &format!("{p}.status"),
                    format!(
                        "{} is not a valid status; use a code from 200 to 599",
                        v.get_ref()
                    ),
                );
                None
            }
        },
    };
    let interval = cx.duration(
        &h.interval,
        &format!("{p}.interval"),
        Duration::from_secs(10),
    );
    let timeout = cx.duration(
        &h.timeout,
        &format!("{p}.timeout"),
        Duration::from_secs(2).min(interval),
    );
    if timeout > interval {
        let s = h.timeout.as_ref().map_or(span.clone(), |t| t.span());
        cx.err(
            &s,
            &format!("{p}.timeout"),
            format!("{timeout:?} is longer than the interval ({interval:?}); make it shorter"),
        );
    }
    let threshold =
        |cx: &mut Ctx<'_>, v: &Option<Spanned<i64>>, name: &str, default: u32| -> NonZeroU32 {
            let n = cx.count(v, &format!("{p}.{name}"), 1, 100, default as usize) as u32;
            NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
        };
    let healthy_threshold = threshold(cx, &h.healthy_threshold, "healthy_threshold", 2);
    let unhealthy_threshold = threshold(cx, &h.unhealthy_threshold, "unhealthy_threshold", 3);
    Some(HealthCheck {
        path,
        status,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    })
}

fn passive(cx: &mut Ctx<'_>, r: &RawRoute, prefix: &str, upstreams: usize) -> PassiveHealth {
    let default = if upstreams > 1 {
        PassiveHealth::DEFAULT
    } else {
        PassiveHealth::OFF
    };
    let Some(p) = &r.passive_health else {
        return default;
    };
    let p = p.get_ref();
    let f = format!("{prefix}.passive_health");
    PassiveHealth {
        failures: cx.count(
            &p.failures,
            &format!("{f}.failures"),
            0,
            1000,
            PassiveHealth::DEFAULT.failures as usize,
        ) as u32,
        window: cx.duration(
            &p.window,
            &format!("{f}.window"),
            PassiveHealth::DEFAULT.window,
        ),
        cooldown: cx.duration(
            &p.cooldown,
            &format!("{f}.cooldown"),
            PassiveHealth::DEFAULT.cooldown,
        ),
    }
}
