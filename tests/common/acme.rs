//! ACME test harness: a real Pebble (Debian package `pebble`) and its DNS
//! companion `pebble-challtestsrv` on loopback ports, the proxy started in
//! process with its listeners bound first (Pebble validates HTTP-01 and
//! TLS-ALPN-01 against them), HTTPS helpers that trust Pebble's roots, and
//! a small ARI front for Pebble, which serves no renewal information.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use crate::common::client::cert_report;
use crate::common::client::{admin_call, send_over, tls_connect, Got};
pub use crate::common::metrics::scrape_at;
pub use crate::common::origin::unreserved_port;
use crate::common::pki::{backend_tls, client_config_trusting, Alg, Pki};
pub use crate::common::proxy::Proxy;
pub use crate::common::wait::{eventually, wait_for, wait_until};

/// Fails (never skips) when Pebble is missing: CI installs it.
pub fn require(bin: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{bin}` is not installed. These tests run against a real Pebble ACME server: run tests/run-all.sh \
         (it installs the Debian package `pebble`), or `apt-get install pebble`."
    );
}

/// Waits until `child` accepts connections on `port`: Ok, or Err with its
/// log when it exits first or `limit` passes.
async fn wait_listening(
    child: &mut Child,
    port: u16,
    limit: Duration,
    log: &Path,
) -> Result<(), String> {
    let up = eventually(limit, || {
        let exited = !matches!(child.try_wait(), Ok(None));
        async move { exited || TcpStream::connect(("127.0.0.1", port)).await.is_ok() }
    })
    .await;
    let log = std::fs::read_to_string(log).unwrap_or_default();
    match child.try_wait() {
        Ok(None) if up => Ok(()),
        Ok(None) => Err(format!(
            "did not listen on 127.0.0.1:{port} within {limit:?}; its log:\n{log}"
        )),
        _ => Err(format!(
            "exited before listening on 127.0.0.1:{port}; its log:\n{log}"
        )),
    }
}

/// A bind lost to another process (see [`unreserved_port`]).
fn lost_port_race(err: &str) -> bool {
    err.contains("address already in use")
}

/// How to run Pebble.
#[derive(Clone, Debug, Default)]
pub struct PebbleOptions {
    /// `PEBBLE_WFE_NONCEREJECT`: percentage of good nonces refused.
    pub nonce_reject: u32,
    /// `certificateValidityPeriod` in seconds (None: Pebble's default, years).
    pub validity_secs: Option<u64>,
    /// External account binding keys (kid -> base64url HMAC); required when set.
    pub eab: Option<(String, String)>,
}

/// Pebble and its fake DNS, on loopback ports chosen once (see
/// [`unreserved_port`]) so it can be stopped and started again at the same
/// address.
pub struct Pebble {
    pub dir: tempfile::TempDir,
    /// The test PKI behind Pebble's own HTTPS certificate (and the ARI front's).
    pub pki: Pki,
    pub acme_port: u16,
    pub mgmt_port: u16,
    pub dns_port: u16,
    pub dns_mgmt_port: u16,
    /// Where Pebble validates HTTP-01 and TLS-ALPN-01 (the proxy's listeners).
    pub http_port: u16,
    pub tls_port: u16,
    pub opts: PebbleOptions,
    pebble: Option<Child>,
    dns: Option<Child>,
}

impl Pebble {
    /// Reserves ports; nothing runs until [`Pebble::start`].
    pub fn new(opts: PebbleOptions) -> Pebble {
        require("pebble");
        require("pebble-challtestsrv");
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let leaf = pki.leaf(&["127.0.0.1", "localhost"], Alg::Ecdsa);
        std::fs::write(dir.path().join("pebble-cert.pem"), &leaf.chain_pem).unwrap();
        std::fs::write(dir.path().join("pebble-key.pem"), &leaf.key_pem).unwrap();
        std::fs::write(dir.path().join("test-root.pem"), &pki.root_pem).unwrap();
        Pebble {
            dir,
            pki,
            acme_port: unreserved_port(),
            mgmt_port: unreserved_port(),
            dns_port: unreserved_port(),
            dns_mgmt_port: unreserved_port(),
            http_port: 0,
            tls_port: 0,
            opts,
            pebble: None,
            dns: None,
        }
    }

    /// The directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The root that Pebble's (and the ARI front's) HTTPS certificate chains to.
    pub fn ca_root_path(&self) -> PathBuf {
        self.dir.path().join("test-root.pem")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or starts again) Pebble validating against `http_port` and `tls_port`.
    pub async fn start(&mut self, http_port: u16, tls_port: u16) {
        self.http_port = http_port;
        self.tls_port = tls_port;
        let mut tries = 0;
        while self.dns.is_none() {
            let log_path = self.dir.path().join("dns.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(require("pebble-challtestsrv"))
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{}", self.dns_port)])
                .args(["-management", &format!("127.0.0.1:{}", self.dns_mgmt_port)])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("pebble-challtestsrv starts");
            let limit = Duration::from_secs(15);
            match wait_listening(&mut child, self.dns_mgmt_port, limit, &log_path).await {
                Ok(()) => self.dns = Some(child),
                Err(e) if lost_port_race(&e) && tries < 3 => {
                    tries += 1;
                    let _ = child.kill();
                    let _ = child.wait();
                    self.dns_port = unreserved_port();
                    self.dns_mgmt_port = unreserved_port();
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("pebble-challtestsrv {e}");
                }
            }
        }
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{}", self.acme_port),
            "managementListenAddress": format!("127.0.0.1:{}", self.mgmt_port),
            "certificate": self.dir.path().join("pebble-cert.pem"),
            "privateKey": self.dir.path().join("pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.opts.eab.is_some(),
        });
        if let Some(v) = self.opts.validity_secs {
            pebble["certificateValidityPeriod"] = v.into();
        }
        if let Some((kid, key)) = &self.opts.eab {
            pebble["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        let config = self.dir.path().join("pebble.json");
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(&serde_json::json!({ "pebble": pebble })).unwrap(),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(require("pebble"))
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", self.opts.nonce_reject.to_string())
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("pebble starts");
        let mut child = child;
        for port in [self.acme_port, self.mgmt_port] {
            if let Err(e) =
                wait_listening(&mut child, port, Duration::from_secs(15), &self.log_path()).await
            {
                let _ = child.kill();
                let _ = child.wait();
                let race = if lost_port_race(&e) {
                    " (another process took the port between its reservation and Pebble's \
                     bind: the residual race documented at `unreserved_port`; run again)"
                } else {
                    ""
                };
                panic!("pebble {e}{race}");
            }
        }
        self.pebble = Some(child);
    }

    /// Stops Pebble (it forgets every account, order and key).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A TLS client config trusting the test PKI (Pebble's own HTTPS).
    pub fn api_client(&self) -> Arc<rustls::ClientConfig> {
        self.pki.client_config(&[b"http/1.1"])
    }

    /// GET on Pebble's management interface.
    pub async fn mgmt_get(&self, path: &str) -> (u16, Bytes) {
        https_request(
            SocketAddr::from(([127, 0, 0, 1], self.mgmt_port)),
            self.api_client(),
            Request::get(path)
                .header("host", format!("127.0.0.1:{}", self.mgmt_port))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .map(|(s, _, b)| (s, b))
        .unwrap_or_else(|e| panic!("pebble management GET {path}: {e}"))
    }

    /// Pebble's current root (it makes a new one at every start).
    pub async fn root(&self) -> CertificateDer<'static> {
        let (status, pem) = self.mgmt_get("/roots/0").await;
        assert_eq!(status, 200, "GET /roots/0");
        CertificateDer::from_pem_slice(&pem).expect("a PEM root")
    }

    /// A client trusting Pebble's current root, offering `alpn`.
    pub async fn issued_client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root().await).unwrap();
        client_config_trusting(roots, alpn)
    }

    /// Pebble's view of a certificate: `(status, reason)`, e.g. `("Revoked", Some(1))`.
    pub async fn cert_status(&self, serial_hex: &str) -> (String, Option<i64>) {
        let trimmed = serial_hex.trim_start_matches('0');
        for s in [trimmed, serial_hex] {
            let (status, body) = self.mgmt_get(&format!("/cert-status-by-serial/{s}")).await;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                return (
                    v["Status"].as_str().unwrap_or("").to_string(),
                    v["Reason"].as_i64(),
                );
            }
        }
        panic!("pebble does not know serial {serial_hex}");
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut c) = self.dns.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request over a fresh TLS connection to `addr` (SNI from the Host
/// header, or none for an IP): status, headers, body.
pub async fn https_request(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(n, _)| n).to_string())
        .unwrap_or_else(|| addr.ip().to_string());
    let tls = tls_connect(addr, &host, cfg).await?;
    let got = Got::read(send_over(tls, req).await?).await?;
    Ok((got.status, got.headers, got.body))
}

/// A GET to the admin API (plain HTTP).
pub async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    admin_call(addr, method, path).await
}

/// A metric's value from `/metrics` (exact label set, as rendered).
/// The `/certs` entry of `name` once it reports a `last_error` (at most 10 s).
pub async fn error_report(admin_addr: SocketAddr, name: &str) -> serde_json::Value {
    let what = format!("an error reported for {name}");
    wait_for(Duration::from_secs(10), &what, || async {
        let r = cert_report(admin_addr, name).await;
        r["last_error"].is_string().then_some(r)
    })
    .await
}

/// `portcullis_acme_next_renewal_timestamp_seconds` of site `name`.
pub async fn next_renewal(admin_addr: SocketAddr, name: &str) -> Option<f64> {
    scrape_at(admin_addr).await.exact(
        "portcullis_acme_next_renewal_timestamp_seconds",
        &[("name", name)],
    )
}

/// Now, in Unix seconds (as the timestamp metrics are).
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `portcullis_acme_renewals_total` of site `name` with `result`
/// (`success` or `failure`).
pub async fn renewals(admin_addr: SocketAddr, name: &str, result: &str) -> Option<f64> {
    scrape_at(admin_addr).await.exact(
        "portcullis_acme_renewals_total",
        &[("name", name), ("result", result)],
    )
}

pub async fn metric(admin_addr: SocketAddr, series: &str) -> Option<f64> {
    scrape_at(admin_addr).await.series(series)
}

impl Proxy {
    /// The serial of the certificate in service for `name` (slot `site`).
    pub fn serial(&self, site: &str) -> Option<String> {
        self.certs
            .slot(site)?
            .current()
            .map(|c| c.info.serial.clone())
    }

    /// Waits until the certificate in service for `site` is an ACME one with
    /// a serial other than `not`; returns it.
    pub async fn wait_issued(
        &self,
        site: &str,
        not: Option<&str>,
        limit: Duration,
        pebble: &Pebble,
    ) -> String {
        let current = || {
            let cur = self.certs.slot(site)?.current()?;
            let acme = cur.info.issuer_cn.to_ascii_lowercase().contains("pebble");
            (acme && Some(cur.info.serial.as_str()) != not).then(|| cur.info.serial.clone())
        };
        if eventually(limit, || async { current().is_some() }).await {
            return current().unwrap();
        }
        let report = self.certs.slot(site).map(|s| format!("{:?}", s.status()));
        panic!(
            "no new ACME certificate for {site} within {limit:?}; slot status: {report:?}\npebble log:\n{}",
            pebble.log()
        );
    }
}

/// A TLS handshake for `sni` with `cfg`: the leaf served, or the error.
pub async fn handshake(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<CertificateDer<'static>, std::io::Error> {
    let tls = crate::common::tls_connect(addr, sni, cfg).await?;
    Ok(crate::common::peer_leaf(&tls))
}

/// A config for the proxy: listeners on `127.0.0.1:0`, admin on, the
/// `[acme]` table pointing at `directory`, and `sites`.
pub fn proxy_toml(
    directory: &str,
    ca_root: &Path,
    http_listener: bool,
    acme_extra: &str,
    sites: &str,
) -> String {
    let http = if http_listener {
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\n"
    } else {
        ""
    };
    format!(
        r#"state_dir = "state"

[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"
{http}
[acme]
directory = "{directory}"
ca_root = "{}"
email = "ops@example.com"
retry_base = "1s"
retry_max = "3s"
order_timeout = "60s"
{acme_extra}

{sites}
"#,
        ca_root.display()
    )
}

/// One site with ACME settings `tls` (the inside of `acme = { ... }`).
pub fn site(name: &str, hosts: &[&str], acme: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "[[sites]]\nname = \"{name}\"\nhosts = [{}]\ntls = {{ acme = {{ {acme} }} }}\n  [[sites.routes]]\n  respond = {{ status = 200, body = \"hello from {name}\\n\" }}\n",
        hosts.join(", ")
    )
}

/// `GET https://{host}/` through the proxy: status and body.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = crate::common::request(addr, host, cfg, req).await?;
    Ok((got.status, String::from_utf8_lossy(&got.body).into_owned()))
}

