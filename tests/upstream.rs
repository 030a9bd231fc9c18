//! Upstream groups with several real backends on loopback: the balancing
//! policies (weighted round robin shares, least requests and p2c prefer
//! the idle upstream, hashing is sticky and moves only the keys of a
//! removed upstream), an upstream killed under load (no client-visible
//! error for idempotent requests; marked down by the passive and by the
//! active checks, back once it returns), all down -> 503 + Retry-After at
//! once, which requests are retried (never a POST whose body was sent),
//! health state kept across a reload, and config errors.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::origin::*;
use common::*;
use http_body_util::Full;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

fn url(b: &Backend) -> String {
    format!("\"http://{}\"", b.addr)
}

fn list(backends: &[&Backend]) -> String {
    backends
        .iter()
        .map(|b| url(b))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which backend answered each of `n` GETs of `path` (by body), sent
/// `concurrency` at a time over one h2 connection each.
async fn spread(
    proxy: &common::Proxy,
    pki: &Pki,
    n: usize,
    concurrency: usize,
) -> std::collections::HashMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut send = h2_client(proxy.https, "api.test", pki).await;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..n / concurrency {
                let (status, body) = h2_get(&mut send, "/", &[]).await.unwrap();
                assert_eq!(status, 200, "{body}");
                got.push(body);
            }
            got
        }));
    }
    let mut count = std::collections::HashMap::new();
    for t in tasks {
        for b in t.await.unwrap() {
            *count.entry(b).or_insert(0) += 1;
        }
    }
    count
}

// ---------------------------------------------------------------------------
// Balancing

/// Waits until every backend has had more than 20 requests.
async fn traffic_on(backends: &[&Backend]) {
    wait_until(WAIT, "traffic on every upstream", || async {
        backends.iter().all(|b| b.hits() > 20)
    })
    .await;
}

/// Waits until `portcullis_upstream_healthy` of `label` on route `/` is `value`.
async fn await_health(proxy: &Proxy, label: &str, value: f64, what: &str) {
    wait_until(WAIT, what, || async {
        healthy(proxy, "/", label).await == Some(value)
    })
    .await;
}

#[tokio::test]
async fn weighted_round_robin_shares_follow_the_weights() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let b = Backend::start("b", Mode::H1).await;
    let c = Backend::start("c", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\nupstreams = [{{ url = \"http://{}\", weight = 3 }}, {{ url = \"http://{}\", weight = 2 }}, {}]\n",
        a.addr,
        b.addr,
        url(&c)
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let n = 1200;
    let count = spread(&proxy, &pki, n, 6).await;
    for (name, weight) in [("a", 3.0), ("b", 2.0), ("c", 1.0)] {
        let share = count[name] as f64 / n as f64;
        let want = weight / 6.0;
        assert!(
            (share - want).abs() < 0.02,
            "{name}: {share:.3} of the requests, want {want:.3} ({count:?})"
        );
    }
    assert_eq!(a.hits() + b.hits() + c.hits(), n);
}

#[tokio::test]
async fn least_requests_and_p2c_send_to_the_idle_upstream() {
    for lb in ["least_requests", "p2c"] {
        let pki = Pki::new();
        let a = Backend::start("a", Mode::H1).await;
        let b = Backend::start("b", Mode::H1).await;
        let routes = format!(
            "[[sites.routes]]\nupstreams = [{}]\nlb = \"{lb}\"\n",
            list(&[&a, &b])
        );
        let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
        let mut send = h2_client(proxy.https, "api.test", &pki).await;
        // One slow request occupies one upstream.
        let mut held_send = send.clone();
        let held = tokio::spawn(async move { h2_get(&mut held_send, "/hold", &[]).await });
        wait_until(WAIT, "a request held upstream", || async {
            a.holding() + b.holding() == 1
        })
        .await;
        let (busy, idle) = if a.holding() == 1 { (&a, &b) } else { (&b, &a) };
        for _ in 0..20 {
            let (status, body) = h2_get(&mut send, "/fast", &[]).await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(
                body, idle.shared.name,
                "{lb}: a request went to the busy upstream"
            );
        }
        assert_eq!(busy.hits(), 1, "{lb}");
        assert_eq!(idle.hits(), 20, "{lb}");
        busy.open_gate();
        assert_eq!(held.await.unwrap().unwrap().0, 200);
        // With the load gone, both get traffic again.
        let count = spread(&proxy, &pki, 40, 1).await;
        assert!(count.len() == 2 || lb == "p2c", "{lb}: {count:?}");
    }
}

#[tokio::test]
async fn hash_header_is_sticky_and_a_removed_upstream_moves_only_its_keys() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let b = Backend::start("b", Mode::H1).await;
    let c = Backend::start("c", Mode::H1).await;
    let route =
        |ups: &str| format!("[[sites.routes]]\nupstreams = [{ups}]\nlb = \"hash_header:x-user\"\n");
    let proxy = OneSite::new()
        .admin()
        .routes(&route(&list(&[&a, &b, &c])))
        .start(&pki)
        .await;
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    let mut owner = Vec::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let (status, body) = h2_get(&mut send, "/", &[("x-user", &user)]).await.unwrap();
            assert_eq!(status, 200);
            seen.insert(body);
        }
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        owner.push(seen.into_iter().next().unwrap());
    }
    let used: std::collections::HashSet<_> = owner.iter().cloned().collect();
    assert_eq!(used.len(), 3, "40 users all hashed to {used:?}");

    // Remove c: its users move, nobody else does.
    proxy
        .reload(
            &OneSite::new()
                .admin()
                .routes(&route(&list(&[&a, &b])))
                .toml(),
        )
        .await;
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    for (u, before) in owner.iter().enumerate() {
        let (_, now) = h2_get(&mut send, "/", &[("x-user", &format!("user-{u}"))])
            .await
            .unwrap();
        if before == "c" {
            assert_ne!(now, "c");
        } else {
            assert_eq!(&now, before, "user-{u} moved although its upstream stayed");
        }
    }
}

