//! Raw file -> [`Config`]: every value is read, every problem collected.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use toml::Spanned;

use super::raw::*;
use super::*;

mod acme;
mod ctx;
mod upstream;

use ctx::Ctx;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let error = |line: usize, message: String| {
            ConfigErrors(vec![ConfigError {
                origin: Origin {
                    file: path.to_path_buf(),
                    line,
                    field: "file".into(),
                },
                message,
            }])
        };
        let bytes = std::fs::read(path)
            .map_err(|e| error(0, format!("cannot read the configuration file: {e}")))?;
        // Not UTF-8: name the line of the first bad byte, like any other error.
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            let column = at
                - bytes[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1)
                + 1;
            error(
                line,
                format!("byte {column} of this line is not UTF-8; save the file as UTF-8"),
            )
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if it were the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        parse(path, text)
    }
}

pub(super) fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx {
        file: path,
        text,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let (field, message) = describe_toml_error(&e, text);
            cx.err(&span, &field, message);
            return Err(ConfigErrors(cx.errors));
        }
    };
    let config = build(&mut cx, raw, path);
    if cx.errors.is_empty() {
        Ok(config)
    } else {
        // In file order (checks run section by section); file-wide last.
        cx.errors.sort_by_key(|e| {
            if e.origin.line == 0 {
                usize::MAX
            } else {
                e.origin.line
            }
        });
        Err(ConfigErrors(cx.errors))
    }
}

/// Turns a toml/serde message into (field, message with a hint). The field
/// is found from the error's position in the text, since neither toml nor
/// serde report the path of the value that failed.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> (String, String) {
    let msg = e.message().trim().to_string();
    let at = e.span().map_or(0, |s| s.start);
    let base = field_at(text, at);
    let join = |name: &str| -> String {
        if base.is_empty() {
            name.to_string()
        } else if base.rsplit('.').next() == Some(name) {
            base.clone()
        } else {
            format!("{base}.{name}")
        }
    };
    // serde: "unknown field `foo`, expected one of `a`, `b`"
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once('`') {
            let expected = expected.trim_start_matches(", ");
            return (
                join(name),
                format!("unknown key \"{name}\"; remove it or fix its spelling ({expected})"),
            );
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        if let Some((name, _)) = rest.split_once('`') {
            return (
                join(name),
                format!("required key \"{name}\" is missing from this table; add it"),
            );
        }
    }
    let field = if base.is_empty() {
        "(top level)".to_string()
    } else {
        base.clone()
    };
    // serde: "invalid type: integer `443`, expected a string"
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            let hint = match expected {
                "a string" => "put the value in double quotes",
                "a boolean" => "write true or false, without quotes",
                e if e.starts_with('i') || e.starts_with('u') || e.contains("integer") => {
                    "write a whole number, without quotes"
                }
                e if e.contains("sequence") => "write a list such as [\"a\", \"b\"]",
                _ => "fix the value",
            };
            let expected = match expected {
                e if e.starts_with('i') || e.starts_with('u') => "a whole number",
                e if e.contains("sequence") => "a list",
                e => e,
            };
            return (
                field,
                format!("{found} is the wrong type, expected {expected}; {hint}"),
            );
        }
    }
    let hint = match msg.as_str() {
        "duplicate key" => "; keep only one of them",
        _ => "",
    };
    (field, format!("is not valid TOML: {msg}{hint}"))
}

/// The dotted field path (`sites[1].routes[0].upstream`) of the value at
/// byte `at` of a TOML text. A line scanner, enough for the messages: it
/// follows `[table]` and `[[array]]` headers and `key =` lines.
fn field_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    // Array-of-tables element counts, by dotted name without indices.
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut table: Vec<String> = Vec::new();
    let mut key: Vec<String> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        offset += line.len();
        let trimmed = line.trim();
        if let Some(inner) = trimmed.strip_prefix("[[") {
            let name = split_key(inner.split("]]").next().unwrap_or(""));
            let dotted = name.join(".");
            let children = format!("{dotted}.");
            arrays.retain(|k, _| !k.starts_with(&children));
            *arrays.entry(dotted).or_insert(0) += 1;
            table = name;
            key.clear();
        } else if let Some(inner) = trimmed.strip_prefix('[') {
            table = split_key(inner.split(']').next().unwrap_or(""));
            key.clear();
        } else if let Some((k, _)) = split_assignment(trimmed) {
            key = split_key(k);
        }
        if at < offset {
            break;
        }
    }
    let mut out = String::new();
    let full: Vec<&String> = table.iter().chain(key.iter()).collect();
    for (i, part) in full.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(part);
        if i < table.len() {
            let dotted: Vec<&str> = table[..=i].iter().map(String::as_str).collect();
            if let Some(n) = arrays.get(&dotted.join(".")) {
                out.push_str(&format!("[{}]", n.saturating_sub(1)));
            }
        }
    }
    out
}

