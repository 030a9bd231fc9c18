//! The real proxy under test: [`Proxy`] runs it in this process (bound on
//! `127.0.0.1:0`, so no port is ever guessed), [`BinProxy`] runs the
//! binary, and [`OneSite`] builds the one-site config most tests need.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::common::client::admin_get;
use crate::common::pki::{Alg, Pki};
use crate::common::wait::wait_until;

/// A running proxy.
pub struct Proxy {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub done: tokio::task::JoinHandle<Result<(), portcullis::Error>>,
    /// The directory of `portcullis.toml` (relative paths resolve here).
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// Certificate store: `subscribe()` for publish/reject events.
    pub certs: Arc<portcullis::certstore::CertStore>,
    pub acme: Arc<portcullis::acme::Manager>,
    pub control: Arc<portcullis::control::Control>,
    /// Owns `dir` when the proxy made it.
    _tmp: Option<tempfile::TempDir>,
}

impl Proxy {
    /// Starts the proxy in this process from TOML text. Every
    /// `listen = "127.0.0.1:0"` is bound to a free port. The text is written
    /// to `portcullis.toml` in a fresh directory, so relative paths (and
    /// error messages) refer to it.
    pub async fn start(toml: &str) -> Proxy {
        Proxy::start_in(tempfile::tempdir().unwrap(), toml).await
    }

    /// Like [`Proxy::start`] in a directory the test already filled.
    pub async fn start_in(dir: tempfile::TempDir, toml: &str) -> Proxy {
        let mut p = Proxy::launch(dir.path(), toml, |_, _| async {}).await;
        p._tmp = Some(dir);
        p
    }

    /// Writes `toml` as `dir/portcullis.toml` (the test keeps `dir`, so a
    /// later proxy can start again on the same state), binds, lets
    /// `before_run` see the bound HTTP and HTTPS ports (to start Pebble
    /// against them), then runs.
    pub async fn launch<F, Fut>(dir: &Path, toml: &str, before_run: F) -> Proxy
    where
        F: FnOnce(Option<u16>, u16) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        Proxy::try_launch(dir, toml, before_run)
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"))
    }

    /// Like [`Proxy::launch`]; a bind failure is returned, not a panic
    /// (for the one test that must name a port, and retries on a lost race).
    pub async fn try_launch<F, Fut>(
        dir: &Path,
        toml: &str,
        before_run: F,
    ) -> Result<Proxy, portcullis::Error>
    where
        F: FnOnce(Option<u16>, u16) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let path = dir.join("portcullis.toml");
        std::fs::write(&path, toml).unwrap();
        let config =
            portcullis::config::Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
        let shutdown = CancellationToken::new();
        let server = portcullis::Server::bind(config, shutdown.clone()).await?;
        let https = server.https_addrs()[0];
        let http = server.http_addrs().first().copied();
        before_run(http.map(|a| a.port()), https.port()).await;
        let (admin, certs, acme, control) = (
            server.admin_addr(),
            server.certs(),
            server.acme(),
            server.control(),
        );
        Ok(Proxy {
            https,
            http,
            admin,
            shutdown,
            done: tokio::spawn(server.run()),
            dir: dir.to_path_buf(),
            config_path: path,
            certs,
            acme,
            control,
            _tmp: None,
        })
    }

    /// The admin listener's address (the config must have one).
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("an admin listener")
    }

    /// Writes a file next to the config.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Rewrites `portcullis.toml` and reloads it through `POST /reload`;
    /// fails the test unless the reload is accepted.
    pub async fn reload(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).unwrap();
        let (status, body) = crate::common::client::admin_post(self.admin(), "/reload").await;
        assert_eq!(status, 200, "reload refused: {body}");
    }

    /// Takes the temporary directory the proxy was started in, so it
    /// outlives the proxy (to read files it wrote after it stopped).
    #[allow(dead_code)]
    pub fn take_tmp(&mut self) -> tempfile::TempDir {
        self._tmp
            .take()
            .expect("started with Proxy::start or start_in")
    }

    /// Stops the proxy and waits (at most 10 s) for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.done).await;
    }
}

