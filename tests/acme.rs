//! ACME end to end against a real Pebble: HTTP-01, TLS-ALPN-01 and DNS-01
//! (hook) issuance served to real TLS clients, storage and restart without
//! a new order, renewal of a short-lived certificate under load, CA outage
//! with backoff and recovery, refused nonces, forced renewal, revocation,
//! renewal information (ARI) through a local responder, EAB, config reload.
//! Pebble must be installed (tests/run-all.sh installs it); nothing skips.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::acme::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;

const ISSUE: Duration = Duration::from_secs(60);

fn spki(der: &rustls::pki_types::CertificateDer<'_>) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    c.public_key().raw.to_vec()
}

/// Plain-HTTP GET (the redirect listener).
async fn http_get(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
) -> (u16, http::HeaderMap, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Starts Pebble and a proxy with one ACME site; returns once it is issued.
async fn issued(
    opts: PebbleOptions,
    http_listener: bool,
    name: &str,
    hosts: &[&str],
    acme: &str,
) -> (Pebble, Proxy, tempfile::TempDir, String) {
    let mut pebble = Pebble::new(opts);
    let dir = tempfile::tempdir().unwrap();
    let toml = proxy_toml(
        &pebble.directory(),
        &pebble.ca_root_path(),
        http_listener,
        "",
        &site(name, hosts, acme),
    );
    let proxy = Proxy::launch(dir.path(), &toml, |http, https| {
        pebble.start(http.unwrap_or(1), https)
    })
    .await;
    let serial = proxy.wait_issued(name, None, ISSUE, &pebble).await;
    (pebble, proxy, dir, serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_certificate_is_issued_stored_and_served() {
    let (pebble, proxy, dir, serial) = issued(
        PebbleOptions::default(),
        true,
        "web",
        &["web.test"],
        "challenges = [\"http-01\"]",
    )
    .await;

    // A real client that trusts Pebble's root gets the issued chain.
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    let leaf = handshake(proxy.https, "web.test", client.clone())
        .await
        .expect("verified handshake");
    assert_eq!(common::serial_of(&leaf), serial);
    let (status, body) = get(proxy.https, "web.test", client).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "hello from web\n"));

    // Stored: chain then key in one 0600 file, the account 0600, the directory 0700.
    let state = dir.path().join("state/acme");
    let bundle = state.join("certs/web/cert.pem");
    let pem = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        pem.matches("BEGIN CERTIFICATE").count() >= 2,
        "chain stored: {pem}"
    );
    assert!(pem.contains("BEGIN PRIVATE KEY"));
    assert_eq!(mode(&bundle), 0o600);
    assert_eq!(mode(&state), 0o700);
    let accounts: Vec<_> = std::fs::read_dir(state.join("accounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(mode(&accounts[0].join("account.json")), 0o600);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("certs/web/meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["directory"], pebble.directory());
    assert_eq!(meta["serial"], serial);

    // Inventory and metrics.
    let r = cert_report(proxy.admin(), "web").await;
    assert_eq!(r["source"], "acme");
    assert_eq!(r["auto_renew"], true);
    assert_eq!(r["serial"], serial);
    assert!(r["issuer"].as_str().unwrap().contains("Pebble"), "{r}");
    assert!(r["last_error"].is_null(), "{r}");
    assert!(r["next_renewal"].is_string(), "{r}");
    assert_eq!(renewals(proxy.admin(), "web", "success").await, Some(1.0));
    assert_eq!(renewals(proxy.admin(), "web", "failure").await, Some(0.0));
    let next = next_renewal(proxy.admin(), "web")
        .await
        .expect("next renewal gauge");
    assert!(next > now_secs());
    assert_eq!(proxy.acme.stats.orders.load(Ordering::Relaxed), 1);

    // The plain-HTTP listener still redirects everything else; a finished
    // challenge's token is no longer answered.
    let http = proxy.http.unwrap();
    let (status, headers, _) = http_get(http, "web.test", "/x?y=1").await;
    assert_eq!(status, 308);
    assert_eq!(headers["location"], "https://web.test/x?y=1");
    let (status, _, _) = http_get(
        http,
        "web.test",
        "/.well-known/acme-challenge/unknown-token",
    )
    .await;
    assert_eq!(status, 308);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_certificate_is_issued_and_served_over_h2() {
    let (pebble, proxy, _dir, serial) = issued(
        PebbleOptions::default(),
        false,
        "alpn",
        &["alpn.test", "www.alpn.test"],
        "challenges = [\"tls-alpn-01\"], key_type = \"rsa2048\"",
    )
    .await;
    let client = pebble.issued_client(&[b"h2"]).await;
    for host in ["alpn.test", "www.alpn.test"] {
        let leaf = handshake(proxy.https, host, client.clone())
            .await
            .expect("verified handshake");
        assert_eq!(common::serial_of(&leaf), serial);
        let (status, body) = get(proxy.https, host, client.clone()).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "hello from alpn\n"));
    }
    let r = cert_report(proxy.admin(), "alpn").await;
    assert_eq!(r["key_type"], "RSA-2048");
    // Once the challenge is over, an `acme-tls/1` hello is an ordinary
    // one: refused, since the proxy speaks only h2 and http/1.1.
    let mut cfg = (*pebble.issued_client(&[]).await).clone();
    cfg.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let err = common::tls_connect(proxy.https, "alpn.test", Arc::new(cfg))
        .await
        .expect_err("no challenge in progress");
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_wildcard_certificate_through_the_hook() {
    let mut pebble = Pebble::new(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    // The hook publishes the TXT record in pebble-challtestsrv's DNS (bash's
    // /dev/tcp: no curl needed) and logs its calls.
    let hook = dir.path().join("dns-hook.sh");
    let calls = dir.path().join("hook-calls.log");
    std::fs::write(
        &hook,
        format!(
            r#"#!/bin/bash
set -eu
echo "$1 $2 $3 $4 $ACME_RECORD" >> {calls}
if [ "$1" = present ]; then
  path=/set-txt; body='{{"host":"'"$ACME_RECORD"'.","value":"'"$4"'"}}'
else
  path=/clear-txt; body='{{"host":"'"$ACME_RECORD"'."}}'
fi
exec 3<>/dev/tcp/127.0.0.1/{port}
printf 'POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "$path" "${{#body}}" "$body" >&3
read -r status <&3
case "$status" in *" 200"*) exit 0 ;; *) echo "challtestsrv: $status" >&2; exit 1 ;; esac
"#,
            calls = calls.display(),
            port = pebble.dns_mgmt_port
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sites = site(
        "wild",
        &["*.wild.test"],
        &format!(
            "challenges = [\"dns-01\"], dns_hook = \"{}\"",
            hook.display()
        ),
    );
    let toml = proxy_toml(
        &pebble.directory(),
        &pebble.ca_root_path(),
        false,
        "",
        &sites,
    );
    let proxy = Proxy::launch(dir.path(), &toml, |_, https| pebble.start(1, https)).await;
    let serial = proxy.wait_issued("wild", None, ISSUE, &pebble).await;
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    for host in ["a.wild.test", "other.wild.test"] {
        let leaf = handshake(proxy.https, host, client.clone())
            .await
            .expect("wildcard verifies");
        assert_eq!(common::serial_of(&leaf), serial);
    }
    let log = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].starts_with("present wild.test ")
            && lines[0].ends_with(" _acme-challenge.wild.test"),
        "{log}"
    );
    assert!(lines[1].starts_with("cleanup wild.test "), "{log}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_stored_certificate_and_orders_nothing() {
    let (pebble, proxy, dir, serial) =
        issued(PebbleOptions::default(), true, "web", &["web.test"], "").await;
    let toml = std::fs::read_to_string(&proxy.config_path).unwrap();
    proxy.stop().await;

    let again = Proxy::launch(dir.path(), &toml, |_, _| async {}).await;
    // In service at once, before any task ran.
    assert_eq!(again.serial("web").as_deref(), Some(serial.as_str()));
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    let leaf = handshake(again.https, "web.test", client)
        .await
        .expect("verified handshake");
    assert_eq!(common::serial_of(&leaf), serial);
    // The renewal scheduler publishes its next renewal time once it has
    // decided what to do with the stored certificate (and it would order at
    // once were it missing): await that decision, not a fixed pause.
    let next = wait_for(
        Duration::from_secs(10),
        "the scheduler's decision",
        || async {
            again
                .certs
                .slot("web")
                .and_then(|s| s.status().next_renewal)
        },
    )
    .await;
    assert!(
        next > SystemTime::now(),
        "renewal due at once after a restart"
    );
    assert_eq!(
        again.acme.stats.orders.load(Ordering::Relaxed),
        0,
        "a restart must not order"
    );
    assert_eq!(again.serial("web").as_deref(), Some(serial.as_str()));
    let r = cert_report(again.admin(), "web").await;
    assert!(r["last_error"].is_null(), "{r}");
    // Pebble's default lifetime is years: renewal is far away.
    let next = next_renewal(again.admin(), "web").await.unwrap();
    let now = now_secs();
    assert!(next > now + 86_400.0, "next renewal {next} vs now {now}");
    assert_eq!(renewals(again.admin(), "web", "success").await, Some(0.0));
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificate_is_renewed_under_load_with_no_failed_request() {
    let opts = PebbleOptions {
        validity_secs: Some(18),
        ..PebbleOptions::default()
    };
    let (pebble, proxy, _dir, first) = issued(opts, true, "web", &["web.test"], "").await;
    // Full handshakes only: a resumed session shows the certificate it was
    // first made with.
    let mut cfg = (*pebble.issued_client(&[b"http/1.1"]).await).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(cfg);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let serials = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (ok, failed, serials, stop, client) = (
            ok.clone(),
            failed.clone(),
            serials.clone(),
            stop.clone(),
            client.clone(),
        );
        let addr = proxy.https;
        workers.push(tokio::spawn(async move {
            // Bounded: stopped by the test, and at most 100_000 requests.
            for _ in 0..100_000 {
                if stop.is_cancelled() {
                    break;
                }
                // A fresh connection each time: every request is a new handshake.
                match common::tls_connect(addr, "web.test", client.clone()).await {
                    Ok(tls) => {
                        serials
                            .lock()
                            .unwrap()
                            .insert(common::serial_of(&common::peer_leaf(&tls)));
                        drop(tls);
                        match get(addr, "web.test", client.clone()).await {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failed.lock().unwrap().push(format!("{other:?}")),
                        }
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
                // Pacing of the load (about 50 handshakes/s per worker), not
                // a synchronisation.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // 18 s lifetime: renewed when a third (6 s) is left, ~12 s after issue.
    let started = Instant::now();
    let second = proxy
        .wait_issued("web", Some(&first), Duration::from_secs(40), &pebble)
        .await;
    let renewed_after = started.elapsed();
    // Keep the load on until clients have handshaked with the renewed
    // certificate (and enough requests ran); the asserts below say which
    // part was missing if the wait runs out.
    eventually(Duration::from_secs(20), || async {
        serials.lock().unwrap().contains(&second) && ok.load(Ordering::Relaxed) > 50
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "only {} requests",
        ok.load(Ordering::Relaxed)
    );
    let seen = serials.lock().unwrap().clone();
    assert!(
        seen.contains(&first) && seen.contains(&second),
        "clients saw {seen:?}; first {first}, second {second}"
    );
    assert!(
        renewed_after < Duration::from_secs(17),
        "renewed only after {renewed_after:?}"
    );
    assert_eq!(renewals(proxy.admin(), "web", "success").await, Some(2.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_backs_off_keeps_serving_and_recovers() {
    // 36 s certificates: renewal is due when 12 s are left, 24 s after issue.
    let opts = PebbleOptions {
        validity_secs: Some(36),
        ..PebbleOptions::default()
    };
    let (mut pebble, proxy, _dir, first) = issued(opts, true, "web", &["web.test"], "").await;
    let issued_at = Instant::now();
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    let (http_port, tls_port) = (pebble.http_port, pebble.tls_port);
    pebble.stop();

    // Nothing is attempted before the renewal time; from then on every
    // attempt fails and is retried with backoff (base 1 s, cap 3 s).
    let limit = Duration::from_secs(32).saturating_sub(issued_at.elapsed());
    wait_until(
        limit,
        "two failed renewal attempts, 32 s after issue",
        || async { renewals(proxy.admin(), "web", "failure").await.unwrap() >= 2.0 },
    )
    .await;
    assert!(
        issued_at.elapsed() >= Duration::from_secs(22),
        "attempted before due: {:?}",
        issued_at.elapsed()
    );
    // The error is visible, the next attempt is a backoff away, the old
    // certificate still serves.
    let r = cert_report(proxy.admin(), "web").await;
    assert_eq!(r["last_result"], "error");
    assert!(
        r["last_error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{}", pebble.acme_port)),
        "{r}"
    );
    assert_eq!(r["serial"], first);
    let next = next_renewal(proxy.admin(), "web").await.unwrap();
    let now = now_secs();
    assert!(
        next <= now + 4.0,
        "retry {next} is more than the cap away from {now}"
    );
    let leaf = handshake(proxy.https, "web.test", client.clone())
        .await
        .expect("old certificate still served");
    assert_eq!(common::serial_of(&leaf), first);
    let (status, body) = admin(proxy.admin(), "POST", "/certs/web/renew?force=1").await;
    assert_eq!(status, 502, "{body}");

    // Pebble is back (with no memory of the account): the next retry
    // renews, before the old certificate expires.
    pebble.start(http_port, tls_port).await;
    let second = proxy
        .wait_issued("web", Some(&first), Duration::from_secs(15), &pebble)
        .await;
    assert!(
        issued_at.elapsed() < Duration::from_secs(36),
        "renewed after expiry"
    );
    let r = cert_report(proxy.admin(), "web").await;
    assert!(r["last_error"].is_null(), "{r}");
    assert_eq!(r["last_result"], "ok");
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    let leaf = handshake(proxy.https, "web.test", client)
        .await
        .expect("new chain verifies");
    assert_eq!(common::serial_of(&leaf), second);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_nonces_are_retried_beyond_the_librarys_two() {
    let opts = PebbleOptions {
        nonce_reject: 75,
        ..PebbleOptions::default()
    };
    let (pebble, proxy, _dir, serial) = issued(opts, true, "web", &["web.test"], "").await;
    let retries = proxy.acme.stats.nonce_retries.load(Ordering::Relaxed);
    assert!(
        retries > 0,
        "with 75% of nonces refused, instant-acme alone gives up; our retries: {retries}"
    );
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    let leaf = handshake(proxy.https, "web.test", client).await.unwrap();
    assert_eq!(common::serial_of(&leaf), serial);
    assert_eq!(renewals(proxy.admin(), "web", "failure").await, Some(0.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_renewal_then_revocation_with_a_fresh_key_each_time() {
    let (pebble, proxy, _dir, first) =
        issued(PebbleOptions::default(), true, "web", &["web.test"], "").await;
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    let leaf1 = handshake(proxy.https, "web.test", client.clone())
        .await
        .unwrap();

    let (status, body) = admin(proxy.admin(), "POST", "/certs/web/renew").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["renewed"], false, "not due: {body}");
    assert!(v["reason"].as_str().unwrap().contains("force"), "{body}");

    let (status, body) = admin(proxy.admin(), "POST", "/certs/web/renew?force=1").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["renewed"], true);
    let second = v["serial"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(proxy.serial("web").as_deref(), Some(second.as_str()));
    let leaf2 = handshake(proxy.https, "web.test", client.clone())
        .await
        .unwrap();
    assert_eq!(common::serial_of(&leaf2), second);
    assert_ne!(
        spki(&leaf1),
        spki(&leaf2),
        "a forced renewal uses a new key"
    );

    // Bad requests are refused with what to do.
    let (status, body) = admin(proxy.admin(), "POST", "/certs/web/revoke").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("key-compromise"));
    let (status, _) = admin(
        proxy.admin(),
        "POST",
        "/certs/nope/revoke?reason=superseded",
    )
    .await;
    assert_eq!(status, 404);

    // The CLI: replacement first, then revocation of the old one.
    let admin_url = format!("http://{}", proxy.admin());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "revoke",
                "web",
                "--reason",
                "key-compromise",
                "--admin",
                &admin_url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "revoke: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["revoked"], second);
    assert_eq!(v["renewed"], true);
    let third = v["serial"].as_str().unwrap().to_string();
    assert_ne!(third, second);
    let leaf3 = handshake(proxy.https, "web.test", client).await.unwrap();
    assert_eq!(common::serial_of(&leaf3), third);
    assert_ne!(spki(&leaf3), spki(&leaf2));
    assert_eq!(
        pebble.cert_status(&second).await,
        ("Revoked".to_string(), Some(1))
    );
    assert_eq!(pebble.cert_status(&third).await.0, "Valid");
    assert_eq!(renewals(proxy.admin(), "web", "success").await, Some(3.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_window_schedules_the_renewal_and_the_order_replaces_the_old_certificate() {
    let mut pebble = Pebble::new(PebbleOptions::default());
    let front = AriFront::start(&pebble).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = proxy_toml(
        &front.directory(),
        &pebble.ca_root_path(),
        true,
        "",
        &site("web", &["web.test"], ""),
    );
    let proxy = Proxy::launch(dir.path(), &toml, |http, https| {
        pebble.start(http.unwrap(), https)
    })
    .await;
    let first = proxy.wait_issued("web", None, ISSUE, &pebble).await;
    // The first order replaces nothing.
    assert_eq!(front.state.lock().unwrap().replaces, vec![None]);

    // The proxy asks about the new certificate by its ARI identifier and
    // schedules inside the (default, 30-31 days away) window.
    let leaf = proxy.certs.slot("web").unwrap().current().unwrap().key.cert[0].clone();
    let id = instant_acme::CertificateIdentifier::try_from(&leaf)
        .unwrap()
        .to_string();
    let asked = || front.state.lock().unwrap().asked.contains(&id);
    assert!(
        eventually(Duration::from_secs(10), || async { asked() }).await,
        "no ARI request for {id}: {:?}",
        front.state.lock().unwrap().asked
    );
    // The scheduler then moves its next renewal into the window: await it
    // (the exact bounds are asserted below).
    let in_window = |next: f64, now: f64| {
        next >= now + 30.0 * 86_400.0 - 60.0 && next <= now + 31.0 * 86_400.0 + 60.0
    };
    eventually(Duration::from_secs(10), || async {
        next_renewal(proxy.admin(), "web")
            .await
            .is_some_and(|next| in_window(next, now_secs()))
    })
    .await;
    let next = next_renewal(proxy.admin(), "web").await.unwrap();
    let now = now_secs();
    assert!(in_window(next, now), "next {next} now {now}");

    // The CA moves the window to now: the proxy renews within it, and the
    // order says which certificate it replaces.
    let start = SystemTime::now() + Duration::from_secs(1);
    front.set_window(start, start + Duration::from_secs(2));
    let second = proxy
        .wait_issued("web", Some(&first), Duration::from_secs(30), &pebble)
        .await;
    let renewed_at = SystemTime::now();
    assert!(renewed_at >= start, "renewed before the window");
    assert_eq!(
        front.state.lock().unwrap().replaces.last().cloned(),
        Some(Some(id)),
        "replaces the old certificate"
    );
    assert_ne!(second, first);
    assert_eq!(proxy.acme.stats.orders.load(Ordering::Relaxed), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_certificate_handshakes_fail_cleanly_or_use_the_internal_ca() {
    // Pebble is never started: every order fails.
    let pebble = Pebble::new(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let sites = format!(
        "{}{}",
        site("plain", &["plain.test"], ""),
        site(
            "fallback",
            &["fallback.test"],
            "until_issued = \"internal\""
        )
    );
    let toml = proxy_toml(
        &pebble.directory(),
        &pebble.ca_root_path(),
        true,
        "",
        &sites,
    );
    let proxy = Proxy::launch(dir.path(), &toml, |_, _| async {}).await;

    let any = common::Pki::new().client_config(&[b"http/1.1"]);
    let err = handshake(proxy.https, "plain.test", any)
        .await
        .expect_err("no certificate yet");
    assert!(
        err.to_string().to_lowercase().contains("unrecognised")
            || err.to_string().to_lowercase().contains("unrecognized"),
        "{err}"
    );

    let ca = std::fs::read(dir.path().join("state/internal-ca/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let internal = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let (status, body) = get(proxy.https, "fallback.test", internal)
        .await
        .expect("internal certificate meanwhile");
    assert_eq!((status, body.as_str()), (200, "hello from fallback\n"));

    // The failure is visible; both sites keep retrying.
    let r = error_report(proxy.admin(), "plain").await;
    assert!(
        r["last_error"]
            .as_str()
            .unwrap()
            .contains(&pebble.directory()),
        "{r}"
    );
    assert!(r["serial"].is_null());
    assert!(r["next_renewal"].is_string());
    assert_eq!(renewals(proxy.admin(), "plain", "success").await, Some(0.0));
    assert!(
        renewals(proxy.admin(), "fallback", "failure")
            .await
            .unwrap()
            >= 1.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_sent_when_the_ca_requires_it() {
    let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let opts = PebbleOptions {
        eab: Some(("kid-1".into(), key.into())),
        ..PebbleOptions::default()
    };
    let (pebble, proxy, dir, serial) = issued(
        opts,
        true,
        "web",
        &["web.test"],
        &format!("eab = {{ kid = \"kid-1\", hmac_key = \"{key}\" }}"),
    )
    .await;
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    assert_eq!(
        common::serial_of(&handshake(proxy.https, "web.test", client).await.unwrap()),
        serial
    );
    let accounts: Vec<String> = std::fs::read_dir(dir.path().join("state/acme/accounts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(accounts[0].ends_with("_kid-kid-1"), "{accounts:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_adds_an_acme_site_and_keeps_the_others_renewing() {
    let (pebble, proxy, _dir, first) =
        issued(PebbleOptions::default(), true, "one", &["one.test"], "").await;
    let toml = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        format!("{toml}\n{}", site("two", &["two.test"], "")),
    )
    .unwrap();
    let (status, body) = admin(proxy.admin(), "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let two = proxy.wait_issued("two", None, ISSUE, &pebble).await;
    assert_eq!(
        proxy.serial("one").as_deref(),
        Some(first.as_str()),
        "the first site kept its certificate"
    );
    assert_eq!(renewals(proxy.admin(), "two", "failure").await, Some(0.0));
    // The first site's task still runs after the reload.
    let (status, body) = admin(proxy.admin(), "POST", "/certs/one/renew?force=1").await;
    assert_eq!(status, 200, "{body}");
    let client = pebble.issued_client(&[b"http/1.1"]).await;
    for (host, not) in [("one.test", first.as_str()), ("two.test", "")] {
        let leaf = handshake(proxy.https, host, client.clone()).await.unwrap();
        assert_ne!(common::serial_of(&leaf), not);
    }
    assert_eq!(
        common::serial_of(&handshake(proxy.https, "two.test", client).await.unwrap()),
        two
    );
    // A reload that only moves the sites to other lines keeps their slots
    // (and renewal tasks).
    let before = proxy.certs.slot("one").unwrap();
    let toml = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(&proxy.config_path, format!("# moved down\n\n{toml}")).unwrap();
    let (status, body) = admin(proxy.admin(), "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        Arc::ptr_eq(&before, &proxy.certs.slot("one").unwrap()),
        "slot replaced by a no-op reload"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_order_waits_for_the_cas_retry_after() {
    let mut pebble = Pebble::new(PebbleOptions::default());
    let front = AriFront::start(&pebble).await;
    {
        let mut s = front.state.lock().unwrap();
        s.rate_limit_orders = 1;
        s.retry_after_secs = 6;
    }
    let dir = tempfile::tempdir().unwrap();
    let toml = proxy_toml(
        &front.directory(),
        &pebble.ca_root_path(),
        true,
        "",
        &site("web", &["web.test"], ""),
    );
    let started = SystemTime::now();
    let proxy = Proxy::launch(dir.path(), &toml, |http, https| {
        pebble.start(http.unwrap(), https)
    })
    .await;
    // The refusal is visible, and the retry waits for the CA's Retry-After
    // (6 s), past the configured cap (retry_max = 3 s).
    let r = error_report(proxy.admin(), "web").await;
    assert!(
        r["last_error"].as_str().unwrap().contains("rateLimited"),
        "{r}"
    );
    let next = next_renewal(proxy.admin(), "web").await.unwrap();
    let t0 = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        next >= t0 + 5.0,
        "retry at {next}, {}s after start",
        next - t0
    );
    proxy
        .wait_issued("web", None, Duration::from_secs(30), &pebble)
        .await;
    let took = started.elapsed().unwrap();
    assert!(
        took >= Duration::from_secs(5),
        "issued after {took:?}: Retry-After ignored"
    );
    assert_eq!(renewals(proxy.admin(), "web", "failure").await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_and_certs_cli_know_acme_sites() {
    // An unreadable ca_root is caught before serving, with file, line and field.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-root.pem");
    let toml = proxy_toml(
        "https://127.0.0.1:9/dir",
        &missing,
        true,
        "",
        &site("web", &["web.test"], ""),
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, &toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let tls_line = toml.lines().position(|l| l.starts_with("tls = ")).unwrap() + 1;
    assert!(
        stderr.contains(&format!(
            "{}:{tls_line}: sites[0].tls: ca_root {}: cannot read it",
            path.display(),
            missing.display()
        )),
        "{stderr}"
    );

    // `certs --config` reads the stored certificate, no proxy running.
    let (_pebble, proxy, dir, serial) =
        issued(PebbleOptions::default(), true, "web", &["web.test"], "").await;
    proxy.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["certs", "--json", "--config"])
        .arg(dir.path().join("portcullis.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["source"], "acme");
    assert_eq!(v[0]["serial"], serial);
    assert_eq!(v[0]["auto_renew"], true);
}
