//! On-call commands behind the CLI: the certificate inventory table,
//! `inspect` of any TLS endpoint, and requests to a running proxy's admin
//! API (`reload`, `renew`). Control path; nothing here runs in the proxy.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::certstore::inventory::CertReport;
use crate::certstore::{self, load, rfc3339, CertSlot, CertSource};
use crate::config::Config;

/// An on-call command failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpsError(pub String);

fn err(s: impl Into<String>) -> OpsError {
    OpsError(s.into())
}

/// The environment variable naming the file of the admin bearer token
/// (the same file as the config's `admin.token_file`).
pub const ADMIN_TOKEN_FILE_ENV: &str = "PORTCULLIS_ADMIN_TOKEN_FILE";

/// The bearer token to send, if [`ADMIN_TOKEN_FILE_ENV`] names a file.
fn admin_token() -> Result<Option<String>, OpsError> {
    let Some(path) = std::env::var_os(ADMIN_TOKEN_FILE_ENV) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        err(format!(
            "{ADMIN_TOKEN_FILE_ENV}={}: cannot read the admin token: {e}",
            std::path::Path::new(&path).display()
        ))
    })?;
    Ok(Some(text.trim().to_string()))
}

/// Sends `method path` to the admin API at `base` (`http://127.0.0.1:9901`),
/// with the bearer token of [`ADMIN_TOKEN_FILE_ENV`] when it is set.
pub async fn admin_request(
    base: &str,
    method: &str,
    path: &str,
) -> Result<(u16, String), OpsError> {
    let uri: http::Uri = base.parse().map_err(|_| {
        err(format!(
            "--admin {base:?} is not a URL; write http://127.0.0.1:9901"
        ))
    })?;
    let auth = uri
        .authority()
        .ok_or_else(|| err(format!("--admin {base:?} has no host:port")))?
        .clone();
    if uri.scheme_str() != Some("http") {
        return Err(err(format!(
            "--admin {base:?}: the admin API speaks plain http://"
        )));
    }
    let addr = format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80));
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| err(format!("admin API at {base}: connection timed out")))?
    .map_err(|e| {
        err(format!(
            "admin API at {base}: {e}; is portcullis running with its admin listener there?"
        ))
    })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| err(format!("admin API at {base}: {e}")))?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, auth.as_str());
    if let Some(token) = admin_token()? {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| err(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(120), send.send_request(req))
        .await
        .map_err(|_| err(format!("admin API at {base}: no answer")))?
        .map_err(|e| err(format!("admin API at {base}: {e}")))?;
    let status = resp.status().as_u16();
    if status == 401 {
        return Err(err(format!(
            "admin API at {base} requires its bearer token: set {ADMIN_TOKEN_FILE_ENV} to the admin.token_file path"
        )));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The inventory from a running proxy.
pub async fn inventory_from_admin(base: &str) -> Result<Vec<CertReport>, OpsError> {
    let (status, body) = admin_request(base, "GET", "/certs").await?;
    if status != 200 {
        return Err(err(format!("admin API answered {status}: {}", body.trim())));
    }
    #[derive(serde::Deserialize)]
    struct Body {
        certificates: Vec<CertReport>,
    }
    let b: Body =
        serde_json::from_str(&body).map_err(|e| err(format!("unexpected /certs answer: {e}")))?;
    Ok(b.certificates)
}

/// The inventory read from the files a config names (no proxy needed).
/// Internal certificates only exist inside a running proxy; they are listed
/// without dates, as `unknown`, and do not count for `--within`.
pub fn inventory_from_config(path: &Path) -> Result<Vec<CertReport>, OpsError> {
    let config = Config::load(path).map_err(|e| err(e.to_string()))?;
    let now = SystemTime::now();
    let mut out = Vec::new();
    for site in &config.sites {
        let source = certstore::source_of(&config, site);
        let slot = CertSlot::new(site.name.clone(), site.hosts.clone(), source, site.default);
        if let CertSource::File { .. } | CertSource::Acme { .. } = slot.source {
            match certstore::obtain(
                &slot,
                None,
                certstore::Checks {
                    allow_expired: true,
                },
            ) {
                Ok(c) => slot.install(c),
                Err(certstore::CertError::NotIssued { .. }) => {}
                Err(e) => {
                    slot.record_error(&e.to_string());
                }
            }
        }
        let mut report = certstore::inventory::report(&slot, now);
        if matches!(slot.source, CertSource::Internal) {
            // Issued in memory by a running proxy, which renews it; the
            // config says nothing about its dates.
            report.last_result = certstore::inventory::UNKNOWN.into();
        }
        out.push(report);
    }
    Ok(out)
}

/// Renders the inventory as an aligned table.
pub fn inventory_table(reports: &[CertReport]) -> String {
    let head = [
        "NAME",
        "SOURCE",
        "HOSTS",
        "ISSUER",
        "SERIAL",
        "NOT AFTER",
        "DAYS LEFT",
        "STATUS",
    ];
    let rows: Vec<[String; 8]> = reports
        .iter()
        .map(|r| {
            let serial = r.serial.clone().unwrap_or_else(|| "-".into());
            let serial = if serial.len() > 16 {
                format!("{}…", &serial[..16])
            } else {
                serial
            };
            [
                r.name.clone(),
                r.source.clone(),
                r.hosts.join(","),
                r.issuer.clone().unwrap_or_else(|| "-".into()),
                serial,
                r.not_after.clone().unwrap_or_else(|| "-".into()),
                r.days_left
                    .map(|d| format!("{d:.1}"))
                    .unwrap_or_else(|| "-".into()),
                match &r.last_error {
                    Some(e) => format!("error: {e}"),
                    None if r.days_left.is_some_and(|d| d < 0.0) => "EXPIRED".into(),
                    None if r.last_result == certstore::inventory::UNKNOWN => {
                        "unknown: issued by the running proxy (ask it with --admin)".into()
                    }
                    None => r.last_result.clone(),
                },
            ]
        })
        .collect();
    let mut widths = head.map(|h| h.chars().count());
    for row in &rows {
        for (i, c) in row.iter().enumerate().take(7) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (i, c) in cells.iter().enumerate() {
            if i == cells.len() - 1 {
                let _ = write!(out, "{c}");
            } else {
                let pad = widths[i] - c.chars().count();
                let _ = write!(out, "{c}{}  ", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(&mut out, &head);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    out
}

/// What `inspect` saw.
#[derive(Debug)]
pub struct Inspection {
    /// The served chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// `None` when the chain verified for the name; otherwise why not.
    pub verify_error: Option<String>,
    /// Negotiated TLS version.
    pub version: String,
    /// Negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// Negotiated cipher suite.
    pub cipher: String,
}

/// Records the chain and the real verification result, and lets the
/// handshake finish either way so the chain can be shown.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<(Vec<CertificateDer<'static>>, Option<String>)>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .err()
            .map(|e| describe_verify_error(&e));
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((chain, result));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn describe_verify_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForName) | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "name mismatch: the certificate does not cover the requested name".into()
        }
        rustls::Error::InvalidCertificate(C::Expired) | rustls::Error::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "unknown issuer: the chain does not lead to a trusted root (pass --cafile for a private CA)".into()
        }
        other => other.to_string(),
    }
}

/// Root certificates: `--cafile`, else `SSL_CERT_FILE`, else the system bundle.
fn roots(cafile: Option<&Path>) -> Result<rustls::RootCertStore, OpsError> {
    let path: PathBuf = match cafile {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
    };
    let pem = std::fs::read(&path)
        .map_err(|e| err(format!("cannot read CA file {}: {e}", path.display())))?;
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = store.add(c);
    }
    if store.is_empty() {
        return Err(err(format!(
            "{} holds no usable CA certificate",
            path.display()
        )));
    }
    Ok(store)
}

