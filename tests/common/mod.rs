//! Shared test harness: an rcgen PKI built at run time, real hyper
//! upstreams on 127.0.0.1:0, the real proxy on 127.0.0.1:0, and a real
//! rustls client.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

/// Key algorithm for a test leaf.
#[derive(Clone, Copy, Debug)]
pub enum Alg {
    Ecdsa,
    Rsa,
}

/// A root CA and an intermediate, both made by rcgen in memory.
pub struct Pki {
    pub root_der: CertificateDer<'static>,
    pub root_pem: String,
    root: Issuer<'static, KeyPair>,
    pub inter_der: CertificateDer<'static>,
    pub inter_pem: String,
    inter: Issuer<'static, KeyPair>,
}

/// A leaf certificate: the PEM chain (leaf + intermediate) and key.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
    pub leaf_der: CertificateDer<'static>,
    /// Serial as lower-case hex (as the proxy reports it).
    pub serial: String,
    pub not_after: time::OffsetDateTime,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

impl Pki {
    pub fn new() -> Pki {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("portcullis test root");
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = Issuer::new(root_params, root_key);
        let inter_key = KeyPair::generate().unwrap();
        let mut inter_params = ca_params("portcullis test intermediate");
        inter_params.use_authority_key_identifier_extension = true;
        let inter_cert = inter_params.signed_by(&inter_key, &root).unwrap();
        let inter = Issuer::new(inter_params, inter_key);
        Pki {
            root_der: root_cert.der().clone(),
            root_pem: root_cert.pem(),
            root,
            inter_der: inter_cert.der().clone(),
            inter_pem: inter_cert.pem(),
            inter,
        }
    }

    /// A leaf for `names`, valid from yesterday for `days` days.
    pub fn leaf(&self, names: &[&str], alg: Alg) -> Leaf {
        let now = time::OffsetDateTime::now_utc();
        self.leaf_with_dates(
            names,
            alg,
            now - time::Duration::days(1),
            now + time::Duration::days(90),
        )
    }

    /// A leaf with explicit validity dates.
    pub fn leaf_with_dates(
        &self,
        names: &[&str],
        alg: Alg,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, names[0].clone());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let serial: [u8; 8] = rand_bytes();
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f;
        serial[0] |= 0x10;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = match alg {
            Alg::Ecdsa => KeyPair::generate().unwrap(),
            Alg::Rsa => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                    .unwrap()
            }
        };
        let cert = p.signed_by(&key, &self.inter).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.inter_pem),
            key_pem: key.serialize_pem(),
            leaf_der: cert.der().clone(),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after,
        }
    }

    /// A client config trusting the test root, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root_der.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

impl Leaf {
    /// Writes `cert.pem` and `key.pem` into `dir` with a prefix; returns the paths.
    pub fn write(&self, dir: &Path, prefix: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{prefix}cert.pem"));
        let k = dir.join(format!("{prefix}key.pem"));
        std::fs::write(&c, &self.chain_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }
}

/// Re-encodes a PKCS#8 key as PKCS#1 (RSA) or SEC1 (EC) with openssl.
pub fn traditional_key(pkcs8_pem: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.pem");
    std::fs::write(&input, pkcs8_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-traditional", "-in"])
        .arg(&input)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What the echo upstream saw.
pub type Seen = BTreeMap<String, String>;

/// Starts a hyper HTTP/1.1 upstream on 127.0.0.1:0 running `f` per request.
pub async fn upstream<F, Fut>(f: F) -> (SocketAddr, CancellationToken)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>>
        + Send
        + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop2.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, stop)
}

/// Boxes a fixed body.
pub fn full(b: impl Into<Bytes>) -> http_body_util::combinators::BoxBody<Bytes, Infallible> {
    Full::new(b.into()).boxed()
}

/// An upstream that answers with a JSON object of the request line and
/// headers it received (`:method`, `:path`, `:version`, then each header;
/// repeated headers joined with `, `).
pub async fn echo_upstream() -> (SocketAddr, CancellationToken) {
    upstream(|req: Request<Incoming>| async move {
        let mut seen = Seen::new();
        seen.insert(":method".into(), req.method().to_string());
        seen.insert(":path".into(), req.uri().to_string());
        seen.insert(":version".into(), format!("{:?}", req.version()));
        for (k, v) in req.headers() {
            let v = String::from_utf8_lossy(v.as_bytes()).to_string();
            seen.entry(k.to_string())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(&v);
                })
                .or_insert(v);
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        seen.insert(":body-len".into(), body.len().to_string());
        Response::new(full(serde_json::to_vec(&seen).unwrap()))
    })
    .await
}

