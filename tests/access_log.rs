//! The access log: lines in each format (json, common, combined) with the
//! right status and byte count, every line in the file once the server has
//! stopped, a reload that changes the file and format, the file reopened
//! on SIGUSR1 after a logrotate-style rename (the real binary), and config
//! errors that name the file, line and key.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use common::*;

/// Bound on every step, on a loaded 2-core machine.
const STEP: Duration = Duration::from_secs(20);

/// One site with a 200 route answering `hello` (5 bytes) on `/`, and a 404
/// for everything under `/missing` (an unrouted path).
fn config(top: &str) -> String {
    format!(
        r#"{top}
[admin]
listen = "127.0.0.1:0"
[[listeners]]
listen = "127.0.0.1:0"
[[sites]]
hosts = ["log.test"]
tls = {{ cert = "cert.pem", key = "key.pem" }}
  [[sites.routes]]
  path = "/hello"
  respond = {{ status = 200, body = "hello" }}
"#
    )
}

fn dir_with_cert(pki: &Pki) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["log.test"], Alg::Ecdsa).write(dir.path(), "");
    dir
}

/// `GET path` with a Referer and a User-Agent over `alpn`; the status.
async fn get_with_headers(
    proxy_addr: std::net::SocketAddr,
    pki: &Pki,
    alpn: &[u8],
    path: &str,
) -> u16 {
    let req = req_builder(alpn, "log.test", path)
        .header("referer", "https://ref.test/page")
        .header("user-agent", "tester/1.0 \"quoted\"")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = tokio::time::timeout(
        STEP,
        request(proxy_addr, "log.test", pki.client_config(&[alpn]), req),
    )
    .await
    .unwrap()
    .unwrap();
    got.status
}

