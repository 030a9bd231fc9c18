//! Admin `GET /metrics` scraped from a running proxy: the exact validity of
//! every certificate in service (leaf and intermediate, default site
//! included), series that swap in one scrape when a certificate is
//! replaced, reload outcome counters and the pending-error gauge, traffic
//! counters, and labels that never carry values from the network.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use portcullis::certstore::CertEvent;

const NOT_AFTER: &str = "portcullis_tls_cert_not_after_timestamp_seconds";
const NOT_BEFORE: &str = "portcullis_tls_cert_not_before_timestamp_seconds";
const EXPIRY: &str = "portcullis_tls_cert_expiry_seconds";
const RELOADS: &str = "portcullis_tls_cert_reloads_total";
const LAST_RELOAD: &str = "portcullis_tls_cert_last_reload_success_timestamp_seconds";
const PENDING: &str = "portcullis_tls_cert_reload_pending_error";
const DAY: i64 = 86_400;
/// Upper bound for "it happened" on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(10);

/// Every `# TYPE` line names a family once (Prometheus rejects a scrape
/// that repeats one).
fn assert_families_unique(text: &str) {
    let mut seen = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            seen.insert(name.to_string()),
            "family {name} declared twice"
        );
    }
}

fn site(name: &str, hosts: &str, prefix: &str, default: bool) -> String {
    respond_site(Some(name), hosts, prefix, default, &format!("{name}\n"))
}

fn head() -> String {
    sites_head(true, "[certificates]\npoll_interval = \"1h\"")
}

fn labels_of(s: &Sample) -> Vec<(&str, &str)> {
    s.labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test]
async fn metrics_export_exact_dates_of_leaf_intermediate_and_default_certificate() {
    let now = unix_now();
    let (inter_nb, inter_na) = (now - 40 * DAY - 7, now + 400 * DAY + 13);
    let pki = Pki::with_intermediate(
        "metrics test root",
        "metrics test intermediate",
        &[0x4a, 0x11, 0x22, 0x33, 0x44, 0x55],
        at_unix(inter_nb),
        at_unix(inter_na),
    );
    let (api_nb, api_na) = (now - 3600 - 17, now + 30 * DAY + 29);
    let (def_nb, def_na) = (now - 2 * DAY - 3, now + 61 * DAY + 41);
    let dir = tempfile::tempdir().unwrap();
    let api = pki.leaf_with_dates(
        &["api.metrics.test", "www.metrics.test"],
        Alg::Ecdsa,
        at_unix(api_nb),
        at_unix(api_na),
    );
    api.write(dir.path(), "api-");
    let fallback = pki.leaf_with_dates(
        &["fallback.metrics.test"],
        Alg::Rsa,
        at_unix(def_nb),
        at_unix(def_na),
    );
    fallback.write(dir.path(), "fallback-");
    let toml = format!(
        "{}{}{}",
        head(),
        site(
            "api",
            r#""api.metrics.test", "www.metrics.test""#,
            "api-",
            false
        ),
        site("fallback", r#""fallback.metrics.test""#, "fallback-", true)
    );
    let proxy = Proxy::start_in(dir, &toml).await;

    let before = unix_now();
    let m = scrape(&proxy).await;
    let after = unix_now();
    assert_families_unique(&m.text);

    // Two certificates in service, each a leaf and one intermediate; the
    // self-signed root is not served, so nothing else.
    for family in [NOT_AFTER, NOT_BEFORE, EXPIRY] {
        assert_eq!(m.find(family, &[]).len(), 4, "{family}:\n{}", m.text);
    }

    let inter_serial = "4a1122334455";
    let expect = [
        ("api", "api.metrics.test", &api, api_nb, api_na),
        (
            "fallback",
            "fallback.metrics.test",
            &fallback,
            def_nb,
            def_na,
        ),
    ];
    for (name, domain, leaf, nb, na) in expect {
        let leaf_labels = [
            ("name", name),
            ("domain", domain),
            ("issuer", "metrics test intermediate"),
            ("serial", leaf.serial.as_str()),
            ("source", "file"),
            ("position", "leaf"),
        ];
        let s = m.one(NOT_AFTER, &leaf_labels);
        assert_eq!(s.labels.len(), 6, "exactly these labels: {:?}", s.labels);
        assert_eq!(s.value, na as f64, "{name} leaf not_after");
        assert_eq!(
            m.one(NOT_BEFORE, &leaf_labels).value,
            nb as f64,
            "{name} leaf not_before"
        );
        let left = m.one(EXPIRY, &leaf_labels).value;
        assert!(
            ((na - after) as f64..=(na - before) as f64).contains(&left),
            "{name} leaf expiry {left}, expected not_after - now = {}..={}",
            na - after,
            na - before
        );

        let inter_labels = [
            ("name", name),
            ("domain", domain),
            ("issuer", "metrics test root"),
            ("serial", inter_serial),
            ("source", "file"),
            ("position", "intermediate"),
        ];
        let s = m.one(NOT_AFTER, &inter_labels);
        assert_eq!(s.labels.len(), 6, "exactly these labels: {:?}", s.labels);
        assert_eq!(s.value, inter_na as f64, "{name} intermediate not_after");
        assert_eq!(
            m.one(NOT_BEFORE, &inter_labels).value,
            inter_nb as f64,
            "{name} intermediate not_before"
        );
        let left = m.one(EXPIRY, &inter_labels).value;
        assert!(
            ((inter_na - after) as f64..=(inter_na - before) as f64).contains(&left),
            "{name} intermediate expiry {left}"
        );
    }

    // Nothing was replaced yet, and nothing is pending.
    assert_eq!(m.one(RELOADS, &[("result", "success")]).value, 0.0);
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 0.0);
    assert_eq!(m.one(PENDING, &[("name", "api")]).value, 0.0);
    assert_eq!(m.one(PENDING, &[("name", "fallback")]).value, 0.0);
}