/// A running proxy.
pub struct Proxy {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<Result<(), portcullis::Error>>,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the proxy in this process from TOML text. Every
    /// `listen = "127.0.0.1:0"` is bound to a free port. The text is written
    /// to `portcullis.toml` in a fresh directory, so relative paths (and
    /// error messages) refer to it.
    pub async fn start(toml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        Proxy::start_in(dir, toml).await
    }

    /// Like [`Proxy::start`] in a directory the test already filled.
    pub async fn start_in(dir: tempfile::TempDir, toml: &str) -> Proxy {
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, toml).unwrap();
        let config =
            portcullis::config::Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
        let shutdown = CancellationToken::new();
        let server = portcullis::Server::bind(config, shutdown.clone())
            .await
            .unwrap();
        let https = server.https_addrs()[0];
        let http = server.http_addrs().first().copied();
        let admin = server.admin_addr();
        let done = tokio::spawn(server.run());
        Proxy {
            https,
            http,
            admin,
            shutdown,
            done,
            dir,
        }
    }

    /// Writes a file next to the config.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

/// A TLS connection to `addr` with `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Serial (lower-case hex) of a DER certificate.
pub fn serial_of(der: &CertificateDer<'_>) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    c.raw_serial_as_string().replace(':', "")
}

/// A simple response: status, headers, body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Got {
    /// The echo upstream's JSON.
    pub fn seen(&self) -> Seen {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not echo JSON: {:?}", self.body))
    }
}

/// Sends one request over a fresh TLS connection with ALPN `h2` or `http/1.1`.
pub async fn request(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> Result<Got, Box<dyn std::error::Error + Send + Sync>> {
    let tls = tls_connect(addr, sni, cfg).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Got {
        status,
        headers,
        body,
        version,
    })
}

/// `GET https://{host}{path}` (Host = host) over a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str, cfg: Arc<rustls::ClientConfig>) -> Got {
    let h2 = cfg.alpn_protocols.first().map(|p| p.as_slice()) == Some(b"h2");
    let mut b = Request::builder().uri(format!("https://{host}{path}"));
    if !h2 {
        b = b.header("host", host);
    }
    request(addr, host, cfg, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET https://{host}{path}: {e}"))
}