/// `key = value` -> `key` (the `=` found outside quotes); `None` for other lines.
fn split_assignment(line: &str) -> Option<(&str, &str)> {
    if line.starts_with('#') {
        return None;
    }
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '=') => return Some((&line[..i], &line[i + 1..])),
            _ => {}
        }
    }
    None
}

/// `a."b.c" . d` -> `["a", "b.c", "d"]`.
fn split_key(k: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in k.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '.') => parts.push(std::mem::take(&mut cur)),
            // Whitespace, and stray brackets of a broken header.
            (None, c) if c.is_whitespace() || c == '[' || c == ']' => {}
            (_, c) => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

fn build(cx: &mut Ctx<'_>, raw: RawConfig, path: &Path) -> Config {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };

    let state_dir = match &raw.state_dir {
        Some(s) if s.get_ref().trim().is_empty() => {
            cx.err(
                &s.span(),
                "state_dir",
                "is empty; give a directory path such as \"/var/lib/portcullis\"",
            );
            PathBuf::new()
        }
        Some(s) => resolve(s.get_ref()),
        None => base.join("state"),
    };

    let admin = match raw.admin.as_ref().and_then(|a| a.listen.as_ref()) {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
        Some(v) if v.get_ref() == "off" => None,
        Some(v) => match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    &v.span(),
                    "admin.listen",
                    format!("\"{}\" is not an address; write IP:PORT such as \"127.0.0.1:9901\", or \"off\"", v.get_ref()),
                );
                None
            }
        },
    };

    let admin_access = admin_access(cx, raw.admin.as_ref(), admin, &resolve);

    let t = raw.timeouts.unwrap_or_default();
    let d = Timeouts::default();
    let timeouts = Timeouts {
        tls_handshake: cx.duration(&t.tls_handshake, "timeouts.tls_handshake", d.tls_handshake),
        request_header: cx.duration(
            &t.request_header,
            "timeouts.request_header",
            d.request_header,
        ),
        request_body: cx.duration(&t.request_body, "timeouts.request_body", d.request_body),
        response_write: cx.duration(
            &t.response_write,
            "timeouts.response_write",
            d.response_write,
        ),
        idle: cx.duration(&t.idle, "timeouts.idle", d.idle),
        upstream_connect: cx.duration(
            &t.upstream_connect,
            "timeouts.upstream_connect",
            d.upstream_connect,
        ),
        upstream_response: cx.duration(
            &t.upstream_response,
            "timeouts.upstream_response",
            d.upstream_response,
        ),
        upstream_idle: cx.duration(&t.upstream_idle, "timeouts.upstream_idle", d.upstream_idle),
        shutdown_grace: cx.duration(
            &t.shutdown_grace,
            "timeouts.shutdown_grace",
            d.shutdown_grace,
        ),
    };

    let l = raw.limits.unwrap_or_default();
    let dl = Limits::default();
    let limits = Limits {
        max_header_bytes: cx.count(
            &l.max_header_bytes,
            "limits.max_header_bytes",
            8192,
            1 << 24,
            dl.max_header_bytes,
        ),
        max_headers: cx.count(
            &l.max_headers,
            "limits.max_headers",
            1,
            10_000,
            dl.max_headers,
        ),
        max_connections: cx.count(
            &l.max_connections,
            "limits.max_connections",
            1,
            10_000_000,
            dl.max_connections,
        ),
        max_connections_per_ip: cx.count(
            &l.max_connections_per_ip,
            "limits.max_connections_per_ip",
            1,
            10_000_000,
            dl.max_connections_per_ip,
        ),
        max_pending_handshakes: cx.count(
            &l.max_pending_handshakes,
            "limits.max_pending_handshakes",
            1,
            10_000_000,
            dl.max_pending_handshakes,
        ),
        max_pending_handshakes_per_ip: cx.count(
            &l.max_pending_handshakes_per_ip,
            "limits.max_pending_handshakes_per_ip",
            1,
            10_000_000,
            dl.max_pending_handshakes_per_ip,
        ),
        max_upstream_idle_per_host: cx.count(
            &l.max_upstream_idle_per_host,
            "limits.max_upstream_idle_per_host",
            0,
            1_000_000,
            dl.max_upstream_idle_per_host,
        ),
    };

    let cert_poll_interval = cx.duration(
        &raw.certificates
            .as_ref()
            .and_then(|c| c.poll_interval.clone()),
        "certificates.poll_interval",
        Duration::from_secs(60),
    );
    let rate_limit = build_rate_limit_settings(cx, raw.rate_limit.as_ref());
    let access_log = build_access_log(
        cx,
        (raw.access_log.as_ref(), raw.access_log_format.as_ref()),
        path,
        &resolve,
    );
    let listeners = build_listeners(cx, &raw.listeners);
    let acme_table = raw.acme.as_ref().map(|t| acme::AcmeTable {
        table: t.get_ref(),
        field: "acme".into(),
    });
    let acme_base = acme::global(cx, acme_table.as_ref(), &resolve);
    let sites = build_sites(cx, &raw.sites, &resolve, &acme_base, &listeners);

    // A listener declared https but with a bad address is reported on its
    // own; only a file that declares none gets this error.
    let declared_https = raw.listeners.iter().any(|l| {
        l.get_ref()
            .protocol
            .as_ref()
            .is_none_or(|p| p.get_ref() == "https")
    });
    if !declared_https && !raw.sites.is_empty() {
        // About the whole file, not a line of it.
        cx.errors.push(ConfigError {
            origin: Origin {
                file: path.to_path_buf(),
                line: 0,
                field: "listeners".into(),
            },
            message: "no https listener; add [[listeners]] with listen = \"0.0.0.0:443\"".into(),
        });
    }

    Config {
        source: path.to_path_buf(),
        state_dir,
        admin,
        admin_access,
        listeners,
        sites,
        timeouts,
        limits,
        cert_poll_interval,
        rate_limit,
        access_log,
    }
}

