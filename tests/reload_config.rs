//! Config reload on a running proxy: a WebSocket and a slow streaming
//! download on an unchanged route live through 20 reloads that add and
//! remove a site and change another route; a broken config is refused
//! with its file:line error (in the `POST /reload` reply and `GET /certs`)
//! while traffic goes on; listeners are opened, closed and kept (a kept
//! one never refuses a connection); SIGHUP reloads the real binary.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use common::*;

/// Bound on every step, on a loaded 2-core machine.
const STEP: Duration = Duration::from_secs(20);
const RELOADS: usize = 20;

type Chunks = Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>;

/// An upstream with a WebSocket echo on `/ws`, a download on `/download`
/// that streams whatever the test pushes into `chunks` (and ends when the
/// sender is dropped), and `up` for anything else.
async fn app_upstream(chunks: Chunks) -> (SocketAddr, CancellationToken) {
    upstream(move |mut req: Request<Incoming>| {
        let chunks = chunks.clone();
        async move {
            if req.uri().path().starts_with("/download") {
                let Some(rx) = chunks.lock().unwrap().take() else {
                    return Response::new(full("no download prepared"));
                };
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
                });
                return Response::new(BodyExt::boxed(StreamBody::new(stream)));
            }
            if req.uri().path().starts_with("/ws") {
                if let Some(resp) = ws_echo(&mut req, 10_000) {
                    return resp;
                }
            }
            Response::new(full("up"))
        }
    })
    .await
}

/// The config of reload `k`: the `stable` site's `/ws` and `/download`
/// routes never change; its `/version` route answers `v{k}`, and the
/// `extra` site exists on odd `k` only.
fn config(up: SocketAddr, k: usize, extra_listeners: &str) -> String {
    let mut s = format!(
        r#"[admin]
listen = "127.0.0.1:0"
[[listeners]]
listen = "127.0.0.1:0"
{extra_listeners}
[[sites]]
name = "stable"
hosts = ["stable.test"]
tls = {{ cert = "cert.pem", key = "key.pem" }}
  [[sites.routes]]
  path = "/ws"
  upstream = "http://{up}"
  [[sites.routes]]
  path = "/download"
  upstream = "http://{up}"
  [[sites.routes]]
  path = "/version"
  respond = {{ status = 200, body = "v{k}" }}
  [[sites.routes]]
  upstream = "http://{up}"
"#
    );
    if k % 2 == 1 {
        s.push_str(&format!(
            r#"
[[sites]]
name = "extra"
hosts = ["extra.test"]
tls = {{ cert = "extra-cert.pem", key = "extra-key.pem" }}
  [[sites.routes]]
  respond = {{ status = 200, body = "extra {k}" }}
"#
        ));
    }
    s
}

