//! A bad replacement on disk never replaces a good certificate: truncated
//! PEM, garbage, an empty file, a key that does not match, an expired
//! certificate, one that does not cover the host, a deleted file, a file
//! that cannot be read. Each keeps the old certificate serving (checked
//! with a fresh handshake) and reports the reason in `GET /certs` and once
//! in the log; a good pair then goes into service and clears the error. A
//! certificate written before its key converges without ever serving a
//! mismatched pair.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use portcullis::certstore::{CertEvent, CertStore};
use tokio::sync::broadcast::Receiver;
use tokio_util::sync::CancellationToken;

use common::*;

/// Bound on anything that should happen, on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(20);

// ---- the log, captured for the whole test binary ----

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .with_env_filter("portcullis=info")
            .init();
    });
}

/// Log lines that mention `site` and contain `needle`.
fn log_lines(site: &str, needle: &str) -> Vec<String> {
    let log = LOG.lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| l.contains(&format!("site={site} ")) && l.contains(needle))
        .map(str::to_string)
        .collect()
}

// ---- one proxy with one file certificate ----

struct Fixture {
    name: &'static str,
    host: String,
    pki: Pki,
    proxy: Proxy,
    certs: Arc<CertStore>,
    events: Receiver<CertEvent>,
    good: Leaf,
    cert: PathBuf,
    key: PathBuf,
}

async fn fixture(name: &'static str) -> Fixture {
    capture_log();
    let pki = Pki::new();
    let host = format!("{name}.test");
    let dir = tempfile::tempdir().unwrap();
    let good = pki.leaf(&[&host], Alg::Ecdsa);
    let (cert, key) = good.write(dir.path(), "");
    let toml = OneSite::new()
        .admin()
        .name(name)
        .host(&host)
        .route("respond = { status = 200, body = \"ok\" }")
        .toml();
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    let events = certs.subscribe();
    Fixture {
        name,
        host,
        pki,
        proxy,
        certs,
        events,
        good,
        cert,
        key,
    }
}

impl Fixture {
    /// `serial` is published for this site, and the next handshake gets it.
    async fn expect_served(&mut self, serial: &str) {
        wait_published(&mut self.events, self.name, serial, LIMIT)
            .await
            .unwrap();
        assert_eq!(
            served_serial(self.proxy.https, &self.host, &self.pki).await,
            serial
        );
    }

    /// The replacement is refused with `error` and the good certificate
    /// keeps serving; then the good pair written back is published again.
    async fn keeps_last_good(&mut self, error: &str) {
        self.expect_rejected(error).await;
        self.expect_recovery().await;
    }

    /// A leaf for `names` with the good key (so only the certificate file
    /// changes), valid from `from_days` to `to_days` days from now.
    fn same_key_leaf(&self, names: &[&str], from_days: i64, to_days: i64) -> Leaf {
        let now = time::OffsetDateTime::now_utc();
        self.pki.leaf_with_key(
            names,
            &self.good.key_pem,
            now + time::Duration::days(from_days),
            now + time::Duration::days(to_days),
        )
    }

    /// This site's entry in `GET /certs`.
    async fn inventory(&self) -> serde_json::Value {
        cert_report(self.proxy.admin(), self.name).await
    }

    /// Waits for the rejection whose reason contains `needle`, then checks
    /// the good certificate still serves and the reason is in `GET /certs`
    /// and logged exactly once (even after a reload re-reads the files).
    async fn expect_rejected(&mut self, needle: &str) {
        let name = self.name;
        let ev = wait_cert_event(&mut self.events, LIMIT, |e| {
            matches!(e, CertEvent::Rejected { name: n, error } if n == name && error.contains(needle))
        })
        .await;
        let CertEvent::Rejected { error, .. } = ev else {
            unreachable!()
        };

        assert_eq!(
            served_serial(self.proxy.https, &self.host, &self.pki).await,
            self.good.serial,
            "the previous certificate keeps serving"
        );
        let got = get(
            self.proxy.https,
            &self.host,
            "/",
            self.pki.client_config(&[b"h2"]),
        )
        .await;
        assert_eq!(got.status, 200);

        let inv = self.inventory().await;
        assert_eq!(inv["serial"], self.good.serial.as_str(), "{inv}");
        assert_eq!(inv["last_result"], "error", "{inv}");
        let last_error = inv["last_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no last_error: {inv}"));
        assert!(
            last_error.contains(needle),
            "last_error {last_error:?} lacks {needle:?}"
        );
        assert_eq!(last_error, error);