/// `admin.hosts` and `admin.token_file`; a non-loopback listener needs
/// the token.
fn admin_access(
    cx: &mut Ctx<'_>,
    raw: Option<&RawAdmin>,
    listen: Option<SocketAddr>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> AdminAccess {
    let mut access = AdminAccess::default();
    let Some(raw) = raw else { return access };
    for (i, h) in raw.hosts.iter().flatten().enumerate() {
        let name = h.get_ref().trim().to_ascii_lowercase();
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if ok {
            access.hosts.push(name);
        } else {
            cx.err(
                &h.span(),
                &format!("admin.hosts[{i}]"),
                format!(
                    "\"{}\" is not a host name; write a DNS name such as \"admin.internal\"",
                    h.get_ref()
                ),
            );
        }
    }
    if let Some(f) = &raw.token_file {
        let path = resolve(f.get_ref());
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => access.token = Some(t.trim().to_string()),
            Ok(_) => cx.err(
                &f.span(),
                "admin.token_file",
                format!("\"{}\" is empty; write a long random token in it (e.g. `openssl rand -hex 32 > {}`)", path.display(), path.display()),
            ),
            Err(e) => cx.err(
                &f.span(),
                "admin.token_file",
                format!("cannot read \"{}\": {e}", path.display()),
            ),
        }
    }
    if let (Some(addr), None) = (listen, &raw.token_file) {
        if !addr.ip().is_loopback() {
            let span = raw.listen.as_ref().map(|l| l.span()).unwrap_or(0..0);
            cx.err(
                &span,
                "admin.listen",
                format!("{addr} is not a loopback address: anyone who reaches it could reload the config and re-issue certificates; set admin.token_file to require a bearer token, or listen on 127.0.0.1"),
            );
        }
    }
    access
}