/// Polls `f` every 10 ms until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// The real `portcullis` binary running `run --config F` as a child process,
/// killed when dropped (also when a test panics).
pub struct BinProxy {
    pub child: std::process::Child,
    /// The HTTPS address parsed from its `listening protocol="https"` log line.
    pub https: SocketAddr,
    /// Every stderr line so far (drained by a thread so the pipe never fills).
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl BinProxy {
    /// Writes `toml` to `portcullis.toml` in `dir` and starts the binary;
    /// returns once it logs its HTTPS address (at most 60 s).
    pub fn start_in(dir: tempfile::TempDir, toml: &str) -> BinProxy {
        use std::io::BufRead;
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("portcullis binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") && line.contains("protocol=\"https\"") {
                    let addr = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .and_then(|a| a.trim_matches('"').parse::<SocketAddr>().ok());
                    if let (Some(addr), Some(tx)) = (addr, tx.take()) {
                        let _ = tx.send(addr);
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let mut proxy = BinProxy {
            child,
            https: "127.0.0.1:0".parse().unwrap(),
            log,
            dir,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => proxy.https = addr,
            Err(_) => panic!(
                "portcullis did not log its https address; stderr:\n{}",
                proxy.log_text()
            ),
        }
        proxy
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (`VmHWM`) of the child, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in /proc/{}/status", self.pid()));
        kb * 1024
    }

    /// Sends `signal` (e.g. "TERM") with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `limit` for the child to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stderr lines so far, joined.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for BinProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `req` (any body, e.g. a stream) over a fresh TLS connection with
/// ALPN from `cfg` and returns the response with its body unread. For h1 the
/// request should carry a Host header; for h2 an absolute URI.
pub async fn send<B>(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<B>,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_connect(addr, sni, cfg).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Ok(send.send_request(req).await?)
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(send.send_request(req).await?)
    }
}

/// A request builder for `https://{host}{path}` that suits both h1 (Host
/// header) and h2 (absolute URI; hyper turns it into `:authority`).
pub fn req_builder(alpn: &[u8], host: &str, path: &str) -> http::request::Builder {
    if alpn == b"h2" {
        Request::builder().uri(format!("https://{host}{path}"))
    } else {
        Request::builder().uri(path).header("host", host)
    }
}

// ---- certificate metrics, inventory and on-call CLI tests ----

/// Unix seconds as an `OffsetDateTime` (whole seconds, so DER dates and
/// exported timestamps compare exactly).
pub fn at_unix(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

/// Now, in whole Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Pki {
    /// Like [`Pki::new`], with the intermediate's validity and serial chosen
    /// by the test (whole seconds), and the CNs given.
    pub fn with_intermediate(
        root_cn: &str,
        inter_cn: &str,
        inter_serial: &[u8],
        inter_not_before: time::OffsetDateTime,
        inter_not_after: time::OffsetDateTime,
    ) -> Pki {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params(root_cn);
        let root_cert = root_params.self_signed(&root_key).unwrap();
        let root = Issuer::new(root_params, root_key);
        let inter_key = KeyPair::generate().unwrap();
        let mut inter_params = ca_params(inter_cn);
        inter_params.use_authority_key_identifier_extension = true;
        inter_params.not_before = inter_not_before;
        inter_params.not_after = inter_not_after;
        inter_params.serial_number = Some(rcgen::SerialNumber::from_slice(inter_serial));
        let inter_cert = inter_params.signed_by(&inter_key, &root).unwrap();
        let inter = Issuer::new(inter_params, inter_key);
        Pki {
            root_der: root_cert.der().clone(),
            root_pem: root_cert.pem(),
            root,
            inter_der: inter_cert.der().clone(),
            inter_pem: inter_cert.pem(),
            inter,
        }
    }

    /// A leaf for `names` with an existing private key (PEM), as certbot's
    /// `--reuse-key` does: a replacement then changes only the chain file.
    pub fn leaf_with_key(
        &self,
        names: &[&str],
        key_pem: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, names[0].clone());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let mut serial = rand_bytes::<8>().to_vec();
        serial[0] &= 0x7f;
        serial[0] |= 0x10;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = KeyPair::from_pem(key_pem).unwrap();
        let cert = p.signed_by(&key, &self.inter).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.inter_pem),
            key_pem: key_pem.to_string(),
            leaf_der: cert.der().clone(),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after,
        }
    }
}

/// Writes `contents` to `path` the way deploy tools do: a temp file in the
/// same directory, then a rename over the old one.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Like [`Proxy::start_in`], and also hands back the certificate store so a
/// test can `subscribe()` to publish/reject events.
pub async fn start_with_certs(
    dir: tempfile::TempDir,
    toml: &str,
) -> (Proxy, Arc<portcullis::certstore::CertStore>) {
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, toml).unwrap();
    let config = portcullis::config::Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let shutdown = CancellationToken::new();
    let server = portcullis::Server::bind(config, shutdown.clone())
        .await
        .unwrap();
    let certs = server.certs();
    let https = server.https_addrs()[0];
    let http = server.http_addrs().first().copied();
    let admin = server.admin_addr();
    let done = tokio::spawn(server.run());
    let proxy = Proxy {
        https,
        http,
        admin,
        shutdown,
        done,
        dir,
    };
    (proxy, certs)
}