/// Writes the config and asks the admin API to reload it.
async fn reload(dir: &Path, admin: SocketAddr, toml: &str) -> (u16, serde_json::Value) {
    std::fs::write(dir.join("portcullis.toml"), toml).unwrap();
    let (status, body) = tokio::time::timeout(STEP, admin_post(admin, "/reload"))
        .await
        .expect("reload answers in time");
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

/// GET on a fresh connection, bounded.
async fn fresh_get(addr: SocketAddr, host: &str, path: &str, pki: &Pki) -> Got {
    tokio::time::timeout(STEP, get(addr, host, path, pki.client_config(&[b"h2"])))
        .await
        .expect("answer in time")
}

/// Requests on fresh connections and on one keep-alive connection, back
/// to back until `stop`; returns (requests, failures).
fn background_traffic(
    addr: SocketAddr,
    pki: Arc<Pki>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let mut n = 0;
        let mut failures = Vec::new();
        let mut keep = h1_client(addr, "stable.test", &pki).await;
        for i in 0..1_000_000u64 {
            if stop.is_cancelled() {
                break;
            }
            let r = if i % 2 == 0 {
                let req = req_builder(b"http/1.1", "stable.test", "/")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match tokio::time::timeout(
                    STEP,
                    request(addr, "stable.test", pki.client_config(&[b"h2"]), req),
                )
                .await
                {
                    Ok(Ok(got)) => (got.status == 200 && got.body == "up")
                        .then_some(())
                        .ok_or(format!("fresh: {} {:?}", got.status, got.body)),
                    other => Err(format!("fresh: {other:?}")),
                }
            } else {
                let req = req_builder(b"http/1.1", "stable.test", "/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let r = tokio::time::timeout(STEP, async {
                    keep.ready().await?;
                    let resp = keep.send_request(req).await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>((status, body))
                })
                .await;
                match r {
                    Ok(Ok((s, b))) if s == 200 && b == "up" => Ok(()),
                    other => Err(format!("keep-alive: {other:?}")),
                }
            };
            n += 1;
            if let Err(e) = r {
                failures.push(e);
                if failures.len() > 20 {
                    break;
                }
            }
        }
        (n, failures)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_download_survive_20_reloads_and_a_broken_one_is_refused() {
    let pki = Arc::new(Pki::new());
    let (chunk_tx, chunk_rx) = mpsc::channel::<Bytes>(4);
    let chunks: Chunks = Arc::new(Mutex::new(Some(chunk_rx)));
    let (up, _up_stop) = app_upstream(chunks.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["stable.test"], Alg::Ecdsa).write(dir.path(), "");
    let extra = pki.leaf(&["extra.test"], Alg::Ecdsa);
    extra.write(dir.path(), "extra-");
    let (proxy, _certs) = start_with_certs(dir, &config(up, 0, "")).await;
    let admin = proxy.admin.unwrap();
    let dirp = proxy.dir.as_path().to_path_buf();

    // A WebSocket on /ws (HTTP/1.1 upgrade).
    let tls = stable_h1(proxy.https, &pki).await;
    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async("wss://stable.test/ws", tls),
    )
    .await
    .expect("WebSocket handshake in time")
    .expect("WebSocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    // A download on /download (HTTP/2) that the test feeds chunk by chunk.
    let req = req_builder(b"h2", "stable.test", "/download")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(
        STEP,
        send(proxy.https, "stable.test", pki.client_config(&[b"h2"]), req),
    )
    .await
    .expect("download starts in time")
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut download = resp.into_body();
    let mut downloaded = 0usize;
    let chunk = |k: usize| Bytes::from(format!("chunk {k:02} ").repeat(1000));

    let stop = CancellationToken::new();
    let traffic = background_traffic(proxy.https, pki.clone(), stop.clone());

    for k in 1..=RELOADS {
        let (status, body) = reload(&dirp, admin, &config(up, k, "")).await;
        assert_eq!(status, 200, "reload {k}: {body}");
        assert_eq!(body["ok"], true);

        // The reload took effect: the changed route and the site set.
        let got = fresh_get(proxy.https, "stable.test", "/version", &pki).await;
        assert_eq!(got.body, format!("v{k}"));
        let extra_conn = tokio::time::timeout(
            STEP,
            tls_connect(proxy.https, "extra.test", pki.client_config(&[b"h2"])),
        )
        .await
        .unwrap();
        if k % 2 == 1 {
            assert!(
                extra_conn.is_ok(),
                "reload {k}: extra.test added: {extra_conn:?}"
            );
            let got = fresh_get(proxy.https, "extra.test", "/", &pki).await;
            assert_eq!(got.body, format!("extra {k}"));
        } else {
            assert!(extra_conn.is_err(), "reload {k}: extra.test removed");
        }

        // The WebSocket is still open and echoes.
        let msg = format!("after reload {k}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let echo = tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap_or_else(|_| panic!("echo after reload {k} in time"));
        assert_eq!(echo.unwrap().unwrap(), Message::text(msg));

        // The download is still flowing.
        let want = chunk(k);
        chunk_tx.send(want.clone()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = tokio::time::timeout(STEP, download.frame())
                .await
                .unwrap_or_else(|_| panic!("download data after reload {k} in time"))
                .expect("download not ended")
                .expect("download not broken");
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, want, "download bytes after reload {k}");
        downloaded += got.len();
    }

    // A broken config is refused with file and line; nothing changes.
    let good = config(up, RELOADS, "");
    let broken = format!("{good}[[sites]]\nhosts = [\"broken.test\"]\ntls = \"internal\"\n  [[sites.routes]]\n  upstream = \"http//x\"\n");
    let line = broken.lines().count();
    let (status, body) = reload(&dirp, admin, &broken).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["ok"], false);
    let error = body["error"].as_str().unwrap().to_string();
    let path = dirp.join("portcullis.toml");
    let want = format!(
        "{}:{line}: sites[1].routes[0].upstream: \"http//x\" is not a URL",
        path.display()
    );
    assert!(error.contains(&want), "error {error:?} lacks {want:?}");
    let (_, certs) = admin_get(admin, "/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(
        certs["config_reload"]["last_error"],
        error.as_str(),
        "{certs}"
    );
    // The running config is untouched and traffic flows.
    assert_eq!(
        fresh_get(proxy.https, "stable.test", "/version", &pki)
            .await
            .body,
        format!("v{RELOADS}")
    );
    ws.send(Message::text("after the broken one"))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::text("after the broken one")
    );

    // Fixed again: the error clears.
    let (status, body) = reload(&dirp, admin, &good).await;
    assert_eq!(status, 200, "{body}");
    let (_, certs) = admin_get(admin, "/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(
        certs["config_reload"]["last_error"],
        serde_json::Value::Null,
        "{certs}"
    );
    assert_eq!(
        certs["config_reload"]["reloads"],
        RELOADS as u64 + 1,
        "{certs}"
    );

    // The download ends cleanly with every byte; the WebSocket closes cleanly.
    drop(chunk_tx);
    let rest = tokio::time::timeout(STEP, download.collect())
        .await
        .expect("download ends in time")
        .expect("download ends cleanly")
        .to_bytes();
    assert!(rest.is_empty());
    assert_eq!(
        downloaded,
        (1..=RELOADS).map(|k| chunk(k).len()).sum::<usize>()
    );
    ws.close(None).await.unwrap();

    stop.cancel();
    let (n, failures) = tokio::time::timeout(STEP, traffic).await.unwrap().unwrap();
    assert!(failures.is_empty(), "{n} requests, failures: {failures:#?}");
    assert!(
        n > RELOADS as u64,
        "traffic ran through the reloads ({n} requests)"
    );
    proxy.shutdown.cancel();
}