#[tokio::test]
async fn internal_certificate_is_exported_with_source_internal_and_no_root_series() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"{}
[[sites]]
name = "tools"
hosts = ["tools.internal.test"]
tls = "internal"
  [[sites.routes]]
  respond = {{ status = 200 }}
"#,
        head()
    );
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    let cur = certs.slot("tools").unwrap().current().unwrap();
    let m = scrape(&proxy).await;
    let s = m.one(NOT_AFTER, &[("name", "tools")]);
    assert_eq!(
        labels_of(s),
        vec![
            ("domain", "tools.internal.test"),
            ("issuer", "portcullis internal CA"),
            ("name", "tools"),
            ("position", "leaf"),
            ("serial", cur.info.serial.as_str()),
            ("source", "internal"),
        ]
    );
    let na = cur
        .info
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(s.value, na as f64);
}

#[tokio::test]
async fn replaced_certificate_series_swap_in_the_same_scrape() {
    let now = unix_now();
    let pki = Pki::with_intermediate(
        "old root",
        "old intermediate",
        &[0x31, 0x01],
        at_unix(now - DAY),
        at_unix(now + 900 * DAY),
    );
    let pki2 = Pki::with_intermediate(
        "new root",
        "new intermediate",
        &[0x32, 0x02],
        at_unix(now - DAY),
        at_unix(now + 901 * DAY),
    );
    let dir = tempfile::tempdir().unwrap();
    let old = pki.leaf_with_dates(
        &["swap.test"],
        Alg::Ecdsa,
        at_unix(now - DAY),
        at_unix(now + 10 * DAY),
    );
    let (cert_path, _) = old.write(dir.path(), "swap-");
    let other = pki.leaf_with_dates(
        &["other.test"],
        Alg::Ecdsa,
        at_unix(now - DAY),
        at_unix(now + 20 * DAY),
    );
    other.write(dir.path(), "other-");
    let toml = format!(
        "{}{}{}",
        head(),
        site("swap", r#""swap.test""#, "swap-", false),
        site("other", r#""other.test""#, "other-", true)
    );
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    wait_ready(&proxy).await;
    let mut events = certs.subscribe();

    let m = scrape(&proxy).await;
    assert_eq!(
        m.one(NOT_AFTER, &[("name", "swap"), ("position", "leaf")])
            .labels["serial"],
        old.serial
    );

    // Scrape continuously while the file is replaced: every scrape shows
    // exactly one leaf and one intermediate for the site, and they belong
    // together (never both, never none, never a mix).
    let stop = Arc::new(AtomicBool::new(false));
    // What the scraper has done so far, for the test to await.
    let scraped = Arc::new(AtomicUsize::new(0));
    let seen_new = Arc::new(AtomicBool::new(false));
    let admin = proxy.admin.unwrap();
    let watcher = {
        let (stop, scraped, seen_new) = (stop.clone(), scraped.clone(), seen_new.clone());
        let (old_serial, new_inter) = (old.serial.clone(), "3202".to_string());
        tokio::spawn(async move {
            let mut scrapes = 0;
            let mut saw_new = false;
            while !stop.load(Ordering::Acquire) {
                let (_, text) = admin_get(admin, "/metrics").await;
                let samples = parse(&text);
                for family in [NOT_AFTER, NOT_BEFORE, EXPIRY] {
                    let of = |pos: &str| -> Vec<String> {
                        samples
                            .iter()
                            .filter(|s| {
                                s.name == family
                                    && s.labels["name"] == "swap"
                                    && s.labels["position"] == pos
                            })
                            .map(|s| s.labels["serial"].clone())
                            .collect()
                    };
                    let (leaf, inter) = (of("leaf"), of("intermediate"));
                    assert_eq!(
                        leaf.len(),
                        1,
                        "{family}: one leaf series per scrape:\n{text}"
                    );
                    assert_eq!(
                        inter.len(),
                        1,
                        "{family}: one intermediate series per scrape:\n{text}"
                    );
                    let is_old = leaf[0] == old_serial;
                    assert_eq!(
                        inter[0] == new_inter,
                        !is_old,
                        "leaf and intermediate from different chains:\n{text}"
                    );
                    saw_new |= !is_old;
                }
                scrapes += 1;
                scraped.store(scrapes, Ordering::Release);
                seen_new.store(saw_new, Ordering::Release);
            }
            (scrapes, saw_new)
        })
    };

    wait_until(
        LIMIT,
        "the scraper's first scrapes of the old chain",
        || async { scraped.load(Ordering::Acquire) >= 2 },
    )
    .await;
    let new = pki2.leaf_with_key(
        &["swap.test"],
        &old.key_pem,
        at_unix(now - 2 * DAY),
        at_unix(now + 45 * DAY),
    );
    replace_file(&cert_path, &new.chain_pem);
    let ev = wait_cert_event(
        &mut events,
        Duration::from_secs(10),
        |e| matches!(e, CertEvent::Published { name, .. } if name == "swap"),
    )
    .await;
    assert_eq!(
        ev,
        CertEvent::Published {
            name: "swap".into(),
            serial: new.serial.clone()
        }
    );

    let m = scrape(&proxy).await;
    for family in [NOT_AFTER, NOT_BEFORE, EXPIRY] {
        let leaf = m.one(family, &[("name", "swap"), ("position", "leaf")]);
        assert_eq!(leaf.labels["serial"], new.serial);
        assert_eq!(leaf.labels["issuer"], "new intermediate");
        let inter = m.one(family, &[("name", "swap"), ("position", "intermediate")]);
        assert_eq!(inter.labels["serial"], "3202");
        assert_eq!(inter.labels["issuer"], "new root");
        // The other site is untouched.
        assert_eq!(
            m.one(family, &[("name", "other"), ("position", "leaf")])
                .labels["serial"],
            other.serial
        );
    }
    assert_eq!(
        m.one(NOT_AFTER, &[("name", "swap"), ("position", "leaf")])
            .value,
        (now + 45 * DAY) as f64
    );
    assert_eq!(
        m.one(NOT_BEFORE, &[("name", "swap"), ("position", "leaf")])
            .value,
        (now - 2 * DAY) as f64
    );
    assert!(
        !m.text.contains(&old.serial),
        "old leaf serial still exported:\n{}",
        m.text
    );
    assert!(
        m.find(NOT_AFTER, &[("name", "swap"), ("serial", "3101")])
            .is_empty(),
        "old intermediate still exported:\n{}",
        m.text
    );

    // And handshakes get the new one.
    let tls = tls_connect(proxy.https, "swap.test", pki2.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(serial_of(&peer_leaf(&tls)), new.serial);

    // Stop once the scraper has seen the new chain (or the wait runs out:
    // the assertion below then says so).
    eventually(LIMIT, || async { seen_new.load(Ordering::Acquire) }).await;
    stop.store(true, Ordering::Release);
    let (scrapes, saw_new) = watcher.await.unwrap();
    assert!(scrapes >= 2, "the concurrent scraper ran {scrapes} times");
    assert!(
        saw_new,
        "the concurrent scraper never saw the new certificate"
    );
}

#[tokio::test]
async fn reload_outcomes_are_counted_and_pending_error_gauge_follows_the_files() {
    let now = unix_now();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let first = pki.leaf_with_dates(
        &["reload.test"],
        Alg::Ecdsa,
        at_unix(now - DAY),
        at_unix(now + 30 * DAY),
    );
    let (cert_path, _) = first.write(dir.path(), "reload-");
    let toml = format!(
        "{}{}",
        head(),
        site("reload", r#""reload.test""#, "reload-", true)
    );
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    wait_ready(&proxy).await;
    let mut events = certs.subscribe();
    let is_reload = |e: &CertEvent| matches!(e, CertEvent::Published { name, .. } | CertEvent::Rejected { name, .. } if name == "reload");

    let m = scrape(&proxy).await;
    assert_eq!(m.one(RELOADS, &[("result", "success")]).value, 0.0);
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 0.0);
    assert_eq!(m.one(LAST_RELOAD, &[]).value, 0.0);
    assert_eq!(m.one(PENDING, &[("name", "reload")]).value, 0.0);

    // A good replacement.
    let second = pki.leaf_with_key(
        &["reload.test"],
        &first.key_pem,
        at_unix(now - DAY),
        at_unix(now + 60 * DAY),
    );
    let before = unix_now();
    replace_file(&cert_path, &second.chain_pem);
    let ev = wait_cert_event(&mut events, Duration::from_secs(10), is_reload).await;
    assert_eq!(
        ev,
        CertEvent::Published {
            name: "reload".into(),
            serial: second.serial.clone()
        }
    );
    let m = scrape(&proxy).await;
    assert_eq!(m.one(RELOADS, &[("result", "success")]).value, 1.0);
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 0.0);
    let last = m.one(LAST_RELOAD, &[]).value;
    assert!(
        (before as f64..=unix_now() as f64).contains(&last),
        "last reload {last}, now {before}"
    );
    assert_eq!(m.one(PENDING, &[("name", "reload")]).value, 0.0);

    // A truncated chain: refused, counted, pending; the good one stays.
    replace_file(&cert_path, &second.chain_pem[..second.chain_pem.len() / 2]);
    let ev = wait_cert_event(&mut events, Duration::from_secs(10), is_reload).await;
    assert!(matches!(ev, CertEvent::Rejected { .. }), "{ev:?}");
    let m = scrape(&proxy).await;
    assert_eq!(m.one(RELOADS, &[("result", "success")]).value, 1.0);
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 1.0);
    assert_eq!(m.one(LAST_RELOAD, &[]).value, last);
    assert_eq!(m.one(PENDING, &[("name", "reload")]).value, 1.0);
    assert_eq!(
        m.one(NOT_AFTER, &[("name", "reload"), ("position", "leaf")])
            .labels["serial"],
        second.serial
    );

    // An expired replacement is refused too (a replacement must never be worse).
    let expired = pki.leaf_with_key(
        &["reload.test"],
        &first.key_pem,
        at_unix(now - 9 * DAY),
        at_unix(now - DAY),
    );
    replace_file(&cert_path, &expired.chain_pem);
    let ev = wait_cert_event(&mut events, Duration::from_secs(10), is_reload).await;
    assert!(
        matches!(&ev, CertEvent::Rejected { error, .. } if error.contains("expired")),
        "{ev:?}"
    );
    let m = scrape(&proxy).await;
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 2.0);
    assert_eq!(m.one(PENDING, &[("name", "reload")]).value, 1.0);
    assert!(!m.text.contains(&expired.serial));

    // A good one clears it.
    let third = pki.leaf_with_key(
        &["reload.test"],
        &first.key_pem,
        at_unix(now - DAY),
        at_unix(now + 90 * DAY),
    );
    replace_file(&cert_path, &third.chain_pem);
    let ev = wait_cert_event(&mut events, Duration::from_secs(10), is_reload).await;
    assert_eq!(
        ev,
        CertEvent::Published {
            name: "reload".into(),
            serial: third.serial.clone()
        }
    );
    let m = scrape(&proxy).await;
    assert_eq!(m.one(RELOADS, &[("result", "success")]).value, 2.0);
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 2.0);
    assert_eq!(m.one(PENDING, &[("name", "reload")]).value, 0.0);

    // Broken again, then the operator puts back exactly the file being
    // served: nothing is published (same certificate), but the files no
    // longer differ from what is served, so the gauge returns to 0.
    replace_file(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64\n");
    let ev = wait_cert_event(&mut events, Duration::from_secs(10), is_reload).await;
    assert!(matches!(ev, CertEvent::Rejected { .. }), "{ev:?}");
    assert_eq!(
        scrape(&proxy)
            .await
            .one(PENDING, &[("name", "reload")])
            .value,
        1.0
    );
    replace_file(&cert_path, &third.chain_pem);
    wait_until(
        LIMIT,
        "the pending error gauge back to 0 after the served file was restored",
        || async {
            scrape(&proxy)
                .await
                .one(PENDING, &[("name", "reload")])
                .value
                == 0.0
        },
    )
    .await;
    let m = scrape(&proxy).await;
    assert_eq!(
        m.one(RELOADS, &[("result", "success")]).value,
        2.0,
        "restoring the same certificate is not a replacement"
    );
    assert_eq!(m.one(RELOADS, &[("result", "failure")]).value, 3.0);
}