#[tokio::test]
async fn hash_ip_keeps_each_client_address_on_one_upstream() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let b = Backend::start("b", Mode::H1).await;
    let c = Backend::start("c", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\nupstreams = [{}]\nlb = \"hash_ip\"\n",
        list(&[&a, &b, &c])
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let cfg = pki.client_config(&[b"http/1.1"]);
    let mut used = std::collections::HashSet::new();
    for last in 2..26u8 {
        let from = std::net::IpAddr::from([127, 0, 0, last]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let req = Request::builder()
                .uri("/")
                .header("host", "api.test")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let got = common::request_from(from, proxy.https, "api.test", cfg.clone(), req)
                .await
                .unwrap();
            assert_eq!(got.status, 200);
            seen.insert(String::from_utf8_lossy(&got.body).into_owned());
        }
        assert_eq!(seen.len(), 1, "{from} went to {seen:?}");
        used.extend(seen);
    }
    assert!(
        used.len() >= 2,
        "24 client addresses all hashed to {used:?}"
    );
}

// ---------------------------------------------------------------------------
// An upstream killed under load

/// GETs from `tasks` h2 connections until `stop`; counts answers that are
/// not 200 (and transport errors) with a sample of what they were.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    bad: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(proxy: &common::Proxy, pki: &Pki, tasks: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let mut send = h2_client(proxy.https, "api.test", pki).await;
            let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
            handles.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match h2_get(&mut send, "/", &[]).await {
                        Ok((200, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => bad.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            bad,
            tasks: handles,
        }
    }

    /// Stops the load; returns (answered 200, everything else).
    /// Stops the load; fails the test if any request failed.
    async fn finish_with_no_failure(self) {
        let (ok, bad) = self.finish().await;
        assert!(
            bad.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            bad.len(),
            ok + bad.len(),
            &bad[..bad.len().min(5)]
        );
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.bad.lock().unwrap().clone(),
        )
    }
}

