//! Request checks and header rewriting between downstream and upstream.
//! Hot path: no allocation unless a header must be built.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the legacy ones proxies drop.
/// `Trailer` is not one: it names the trailer fields end to end, and
/// HTTP/1.1 peers only send the fields it names.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Why a request is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Missing, repeated or conflicting Host.
    Host,
    /// `Transfer-Encoding` repeated or not plain `chunked`.
    TransferEncoding,
    /// `Content-Length` and `Transfer-Encoding` together.
    LengthAndEncoding,
    /// CR, LF or NUL inside a header value (HTTP/2 request).
    HeaderBytes,
    /// A `.` or `..` path segment.
    DotSegment,
    /// An HTTP/2 `:scheme` other than `http` or `https`.
    Scheme,
}

impl Reject {
    /// The short body sent with the 400.
    pub fn message(self) -> &'static str {
        match self {
            Reject::Host => "bad request: exactly one valid Host header is required\n",
            Reject::TransferEncoding => "bad request: unsupported or repeated Transfer-Encoding\n",
            Reject::LengthAndEncoding => {
                "bad request: Content-Length and Transfer-Encoding together\n"
            }
            Reject::HeaderBytes => "bad request: invalid characters in a header value\n",
            Reject::DotSegment => "bad request: \".\" and \"..\" path segments are not allowed\n",
            Reject::Scheme => "bad request: the scheme must be http or https\n",
        }
    }
}

/// Checks framing and Host; returns the host name (lower case untouched,
/// port stripped) the request is for.
pub fn check_request<B>(req: &Request<B>) -> Result<Option<&str>, Reject> {
    let headers = req.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(Reject::Host);
    }
    let mut tes = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(te) = tes.next() {
        if tes.next().is_some() || !te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(Reject::TransferEncoding);
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(Reject::LengthAndEncoding);
        }
    }
    if let Some(scheme) = req.uri().scheme_str() {
        if !scheme.eq_ignore_ascii_case("https") && !scheme.eq_ignore_ascii_case("http") {
            return Err(Reject::Scheme);
        }
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    let host = match (host_header, req.version()) {
        (Some(h), _) => {
            let h = h.to_str().map_err(|_| Reject::Host)?;
            if let Some(a) = authority {
                // HTTP/2 :authority and Host must agree.
                if !a.eq_ignore_ascii_case(h) {
                    return Err(Reject::Host);
                }
            }
            Some(h)
        }
        (None, Version::HTTP_2) => authority,
        (None, Version::HTTP_11) => return Err(Reject::Host),
        (None, _) => None,
    };
    if req.version() == Version::HTTP_2 {
        for v in headers.values() {
            if v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(Reject::HeaderBytes);
            }
        }
    }
    match host {
        None => Ok(None),
        Some(h) => {
            let name = strip_port(h).ok_or(Reject::Host)?;
            Ok(Some(name))
        }
    }
}

/// Joins several `Cookie` fields into one `Cookie: a=1; b=2`, as an
/// HTTP/1.1 upstream expects (RFC 9113 §8.2.3: HTTP/2 clients may split
/// cookies into fields of their own). No allocation with zero or one field.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Refuses `.` and `..` path segments, plain or percent-encoded. Routes
/// match the path as sent; an upstream that resolves `/api/../admin` would
/// serve a path no route of the proxy chose. Clients remove dot segments
/// before sending (RFC 3986 §5.2.4), so only crafted requests have them.
pub fn check_path(path: &str) -> Result<(), Reject> {
    let dot = |s: &str| {
        let s = s.as_bytes();
        s == b"." || s.eq_ignore_ascii_case(b"%2e")
    };
    for seg in path.split('/') {
        let bad = match seg.len() {
            1 | 3 => dot(seg),
            2 | 4 | 6 => {
                (1..seg.len()).any(|i| seg.is_char_boundary(i) && dot(&seg[..i]) && dot(&seg[i..]))
            }
            _ => false,
        };
        if bad {
            return Err(Reject::DotSegment);
        }
    }
    Ok(())
}