/// A proxy with routes `/ok` (echo upstream) and `/dead` (nothing
/// listening: 502), and a default site so any SNI completes a handshake.
/// Also returns the two upstream addresses (config values, which may
/// appear as labels).
/// The returned [`Refusing`] keeps `/dead` refusing: hold it for the test.
async fn traffic_proxy(pki: &Pki) -> (Proxy, [String; 2], Refusing) {
    let (up, stop) = echo_upstream().await;
    std::mem::forget(stop);
    let dead = Refusing::new();
    let dir = tempfile::tempdir().unwrap();
    // The certificate also covers `*.traffic-probe.test`, so a client sending
    // a made-up SNI there verifies the default site's answer.
    pki.leaf(&["traffic.test", "*.traffic-probe.test"], Alg::Ecdsa)
        .write(dir.path(), "");
    let toml = OneSite::new()
        .admin()
        .top("[certificates]\npoll_interval = \"1h\"")
        .name("traffic")
        .host("traffic.test")
        .site("default = true")
        .route(&format!("path = \"/ok\"\nupstream = \"http://{up}\""))
        .route(&format!("path = \"/dead\"\nupstream = \"http://{dead}\""))
        .route("respond = { status = 404 }")
        .toml();
    let upstreams = [up.to_string(), dead.to_string()];
    (Proxy::start_in(dir, &toml).await, upstreams, dead)
}