#[tokio::test]
async fn killed_upstream_under_load_loses_no_request_and_is_taken_out_by_passive_checks() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let mut b = Backend::start("b", Mode::H1).await;
    let c = Backend::start("c", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\nupstreams = [{}]\n[sites.routes.passive_health]\nfailures = 2\nwindow = \"10s\"\ncooldown = \"500ms\"\n",
        list(&[&a, &b, &c])
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let label = b.label();
    assert_eq!(healthy(&proxy, "/", &label).await, Some(1.0));
    let load = Load::start(&proxy, &pki, 6).await;
    traffic_on(&[&a, &b, &c]).await;

    b.kill();
    await_health(&proxy, &label, 0.0, "b marked down by the passive check").await;
    // a and c carry on.
    let (a0, c0) = (a.hits(), c.hits());
    wait_until(WAIT, "traffic on a and c", || async {
        a.hits() > a0 + 50 && c.hits() > c0 + 50
    })
    .await;

    let b0 = b.hits();
    b.revive().await;
    wait_until(WAIT, "b back in service, with traffic", || async {
        b.hits() > b0 + 20 && healthy(&proxy, "/", &label).await == Some(1.0)
    })
    .await;

    load.finish_with_no_failure().await;
    let m = scrape(&proxy).await;
    let on_b = [
        ("site", "api.test"),
        ("route", "/"),
        ("upstream", label.as_str()),
    ];
    let b_retries = m
        .exact("portcullis_upstream_retries_total", &on_b)
        .expect("a retries series for b");
    assert!(
        b_retries >= 1.0,
        "requests that failed on b were retried:\n{}",
        m.text
    );
    let errors = m
        .exact(
            "portcullis_upstream_requests_total",
            &[on_b[0], on_b[1], on_b[2], ("status", "error")],
        )
        .expect("an error series for b");
    assert!(errors >= 1.0);
}

#[tokio::test]
async fn killed_upstream_is_taken_out_by_active_checks_and_brought_back() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let mut b = Backend::start("b", Mode::H1).await;
    let c = Backend::start("c", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\nupstreams = [{}]\n\
         [sites.routes.passive_health]\nfailures = 0\n\
         [sites.routes.health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n",
        list(&[&a, &b, &c])
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let label = b.label();
    wait_until(WAIT, "health checks on every upstream", || async {
        [&a, &b, &c]
            .iter()
            .all(|x| x.shared.health_hits.load(Ordering::SeqCst) >= 2)
    })
    .await;
    let load = Load::start(&proxy, &pki, 6).await;
    traffic_on(&[&a, &b, &c]).await;

    // Killed: the active checks take it out (passive checks are off, so
    // until then requests that hit it are retried on the others).
    b.kill();
    await_health(&proxy, &label, 0.0, "b marked down by the active check").await;
    let b_out = b.hits();
    let (a0, c0) = (a.hits(), c.hits());
    wait_until(WAIT, "traffic on a and c", || async {
        a.hits() > a0 + 50 && c.hits() > c0 + 50
    })
    .await;
    assert_eq!(b.hits(), b_out);

    b.revive().await;
    wait_until(
        WAIT,
        "b back after healthy_threshold checks, with traffic",
        || async { healthy(&proxy, "/", &label).await == Some(1.0) && b.hits() > b_out + 20 },
    )
    .await;

    // A live upstream whose health endpoint fails is taken out too.
    c.set_healthy(false);
    let c_label = c.label();
    await_health(&proxy, &c_label, 0.0, "c marked down").await;
    let c_out = c.hits();
    let a1 = a.hits();
    wait_until(WAIT, "traffic on a", || async { a.hits() > a1 + 50 }).await;
    assert_eq!(c.hits(), c_out, "c got traffic while out of service");
    c.set_healthy(true);
    wait_until(WAIT, "c back", || async {
        healthy(&proxy, "/", &c_label).await == Some(1.0) && c.hits() > c_out
    })
    .await;

    load.finish_with_no_failure().await;
}

// ---------------------------------------------------------------------------
// Everything down

#[tokio::test]
async fn all_upstreams_down_by_active_checks_gives_503_with_retry_after_at_once() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let b = Backend::start("b", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\nupstreams = [{}]\n[sites.routes.health_check]\npath = \"/health\"\ninterval = \"3s\"\ntimeout = \"1s\"\nunhealthy_threshold = 1\n",
        list(&[&a, &b])
    );
    a.set_healthy(false);
    b.set_healthy(false);
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    for x in [&a, &b] {
        let l = x.label();
        wait_until(WAIT, "marked down", || async {
            healthy(&proxy, "/", &l).await == Some(0.0)
        })
        .await;
    }
    let started = Instant::now();
    let got = common::get(
        proxy.https,
        "api.test",
        "/",
        pki.client_config(&[b"http/1.1"]),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(got.status, 503);
    assert_eq!(got.body, "no upstream is available\n");
    let retry_after: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry_after), "Retry-After: {retry_after}");
    assert!(took < Duration::from_millis(500), "answered after {took:?}");
    assert_eq!(
        a.hits() + b.hits(),
        0,
        "a request reached an upstream that is out"
    );
}