/// Waits (at most `limit`) for a certificate event about `name` that
/// `pred` accepts; panics on timeout.
pub async fn wait_cert_event(
    rx: &mut tokio::sync::broadcast::Receiver<portcullis::certstore::CertEvent>,
    limit: Duration,
    mut pred: impl FnMut(&portcullis::certstore::CertEvent) -> bool,
) -> portcullis::certstore::CertEvent {
    tokio::time::timeout(limit, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(e) => panic!("certificate events: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no matching certificate event within {limit:?}"))
}

/// `GET path` on a plain-HTTP/1.1 endpoint (the admin API): status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// A proxy serving three file certificates from one PKI: `normal`
/// (`normal.test`, 90 days, ECDSA, the default site), `soon` (`soon.test`,
/// 5 days, RSA) and `expired` (`expired.test`, expired 2 days ago; loaded
/// at start with a warning). Dates are whole seconds; `root.pem` is written
/// next to the config.
pub struct OnCall {
    pub pki: Pki,
    pub proxy: Proxy,
    pub certs: Arc<portcullis::certstore::CertStore>,
    pub normal: Leaf,
    pub soon: Leaf,
    pub expired: Leaf,
    /// (not_before, not_after) of each, Unix seconds, same order.
    pub dates: [(i64, i64); 3],
    pub root_pem: PathBuf,
}

impl OnCall {
    pub async fn start() -> OnCall {
        const DAY: i64 = 86_400;
        let pki = Pki::new();
        let now = unix_now();
        let dates = [
            (now - DAY, now + 90 * DAY),
            (now - 85 * DAY, now + 5 * DAY),
            (now - 30 * DAY, now - 2 * DAY),
        ];
        let dir = tempfile::tempdir().unwrap();
        let normal = pki.leaf_with_dates(
            &["normal.test"],
            Alg::Ecdsa,
            at_unix(dates[0].0),
            at_unix(dates[0].1),
        );
        let soon = pki.leaf_with_dates(
            &["soon.test"],
            Alg::Rsa,
            at_unix(dates[1].0),
            at_unix(dates[1].1),
        );
        let expired = pki.leaf_with_dates(
            &["expired.test"],
            Alg::Ecdsa,
            at_unix(dates[2].0),
            at_unix(dates[2].1),
        );
        normal.write(dir.path(), "normal-");
        soon.write(dir.path(), "soon-");
        expired.write(dir.path(), "expired-");
        let root_pem = dir.path().join("root.pem");
        std::fs::write(&root_pem, &pki.root_pem).unwrap();
        let site = |name: &str, default: bool| {
            format!(
                "[[sites]]\nname = \"{name}\"\nhosts = [\"{name}.test\"]\ndefault = {default}\n\
                 tls = {{ cert = \"{name}-cert.pem\", key = \"{name}-key.pem\" }}\n\
                 [[sites.routes]]\nrespond = {{ status = 200, body = \"{name}\\n\" }}\n"
            )
        };
        let head = "[admin]\nlisten = \"127.0.0.1:0\"\n[certificates]\npoll_interval = \"1h\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n";
        let toml = format!(
            "{head}{}{}{}",
            site("normal", true),
            site("soon", false),
            site("expired", false)
        );
        // The same config with only the 90-day certificate, for `--config`.
        std::fs::write(
            dir.path().join("only-normal.toml"),
            format!("{head}{}", site("normal", true)),
        )
        .unwrap();
        let (proxy, certs) = start_with_certs(dir, &toml).await;
        wait_ready(&proxy).await;
        OnCall {
            pki,
            proxy,
            certs,
            normal,
            soon,
            expired,
            dates,
            root_pem,
        }
    }

    /// `http://ADMIN`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.proxy.admin.unwrap())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.proxy.dir.path().join(name)
    }
}