#[tokio::test]
async fn label_values_never_carry_client_address_path_host_or_sni() {
    let pki = Pki::new();
    let (proxy, upstreams, _dead) = traffic_proxy(&pki).await;
    let marker = format!("zq{}x", unix_now());
    let sni = format!("{marker}-sni.traffic-probe.test");
    let path = format!("/ok/{marker}-path?q={marker}-query");
    // A handshake for an unknown name (the default site answers) and a
    // request with a unique path and Host.
    let cfg = pki.client_config(&[b"http/1.1"]);
    let req = http::Request::builder()
        .uri(&path)
        .header("host", format!("{marker}-host.test"))
        .header("user-agent", format!("{marker}-agent"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = request(proxy.https, &sni, cfg.clone(), req).await.unwrap();
    assert!(got.status < 600);
    let _ = get(
        proxy.https,
        "traffic.test",
        &format!("/dead/{marker}-dead"),
        cfg.clone(),
    )
    .await;
    let _ = get(
        proxy.https,
        "traffic.test",
        &format!("/{marker}-nowhere"),
        cfg,
    )
    .await;
    // A failed handshake with the unique SNI (the client does not trust the CA).
    let stranger = Pki::new();
    assert!(
        tls_connect(proxy.https, &sni, stranger.client_config(&[b"h2"]))
            .await
            .is_err()
    );
    // The failed handshake is the last thing recorded: await it.
    wait_until(LIMIT, "the failed handshake counted", || async {
        scrape(&proxy)
            .await
            .sum("portcullis_tls_handshake_failures_total", &[])
            >= 1.0
    })
    .await;

    let m = scrape(&proxy).await;
    assert_families_unique(&m.text);
    assert!(
        !m.text.contains(&marker),
        "a value from the network reached /metrics:\n{}",
        m.text
    );
    for v in m.label_values() {
        // Upstream addresses come from the config; nothing else on
        // 127.0.0.1 (the client) may appear.
        assert!(
            !v.contains("127.0.0.1") || upstreams.iter().any(|u| u == v),
            "client address in a label value {v:?}:\n{}",
            m.text
        );
        assert!(!v.contains(&marker), "network value in a label value {v:?}");
    }
    // Any label value from traffic families must come from a bounded set.
    for s in &m.samples {
        if let Some(route) = s.labels.get("route") {
            assert!(
                ["/ok", "/dead", "/", "-", ""].contains(&route.as_str()),
                "unbounded route label {route:?}"
            );
        }
        if let Some(site) = s.labels.get("site") {
            assert!(
                ["traffic", "-"].contains(&site.as_str()),
                "unbounded site label {site:?}"
            );
        }
    }
}

/// Needs the handler instrumentation (`record()` and upstream error kinds
/// in `src/proxy/handler.rs`).
#[tokio::test]
async fn traffic_metrics_count_requests_latency_handshakes_and_upstream_errors() {
    let pki = Pki::new();
    let (proxy, _, _dead) = traffic_proxy(&pki).await;
    let cfg = pki.client_config(&[b"http/1.1"]);
    for _ in 0..3 {
        assert_eq!(
            get(proxy.https, "traffic.test", "/ok/a", cfg.clone())
                .await
                .status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            get(proxy.https, "traffic.test", "/dead/b", cfg.clone())
                .await
                .status,
            502
        );
    }
    let stranger = Pki::new();
    assert!(tls_connect(
        proxy.https,
        "traffic.test",
        stranger.client_config(&[b"h2"])
    )
    .await
    .is_err());

    // One connection held open while scraping.
    let held = tls_connect(proxy.https, "traffic.test", cfg.clone())
        .await
        .unwrap();
    // Await the counts of everything above (the held handshake is the last
    // one, the stranger's the failure); the exact values are asserted below.
    let m = wait_for(LIMIT, "six handshakes and one failure counted", || async {
        let m = scrape(&proxy).await;
        let settled = m.sum("portcullis_tls_handshakes_total", &[]) >= 6.0
            && m.sum("portcullis_tls_handshake_failures_total", &[]) >= 1.0
            && m.one("portcullis_http_requests_in_flight", &[]).value == 0.0;
        settled.then_some(m)
    })
    .await;
    let req = "portcullis_http_requests_total";
    assert_eq!(
        m.sum(
            req,
            &[("site", "traffic"), ("method", "GET"), ("status", "2xx")]
        ),
        3.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            req,
            &[("site", "traffic"), ("method", "GET"), ("status", "5xx")]
        ),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(req, &[("site", "traffic"), ("route", "/ok")]),
        3.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(req, &[("site", "traffic"), ("route", "/dead")]),
        2.0,
        "{}",
        m.text
    );
    let hist = "portcullis_http_request_duration_seconds";
    assert_eq!(
        m.sum(
            &format!("{hist}_count"),
            &[("site", "traffic"), ("route", "/ok")]
        ),
        3.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            &format!("{hist}_count"),
            &[("site", "traffic"), ("route", "/dead")]
        ),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.one(
            &format!("{hist}_bucket"),
            &[("route", "/ok"), ("le", "+Inf")]
        )
        .value,
        3.0
    );
    assert!(m.sum(&format!("{hist}_sum"), &[("route", "/ok")]) > 0.0);
    assert_eq!(
        m.sum("portcullis_upstream_errors_total", &[("kind", "connect")]),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum("portcullis_tls_handshakes_total", &[]),
        6.0,
        "5 requests + the held connection:\n{}",
        m.text
    );
    assert_eq!(
        m.sum("portcullis_tls_handshake_failures_total", &[]),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(m.one("portcullis_http_requests_in_flight", &[]).value, 0.0);
    assert!(
        m.one("portcullis_connections_open", &[]).value >= 1.0,
        "{}",
        m.text
    );
    drop(held);
    wait_until(LIMIT, "portcullis_connections_open back to 0", || async {
        scrape(&proxy)
            .await
            .one("portcullis_connections_open", &[])
            .value
            == 0.0
    })
    .await;
    assert!(
        m.find("portcullis_process_resident_memory_bytes", &[])
            .len()
            == 1,
        "process metrics"
    );
}

/// The certificates are loaded in `Server::bind`; the file watcher starts
/// in `Server::run`. A file replaced in between must not wait for the hash
/// poll (`poll_interval`, 1 h here, 60 s by default).
#[tokio::test]
async fn certificate_replaced_while_the_proxy_starts_is_picked_up_without_the_poll() {
    let now = unix_now();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let first = pki.leaf_with_dates(
        &["early.test"],
        Alg::Ecdsa,
        at_unix(now - DAY),
        at_unix(now + 30 * DAY),
    );
    let (cert_path, _) = first.write(dir.path(), "early-");
    let toml = format!(
        "{}{}",
        head(),
        site("early", r#""early.test""#, "early-", true)
    );
    let (proxy, certs) = start_with_certs(dir, &toml).await;
    let mut events = certs.subscribe();
    // Still on this task: `run` has not started its watcher yet.
    let second = pki.leaf_with_key(
        &["early.test"],
        &first.key_pem,
        at_unix(now - DAY),
        at_unix(now + 60 * DAY),
    );
    replace_file(&cert_path, &second.chain_pem);
    let ev = wait_cert_event(
        &mut events,
        Duration::from_secs(5),
        |e| matches!(e, CertEvent::Published { name, .. } if name == "early"),
    )
    .await;
    assert_eq!(
        ev,
        CertEvent::Published {
            name: "early".into(),
            serial: second.serial.clone()
        }
    );
    assert_eq!(
        scrape(&proxy)
            .await
            .one(NOT_AFTER, &[("name", "early"), ("position", "leaf")])
            .labels["serial"],
        second.serial
    );
}