fn build_access_log(
    cx: &mut Ctx<'_>,
    (target, format): (Option<&Spanned<String>>, Option<&Spanned<String>>),
    path: &Path,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> AccessLogConfig {
    let mut out = AccessLogConfig::default();
    out.origin.file = path.to_path_buf();
    if let Some(v) = target {
        out.origin = cx.origin(&v.span(), "access_log");
        out.target = match v.get_ref().trim() {
            "" => {
                cx.err(
                    &v.span(),
                    "access_log",
                    "is empty; give a file path such as \"/var/log/portcullis/access.log\", or \"stderr\", \"stdout\" or \"off\"",
                );
                AccessLogTarget::Stderr
            }
            "off" => AccessLogTarget::Off,
            "stderr" => AccessLogTarget::Stderr,
            "stdout" => AccessLogTarget::Stdout,
            p if p.ends_with('/') => {
                cx.err(
                    &v.span(),
                    "access_log",
                    format!("\"{p}\" is a directory; name a file in it, such as \"{p}access.log\""),
                );
                AccessLogTarget::Stderr
            }
            p => AccessLogTarget::File(resolve(p)),
        };
    }
    if let Some(v) = format {
        out.format = match v.get_ref().as_str() {
            "json" => Some(AccessLogFormat::Json),
            "common" => Some(AccessLogFormat::Common),
            "combined" => Some(AccessLogFormat::Combined),
            other => {
                cx.err(
                    &v.span(),
                    "access_log_format",
                    format!(
                        "\"{other}\" is not a format; use \"json\", \"common\" or \"combined\""
                    ),
                );
                None
            }
        };
    }
    out
}

fn build_rate_limit_settings(
    cx: &mut Ctx<'_>,
    raw: Option<&RawRateLimitGlobal>,
) -> RateLimitSettings {
    let d = RateLimitSettings::default();
    let Some(raw) = raw else { return d };
    let mut trusted = Vec::new();
    for (i, p) in raw.trusted_proxies.iter().flatten().enumerate() {
        match Cidr::parse(p.get_ref()) {
            Some(c) => trusted.push(c),
            None => cx.err(
                &p.span(),
                &format!("rate_limit.trusted_proxies[{i}]"),
                format!("\"{}\" is not an address or CIDR block; write e.g. \"10.0.0.0/8\" or \"192.0.2.7\"", p.get_ref()),
            ),
        }
    }
    RateLimitSettings {
        trusted_proxies: trusted,
        max_keys: cx.count(
            &raw.max_keys,
            "rate_limit.max_keys",
            1,
            100_000_000,
            d.max_keys,
        ),
        purge_interval: cx.duration(
            &raw.purge_interval,
            "rate_limit.purge_interval",
            d.purge_interval,
        ),
        body: raw.body.clone().unwrap_or(d.body),
    }
}

fn build_limits(cx: &mut Ctx<'_>, raw: &[Spanned<RawLimit>], prefix: &str) -> Vec<RateLimitConfig> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (k, l) in raw.iter().enumerate() {
        let l = l.get_ref();
        let field = format!("{prefix}.rate_limits[{k}]");
        let Some((count, per)) = parse_rate(l.rate.get_ref()) else {
            cx.err(
                &l.rate.span(),
                &format!("{field}.rate"),
                format!("\"{}\" is not a rate; write COUNT/UNIT such as \"100/s\", \"6000/min\" or \"50/h\"", l.rate.get_ref()),
            );
            continue;
        };
        let burst = match &l.burst {
            None => count,
            Some(b) => match u32::try_from(*b.get_ref())
                .ok()
                .and_then(std::num::NonZeroU32::new)
            {
                Some(b) => b,
                None => {
                    cx.err(
                        &b.span(),
                        &format!("{field}.burst"),
                        format!(
                            "{} is not a valid burst; use a whole number from 1",
                            b.get_ref()
                        ),
                    );
                    continue;
                }
            },
        };
        let key = match l.key.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
            None | Some(("ip", _)) => LimitKey::ClientIp,
            Some(("route", _)) => LimitKey::Route,
            Some((other, span)) => match other
                .strip_prefix("header:")
                .map(|h| http::HeaderName::from_bytes(h.trim().as_bytes()))
            {
                Some(Ok(h)) => LimitKey::Header(h),
                _ => {
                    cx.err(&span, &format!("{field}.key"), format!("\"{other}\" is not a key; use \"ip\", \"route\" or \"header:NAME\" (e.g. \"header:x-api-key\")"));
                    continue;
                }
            },
        };
        let shadow = match l.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("enforce", _)) => false,
            Some(("shadow", _)) => true,
            Some((other, span)) => {
                cx.err(
                    &span,
                    &format!("{field}.mode"),
                    format!("\"{other}\" is not a mode; use \"enforce\" or \"shadow\""),
                );
                continue;
            }
        };
        let name = match &l.name {
            Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
            Some(n) => {
                cx.err(
                    &n.span(),
                    &format!("{field}.name"),
                    format!(
                        "\"{}\" is not a valid name; use letters, digits, '.', '-' and '_'",
                        n.get_ref()
                    ),
                );
                continue;
            }
            None => match &key {
                LimitKey::ClientIp => "ip".to_string(),
                LimitKey::Route => "route".to_string(),
                LimitKey::Header(h) => h.as_str().to_string(),
            },
        };
        if !names.insert(name.clone()) {
            let span = l.name.as_ref().map(|n| n.span()).unwrap_or(l.rate.span());
            cx.err(
                &span,
                &format!("{field}.name"),
                format!(
                    "\"{name}\" is already a limit of this route; give each limit its own name"
                ),
            );
            continue;
        }
        out.push(RateLimitConfig {
            name,
            count,
            per,
            burst,
            key,
            shadow,
        });
    }
    out
}