        // A reload (which re-reads every file) changes nothing and logs nothing new.
        let (status, body) = admin_post(self.proxy.admin.unwrap(), "/reload").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            served_serial(self.proxy.https, &self.host, &self.pki).await,
            self.good.serial
        );
        let logged = log_lines(self.name, "keeping previous certificate");
        let logged: Vec<_> = logged.iter().filter(|l| l.contains(&error)).collect();
        assert_eq!(logged.len(), 1, "logged once: {logged:#?}");
        assert!(logged[0].contains("WARN"), "{}", logged[0]);
    }

    /// A good pair written after the failure goes into service and clears it.
    async fn expect_recovery(&mut self) {
        let next = self.pki.leaf(&[&self.host], Alg::Ecdsa);
        replace_file(&self.key, &next.key_pem);
        replace_file(&self.cert, &next.chain_pem);
        self.expect_served(&next.serial).await;
        let inv = self.inventory().await;
        assert_eq!(inv["last_result"], "ok", "{inv}");
        assert_eq!(inv["last_error"], serde_json::Value::Null, "{inv}");
        assert_eq!(inv["serial"], next.serial.as_str());
        assert_eq!(
            self.certs.slot(self.name).unwrap().status().last_error,
            None
        );
    }
}

#[tokio::test]
async fn reload_keeps_last_good_on_truncated_pem() {
    let mut f = fixture("truncated").await;
    let next = f.pki.leaf(&[&f.host], Alg::Ecdsa);
    // A third of the leaf: the END line never comes.
    replace_file(&f.cert, &next.chain_pem[..next.chain_pem.len() / 6]);
    f.keeps_last_good("damaged or truncated").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_truncated_key() {
    let mut f = fixture("truncatedkey").await;
    let key = f.good.key_pem.clone();
    replace_file(&f.key, &key[..key.len() / 2]);
    f.keeps_last_good("damaged or truncated").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_garbage() {
    let mut f = fixture("garbage").await;
    replace_file(
        &f.cert,
        "this is not a certificate\n\u{1}\u{2}\u{3} ~~~ 0xdeadbeef\n",
    );
    f.keeps_last_good("no \"-----BEGIN CERTIFICATE-----\" block found")
        .await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_garbage_inside_pem_markers() {
    let mut f = fixture("garbagepem").await;
    replace_file(
        &f.cert,
        "-----BEGIN CERTIFICATE-----\nnot*base64*at*all!!\n-----END CERTIFICATE-----\n",
    );
    f.keeps_last_good("damaged or truncated").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_empty_file() {
    let mut f = fixture("empty").await;
    // In place, as `> cert.pem` does.
    std::fs::File::create(&f.cert).unwrap();
    f.keeps_last_good("the file is empty").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_key_that_does_not_match() {
    let mut f = fixture("mismatch").await;
    let other = f.pki.leaf(&[&f.host], Alg::Ecdsa);
    replace_file(&f.key, &other.key_pem);
    f.keeps_last_good("does not match the certificate").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_expired_certificate() {
    let mut f = fixture("expired").await;
    // Same key, so only the certificate file changes.
    let expired = f.same_key_leaf(&[&f.host], -90, -1);
    replace_file(&f.cert, &expired.chain_pem);
    f.keeps_last_good("the certificate expired at").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_certificate_not_covering_the_host() {
    let mut f = fixture("notcovering").await;
    let other = f.same_key_leaf(&["elsewhere.test"], -1, 30);
    replace_file(&f.cert, &other.chain_pem);
    f.keeps_last_good("does not cover \"notcovering.test\"")
        .await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_deleted_file() {
    let mut f = fixture("deleted").await;
    std::fs::remove_file(&f.cert).unwrap();
    f.keeps_last_good("file not found").await;
}

#[tokio::test]
async fn reload_keeps_last_good_on_deleted_key() {
    let mut f = fixture("deletedkey").await;
    std::fs::remove_file(&f.key).unwrap();
    f.keeps_last_good("file not found").await;
}

/// Whether this process can read a file whose mode is 000 (root, or
/// CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH).
fn reads_unreadable_files() -> bool {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe");
    std::fs::write(&p, "x").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::read(&p).is_ok()
}

#[tokio::test]
async fn reload_keeps_last_good_on_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let mut f = fixture("denied").await;
    if !reads_unreadable_files() {
        // The real thing: the operator's tool wrote the key 0000.
        std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(0o000)).unwrap();
    } else {
        // Running as root, a 0000 mode denies nothing. A sysctl file that
        // is write-only denies reads even to root (the kernel checks its
        // mode itself), so point the key there: the open fails with
        // EACCES, the same error an unreadable file gives.
        let denied = ["/proc/sys/vm/drop_caches", "/proc/sys/vm/compact_memory"]
            .into_iter()
            .find(|p| {
                std::fs::read(p).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
            });
        let Some(denied) = denied else {
            // Nothing this process is denied to read: the rejection cannot
            // be provoked here. Everything else about the site is checked.
            eprintln!("SKIPPED permission-denied sub-assertion: this process can read every file");
            return;
        };
        let tmp = f.key.with_extension("link");
        std::os::unix::fs::symlink(denied, &tmp).unwrap();
        std::fs::rename(&tmp, &f.key).unwrap();
    }
    f.keeps_last_good("permission denied").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_written_before_its_key_converges_without_a_mismatched_pair() {
    let mut f = fixture("certfirst").await;
    let next = f.pki.leaf(&[&f.host], Alg::Ecdsa);

    // Full handshakes all along, each verified by the client: a mismatched
    // pair would fail the handshake (the signature would not verify).
    let stop = CancellationToken::new();
    let handshakes = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (addr, host, stop, n) = (
            f.proxy.https,
            f.host.clone(),
            stop.clone(),
            handshakes.clone(),
        );
        let cfg = full_handshake_config(&f.pki, &[]);
        let allowed = [f.good.serial.clone(), next.serial.clone()];
        tokio::spawn(async move {
            let mut bad = Vec::new();
            for _ in 0..100_000 {
                if stop.is_cancelled() {
                    break;
                }
                match tokio::time::timeout(LIMIT, tls_connect(addr, &host, cfg.clone())).await {
                    Ok(Ok(tls)) => {
                        let s = serial_of(&peer_leaf(&tls));
                        if !allowed.contains(&s) {
                            bad.push(format!("unexpected serial {s}"));
                        }
                    }
                    other => bad.push(format!("handshake failed: {other:?}")),
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
            bad
        })
    };

    replace_file(&f.cert, &next.chain_pem);
    // Seen, refused (the old key does not match), old pair still served.
    f.expect_rejected("does not match the certificate").await;
    let before = handshakes.load(Ordering::Relaxed);
    assert!(
        eventually(LIMIT, || async {
            handshakes.load(Ordering::Relaxed) > before + 5
        })
        .await,
        "handshakes keep going while the key is missing"
    );
    assert_eq!(
        served_serial(f.proxy.https, &f.host, &f.pki).await,
        f.good.serial
    );

    replace_file(&f.key, &next.key_pem);
    f.expect_served(&next.serial).await;
    assert_eq!(f.inventory().await["last_error"], serde_json::Value::Null);

    stop.cancel();
    let bad = tokio::time::timeout(LIMIT, watcher).await.unwrap().unwrap();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(handshakes.load(Ordering::Relaxed) > 10);
}

#[tokio::test]
async fn key_written_before_its_certificate_converges_too() {
    let mut f = fixture("keyfirst").await;
    let next = f.pki.leaf(&[&f.host], Alg::Ecdsa);
    replace_file(&f.key, &next.key_pem);
    f.expect_rejected("does not match the certificate").await;
    replace_file(&f.cert, &next.chain_pem);
    f.expect_served(&next.serial).await;
}
