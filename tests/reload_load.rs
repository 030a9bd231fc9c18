//! Certificates replaced on disk while the proxy is under load: every
//! write pattern (in place, temp + rename, certbot symlinks, Kubernetes
//! `..data` swap, delete + recreate), 50+ swaps, 40+ concurrent clients
//! mixing HTTP/1.1 keep-alive, HTTP/2 streams on shared connections, a new
//! handshake per request and resumed sessions. Nothing may fail, and a
//! full handshake that starts after a swap was announced must present the
//! new certificate.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::HandshakeKind;
use tokio_util::sync::CancellationToken;

use common::*;

/// Replacements of each pattern's certificate.
const ROUNDS: usize = 12;
/// Bound on each client loop (they are stopped by the test long before).
const MAX_ROUNDS: usize = 1_000_000;
/// Bound on one request, one handshake, or one swap being announced, on a
/// loaded 2-core machine.
const STEP: Duration = Duration::from_secs(20);
/// Bound on the whole test.
const TOTAL: Duration = Duration::from_secs(240);

const KEEPALIVE_H1: usize = 12;
const H2_CONNS: usize = 4;
const H2_STREAMS: usize = 4;
const HANDSHAKE_PER_REQUEST: usize = 12;
const RESUMING: usize = 2;

/// One site per write pattern: what has been announced as published.
struct Site {
    name: String,
    host: String,
    /// Serial -> generation (0 = the one loaded at start). Filled before
    /// the files are written, so every serial a client can see is known.
    generations: Mutex<HashMap<String, usize>>,
    /// The newest generation whose `Published` event the swapper has seen.
    announced: AtomicUsize,
}

impl Site {
    fn generation(&self, serial: &str) -> Option<usize> {
        self.generations.lock().unwrap().get(serial).copied()
    }
}

#[derive(Default)]
struct Stats {
    h1_requests: AtomicU64,
    h2_requests: AtomicU64,
    handshakes_checked: AtomicU64,
    handshakes_after_swap: AtomicU64,
    resumed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 50 {
            f.push(what);
        }
    }
}

/// GET `/` on an open connection; Ok(()) on 200 "ok".
async fn get_ok<B>(send: &mut B, alpn: &[u8], host: &str) -> Result<(), String>
where
    B: Sender,
{
    let req = req_builder(alpn, host, "/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(STEP, send.send(req))
        .await
        .map_err(|_| "request timed out".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = tokio::time::timeout(STEP, resp.into_body().collect())
        .await
        .map_err(|_| "body timed out".to_string())?
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != 200 || body.as_ref() != b"ok" {
        return Err(format!("status {status}, body {body:?}"));
    }
    Ok(())
}

/// An HTTP/1.1 or HTTP/2 request sender.
trait Sender {
    fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> impl std::future::Future<Output = hyper::Result<Response<Incoming>>> + Send;
}

impl Sender for hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    async fn send(&mut self, req: Request<Empty<Bytes>>) -> hyper::Result<Response<Incoming>> {
        self.ready().await?;
        self.send_request(req).await
    }
}

impl Sender for hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    async fn send(&mut self, req: Request<Empty<Bytes>>) -> hyper::Result<Response<Incoming>> {
        self.ready().await?;
        self.send_request(req).await
    }
}

/// A TLS connection for `site` offering `alpn` (None, recorded as a
/// failure, when it does not come up within [`STEP`]).
async fn connect(
    addr: std::net::SocketAddr,
    site: &Site,
    pki: &Pki,
    alpn: &[u8],
    stats: &Stats,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let alpn_name = String::from_utf8_lossy(alpn).into_owned();
    match tokio::time::timeout(
        STEP,
        tls_connect(addr, &site.host, pki.client_config(&[alpn])),
    )
    .await
    {
        Ok(Ok(t)) => Some(t),
        other => {
            stats.fail(format!("{alpn_name} connect to {}: {other:?}", site.host));
            None
        }
    }
}