/// Stops the proxy and waits for `Server::run` to return.
async fn stop(mut proxy: Proxy) -> tempfile::TempDir {
    let dir = proxy.take_tmp();
    proxy.shutdown.cancel();
    tokio::time::timeout(STEP, proxy.done)
        .await
        .expect("run returns")
        .unwrap()
        .unwrap();
    dir
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs one request per protocol (a 200 and a 404) with the log in
/// `format`; the file's lines once the server has stopped.
async fn two_requests_logged(format: &str) -> Vec<String> {
    let pki = Pki::new();
    let dir = dir_with_cert(&pki);
    let top = format!("access_log = \"logs/access.log\"\naccess_log_format = \"{format}\"");
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let proxy = Proxy::start_in(dir, &config(&top)).await;
    assert_eq!(
        get_with_headers(proxy.https, &pki, b"http/1.1", "/hello?x=1").await,
        200
    );
    assert_eq!(
        get_with_headers(proxy.https, &pki, b"h2", "/missing").await,
        404
    );
    let dir = stop(proxy).await;
    lines(&dir.path().join("logs/access.log"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_status_bytes_and_request_facts() {
    let lines = two_requests_logged("json").await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let v: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(v[0]["status"], 200);
    assert_eq!(v[0]["bytes"], 5);
    assert_eq!(v[0]["method"], "GET");
    assert_eq!(v[0]["path"], "/hello");
    assert_eq!(v[0]["query"], "x=1");
    assert_eq!(v[0]["proto"], "HTTP/1.1");
    assert_eq!(v[0]["host"], "log.test");
    assert_eq!(v[0]["sni"], "log.test");
    assert_eq!(v[0]["client"], "127.0.0.1");
    assert!(v[0]["upstream"].is_null());
    assert!(v[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(v[0]["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v[1]["status"], 404);
    assert_eq!(v[1]["proto"], "HTTP/2.0");
    assert_eq!(v[1]["path"], "/missing");
    assert_eq!(v[1]["bytes"], "not found\n".len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_lines_are_nginx_clf() {
    let lines = two_requests_logged("common").await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
    assert!(
        lines[0].ends_with(" +0000] \"GET /hello?x=1 HTTP/1.1\" 200 5"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with(" +0000] \"GET /missing HTTP/2.0\" 404 10"),
        "{}",
        lines[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_add_referer_and_user_agent() {
    let lines = two_requests_logged("combined").await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].ends_with(
            "\"GET /hello?x=1 HTTP/1.1\" 200 5 \"https://ref.test/page\" \"tester/1.0 \\x22quoted\\x22\""
        ),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with("\"GET /missing HTTP/2.0\" 404 10 \"https://ref.test/page\" \"tester/1.0 \\x22quoted\\x22\""),
        "{}",
        lines[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_in_the_file_once_the_server_has_stopped() {
    let pki = Pki::new();
    let dir = dir_with_cert(&pki);
    let proxy = Proxy::start_in(dir, &config("access_log = \"access.log\"")).await;
    const N: usize = 300;
    let cfg = pki.client_config(&[b"h2"]);
    let tls = tls_connect(proxy.https, "log.test", cfg).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("https://log.test/hello/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(STEP, t).await.unwrap().unwrap();
    }
    let dir = stop(proxy).await;
    let lines = lines(&dir.path().join("access.log"));
    assert_eq!(lines.len(), N);
    for i in 0..N {
        let needle = format!("\"GET /hello/{i} HTTP/2.0\" 200 5 ");
        assert_eq!(
            lines.iter().filter(|l| l.contains(&needle)).count(),
            1,
            "{needle}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_the_log_to_a_new_file_and_format() {
    let pki = Pki::new();
    let dir = dir_with_cert(&pki);
    let proxy = Proxy::start_in(
        dir,
        &config("access_log = \"a.log\"\naccess_log_format = \"common\""),
    )
    .await;
    assert_eq!(
        get_with_headers(proxy.https, &pki, b"http/1.1", "/hello/a").await,
        200
    );
    proxy.write(
        "portcullis.toml",
        &config("access_log = \"b.log\"\naccess_log_format = \"json\""),
    );
    let (status, body) = admin_post(proxy.admin.unwrap(), "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        get_with_headers(proxy.https, &pki, b"http/1.1", "/hello/b").await,
        200
    );
    // Off: nothing more is written anywhere.
    proxy.write("portcullis.toml", &config("access_log = \"off\""));
    let (status, body) = admin_post(proxy.admin.unwrap(), "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        get_with_headers(proxy.https, &pki, b"http/1.1", "/hello/c").await,
        200
    );
    let dir = stop(proxy).await;
    let a = lines(&dir.path().join("a.log"));
    let b = lines(&dir.path().join("b.log"));
    assert_eq!(a.len(), 1, "{a:#?}");
    assert!(a[0].contains("\"GET /hello/a HTTP/1.1\" 200 5"), "{}", a[0]);
    assert_eq!(b.len(), 1, "{b:#?}");
    let v: serde_json::Value = serde_json::from_str(&b[0]).unwrap();
    assert_eq!(v["path"], "/hello/b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_a_rename() {
    let pki = Pki::new();
    let dir = dir_with_cert(&pki);
    let toml = config("access_log = \"access.log\"").replace("127.0.0.1:0\"\n[[l", "off\"\n[[l");
    let proxy = BinProxy::start_in(dir, &toml);
    let path = proxy.dir.path().join("access.log");
    let rotated = proxy.dir.path().join("access.log.1");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    assert_eq!(
        get_with_headers(proxy.https, &pki, b"http/1.1", "/hello/first").await,
        200
    );
    assert!(
        eventually(STEP, || async { read(&path).contains("/hello/first") }).await,
        "first line never written; stderr:\n{}",
        proxy.log_text()
    );
    std::fs::rename(&path, &rotated).unwrap();
    proxy.signal("USR1");
    // The process says when the new file is open.
    assert!(
        eventually(STEP, || async {
            proxy.log_text().contains("access log reopened")
        })
        .await,
        "no reopen logged:\n{}",
        proxy.log_text()
    );
    assert_eq!(
        get_with_headers(proxy.https, &pki, b"http/1.1", "/hello/second").await,
        200
    );
    assert!(
        eventually(STEP, || async { read(&path).contains("/hello/second") }).await,
        "second line not in a new file at {}; stderr:\n{}",
        path.display(),
        proxy.log_text()
    );
    let old = read(&rotated);
    let new = read(&path);
    assert_eq!(old.lines().count(), 1, "{old}");
    assert!(old.contains("/hello/first"), "{old}");
    assert_eq!(new.lines().count(), 1, "{new}");
    // Still alive: SIGUSR1 did not kill it.
    let mut proxy = proxy;
    assert!(proxy.child.try_wait().unwrap().is_none());
    proxy.signal("TERM");
    assert!(proxy.wait_exit(STEP).await.is_some_and(|s| s.success()));
}

#[test]
fn bad_values_name_the_file_line_and_key() {
    let text = "state_dir = \"s\"\naccess_log = \"\"\naccess_log_format = \"xml\"\n";
    let err = portcullis::config::Config::parse(Path::new("p.toml"), text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("p.toml:2: access_log: is empty; give a file path"),
        "{err}"
    );
    assert!(
        err.contains(
            "p.toml:3: access_log_format: \"xml\" is not a format; use \"json\", \"common\" or \"combined\""
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unopenable_file_stops_the_start_with_its_line() {
    let pki = Pki::new();
    let dir = dir_with_cert(&pki);
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config("access_log = \"no/such/dir/access.log\"")).unwrap();
    let cfg = portcullis::config::Config::load(&path).unwrap();
    let err = match portcullis::Server::bind(cfg, Default::default()).await {
        Ok(_) => panic!("started with an unopenable access log"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("{}:1: access_log: cannot open", path.display())),
        "{err}"
    );
    assert!(err.contains("no/such/dir/access.log"), "{err}");
}