/// Connects to `target` (`host:port`), completes a handshake for `servername`
/// and reports the chain and whether it verifies.
pub async fn inspect(
    target: &str,
    servername: Option<&str>,
    cafile: Option<&Path>,
    timeout: Duration,
) -> Result<Inspection, OpsError> {
    let (host, _) = target
        .rsplit_once(':')
        .ok_or_else(|| err(format!("{target:?} needs a port, e.g. example.com:443")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = servername.unwrap_or(host).to_string();
    let server_name = ServerName::try_from(name.clone())
        .map_err(|_| err(format!("{name:?} is not a valid server name")))?;
    let provider = load::provider();
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(cafile)?), provider.clone())
            .build()
            .map_err(|e| err(e.to_string()))?;
    let recorder = Arc::new(Recorder {
        inner: verifier,
        seen: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|e| err(format!("cannot resolve {target}: {e}")))?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| err(format!("{target} has no address")))?;
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| err(format!("{target}: connection timed out after {timeout:?}")))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                err(format!("{target}: connection refused (nothing listening?)"))
            }
            _ => err(format!("{target}: {e}")),
        })?;
    let tls = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server_name, tcp),
    )
    .await
    .map_err(|_| {
        err(format!(
            "{target}: TLS handshake timed out after {timeout:?}"
        ))
    })?
    .map_err(|e| err(format!("{target}: TLS handshake failed: {e}")))?;
    let conn = tls.get_ref().1;
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let alpn = conn
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    let (chain, verify_error) = recorder
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| err(format!("{target}: the server sent no certificate")))?;
    Ok(Inspection {
        chain,
        verify_error,
        version,
        alpn,
        cipher,
    })
}