/// Mode bits of a file.
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

// ---------------------------------------------------------------------------
// The ARI front: forwards everything to Pebble, adds `renewalInfo` to the
// directory, answers renewal-information requests itself, and records the
// `replaces` of each new order (and reflects it, as RFC 9773 asks of a CA).

/// What the ARI front answers and what it saw.
#[derive(Default)]
pub struct AriState {
    /// The suggested window to answer with.
    pub window: Option<(SystemTime, SystemTime)>,
    /// Every certificate identifier asked about.
    pub asked: Vec<String>,
    /// The `replaces` of every new order (None: absent).
    pub replaces: Vec<Option<String>>,
    /// This many new orders are refused with `rateLimited` and
    /// `Retry-After: retry_after_secs`, as a CA over its limits answers.
    pub rate_limit_orders: u32,
    pub retry_after_secs: u64,
}

pub struct AriFront {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<AriState>>,
    stop: CancellationToken,
}

impl Drop for AriFront {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl AriFront {
    /// Starts the front for `pebble` on a loopback port.
    pub async fn start(pebble: &Pebble) -> AriFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cert = pebble.pki.server_cert(&["127.0.0.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(backend_tls(&cert, &[b"http/1.1"], None));
        let state = Arc::new(Mutex::new(AriState::default()));
        let stop = CancellationToken::new();
        let upstream = SocketAddr::from(([127, 0, 0, 1], pebble.acme_port));
        let client = pebble.api_client();
        let (st, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (acceptor, st, client) = (acceptor.clone(), st.clone(), client.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (st, client) = (st.clone(), client.clone());
                        async move {
                            Ok::<_, Infallible>(ari_front(req, addr, upstream, client, st).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        AriFront { addr, state, stop }
    }

    pub fn directory(&self) -> String {
        format!("https://{}/dir", self.addr)
    }

    pub fn set_window(&self, start: SystemTime, end: SystemTime) {
        self.state.lock().unwrap().window = Some((start, end));
    }
}

async fn ari_front(
    req: Request<Incoming>,
    me: SocketAddr,
    upstream: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    st: Arc<Mutex<AriState>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if let Some(id) = path.strip_prefix("/renewal-info/") {
        let window = {
            let mut s = st.lock().unwrap();
            s.asked.push(id.to_string());
            s.window
        };
        let (start, end) = window.unwrap_or((
            SystemTime::now() + Duration::from_secs(86_400 * 30),
            SystemTime::now() + Duration::from_secs(86_400 * 31),
        ));
        let body = serde_json::json!({ "suggestedWindow": { "start": rfc3339(start), "end": rfc3339(end) } });
        return Response::builder()
            .header("content-type", "application/json")
            .header("retry-after", "1")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // The `replaces` of a new order, from the JWS payload (base64url JSON).
    let mut replaces: Option<Option<String>> = None;
    if parts.method == http::Method::POST && path.contains("order-plz") {
        let mut s = st.lock().unwrap();
        if s.rate_limit_orders > 0 {
            s.rate_limit_orders -= 1;
            let problem = serde_json::json!({
                "type": "urn:ietf:params:acme:error:rateLimited",
                "detail": "too many new orders recently",
                "status": 429,
            });
            return Response::builder()
                .status(429)
                .header("content-type", "application/problem+json")
                .header("retry-after", s.retry_after_secs.to_string())
                .body(Full::new(Bytes::from(problem.to_string())))
                .unwrap();
        }
    }
    if parts.method == http::Method::POST && path.contains("order-plz") {
        let jws: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let payload = jws["payload"].as_str().unwrap_or("");
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap_or_default();
        let p: serde_json::Value = serde_json::from_slice(&decoded).unwrap_or_default();
        let r = p["replaces"].as_str().map(str::to_string);
        st.lock().unwrap().replaces.push(r.clone());
        replaces = Some(r);
    }
    let mut fwd = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (k, v) in &parts.headers {
        fwd = fwd.header(k, v);
    }
    let fwd = fwd.body(Full::new(body)).unwrap();
    let (status, headers, rbody) = match https_request(upstream, client, fwd).await {
        Ok(x) => x,
        Err(e) => {
            return Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(format!("pebble unreachable: {e}"))))
                .unwrap()
        }
    };
    let mut rbody = rbody;
    if path == "/dir" && status == 200 {
        let mut dir: serde_json::Value = serde_json::from_slice(&rbody).unwrap();
        dir["renewalInfo"] = format!("https://{me}/renewal-info").into();
        rbody = Bytes::from(dir.to_string());
    }
    if let Some(Some(r)) = replaces {
        if status == 201 {
            let mut order: serde_json::Value = serde_json::from_slice(&rbody).unwrap();
            order["replaces"] = r.into();
            rbody = Bytes::from(order.to_string());
        }
    }
    let mut out = Response::builder().status(status);
    for (k, v) in &headers {
        if k != http::header::CONTENT_LENGTH
            && k != http::header::TRANSFER_ENCODING
            && k != http::header::CONNECTION
        {
            out = out.header(k, v);
        }
    }
    out.body(Full::new(rbody)).unwrap()
}