/// `100/s` -> (100, 1 s).
fn parse_rate(s: &str) -> Option<(std::num::NonZeroU32, Duration)> {
    let (n, unit) = s.split_once('/')?;
    let n = std::num::NonZeroU32::new(n.trim().parse().ok()?)?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other).ok().filter(|d| !d.is_zero())?,
    };
    Some((n, per))
}

fn build_listeners(cx: &mut Ctx<'_>, raw: &[Spanned<RawListener>]) -> Vec<ListenerConfig> {
    let mut out = Vec::new();
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, l) in raw.iter().enumerate() {
        let l = l.get_ref();
        let field = format!("listeners[{i}].listen");
        let addr = match l.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                cx.err(
                    &l.listen.span(),
                    &field,
                    format!(
                        "\"{}\" is not an address; write IP:PORT such as \"0.0.0.0:443\" or \"[::]:443\"",
                        l.listen.get_ref()
                    ),
                );
                continue;
            }
        };
        if addr.port() != 0 {
            if let Some(prev) = seen.insert(addr, i) {
                cx.err(
                    &l.listen.span(),
                    &field,
                    format!("{addr} is already used by listeners[{prev}]; each listener needs its own address"),
                );
            }
        }
        let https_port = match &l.https_port {
            None => None,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(p) if p != 0 => Some(p),
                _ => {
                    cx.err(
                        &p.span(),
                        &format!("listeners[{i}].https_port"),
                        "must be a port from 1 to 65535",
                    );
                    None
                }
            },
        };
        let protocol = match l
            .protocol
            .as_ref()
            .map(|p| (p.get_ref().as_str(), p.span()))
        {
            None | Some(("https", _)) => {
                if let Some(p) = &l.https_port {
                    cx.err(
                        &p.span(),
                        &format!("listeners[{i}].https_port"),
                        "only applies to protocol = \"http\" listeners; remove it",
                    );
                }
                ListenerProtocol::Https
            }
            Some(("http", _)) => ListenerProtocol::Http { https_port },
            Some((other, span)) => {
                cx.err(
                    &span,
                    &format!("listeners[{i}].protocol"),
                    format!("\"{other}\" is not a protocol; use \"https\" or \"http\""),
                );
                continue;
            }
        };
        out.push(ListenerConfig { addr, protocol });
    }
    out
}