/// One keep-alive HTTP/1.1 connection, requests back to back until `stop`.
async fn keepalive_h1(
    addr: std::net::SocketAddr,
    site: Arc<Site>,
    pki: Arc<Pki>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let Some(tls) = connect(addr, &site, &pki, b"http/1.1", &stats).await else {
        return;
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..MAX_ROUNDS {
        if stop.is_cancelled() {
            break;
        }
        match get_ok(&mut send, b"http/1.1", &site.host).await {
            Ok(()) => stats.h1_requests.fetch_add(1, Ordering::Relaxed),
            Err(e) => return stats.fail(format!("h1 keep-alive {}: {e}", site.host)),
        };
    }
}

/// One HTTP/2 connection shared by `H2_STREAMS` tasks sending concurrently.
async fn shared_h2(
    addr: std::net::SocketAddr,
    site: Arc<Site>,
    pki: Arc<Pki>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let Some(tls) = connect(addr, &site, &pki, b"h2", &stats).await else {
        return;
    };
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut streams = Vec::new();
    for _ in 0..H2_STREAMS {
        let (mut send, site, stats, stop) =
            (send.clone(), site.clone(), stats.clone(), stop.clone());
        streams.push(tokio::spawn(async move {
            for _ in 0..MAX_ROUNDS {
                if stop.is_cancelled() {
                    break;
                }
                match get_ok(&mut send, b"h2", &site.host).await {
                    Ok(()) => stats.h2_requests.fetch_add(1, Ordering::Relaxed),
                    Err(e) => return stats.fail(format!("h2 stream {}: {e}", site.host)),
                };
            }
        }));
    }
    for s in streams {
        s.await.unwrap();
    }
}

/// A full handshake per request (ALPN alternating h2 / http/1.1): the
/// served certificate must be at least as new as the last one announced
/// before the handshake started.
async fn handshake_per_request(
    addr: std::net::SocketAddr,
    sites: Arc<Vec<Arc<Site>>>,
    first: usize,
    pki: Arc<Pki>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let configs = [
        full_handshake_config(&pki, &[b"h2"]),
        full_handshake_config(&pki, &[b"http/1.1"]),
    ];
    let mut i = first;
    for _ in 0..MAX_ROUNDS {
        if stop.is_cancelled() {
            break;
        }
        i += 1;
        let site = &sites[i % sites.len()];
        let alpn: &[u8] = if i % 2 == 0 { b"h2" } else { b"http/1.1" };
        let announced = site.announced.load(Ordering::SeqCst);
        let tls =
            match tokio::time::timeout(STEP, tls_connect(addr, &site.host, configs[i % 2].clone()))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return stats.fail(format!("handshake {}: {e}", site.host)),
                Err(_) => return stats.fail(format!("handshake {} timed out", site.host)),
            };
        let serial = serial_of(&peer_leaf(&tls));
        match site.generation(&serial) {
            Some(g) if g >= announced => {}
            other => {
                return stats.fail(format!(
                    "{}: handshake started after generation {announced} was announced got {serial} (generation {other:?})",
                    site.host
                ))
            }
        }
        stats.handshakes_checked.fetch_add(1, Ordering::Relaxed);
        if announced > 0 {
            stats.handshakes_after_swap.fetch_add(1, Ordering::Relaxed);
        }
        let io = TokioIo::new(tls);
        let r = if alpn == b"h2" {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            get_ok(&mut send, alpn, &site.host).await
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            get_ok(&mut send, alpn, &site.host).await
        };
        if let Err(e) = r {
            return stats.fail(format!("request after handshake {}: {e}", site.host));
        }
    }
}