impl Inspection {
    /// Leaf `not_after`.
    pub fn leaf_not_after(&self) -> Option<SystemTime> {
        load::inspect_chain(&self.chain[..1], Path::new("<peer>"))
            .ok()
            .map(|i| i.not_after)
    }

    /// Human report.
    pub fn render(&self, target: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{target}: {} {} alpn={}",
            self.version,
            self.cipher,
            self.alpn.as_deref().unwrap_or("-")
        );
        let now = SystemTime::now();
        for (i, der) in self.chain.iter().enumerate() {
            let role = if i == 0 { "leaf" } else { "chain" };
            match load::inspect_chain(std::slice::from_ref(der), Path::new("<peer>")) {
                Ok(info) => {
                    let days = match info.not_after.duration_since(now) {
                        Ok(d) => d.as_secs_f64() / 86_400.0,
                        Err(e) => -e.duration().as_secs_f64() / 86_400.0,
                    };
                    let _ = writeln!(out, "[{i}] {role}: {}", info.subject);
                    if !info.sans.is_empty() {
                        let _ = writeln!(out, "    SANs:       {}", info.sans.join(", "));
                    }
                    let _ = writeln!(out, "    issuer:     {}", info.issuer_cn);
                    let _ = writeln!(out, "    serial:     {}", info.serial);
                    let _ = writeln!(out, "    key:        {}", info.key_type);
                    let _ = writeln!(out, "    not before: {}", rfc3339(info.not_before));
                    let _ = writeln!(
                        out,
                        "    not after:  {} ({days:.1} days left)",
                        rfc3339(info.not_after)
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "[{i}] {role}: unreadable ({e})");
                }
            }
        }
        match &self.verify_error {
            None => out.push_str("verify: ok\n"),
            Some(e) => {
                let _ = writeln!(out, "verify: FAILED: {e}");
            }
        }
        out
    }
}