#[tokio::test]
async fn all_upstreams_down_by_passive_checks_gives_503_with_retry_after_at_once() {
    let pki = Pki::new();
    // Two addresses that refuse connections for the whole test (held, so
    // no other process can start listening there).
    let (hold_x, hold_y) = (Refusing::new(), Refusing::new());
    let (x, y) = (hold_x.addr, hold_y.addr);
    let routes = format!(
        "[[sites.routes]]\nupstreams = [\"http://{x}\", \"http://{y}\"]\n[sites.routes.passive_health]\nfailures = 1\ncooldown = \"30s\"\n"
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let cfg = pki.client_config(&[b"http/1.1"]);
    // Both refuse: the first request tries both (a retry), then fails.
    let got = common::get(proxy.https, "api.test", "/", cfg.clone()).await;
    assert_eq!(got.status, 502);
    for _ in 0..3 {
        let started = Instant::now();
        let got = common::get(proxy.https, "api.test", "/", cfg.clone()).await;
        assert_eq!(got.status, 503);
        let retry_after: u64 = got.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (25..=30).contains(&retry_after),
            "Retry-After: {retry_after}"
        );
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    assert_eq!(healthy(&proxy, "/", &x.to_string()).await, Some(0.0));
    assert_eq!(healthy(&proxy, "/", &y.to_string()).await, Some(0.0));
}

// ---------------------------------------------------------------------------
// What is retried

/// An upstream that reads each request (head and `Content-Length` body),
/// waits `delay`, then closes the connection without answering. Counts
/// requests and body bytes.
async fn black_hole(delay: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let body_bytes = Arc::new(AtomicUsize::new(0));
    let (r, bb) = (requests.clone(), body_bytes.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let (r, bb) = (r.clone(), bb.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < head_end + len {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
                bb.fetch_add(buf.len() - head_end, Ordering::SeqCst);
                // The delay is the behaviour under test (an upstream that
                // goes quiet, then hangs up), not a synchronisation.
                tokio::time::sleep(delay).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, requests, body_bytes)
}

/// A request with a body through a fresh h2 connection.
async fn send_with_body(
    proxy: &common::Proxy,
    pki: &Pki,
    method: &str,
    body: &'static str,
) -> (u16, String) {
    let mut send = h2_client(proxy.https, "api.test", pki).await;
    let req = Request::builder()
        .method(method)
        .uri("https://api.test/submit")
        .header("content-length", body.len())
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    send_req(&mut send, req).await.unwrap()
}

/// A route whose first pick (weight) is `first`, then `good`; passive
/// checks never take `first` out.
fn first_then_good(first: impl std::fmt::Display, good: &Backend) -> String {
    format!(
        "[[sites.routes]]\nupstreams = [{{ url = \"http://{first}\", weight = 1000 }}, {}]\n[sites.routes.passive_health]\nfailures = 0\n",
        url(good)
    )
}

#[tokio::test]
async fn a_request_whose_body_was_sent_is_not_retried_but_a_bodyless_get_is() {
    let pki = Pki::new();
    let (hole, requests, body_bytes) = black_hole(Duration::ZERO).await;
    let good = Backend::start("good", Mode::H1).await;
    // The black hole is picked first (weight), and stays in service.
    let routes = first_then_good(hole, &good);
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let body = "x=1&y=2&amount=100";

    let (status, text) = send_with_body(&proxy, &pki, "POST", body).await;
    assert_eq!(status, 502, "{text}");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        body_bytes.load(Ordering::SeqCst),
        body.len(),
        "the upstream read the body"
    );
    assert_eq!(good.hits(), 0, "a POST whose body was sent was sent again");

    // PUT is idempotent, but its body was read: it cannot be sent again.
    let (status, _) = send_with_body(&proxy, &pki, "PUT", body).await;
    assert_eq!(status, 502);
    assert_eq!(good.hits(), 0);

    // A GET that was reset before any response is retried elsewhere.
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    let (status, who) = h2_get(&mut send, "/", &[]).await.unwrap();
    assert_eq!((status, who.as_str()), (200, "good"));
    assert_eq!(requests.load(Ordering::SeqCst), 3);
    assert_eq!(good.hits(), 1);
}

#[tokio::test]
async fn any_method_is_retried_when_nothing_was_sent() {
    let pki = Pki::new();
    let refused = Refusing::new();
    let good = Backend::start("good", Mode::H1).await;
    let routes = first_then_good(refused, &good);
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let body = "payload";
    let (status, who) = send_with_body(&proxy, &pki, "POST", body).await;
    assert_eq!((status, who.as_str()), (200, "good"));
    let seen = good.seen();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].body_len),
        ("POST", body.len())
    );
}