/// New connections that resume their session when they can (tickets must
/// keep working across swaps); only success is checked, since a resumed
/// session carries the certificate it was first made with.
async fn resuming(
    addr: std::net::SocketAddr,
    site: Arc<Site>,
    pki: Arc<Pki>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let cfg = pki.client_config(&[b"http/1.1"]);
    for _ in 0..MAX_ROUNDS {
        if stop.is_cancelled() {
            break;
        }
        let tls = match tokio::time::timeout(STEP, tls_connect(addr, &site.host, cfg.clone())).await
        {
            Ok(Ok(t)) => t,
            other => return stats.fail(format!("resuming handshake {}: {other:?}", site.host)),
        };
        if tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
            stats.resumed.fetch_add(1, Ordering::Relaxed);
        }
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        if let Err(e) = get_ok(&mut send, b"http/1.1", &site.host).await {
            return stats.fail(format!("resumed request {}: {e}", site.host));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_swap_under_load_in_every_write_pattern_with_no_failure() {
    let started = Instant::now();
    let pki = Arc::new(Pki::new());
    let (up, _up_stop) =
        upstream(|_req: Request<Incoming>| async { Response::new(full("ok")) }).await;
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut sites = Vec::new();
    let mut toml =
        String::from("[admin]\nlisten = \"off\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n");
    for (i, pattern) in WritePattern::ALL.into_iter().enumerate() {
        let name = format!("p{i}");
        let host = format!("{name}.test");
        let leaf = pki.leaf(&[&host], Alg::Ecdsa);
        let f = CertFiles::create(&dir.path().join(&name), pattern, &leaf);
        toml.push_str(&format!(
            "[[sites]]\nname = \"{name}\"\nhosts = [\"{host}\"]\ntls = {{ cert = {:?}, key = {:?} }}\n  [[sites.routes]]\n  upstream = \"http://{up}\"\n",
            f.cert_path(),
            f.key_path()
        ));
        files.push(f);
        sites.push(Arc::new(Site {
            name,
            host,
            generations: Mutex::new(HashMap::from([(leaf.serial.clone(), 0)])),
            announced: AtomicUsize::new(0),
        }));
    }
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    let mut events = certs.subscribe();
    let addr = proxy.https;
    let sites = Arc::new(sites);
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();

    let mut clients = Vec::new();
    for i in 0..KEEPALIVE_H1 {
        let site = sites[i % sites.len()].clone();
        clients.push(tokio::spawn(keepalive_h1(
            addr,
            site,
            pki.clone(),
            stats.clone(),
            stop.clone(),
        )));
    }
    for i in 0..H2_CONNS {
        let site = sites[(i + 2) % sites.len()].clone();
        clients.push(tokio::spawn(shared_h2(
            addr,
            site,
            pki.clone(),
            stats.clone(),
            stop.clone(),
        )));
    }
    for i in 0..HANDSHAKE_PER_REQUEST {
        clients.push(tokio::spawn(handshake_per_request(
            addr,
            sites.clone(),
            i,
            pki.clone(),
            stats.clone(),
            stop.clone(),
        )));
    }
    for i in 0..RESUMING {
        let site = sites[(i + 1) % sites.len()].clone();
        clients.push(tokio::spawn(resuming(
            addr,
            site,
            pki.clone(),
            stats.clone(),
            stop.clone(),
        )));
    }
    let concurrent = KEEPALIVE_H1 + H2_CONNS * H2_STREAMS + HANDSHAKE_PER_REQUEST + RESUMING;
    assert!(concurrent >= 32);

    // The swaps: every pattern in turn, each awaited on its Published event.
    let mut swaps: HashMap<WritePattern, usize> = HashMap::new();
    let mut rejected_on_the_way = Vec::new();
    let mut swap_times = Vec::new();
    'swapping: for round in 1..=ROUNDS {
        for (i, site) in sites.iter().enumerate() {
            assert!(started.elapsed() < TOTAL, "test took too long");
            if !stats.failures.lock().unwrap().is_empty() {
                break 'swapping;
            }
            let leaf = pki.leaf(&[&site.host], Alg::Ecdsa);
            site.generations
                .lock()
                .unwrap()
                .insert(leaf.serial.clone(), round);
            let t0 = Instant::now();
            files[i].replace(&leaf);
            match wait_published(&mut events, &site.name, &leaf.serial, STEP).await {
                Ok(rejected) => {
                    rejected_on_the_way.extend(rejected.into_iter().map(|e| (files[i].pattern, e)))
                }
                Err(e) => panic!("{:?} swap {round} of {}: {e}", files[i].pattern, site.name),
            }
            swap_times.push(t0.elapsed());
            site.announced.store(round, Ordering::SeqCst);
            // And right here, too: the very next handshake has it.
            assert_eq!(served_serial(addr, &site.host, &pki).await, leaf.serial);
            *swaps.entry(files[i].pattern).or_default() += 1;
        }
    }
    // Let the clients run on the final certificates for a moment, then stop.
    let before = stats.handshakes_checked.load(Ordering::Relaxed);
    let checked = || stats.handshakes_checked.load(Ordering::Relaxed);
    wait_until(
        STEP,
        "50 more checked handshakes on the final certificates",
        || async { checked() >= before + 50 },
    )
    .await;
    stop.cancel();
    for c in clients {
        tokio::time::timeout(STEP * 2, c)
            .await
            .expect("clients stop in time")
            .unwrap();
    }

    let failures = stats.failures.lock().unwrap().clone();
    swap_times.sort();
    eprintln!(
        "swaps: {swaps:?}; {} h1 keep-alive requests, {} h2 stream requests, {} full handshakes checked ({} after a swap), {} resumed; swap announced p50 {:?} max {:?}; rejected half-written pairs: {rejected_on_the_way:?}",
        stats.h1_requests.load(Ordering::Relaxed),
        stats.h2_requests.load(Ordering::Relaxed),
        stats.handshakes_checked.load(Ordering::Relaxed),
        stats.handshakes_after_swap.load(Ordering::Relaxed),
        stats.resumed.load(Ordering::Relaxed),
        swap_times.get(swap_times.len() / 2),
        swap_times.last(),
    );
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    for p in WritePattern::ALL {
        assert_eq!(
            swaps.get(&p).copied(),
            Some(ROUNDS),
            "{p:?} swaps: {swaps:?}"
        );
    }
    assert!(swaps.values().sum::<usize>() >= 50);
    assert!(stats.h1_requests.load(Ordering::Relaxed) > 0);
    assert!(stats.h2_requests.load(Ordering::Relaxed) > 0);
    assert!(stats.handshakes_after_swap.load(Ordering::Relaxed) > 0);
    assert!(
        stats.resumed.load(Ordering::Relaxed) > 0,
        "session tickets survive swaps"
    );
    for site in sites.iter() {
        let st = certs.slot(&site.name).unwrap().status();
        assert_eq!(
            st.last_error, None,
            "{}: pending error after the last swap",
            site.name
        );
    }
    proxy.shutdown.cancel();
}

/// The watcher's own reads of the files must not wake it up again (inotify
/// reports opens and read-only closes in the watched directories): once a
/// swap is in service, nothing re-reads the unchanged files until the next
/// change or poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_goes_quiet_after_a_swap() {
    use notify::event::{AccessKind, EventKind};
    use notify::Watcher;

    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let leaf = pki.leaf(&["quiet.test"], Alg::Ecdsa);
    let (cert, key) = leaf.write(dir.path(), "");
    let toml = OneSite::new()
        .name("quiet")
        .host("quiet.test")
        .route("respond = { status = 200 }")
        .toml();
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    let mut events = certs.subscribe();

    // Our own watch on the same directory counts every open of the files.
    let opens = Arc::new(AtomicU64::new(0));
    let files = [cert.clone(), key.clone()];
    let mut spy = {
        let opens = opens.clone();
        notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if matches!(ev.kind, EventKind::Access(AccessKind::Open(_)))
                    && ev.paths.iter().any(|p| files.contains(p))
                {
                    opens.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .unwrap()
    };
    spy.watch(proxy.dir.as_path(), notify::RecursiveMode::NonRecursive)
        .unwrap();

    let next = pki.leaf(&["quiet.test"], Alg::Ecdsa);
    replace_file(&key, &next.key_pem);
    replace_file(&cert, &next.chain_pem);
    wait_published(&mut events, "quiet", &next.serial, STEP)
        .await
        .unwrap();
    assert!(
        eventually(STEP, || async { opens.load(Ordering::Relaxed) > 0 }).await,
        "the spy sees the watcher's reads"
    );
    // Await the end of the reads that led to the publish: no new open
    // for 100 ms (ten polls in a row).
    let (mut last, mut quiet_polls) = (opens.load(Ordering::Relaxed), 0);
    wait_until(STEP, "the reads that led to the publish end", || {
        let now = opens.load(Ordering::Relaxed);
        quiet_polls = if now == last { quiet_polls + 1 } else { 0 };
        last = now;
        let quiet = quiet_polls >= 10;
        async move { quiet }
    })
    .await;
    // Then watch for a second (well over ten debounce periods): nothing may
    // read the files again. This sleep is the observation window itself.
    let before = opens.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rereads = opens.load(Ordering::Relaxed) - before;
    assert!(
        rereads <= 2,
        "the unchanged files were opened {rereads} times in 1 s"
    );
    assert_eq!(
        served_serial(proxy.https, "quiet.test", &pki).await,
        next.serial
    );
    proxy.shutdown.cancel();
}
