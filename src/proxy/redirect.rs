//! Plain-HTTP listeners: every request gets a `308` to the same URL over
//! HTTPS, except the ACME HTTP-01 answers in progress
//! (`/.well-known/acme-challenge/TOKEN`). Hot path (cheap by design: no
//! routing, no upstream). The connection itself is run by
//! [`super::server`].

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use super::body::ResponseBody;
use super::headers::strip_port;
use crate::certstore::CertStore;

/// The answer to one plain-HTTP request.
pub fn answer<B>(
    certs: &CertStore,
    req: &Request<B>,
    https_port: Option<u16>,
) -> Response<ResponseBody> {
    acme_http01(certs, req).unwrap_or_else(|| redirect(req, https_port))
}

/// Where HTTP-01 answers live (RFC 8555 §8.3).
const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The key authorization for an HTTP-01 token the ACME manager is proving
/// right now; `None` (so the request gets the usual redirect) for anything
/// else, including unknown tokens.
pub fn acme_http01<B>(certs: &CertStore, req: &Request<B>) -> Option<Response<ResponseBody>> {
    let token = req.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX)?;
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        || token.is_empty()
        || token.contains('/')
    {
        return None;
    }
    let key_auth = certs.challenges.http01(token)?;
    let mut r = Response::new(ResponseBody::full(Bytes::from(key_auth)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(r)
}

/// The `308` for a plain-HTTP request.
pub fn redirect<B>(req: &Request<B>, https_port: Option<u16>) -> Response<ResponseBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .and_then(strip_port);
    let Some(host) = host else {
        let mut r = Response::new(ResponseBody::full(Bytes::from_static(
            b"bad request: a Host header is required\n",
        )));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match https_port {
        None | Some(443) => format!("https://{host}{pq}"),
        Some(p) => format!("https://{host}:{p}{pq}"),
    };
    let mut r = Response::new(ResponseBody::Empty);
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::try_from(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}