fn build_sites(
    cx: &mut Ctx<'_>,
    raw: &[Spanned<RawSite>],
    resolve: &dyn Fn(&str) -> PathBuf,
    acme_base: &AcmeConfig,
    listeners: &[ListenerConfig],
) -> Vec<SiteConfig> {
    let mut out = Vec::new();
    let mut names: HashMap<String, (usize, bool)> = HashMap::new();
    let mut hosts_seen: HashMap<HostPattern, usize> = HashMap::new();
    let mut default_site: Option<usize> = None;
    for (i, s) in raw.iter().enumerate() {
        let site_span = s.span();
        let s = s.get_ref();
        let mut hosts = Vec::new();
        if s.hosts.get_ref().is_empty() {
            cx.err(
                &s.hosts.span(),
                &format!("sites[{i}].hosts"),
                "is empty; list at least one host name such as \"api.example.com\"",
            );
        }
        for (j, h) in s.hosts.get_ref().iter().enumerate() {
            let field = format!("sites[{i}].hosts[{j}]");
            match parse_host(h.get_ref()) {
                Ok(p) => {
                    if let Some(prev) = hosts_seen.insert(p.clone(), i) {
                        if prev != i {
                            cx.err(
                                &h.span(),
                                &field,
                                format!("\"{p}\" is already served by sites[{prev}]; a host belongs to one site"),
                            );
                        }
                    }
                    hosts.push(p);
                }
                Err(e) => cx.err(&h.span(), &field, e),
            }
        }
        let mut name = match &s.name {
            Some(n) if !valid_name(n.get_ref()) => {
                cx.err(
                    &n.span(),
                    &format!("sites[{i}].name"),
                    format!(
                        "\"{}\" is not a valid name; use letters, digits, '.', '-' and '_'",
                        n.get_ref()
                    ),
                );
                None
            }
            Some(n) => Some(n.get_ref().clone()),
            None => Some(
                s.hosts
                    .get_ref()
                    .first()
                    .map(|h| h.get_ref().trim().to_ascii_lowercase())
                    .unwrap_or_else(|| format!("site{i}")),
            ),
        };
        // A name taken from the first host can only clash when that host is
        // already reported as a duplicate (or named explicitly elsewhere):
        // make it unique instead of reporting a second, confusing error.
        let explicit = s.name.is_some();
        if let Some(n) = &name {
            if let Some(&(prev, prev_explicit)) = names.get(n) {
                if explicit {
                    let taken = if prev_explicit {
                        ""
                    } else {
                        " (taken from its first host)"
                    };
                    cx.err(
                        &s.name.as_ref().unwrap().span(),
                        &format!("sites[{i}].name"),
                        format!("\"{n}\" is already the name of sites[{prev}]{taken}; give each site its own name"),
                    );
                } else {
                    name = Some(format!("{n}-{i}"));
                }
            }
        }
        let name = name.unwrap_or_default();
        if !name.is_empty() {
            names.entry(name.clone()).or_insert((i, explicit));
        }
        let default = s.default.as_ref().map(|d| *d.get_ref()).unwrap_or(false);
        if default {
            if let Some(prev) = default_site {
                cx.err(
                    &s.default.as_ref().unwrap().span(),
                    &format!("sites[{i}].default"),
                    format!("sites[{prev}] is already the default site; only one site may set default = true"),
                );
            }
            default_site = Some(i);
        }
        let tls = match &s.tls {
            None => {
                cx.err(
                    &site_span,
                    &format!("sites[{i}].tls"),
                    "is missing; set tls = { cert = \"fullchain.pem\", key = \"key.pem\" } or tls = \"internal\"",
                );
                TlsSource::Internal
            }
            Some(v) => parse_tls(cx, v, i, resolve, acme_base, &hosts, listeners),
        };
        let mut routes = Vec::new();
        let mut paths: HashSet<String> = HashSet::new();
        for (j, r) in s.routes.iter().enumerate() {
            if let Some(route) = build_route(cx, r, i, j, resolve) {
                if !paths.insert(route.path.clone()) {
                    let span = r
                        .get_ref()
                        .path
                        .as_ref()
                        .map(|p| p.span())
                        .unwrap_or(r.span());
                    cx.err(
                        &span,
                        &format!("sites[{i}].routes[{j}].path"),
                        format!(
                            "\"{}\" is already routed in this site; merge the two routes",
                            route.path
                        ),
                    );
                }
                routes.push(route);
            }
        }
        if s.routes.is_empty() {
            cx.err(
                &site_span,
                &format!("sites[{i}].routes"),
                "has no routes; add [[sites.routes]] with upstream = \"http://127.0.0.1:3000\"",
            );
        }
        // Longest prefix first, so the first match wins.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        out.push(SiteConfig {
            name,
            hosts,
            tls,
            default,
            routes,
        });
    }
    out
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Validates a host name or `*.suffix` wildcard.
pub(crate) fn parse_host(h: &str) -> Result<HostPattern, String> {
    let lower = h.trim().to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        return Err(format!(
            "\"{h}\" is not a host name; write a name such as \"api.example.com\" or \"*.example.com\" (no scheme, port or path)"
        ));
    }
    if wild {
        if !name.contains('.') {
            return Err(format!(
                "\"{h}\" is too broad; a wildcard needs at least two labels after \"*.\""
            ));
        }
        Ok(HostPattern::Wildcard(name.to_string()))
    } else {
        Ok(HostPattern::Exact(name.to_string()))
    }
}