#[tokio::test]
async fn retries_stop_at_the_count_and_the_budget() {
    let pki = Pki::new();
    let refused = Refusing::new();
    let (slow_hole, _, _) = black_hole(Duration::from_millis(100)).await;
    let good = Backend::start("good", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\npath = \"/none\"\nupstreams = [{{ url = \"http://{refused}\", weight = 1000 }}, {good}]\nretries = 0\n\
         [sites.routes.passive_health]\nfailures = 0\n\
         [[sites.routes]]\npath = \"/budget\"\nupstreams = [{{ url = \"http://{slow_hole}\", weight = 1000 }}, {good}]\nretry_budget = \"50ms\"\n\
         [sites.routes.passive_health]\nfailures = 0\n\
         [[sites.routes]]\npath = \"/roomy\"\nupstreams = [{{ url = \"http://{slow_hole}\", weight = 1000 }}, {good}]\nretry_budget = \"5s\"\n\
         [sites.routes.passive_health]\nfailures = 0\n",
        good = url(&good)
    );
    let proxy = OneSite::new().admin().routes(&routes).start(&pki).await;
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    assert_eq!(
        h2_get(&mut send, "/none", &[]).await.unwrap().0,
        502,
        "retries = 0"
    );
    assert_eq!(
        h2_get(&mut send, "/budget", &[]).await.unwrap().0,
        502,
        "budget spent by the first attempt"
    );
    assert_eq!(h2_get(&mut send, "/roomy", &[]).await.unwrap().0, 200);
    assert_eq!(good.hits(), 1);
}

// ---------------------------------------------------------------------------
// Reload

#[tokio::test]
async fn reload_keeps_the_health_of_upstreams_that_remain() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let b = Backend::start("b", Mode::H1).await;
    let c = Backend::start("c", Mode::H1).await;
    let route = |ups: &str, retries: u32| {
        format!(
            "[[sites.routes]]\nupstreams = [{ups}]\nretries = {retries}\n[sites.routes.health_check]\npath = \"/health\"\ninterval = \"200ms\"\nunhealthy_threshold = 3\nhealthy_threshold = 3\n"
        )
    };
    b.set_healthy(false);
    let proxy = OneSite::new()
        .admin()
        .routes(&route(&list(&[&a, &b]), 1))
        .start(&pki)
        .await;
    let (la, lb, lc) = (a.label(), b.label(), c.label());
    await_health(&proxy, &lb, 0.0, "b down").await;

    // The group changes (retries, and a new upstream): b stays out at once
    // (a fresh state would start in service), c starts in service.
    proxy
        .reload(
            &OneSite::new()
                .admin()
                .routes(&route(&list(&[&a, &b, &c]), 2))
                .toml(),
        )
        .await;
    assert_eq!(healthy(&proxy, "/", &lb).await, Some(0.0));
    assert_eq!(healthy(&proxy, "/", &la).await, Some(1.0));
    assert_eq!(healthy(&proxy, "/", &lc).await, Some(1.0));
    let mut send = h2_client(proxy.https, "api.test", &pki).await;
    for _ in 0..30 {
        assert_eq!(h2_get(&mut send, "/", &[]).await.unwrap().0, 200);
    }
    assert_eq!(b.hits(), 0);
    // The restarted check task still watches b.
    b.set_healthy(true);
    await_health(&proxy, &lb, 1.0, "b back").await;

    // A removed upstream's series disappear.
    proxy
        .reload(
            &OneSite::new()
                .admin()
                .routes(&route(&list(&[&a, &c]), 2))
                .toml(),
        )
        .await;
    assert_eq!(healthy(&proxy, "/", &lb).await, None);
}

// ---------------------------------------------------------------------------
// Config errors

fn config_errors(routes: &str) -> String {
    let text = OneSite::new().admin().routes(routes).toml();
    let path = std::path::Path::new("/etc/portcullis/portcullis.toml");
    match portcullis::config::Config::parse(path, &text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e
            .to_string()
            .replace("/etc/portcullis/portcullis.toml", "{f}"),
    }
}