/// One line for `portcullis renew NAME`, from the admin API's answer to
/// `POST /certs/NAME/renew` (JSON, or a plain-text refusal) and, when it
/// could be read, the inventory (for the new certificate's end of validity).
pub fn renew_line(name: &str, body: &str, inventory: Option<&[CertReport]>) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return format!("{name} not renewed: {}", body.trim());
    };
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    if v["ok"] == false {
        let error = text("error").unwrap_or_else(|| body.trim().to_string());
        return format!("{name} not renewed: {error}");
    }
    if v["pending"] == true {
        let reason = text("reason").unwrap_or_default();
        return format!("{name}: renewal under way: {reason}");
    }
    if v["renewed"] != true {
        let reason = text("reason").unwrap_or_else(|| "not due".into());
        return format!("{name} not renewed: {reason}");
    }
    let mut line = format!("renewed {name}");
    if let Some(serial) = text("serial") {
        let _ = write!(line, ": serial {serial}");
        let not_after = inventory
            .into_iter()
            .flatten()
            .find(|r| r.name == name && r.serial.as_deref() == Some(serial.as_str()))
            .and_then(|r| r.not_after.clone());
        if let Some(na) = not_after {
            let _ = write!(line, ", not after {na}");
        }
    }
    if let Some(revoked) = text("revoked") {
        let _ = write!(line, ", revoked {revoked}");
    }
    line
}

/// One line for `portcullis reload`, from the admin API's answer to
/// `POST /reload`.
pub fn reload_line(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return format!("reload refused: {}", body.trim());
    };
    if v["ok"] != true {
        let error = v["error"].as_str().unwrap_or(body.trim());
        return format!("reload refused; the running configuration stays: {error}");
    }
    let r = &v["report"];
    let count = |k: &str| r[k].as_u64().unwrap_or(0);
    let plural = |n: u64| if n == 1 { "" } else { "s" };
    let (replaced, failed) = (count("certificates_replaced"), count("certificates_failed"));
    let mut line = format!(
        "reloaded config: {replaced} certificate{} replaced",
        plural(replaced)
    );
    if failed > 0 {
        let _ = write!(
            line,
            ", {failed} certificate{} not loadable (previous kept; see portcullis certs)",
            plural(failed)
        );
    }
    for (key, what) in [
        ("opened", "opened"),
        ("closed", "closed"),
        ("reconfigured", "reconfigured"),
    ] {
        let addrs: Vec<&str> = r[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .collect();
        if !addrs.is_empty() {
            let _ = write!(line, ", listeners {what}: {}", addrs.join(" "));
        }
    }
    line
}

#[cfg(test)]
mod line_tests {
    use super::{reload_line, renew_line};

    #[test]
    fn renew_answers_read_as_one_line() {
        let ok = r#"{"ok": true, "name": "web", "renewed": true, "serial": "0a1b"}"#;
        assert_eq!(renew_line("web", ok, None), "renewed web: serial 0a1b");
        let not_due = r#"{"ok": true, "name": "web", "renewed": false, "reason": "not due yet; use force to renew now"}"#;
        assert_eq!(
            renew_line("web", not_due, None),
            "web not renewed: not due yet; use force to renew now"
        );
        let refused = "\"web\" is served from files; renew it with the tool that writes them\n";
        assert!(renew_line("web", refused, None).starts_with("web not renewed: \"web\" is served"));
        let failed = r#"{"ok": false, "name": "web", "error": "the CA is away"}"#;
        assert_eq!(
            renew_line("web", failed, None),
            "web not renewed: the CA is away"
        );
    }

    #[test]
    fn reload_answers_read_as_one_line() {
        let ok = r#"{"ok": true, "report": {"opened": ["127.0.0.1:8443"], "closed": [], "reconfigured": [], "certificates_replaced": 2, "certificates_failed": 0}}"#;
        assert_eq!(
            reload_line(ok),
            "reloaded config: 2 certificates replaced, listeners opened: 127.0.0.1:8443"
        );
        let refused = r#"{"ok": false, "error": "p.toml:3: listen: bad"}"#;
        assert_eq!(
            reload_line(refused),
            "reload refused; the running configuration stays: p.toml:3: listen: bad"
        );
    }
}
