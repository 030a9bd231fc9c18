//! `portcullis inspect HOST:PORT` against a running proxy: the served chain
//! (subject, SANs, issuer, dates, key type), the verification result, and
//! the exit code for an expiring, expired, mismatched or untrusted
//! certificate, a refused connection and a server that never answers.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn target(oc: &OnCall) -> String {
    format!("127.0.0.1:{}", oc.proxy.https.port())
}

async fn inspect(oc: &OnCall, servername: &str, extra: &[&str]) -> Cli {
    let root = oc.root_pem.to_str().unwrap().to_string();
    let mut args = vec![
        "inspect".to_string(),
        target(oc),
        "--servername".into(),
        servername.into(),
        "--cafile".into(),
        root,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    cli(args, &[]).await
}

/// The lines of block `[i]` of the report (up to the next block or `verify:`).
fn block(out: &str, i: usize) -> Vec<&str> {
    let start = format!("[{i}] ");
    let mut lines = out.lines().skip_while(|l| !l.starts_with(&start));
    let mut b = vec![lines
        .next()
        .unwrap_or_else(|| panic!("no block [{i}] in:\n{out}"))];
    b.extend(lines.take_while(|l| l.starts_with("    ")));
    b
}

#[tokio::test]
async fn inspect_prints_leaf_and_intermediate_and_verifies() {
    let oc = OnCall::start().await;
    let out = inspect(&oc, "normal.test", &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let (nb, na) = oc.dates[0];
    let first = out.stdout.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("{}: TLSv1_3 ", target(&oc))),
        "{first}"
    );
    assert!(first.ends_with("alpn=h2"), "{first}");
    assert_eq!(
        block(&out.stdout, 0),
        [
            "[0] leaf: normal.test".to_string(),
            "    SANs:       normal.test".into(),
            "    issuer:     portcullis test intermediate".into(),
            format!("    serial:     {}", oc.normal.serial),
            "    key:        ECDSA-P256".into(),
            format!("    not before: {}", rfc3339_of(nb)),
            format!("    not after:  {} (90.0 days left)", rfc3339_of(na)),
        ]
    );
    let inter = block(&out.stdout, 1);
    assert_eq!(inter[0], "[1] chain: portcullis test intermediate");
    assert!(
        inter.contains(&"    issuer:     portcullis test root"),
        "{inter:?}"
    );
    assert!(inter.contains(&"    key:        ECDSA-P256"), "{inter:?}");
    assert!(
        inter.iter().any(|l| l.starts_with("    not before: ")),
        "{inter:?}"
    );
    assert!(
        inter.iter().any(|l| l.starts_with("    not after:  ")),
        "{inter:?}"
    );
    assert!(!out.stdout.contains("[2] "), "the root is not sent");
    assert_eq!(out.stdout.lines().last(), Some("verify: ok"));
    assert_eq!(out.stderr, "");

    // The RSA one, for the key type.
    let out = inspect(&oc, "soon.test", &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        block(&out.stdout, 0).contains(&"    key:        RSA-2048"),
        "{}",
        out.stdout
    );

    // --within below the time left: still fine.
    let out = inspect(&oc, "normal.test", &["--within", "7d"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[tokio::test]
async fn inspect_within_fails_for_a_certificate_expiring_sooner() {
    let oc = OnCall::start().await;
    let out = inspect(&oc, "soon.test", &["--within", "7d"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("verify: ok"),
        "it verifies; it is just expiring: {out:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "not after:  {} (5.0 days left)",
            rfc3339_of(oc.dates[1].1)
        )),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("the leaf certificate expires within 7d"),
        "{out:?}"
    );
    // 4 days is fine.
    let out = inspect(&oc, "soon.test", &["--within", "4d"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[tokio::test]
async fn inspect_expired_certificate_fails_verification() {
    let oc = OnCall::start().await;
    let out = inspect(&oc, "expired.test", &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "not after:  {} (-2.0 days left)",
            rfc3339_of(oc.dates[2].1)
        )),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("verify: FAILED: the certificate has expired"),
        "{out:?}"
    );
}

#[tokio::test]
async fn inspect_name_not_covered_is_a_name_mismatch() {
    let oc = OnCall::start().await;
    // The default site answers the handshake for a name nobody serves.
    let out = inspect(&oc, "elsewhere.test", &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("[0] leaf: normal.test"), "{out:?}");
    assert!(
        out.stdout.contains("verify: FAILED: name mismatch"),
        "{out:?}"
    );
}

#[tokio::test]
async fn inspect_without_the_private_root_reports_unknown_issuer() {
    let oc = OnCall::start().await;
    // A trust store that does not hold the test root (SSL_CERT_FILE is
    // what `inspect` reads without --cafile).
    let now = unix_now();
    let other = Pki::with_intermediate(
        "some public root",
        "some public intermediate",
        &[0x42],
        at_unix(now - 86_400),
        at_unix(now + 86_400),
    );
    let bundle = oc.path("other-roots.pem");
    std::fs::write(&bundle, &other.root_pem).unwrap();
    let args = [
        "inspect".to_string(),
        target(&oc),
        "--servername".into(),
        "normal.test".into(),
    ];
    let out = cli(&args, &[("SSL_CERT_FILE", Some(bundle.to_str().unwrap()))]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("[0] leaf: normal.test"),
        "the chain is still shown: {out:?}"
    );
    assert!(
        out.stdout.contains("verify: FAILED: unknown issuer"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("--cafile"),
        "the hint names the option: {out:?}"
    );

    // The system bundle, when there is one, does not hold it either.
    let system = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    if system.exists() {
        let out = cli(&args, &[("SSL_CERT_FILE", None)]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(
            out.stdout.contains("verify: FAILED: unknown issuer"),
            "{out:?}"
        );
    }
}

#[tokio::test]
async fn inspect_refused_connection_is_a_clear_error() {
    // Refuses connections while held (a bound socket that never listens).
    let closed = Refusing::new();
    let out = cli(
        [
            "inspect",
            &closed.to_string(),
            "--servername",
            "x.test",
            "--timeout",
            "5s",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .contains(&format!("{closed}: connection refused")),
        "{out:?}"
    );
}

#[tokio::test]
async fn inspect_silent_server_times_out() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let started = Instant::now();
    let out = cli(
        [
            "inspect",
            &addr.to_string(),
            "--servername",
            "x.test",
            "--timeout",
            "1s",
        ],
        &[],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .contains(&format!("{addr}: TLS handshake timed out after 1s")),
        "{out:?}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(20),
        "took {took:?}"
    );
}