#[test]
fn upstream_settings_errors_name_the_line_and_field() {
    // Line 9 is [[sites.routes]] (the proxy config puts 8 lines before it).
    assert_eq!(
        config_errors("[[sites.routes]]\nupstreams = [\"http://127.0.0.1:1\", { url = \"http://127.0.0.1:2\", weight = 0 }]\nlb = \"random\"\n"),
        "{f}:10: sites[0].routes[0].upstreams[1].weight: 0 is out of range; use a value from 1 to 1000\n\
         {f}:11: sites[0].routes[0].lb: \"random\" is not a balancing policy; use \"round_robin\", \"least_requests\", \"p2c\", \
         \"hash_ip\" or \"hash_header:NAME\" (e.g. \"hash_header:x-user-id\")"
    );
    assert_eq!(
        config_errors("[[sites.routes]]\nupstream = \"https://127.0.0.1:1\"\nprotocol = \"h2c\"\nca = \"missing.pem\"\n"),
        "{f}:11: sites[0].routes[0].protocol: \"h2c\" is HTTP/2 over cleartext TCP and needs http:// upstreams; use \"h2\" \
         for HTTP/2 over TLS (sites[0].routes[0].upstream is https://)\n\
         {f}:12: sites[0].routes[0].ca: cannot read \"/etc/portcullis/missing.pem\": No such file or directory (os error 2)"
    );
    assert_eq!(
        config_errors(
            "[[sites.routes]]\nupstreams = [\"http://127.0.0.1:1\", \"http://127.0.0.1:1\"]\nclient_cert = \"c.pem\"\n\
             [sites.routes.health_check]\ninterval = \"1s\"\ntimeout = \"2s\"\n"
        ),
        "{f}:10: sites[0].routes[0].upstreams[1]: 127.0.0.1:1 is listed twice; raise its weight instead\n\
         {f}:11: sites[0].routes[0].client_cert: only applies to https:// upstreams; remove it or write the upstream as https://\n\
         {f}:14: sites[0].routes[0].health_check.timeout: 2s is longer than the interval (1s); make it shorter"
    );
    assert_eq!(
        config_errors("[[sites.routes]]\nrespond = { status = 200 }\nretries = 3\n"),
        "{f}:9: sites[0].routes[0]: lb, protocol, ca, tls_server_name, client_cert, client_key, retries, retry_budget, \
         health_check and passive_health only apply to upstream routes; remove them"
    );
}

// ---------------------------------------------------------------------------
// Logs

#[tokio::test]
async fn each_health_change_is_logged_once() {
    let pki = Pki::new();
    let a = Backend::start("a", Mode::H1).await;
    let mut b = Backend::start("b", Mode::H1).await;
    let routes = format!(
        "[[sites.routes]]\nupstreams = [{}]\n[sites.routes.health_check]\npath = \"/health\"\ninterval = \"50ms\"\ntimeout = \"50ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n",
        list(&[&a, &b])
    );
    let proxy = OneSite::new().routes(&routes).start_bin(&pki);
    let upstream = format!("upstream={}", b.label());
    b.kill();
    logged_once(&proxy, &upstream, "out of service (active check)", &a).await;
    b.revive().await;
    logged_once(&proxy, &upstream, "back in service (active check)", &a).await;
    assert_eq!(
        log_count(&proxy, &upstream, "out of service (active check)"),
        1
    );
}

/// Log lines about `upstream` containing `what`.
fn log_count(proxy: &BinProxy, upstream: &str, what: &str) -> usize {
    proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(what) && l.contains(upstream))
        .count()
}

/// `what` is logged about `upstream` once when it happens, then not again
/// over ten more health-check rounds (counted on `a`).
async fn logged_once(proxy: &BinProxy, upstream: &str, what: &str, a: &Backend) {
    let checks_on_a = || a.shared.health_hits.load(Ordering::SeqCst);
    wait_until(WAIT, what, || async {
        log_count(proxy, upstream, what) == 1
    })
    .await;
    let seen = checks_on_a();
    wait_until(WAIT, "ten more check rounds", || async {
        checks_on_a() >= seen + 10
    })
    .await;
    assert_eq!(log_count(proxy, upstream, what), 1, "{}", proxy.log_text());
}