/// Like [`Proxy::start_in`], and also hands back the certificate store so a
/// test can `subscribe()` to publish/reject events.
pub async fn start_with_certs(
    dir: tempfile::TempDir,
    toml: &str,
) -> (Proxy, Arc<portcullis::certstore::CertStore>) {
    let proxy = Proxy::start_in(dir, toml).await;
    let certs = proxy.certs.clone();
    (proxy, certs)
}

/// Waits until `/readyz` answers 200, then lets the background tasks
/// (the certificate file watcher) start: a file changed before the watcher
/// has set up its watches is only seen by the hash poll. The proxy reports
/// no event when its watches are in place, so this is the one remaining
/// fixed pause (50 ms) after an awaited condition.
pub async fn wait_ready(proxy: &Proxy) {
    let admin = proxy.admin();
    wait_until(
        Duration::from_secs(5),
        "/readyz answers 200",
        || async move { admin_get(admin, "/readyz").await.0 == 200 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The head of a multi-site config: the admin listener (on `127.0.0.1:0`
/// or off), `top` tables, and one TLS listener on `127.0.0.1:0`.
pub fn sites_head(admin: bool, top: &str) -> String {
    let admin = if admin { "127.0.0.1:0" } else { "off" };
    format!("[admin]\nlisten = \"{admin}\"\n{top}\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n")
}

/// A `[[sites]]` table for multi-site configs: `hosts` (TOML list items,
/// e.g. `"\"a.test\""`), a certificate at `{prefix}cert.pem` and
/// `{prefix}key.pem`, and one route answering 200 with `body`.
pub fn respond_site(
    name: Option<&str>,
    hosts: &str,
    prefix: &str,
    default: bool,
    body: &str,
) -> String {
    let name = name.map_or(String::new(), |n| format!("name = \"{n}\"\n"));
    format!(
        "[[sites]]\n{name}hosts = [{hosts}]\ndefault = {default}\n\
         tls = {{ cert = \"{prefix}cert.pem\", key = \"{prefix}key.pem\" }}\n\
         [[sites.routes]]\nrespond = {{ status = 200, body = {body:?} }}\n"
    )
}

/// The one-site config most tests need: a TLS listener on `127.0.0.1:0`,
/// one site (`api.test` unless [`OneSite::host`] says otherwise) with a
/// certificate from the test's [`Pki`], and its routes. The admin listener
/// is off unless asked for.
///
/// ```ignore
/// let proxy = OneSite::new().top("[timeouts]\nrequest = \"1s\"").upstream(up).start(&pki).await;
/// ```
#[derive(Clone, Debug)]
pub struct OneSite {
    host: String,
    name: Option<String>,
    admin: bool,
    listeners: String,
    top: String,
    site: String,
    routes: String,
    files: Vec<(String, String)>,
    alg: Alg,
}

impl Default for OneSite {
    fn default() -> Self {
        OneSite::new()
    }
}

impl OneSite {
    pub fn new() -> OneSite {
        OneSite {
            host: "api.test".into(),
            name: None,
            admin: false,
            listeners: String::new(),
            top: String::new(),
            site: String::new(),
            routes: String::new(),
            files: Vec::new(),
            alg: Alg::Ecdsa,
        }
    }

    /// The site's one host name (also the certificate's name).
    pub fn host(mut self, host: &str) -> OneSite {
        self.host = host.into();
        self
    }

    /// The site's `name`.
    pub fn name(mut self, name: &str) -> OneSite {
        self.name = Some(name.into());
        self
    }

    /// An admin listener on `127.0.0.1:0`.
    pub fn admin(mut self) -> OneSite {
        self.admin = true;
        self
    }

    /// A plain-HTTP listener on `127.0.0.1:0` too.
    pub fn http_listener(self) -> OneSite {
        self.listener("listen = \"127.0.0.1:0\"\nprotocol = \"http\"")
    }

    /// Another `[[listeners]]` table with the keys `toml`.
    pub fn listener(mut self, toml: &str) -> OneSite {
        self.listeners.push_str("[[listeners]]\n");
        self.listeners.push_str(toml);
        self.listeners.push('\n');
        self
    }

    /// Top-level TOML (tables such as `[timeouts]`), before the listeners.
    pub fn top(mut self, toml: &str) -> OneSite {
        self.top.push_str(toml);
        self.top.push('\n');
        self
    }

    /// Extra keys of the `[[sites]]` table.
    pub fn site(mut self, toml: &str) -> OneSite {
        self.site.push_str(toml);
        self.site.push('\n');
        self
    }

    /// One `[[sites.routes]]` table with the keys `toml`.
    pub fn route(mut self, toml: &str) -> OneSite {
        self.routes.push_str("[[sites.routes]]\n");
        self.routes.push_str(toml);
        self.routes.push('\n');
        self
    }

    /// A route to the plain-HTTP upstream at `addr`.
    pub fn upstream(self, addr: SocketAddr) -> OneSite {
        self.route(&format!("upstream = \"http://{addr}\""))
    }

    /// Route tables as written (`[[sites.routes]]` headers included).
    pub fn routes(mut self, toml: &str) -> OneSite {
        self.routes.push_str(toml);
        self.routes.push('\n');
        self
    }

    /// A file written next to the config before the proxy starts.
    pub fn file(mut self, name: &str, contents: &str) -> OneSite {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// The site certificate's key algorithm (ECDSA unless set).
    pub fn alg(mut self, alg: Alg) -> OneSite {
        self.alg = alg;
        self
    }

    /// The config text (certificate at `cert.pem` / `key.pem`). With no
    /// `top`, other listener, `name` or `site`, the routes start at line 9
    /// (tests of error messages count on it).
    pub fn toml(&self) -> String {
        let admin = if self.admin { "127.0.0.1:0" } else { "off" };
        let mut t = format!(
            "# one-site config (tests/common/proxy.rs OneSite)\n[admin]\nlisten = \"{admin}\"\n"
        );
        t.push_str(&self.top);
        t.push_str("[[listeners]]\nlisten = \"127.0.0.1:0\"\n");
        t.push_str(&self.listeners);
        t.push_str("[[sites]]\n");
        if let Some(n) = &self.name {
            t.push_str(&format!("name = \"{n}\"\n"));
        }
        t.push_str(&format!(
            "hosts = [\"{}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n",
            self.host
        ));
        t.push_str(&self.site);
        t.push_str(&self.routes);
        t
    }

    /// Writes the site certificate from `pki` and the files into `dir`.
    pub fn prepare(&self, pki: &Pki, dir: &Path) {
        pki.leaf(&[&self.host], self.alg).write(dir, "");
        for (name, contents) in &self.files {
            std::fs::write(dir.join(name), contents).unwrap();
        }
    }

    /// A fresh directory with the certificate, the files and `portcullis.toml`.
    pub fn dir(&self, pki: &Pki) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        self.prepare(pki, dir.path());
        std::fs::write(dir.path().join("portcullis.toml"), self.toml()).unwrap();
        dir
    }

    /// Starts the proxy in this process.
    pub async fn start(&self, pki: &Pki) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        self.prepare(pki, dir.path());
        Proxy::start_in(dir, &self.toml()).await
    }

    /// Starts the `portcullis` binary.
    pub fn start_bin(&self, pki: &Pki) -> BinProxy {
        let dir = tempfile::tempdir().unwrap();
        self.prepare(pki, dir.path());
        BinProxy::start_in(dir, &self.toml())
    }
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
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, toml).unwrap();
        BinProxy::spawn(dir, ["run".as_ref(), "--config".as_ref(), path.as_os_str()])
    }

    /// Starts the binary with `args` (any subcommand that serves HTTPS, e.g.
    /// `reverse-proxy`) in `dir`; returns once it logs its HTTPS address.
    pub fn spawn<I, S>(dir: tempfile::TempDir, args: I) -> BinProxy
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .current_dir(dir.path())
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
        let child = &mut self.child;
        crate::common::wait::eventually(limit, || {
            let exited = child.try_wait().unwrap().is_some();
            async move { exited }
        })
        .await;
        self.child.try_wait().unwrap()
    }

    /// How many stderr lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Awaits the `n`th log line containing `needle` (a log line is the
    /// event a child process gives); fails the test after `limit`.
    pub async fn wait_logged(&self, limit: Duration, needle: &str, n: usize) {
        let logged =
            crate::common::wait::eventually(limit, || async { self.log_count(needle) >= n }).await;
        assert!(
            logged,
            "no {needle:?} logged within {limit:?}:\n{}",
            self.log_text()
        );
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