/// What a run of the `portcullis` binary printed and how it exited.
#[derive(Debug)]
pub struct Cli {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real binary with `args` (asynchronously, so an in-process proxy
/// keeps serving), at most 60 s.
pub async fn cli<I, S>(args: I, env: &[(&str, Option<&str>)]) -> Cli
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("portcullis CLI finished within 60 s")
        .expect("portcullis binary runs");
    Cli {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// RFC 3339 of Unix seconds, as the CLI prints dates.
pub fn rfc3339_of(secs: i64) -> String {
    at_unix(secs)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

// ---- rate limit tests: several clients from one host, admin POST ----

/// A TLS connection to `addr` from the local address `from`: every address
/// of 127.0.0.0/8 is on the loopback interface, so one test can play several
/// clients (127.0.0.2, 127.0.0.3, ...) against a proxy on 127.0.0.1.
pub async fn tls_connect_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let sock = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(from, 0))?;
    let tcp = sock.connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// Like [`request`], over a fresh connection from the local address `from`.
pub async fn request_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> Result<Got, Box<dyn std::error::Error + Send + Sync>> {
    let tls = tls_connect_from(from, addr, sni, cfg).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Got {
        status,
        headers,
        body,
        version,
    })
}

/// `POST path` (empty body) on a plain-HTTP/1.1 endpoint (the admin API):
/// status and body.
pub async fn admin_post(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Waits until `/readyz` answers 200, then lets the background tasks
/// (the certificate file watcher) start: a file changed before the watcher
/// has set up its watches is only seen by the hash poll.
pub async fn wait_ready(proxy: &Proxy) {
    let admin = proxy.admin.expect("admin listener");
    for _ in 0..500 {
        if admin_get(admin, "/readyz").await.0 == 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("/readyz never answered 200");
}

// ---- hot reload tests and benchmarks ----

/// A client config trusting the test root that never resumes a session:
/// every handshake is a full one, so the server presents the certificate
/// in service (a resumed session carries the certificate of the session
/// it resumes).
pub fn full_handshake_config(pki: &Pki, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = (*pki.client_config(alpn)).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// The serial a full handshake for `sni` gets now (the chain is verified).
pub async fn served_serial(addr: SocketAddr, sni: &str, pki: &Pki) -> String {
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tls_connect(addr, sni, full_handshake_config(pki, &[])),
    )
    .await
    .unwrap_or_else(|_| panic!("handshake for {sni} timed out"))
    .unwrap_or_else(|e| panic!("handshake for {sni}: {e}"));
    serial_of(&peer_leaf(&tls))
}

/// How a tool replaces a certificate and its key on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WritePattern {
    /// Both files rewritten in place (same inodes): `cp`, an editor.
    InPlace,
    /// Each file written to a temp name, then renamed over the old one.
    Rename,
    /// certbot: new `archive/NAME/fullchainN.pem` and `privkeyN.pem`, then
    /// each `live/NAME/` symlink unlinked and re-created pointing at them.
    Certbot,
    /// A Kubernetes Secret volume: a new `..<timestamp>` directory, a
    /// `..data_tmp` symlink to it renamed over `..data`, the old directory
    /// removed; `tls.crt -> ..data/tls.crt` never changes.
    Kubernetes,
    /// Both files deleted, then written again.
    DeleteRecreate,
}

impl WritePattern {
    /// Every pattern.
    pub const ALL: [WritePattern; 5] = [
        WritePattern::InPlace,
        WritePattern::Rename,
        WritePattern::Certbot,
        WritePattern::Kubernetes,
        WritePattern::DeleteRecreate,
    ];
}

/// A site's certificate files, laid out for one [`WritePattern`] under `root`.
pub struct CertFiles {
    pub pattern: WritePattern,
    pub root: PathBuf,
    /// Replacements so far (certbot's N, part of the Kubernetes directory name).
    pub generation: u32,
}

impl CertFiles {
    /// Creates `root` and lays out `leaf` the way the pattern's tool does.
    pub fn create(root: &Path, pattern: WritePattern, leaf: &Leaf) -> CertFiles {
        std::fs::create_dir_all(root).unwrap();
        let mut files = CertFiles {
            pattern,
            root: root.to_path_buf(),
            generation: 0,
        };
        match pattern {
            WritePattern::Certbot => {
                std::fs::create_dir_all(root.join("archive/site")).unwrap();
                std::fs::create_dir_all(root.join("live/site")).unwrap();
            }
            WritePattern::Kubernetes => {}
            _ => {
                std::fs::write(files.cert_path(), &leaf.chain_pem).unwrap();
                std::fs::write(files.key_path(), &leaf.key_pem).unwrap();
                return files;
            }
        }
        files.replace(leaf);
        files
    }

    /// The chain path to configure.
    pub fn cert_path(&self) -> PathBuf {
        match self.pattern {
            WritePattern::Certbot => self.root.join("live/site/fullchain.pem"),
            WritePattern::Kubernetes => self.root.join("tls.crt"),
            _ => self.root.join("cert.pem"),
        }
    }

    /// The key path to configure.
    pub fn key_path(&self) -> PathBuf {
        match self.pattern {
            WritePattern::Certbot => self.root.join("live/site/privkey.pem"),
            WritePattern::Kubernetes => self.root.join("tls.key"),
            _ => self.root.join("key.pem"),
        }
    }

    /// Replaces the certificate and key with `leaf`'s.
    pub fn replace(&mut self, leaf: &Leaf) {
        self.generation += 1;
        let n = self.generation;
        let (cert, key) = (self.cert_path(), self.key_path());
        match self.pattern {
            WritePattern::InPlace => {
                for (path, data) in [(&cert, &leaf.chain_pem), (&key, &leaf.key_pem)] {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(path)
                        .unwrap();
                    f.write_all(data.as_bytes()).unwrap();
                }
            }
            WritePattern::Rename => {
                replace_file(&cert, &leaf.chain_pem);
                replace_file(&key, &leaf.key_pem);
            }
            WritePattern::DeleteRecreate => {
                std::fs::remove_file(&cert).unwrap();
                std::fs::remove_file(&key).unwrap();
                std::fs::write(&cert, &leaf.chain_pem).unwrap();
                std::fs::write(&key, &leaf.key_pem).unwrap();
            }
            WritePattern::Certbot => {
                let archive = self.root.join("archive/site");
                std::fs::write(archive.join(format!("fullchain{n}.pem")), &leaf.chain_pem).unwrap();
                std::fs::write(archive.join(format!("privkey{n}.pem")), &leaf.key_pem).unwrap();
                // certbot's `_update_link_to`: unlink, then symlink (privkey before fullchain).
                for (link, kind) in [(&key, "privkey"), (&cert, "fullchain")] {
                    let _ = std::fs::remove_file(link);
                    std::os::unix::fs::symlink(format!("../../archive/site/{kind}{n}.pem"), link)
                        .unwrap();
                }
            }
            WritePattern::Kubernetes => {
                // kubelet's AtomicWriter.
                let stamp = format!("..2026_01_01_00_00_00.{n:09}");
                let new_dir = self.root.join(&stamp);
                std::fs::create_dir(&new_dir).unwrap();
                std::fs::write(new_dir.join("tls.crt"), &leaf.chain_pem).unwrap();
                std::fs::write(new_dir.join("tls.key"), &leaf.key_pem).unwrap();
                let data = self.root.join("..data");
                let old_dir = std::fs::read_link(&data).ok();
                let tmp = self.root.join("..data_tmp");
                std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
                std::fs::rename(&tmp, &data).unwrap();
                for name in ["tls.crt", "tls.key"] {
                    let link = self.root.join(name);
                    if std::fs::symlink_metadata(&link).is_err() {
                        std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
                    }
                }
                if let Some(old) = old_dir {
                    std::fs::remove_dir_all(self.root.join(old)).unwrap();
                }
            }
        }
    }
}

/// Waits (at most `limit`) until `serial` is published for site `name`;
/// returns the rejections seen on the way (a pair caught half-written is
/// refused, which is fine: the previous one keeps serving).
pub async fn wait_published(
    rx: &mut tokio::sync::broadcast::Receiver<portcullis::certstore::CertEvent>,
    name: &str,
    serial: &str,
    limit: Duration,
) -> Result<Vec<String>, String> {
    use portcullis::certstore::CertEvent;
    let mut rejected = Vec::new();
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(CertEvent::Published { name: n, serial: s }) if n == name && s == serial => {
                    return Ok(())
                }
                Ok(CertEvent::Rejected { name: n, error }) if n == name => rejected.push(error),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                    return Err(format!("lagged by {k} events"))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(Ok(())) => Ok(rejected),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "{serial} not published for {name} within {limit:?}; rejected on the way: {rejected:?}"
        )),
    }
}