/// `example.com:8443` -> `example.com`; `[::1]:8443` -> `[::1]`. `None` when
/// the value is not a plausible host.
pub fn strip_port(h: &str) -> Option<&str> {
    if h.is_empty() {
        return None;
    }
    let name = if h.starts_with('[') {
        let end = h.find(']')?;
        let rest = &h[end + 1..];
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        &h[..=end]
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => h,
        }
    };
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'));
    (ok && !name.is_empty()).then_some(name)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Whether the request asks for a WebSocket upgrade over HTTP/1.1. Other
/// upgrades (`h2c`, `TLS/1.0`) concern this hop only: their headers are
/// stripped like any hop-by-hop header and the request goes on as is.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && connection_has(req.headers(), "upgrade")
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| {
                p.trim()
                    .split('/')
                    .next()
                    .is_some_and(|name| name.eq_ignore_ascii_case("websocket"))
            })
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the request's `TE` accepts trailers (gRPC clients send
/// `te: trailers`; it is passed on, the one `TE` value HTTP/2 allows).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Whether the request is gRPC (`content-type: application/grpc[+proto…]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// Most messages carry none, or only `Connection` tokens that are hop-by-hop
/// headers anyway (`keep-alive`, `close`, `upgrade`): those cost no
/// allocation and no removal of absent names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        let Ok(v) = v.to_str() else { continue };
        for t in v.split(',').map(str::trim) {
            let known = t.is_empty()
                || t.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(t));
            if !known {
                if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        headers.remove(n);
    }
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds `X-Forwarded-For` (appended), `-Proto`, `-Host` and `Via`.
/// `client` is the client's address as a header value (formatted once per
/// connection).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    host: Option<&HeaderValue>,
    version: Version,
) {
    // Up to four new names: grow the map once, not once per insert.
    headers.reserve(4);
    let xff = if headers.contains_key(&X_FORWARDED_FOR) {
        // Every existing line, in order (a client or an earlier proxy may
        // have sent several), then the client's address.
        let mut value = Vec::new();
        for prev in headers.get_all(&X_FORWARDED_FOR) {
            let prev = prev.as_bytes().trim_ascii();
            if !prev.is_empty() {
                value.extend_from_slice(prev);
                value.extend_from_slice(b", ");
            }
        }
        value.extend_from_slice(client.as_bytes());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
    } else {
        Some(client.clone())
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
    let via = match version {
        Version::HTTP_2 => "2 portcullis",
        Version::HTTP_10 => "1.0 portcullis",
        _ => "1.1 portcullis",
    };
    headers.append(header::VIA, HeaderValue::from_static(via));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports_and_rejects_junk() {
        assert_eq!(strip_port("a.example.com:8443"), Some("a.example.com"));
        assert_eq!(strip_port("a.example.com"), Some("a.example.com"));
        assert_eq!(strip_port("[::1]:443"), Some("[::1]"));
        assert_eq!(strip_port("a b"), None);
        assert_eq!(strip_port("a:b"), None);
        assert_eq!(strip_port(""), None);
    }

    #[test]
    fn dot_segments_are_refused_plain_or_encoded() {
        for bad in [
            "/api/../admin",
            "/..",
            "/a/./b",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/%2e/x",
            "/a/..",
        ] {
            assert_eq!(check_path(bad), Err(Reject::DotSegment), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "/.well-known/acme",
            "/a/...",
            "/a/..b",
            "/%2e%2e%2e",
            "/a.b/c",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn rejects_ambiguous_framing_and_hosts() {
        let req = |f: &dyn Fn(http::request::Builder) -> http::request::Builder| {
            f(Request::builder()).body(()).unwrap()
        };
        assert_eq!(check_request(&req(&|b| b)), Err(Reject::Host));
        assert_eq!(
            check_request(&req(&|b| b.header("host", "a").header("host", "b"))),
            Err(Reject::Host)
        );
        assert_eq!(
            check_request(&req(&|b| b
                .header("host", "a")
                .header("transfer-encoding", "gzip, chunked"))),
            Err(Reject::TransferEncoding)
        );
        assert_eq!(
            check_request(&req(&|b| b
                .header("host", "a")
                .header("transfer-encoding", "chunked")
                .header("content-length", "3"))),
            Err(Reject::LengthAndEncoding)
        );
        assert_eq!(
            check_request(&req(&|b| b.header("host", "a.test:1"))),
            Ok(Some("a.test"))
        );
    }
}