fn parse_tls(
    cx: &mut Ctx<'_>,
    v: &Spanned<RawTls>,
    i: usize,
    resolve: &dyn Fn(&str) -> PathBuf,
    acme_base: &AcmeConfig,
    hosts: &[HostPattern],
    listeners: &[ListenerConfig],
) -> TlsSource {
    let field = format!("sites[{i}].tls");
    let hint =
        "write tls = \"internal\" or tls = { cert = \"fullchain.pem\", key = \"privkey.pem\" }";
    let any_hint = "write tls = \"internal\", tls = \"acme\", tls = { acme = { ... } } or tls = { cert = \"fullchain.pem\", key = \"privkey.pem\" }";
    let with_acme = |cx: &mut Ctx<'_>, table: Option<&RawAcme>| {
        let origin = cx.origin(&v.span(), &field);
        let t = table.map(|table| acme::AcmeTable {
            table,
            field: format!("{field}.acme"),
        });
        let mut a = acme::site(cx, acme_base, t.as_ref(), origin, resolve);
        acme::check_site(cx, &mut a, hosts, listeners, &v.span(), &field);
        TlsSource::Acme(Box::new(a))
    };
    match v.get_ref() {
        RawTls::Name(s) if s == "internal" => TlsSource::Internal,
        RawTls::Name(s) if s == "acme" => with_acme(cx, None),
        RawTls::Name(s) => {
            cx.err(
                &v.span(),
                &field,
                format!("\"{s}\" is not a certificate source; {any_hint}"),
            );
            TlsSource::Internal
        }
        RawTls::Table(t) if t.iter().any(|(k, _)| k.get_ref() == "acme") => {
            let mut source = TlsSource::Internal;
            for (k, val) in t {
                match (k.get_ref().as_str(), val.get_ref()) {
                    ("acme", RawTlsValue::Table(a)) => source = with_acme(cx, Some(a)),
                    ("acme", _) => cx.err(
                        &val.span(),
                        &format!("{field}.acme"),
                        "must be a table such as acme = { directory = \"letsencrypt\", email = \"ops@example.com\" }",
                    ),
                    (other, _) => cx.err(
                        &k.span(),
                        &format!("{field}.{other}"),
                        "cannot be combined with acme; keep either acme = { ... } or cert and key",
                    ),
                }
            }
            source
        }
        RawTls::Table(t) => {
            let mut cert = None;
            let mut key = None;
            for (k, val) in t {
                match (k.get_ref().as_str(), val.get_ref()) {
                    ("cert", RawTlsValue::Str(s)) => cert = Some(resolve(s)),
                    ("key", RawTlsValue::Str(s)) => key = Some(resolve(s)),
                    ("cert" | "key", _) => {
                        cx.err(
                            &val.span(),
                            &format!("{field}.{}", k.get_ref()),
                            "must be a file path string",
                        );
                    }
                    (other, _) => {
                        cx.err(
                            &k.span(),
                            &format!("{field}.{other}"),
                            format!("unknown key \"{other}\"; expected cert and key, or acme"),
                        );
                    }
                }
            }
            match (cert, key) {
                (Some(cert), Some(key)) => TlsSource::Files {
                    cert,
                    key,
                    origin: cx.origin(&v.span(), &field),
                },
                (None, _) => {
                    cx.err(
                        &v.span(),
                        &format!("{field}.cert"),
                        format!("is missing; {hint}"),
                    );
                    TlsSource::Internal
                }
                (_, None) => {
                    cx.err(
                        &v.span(),
                        &format!("{field}.key"),
                        format!("is missing; {hint}"),
                    );
                    TlsSource::Internal
                }
            }
        }
        RawTls::Other => {
            cx.err(&v.span(), &field, any_hint);
            TlsSource::Internal
        }
    }
}

