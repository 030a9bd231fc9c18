//! `portcullis renew NAME` and `portcullis reload` against a running proxy:
//! one line a person reads by default, the admin API's JSON with `--json`.
//! The renewal is an internal-CA certificate, so it also shows an admin
//! renewal going through the store's one publish path (announced, counted).

mod common;

use std::time::Duration;

use common::*;
use portcullis::certstore::CertEvent;

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"
[certificates]
poll_interval = "1h"
[[listeners]]
listen = "127.0.0.1:0"
[[sites]]
name = "tools"
hosts = ["tools.internal.test"]
tls = "internal"
  [[sites.routes]]
  respond = { status = 200 }
"#;

#[tokio::test]
async fn renew_and_reload_print_one_line_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, certs) = start_with_certs(dir, CONFIG).await;
    let admin = format!("http://{}", proxy.admin.unwrap());
    let mut events = certs.subscribe();
    let before = certs.slot("tools").unwrap().current().unwrap();

    // Not due: nothing happens, and the line says how to force it.
    let out = cli(["renew", "tools", "--admin", &admin], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.trim_end(),
        "tools not renewed: not due yet; use force to renew now"
    );

    let out = cli(["renew", "tools", "--force", "--admin", &admin], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let ev = wait_cert_event(
        &mut events,
        Duration::from_secs(10),
        |e| matches!(e, CertEvent::Published { name, .. } if name == "tools"),
    )
    .await;
    let CertEvent::Published { serial, .. } = ev else {
        unreachable!()
    };
    assert_ne!(serial, before.info.serial);
    let now = certs.slot("tools").unwrap().current().unwrap();
    assert_eq!(now.info.serial, serial);
    let not_after = portcullis::certstore::rfc3339(now.info.not_after);
    assert_eq!(
        out.stdout,
        format!("renewed tools: serial {serial}, not after {not_after}\n")
    );
    assert_eq!(
        certs
            .stats
            .reloads_ok
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let out = cli(
        ["renew", "tools", "--force", "--json", "--admin", &admin],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["renewed"], true);
    assert_ne!(v["serial"].as_str().unwrap(), serial);

    // A name that does not exist: one line, exit 1.
    let out = cli(["renew", "nope", "--admin", &admin], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.starts_with("nope not renewed: "), "{out:?}");

    let out = cli(["reload", "--admin", &admin], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "reloaded config: 0 certificates replaced\n");

    let out = cli(["reload", "--json", "--admin", &admin], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["report"]["certificates_replaced"], 0);

    // A config that cannot be used: refused, the line says so, exit 1.
    std::fs::write(
        proxy.dir.join("portcullis.toml"),
        "[[listeners]]\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let out = cli(["reload", "--admin", &admin], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .starts_with("reload refused; the running configuration stays: "),
        "{out:?}"
    );
    proxy.shutdown.cancel();
}