/// Bound TCP connection attempts to `addr` until `stop`; returns
/// (attempts, failures): a kept listener must refuse none.
fn connect_hammer(
    addr: SocketAddr,
    pki: Arc<Pki>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let attempts = AtomicU64::new(0);
        let mut failures = Vec::new();
        for _ in 0..1_000_000 {
            if stop.is_cancelled() {
                break;
            }
            attempts.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(STEP, get_status(addr, "stable.test", &pki)).await {
                Ok(Ok(200)) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
        (attempts.into_inner(), failures)
    })
}

async fn get_status(addr: SocketAddr, host: &str, pki: &Pki) -> Result<u16, String> {
    let req = req_builder(b"http/1.1", host, "/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    request(addr, host, pki.client_config(&[b"http/1.1"]), req)
        .await
        .map(|g| g.status)
        .map_err(|e| e.to_string())
}

/// Waits until a connection to `addr` is refused (the listener is closed
/// once its accept loop sees the stop; there is no event to await).
async fn refused_eventually(addr: SocketAddr) -> bool {
    eventually(Duration::from_secs(10), || async {
        matches!(
            TcpStream::connect(addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_removed_and_kept_across_reloads() {
    let pki = Arc::new(Pki::new());
    let (up, _up_stop) = app_upstream(Arc::new(Mutex::new(None))).await;
    let dir = tempfile::tempdir().unwrap();
    pki.leaf(&["stable.test"], Alg::Ecdsa).write(dir.path(), "");
    pki.leaf(&["extra.test"], Alg::Ecdsa)
        .write(dir.path(), "extra-");
    // The redirect listener must be named by its port in every config: a
    // reload matches listeners by their configured address, and one on :0
    // is re-opened, not reconfigured in place. So its port is picked by
    // binding :0 and releasing it; another process could take it in the
    // gap (the residual race), and then the proxy fails to bind and the
    // test picks another port, at most 5 times.
    let redirect_on = |port: u16, https_port: u16| {
        format!("[[listeners]]\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"http\"\nhttps_port = {https_port}\n")
    };
    let mut attempt = 0;
    let (proxy, redirect_port) = loop {
        let port = common::origin::unreserved_port();
        match Proxy::try_launch(
            dir.path(),
            &config(up, 0, &redirect_on(port, 8443)),
            |_, _| async {},
        )
        .await
        {
            Ok(p) => break (p, port),
            Err(e) if attempt < 5 => {
                attempt += 1;
                eprintln!("port {port} taken before the proxy bound it ({e}); another");
            }
            Err(e) => panic!("no free port for the redirect listener: {e}"),
        }
    };
    let redirect = |https_port: u16| redirect_on(redirect_port, https_port);
    let admin = proxy.admin.unwrap();
    let dirp = proxy.dir.clone();
    let kept = proxy.https;

    // A keep-alive connection opened before any reload.
    let mut before = h1_client(kept, "stable.test", &pki).await;
    assert_eq!(ask(&mut before).await, 200);

    let stop = CancellationToken::new();
    let hammer = connect_hammer(kept, pki.clone(), stop.clone());

    // Add a second HTTPS listener (also on port 0: a second socket).
    let added_listener = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n";
    let (status, body) = reload(
        &dirp,
        admin,
        &config(up, 0, &format!("{}{added_listener}", redirect(8443))),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let opened: Vec<SocketAddr> = body["report"]["opened"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(opened.len(), 1, "{body}");
    assert_eq!(body["report"]["closed"], serde_json::json!([]), "{body}");
    let added = opened[0];
    assert_ne!(added, kept);
    assert_eq!(get_status(added, "stable.test", &pki).await, Ok(200));
    assert_eq!(get_status(kept, "stable.test", &pki).await, Ok(200));
    assert_eq!(
        ask(&mut before).await,
        200,
        "connection from before the reload"
    );

    // The redirect listener changes its target port: same socket, new answer.
    let (status, body) = reload(
        &dirp,
        admin,
        &config(up, 0, &format!("{}{added_listener}", redirect(9443))),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["report"]["reconfigured"],
        serde_json::json!([format!("127.0.0.1:{redirect_port}")]),
        "{body}"
    );
    assert_eq!(body["report"]["opened"], serde_json::json!([]), "{body}");
    let location = plain_get_location(SocketAddr::from(([127, 0, 0, 1], redirect_port))).await;
    assert_eq!(location, "https://stable.test:9443/x");

    // Remove the added listener: it closes; the first one stays.
    let (status, body) = reload(&dirp, admin, &config(up, 0, &redirect(9443))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["report"]["closed"],
        serde_json::json!([added.to_string()]),
        "{body}"
    );
    assert!(
        refused_eventually(added).await,
        "removed listener {added} still accepts"
    );
    assert_eq!(get_status(kept, "stable.test", &pki).await, Ok(200));
    assert_eq!(
        ask(&mut before).await,
        200,
        "connection from before the reloads"
    );

    // A few more reloads that leave the listeners alone.
    for k in 1..=5 {
        let (status, body) = reload(&dirp, admin, &config(up, k, &redirect(9443))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["report"]["opened"], serde_json::json!([]));
        assert_eq!(body["report"]["closed"], serde_json::json!([]));
    }
    assert_eq!(ask(&mut before).await, 200);

    stop.cancel();
    let (attempts, failures) = tokio::time::timeout(STEP, hammer).await.unwrap().unwrap();
    assert!(
        failures.is_empty(),
        "{attempts} connections to the kept listener, failures: {failures:#?}"
    );
    assert!(attempts > 0);
    proxy.shutdown.cancel();
}

/// A TLS connection to the `stable` site offering HTTP/1.1.
async fn stable_h1(addr: SocketAddr, pki: &Pki) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_connect(addr, "stable.test", pki.client_config(&[b"http/1.1"]))
        .await
        .unwrap()
}

/// `GET /` on an open HTTP/1.1 connection: the status.
async fn ask(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> StatusCode {
    let req = req_builder(b"http/1.1", "stable.test", "/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    tokio::time::timeout(STEP, send.ready())
        .await
        .unwrap()
        .unwrap();
    let resp = tokio::time::timeout(STEP, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

/// `GET /x` over plain HTTP/1.1; the `Location` of the answer.
async fn plain_get_location(addr: SocketAddr) -> String {
    let req = Request::builder()
        .uri("/x")
        .header("host", "stable.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = plain_request(addr, req).await;
    assert_eq!(got.status, 308);
    got.headers[header::LOCATION].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let pki = Pki::new();
    let site = |body: &str| {
        OneSite::new()
            .host("stable.test")
            .route(&format!("respond = {{ status = 200, body = \"{body}\" }}"))
    };
    let proxy = site("v1").start_bin(&pki);
    let path = proxy.dir.path().join("portcullis.toml");
    let body = |p: &BinProxy| {
        let addr = p.https;
        let cfg = pki.client_config(&[b"h2"]);
        async move {
            tokio::time::timeout(STEP, get(addr, "stable.test", "/", cfg))
                .await
                .unwrap()
                .body
        }
    };
    assert_eq!(body(&proxy).await, "v1");

    // A keep-alive connection from before the reloads.
    let tls = stable_h1(proxy.https, &pki).await;
    let (mut before, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);

    std::fs::write(&path, site("v2").toml()).unwrap();
    proxy.signal("HUP");
    // The log line is the event: the process says when it has reloaded.
    proxy.wait_logged(STEP, "configuration reloaded", 1).await;
    assert_eq!(
        proxy.log_count("configuration reloaded"),
        1,
        "{}",
        proxy.log_text()
    );
    assert_eq!(body(&proxy).await, "v2");

    // A broken config: refused with file and line, v2 keeps serving.
    let broken = site("v3")
        .toml()
        .replace("respond = {", "respond = { bogus = 1, ");
    let line = broken.lines().position(|l| l.contains("bogus")).unwrap() + 1;
    std::fs::write(&path, &broken).unwrap();
    proxy.signal("HUP");
    proxy
        .wait_logged(STEP, "configuration reload refused", 1)
        .await;
    assert_eq!(
        proxy.log_count("configuration reload refused"),
        1,
        "{}",
        proxy.log_text()
    );
    let refusal = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("configuration reload refused"))
        .cloned()
        .unwrap();
    let want = format!("{}:{line}:", path.display());
    assert!(refusal.contains(&want), "{refusal:?} lacks {want:?}");
    assert_eq!(body(&proxy).await, "v2");

    let req = req_builder(b"http/1.1", "stable.test", "/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    before.ready().await.unwrap();
    let resp = tokio::time::timeout(STEP, before.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "v2");
}