fn build_route(
    cx: &mut Ctx<'_>,
    r: &Spanned<RawRoute>,
    i: usize,
    j: usize,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Option<RouteConfig> {
    let span = r.span();
    let r = r.get_ref();
    let prefix = format!("sites[{i}].routes[{j}]");
    let path = match &r.path {
        None => "/".to_string(),
        Some(p) if !p.get_ref().starts_with('/') || p.get_ref().contains(['?', '#', ' ']) => {
            cx.err(
                &p.span(),
                &format!("{prefix}.path"),
                format!(
                    "\"{}\" is not a path prefix; it must start with \"/\" and hold no query",
                    p.get_ref()
                ),
            );
            return None;
        }
        Some(p) => p.get_ref().clone(),
    };
    let proxies = r.upstream.is_some() || r.upstreams.is_some();
    let actions = proxies as u8 + r.respond.is_some() as u8 + r.redirect.is_some() as u8;
    if actions != 1 {
        cx.err(
            &span,
            &prefix,
            if actions == 0 {
                "has no action; set one of upstream = \"http://host:port\", respond = { status = 200, body = \"...\" } or redirect = { to = \"https://...\" }"
            } else {
                "has more than one action; keep exactly one of upstream, respond and redirect"
            },
        );
        return None;
    }
    if !proxies && (r.strip_prefix.is_some() || r.preserve_host.is_some()) {
        cx.err(
            &span,
            &prefix,
            "strip_prefix and preserve_host only apply to upstream routes; remove them",
        );
    }
    if !proxies && upstream::has_upstream_only_keys(r) {
        cx.err(
            &span,
            &prefix,
            "lb, protocol, ca, tls_server_name, client_cert, client_key, retries, retry_budget, health_check and passive_health only apply to upstream routes; remove them",
        );
    }
    let action = if proxies {
        RouteAction::Proxy(Box::new(upstream::build(cx, r, &span, &prefix, resolve)?))
    } else if let Some(resp) = &r.respond {
        let resp_span = resp.span();
        let resp = resp.get_ref();
        let status = match &resp.status {
            None => StatusCode::OK,
            Some(s) => match u16::try_from(*s.get_ref())
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(c) if c.as_u16() >= 200 => c,
                _ => {
                    cx.err(
                        &s.span(),
                        &format!("{prefix}.respond.status"),
                        format!(
                            "{} is not a valid status; use a code from 200 to 599",
                            s.get_ref()
                        ),
                    );
                    return None;
                }
            },
        };
        let _ = resp_span;
        RouteAction::Respond {
            status,
            body: Bytes::from(resp.body.clone().unwrap_or_default()),
            content_type: resp
                .content_type
                .clone()
                .unwrap_or_else(|| "text/plain; charset=utf-8".into()),
        }
    } else {
        let red = r.redirect.as_ref().unwrap().get_ref();
        let to = red.to.get_ref();
        if to.is_empty() || to.contains(['\r', '\n', ' ']) {
            cx.err(
                &red.to.span(),
                &format!("{prefix}.redirect.to"),
                format!("\"{to}\" is not a redirect target; write a URL such as \"https://example.com{{uri}}\""),
            );
            return None;
        }
        let status = match &red.status {
            None => StatusCode::PERMANENT_REDIRECT,
            Some(s) => match *s.get_ref() {
                301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(*s.get_ref() as u16).unwrap(),
                other => {
                    cx.err(
                        &s.span(),
                        &format!("{prefix}.redirect.status"),
                        format!("{other} is not a redirect status; use 301, 302, 303, 307 or 308"),
                    );
                    return None;
                }
            },
        };
        RouteAction::Redirect {
            to: to.clone(),
            status,
        }
    };
    let limits = build_limits(cx, &r.rate_limits, &prefix);
    Some(RouteConfig {
        path,
        action,
        limits,
    })
}
