//! `portcullis certs` against a running proxy (`--admin`) and from its
//! config (`--config`): the table, the JSON, and the `--within` exit codes
//! with a 90-day, a 5-day and an expired certificate.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use portcullis::certstore::CertEvent;
use serde_json::Value;

const COLUMNS: [&str; 8] = [
    "NAME",
    "SOURCE",
    "HOSTS",
    "ISSUER",
    "SERIAL",
    "NOT AFTER",
    "DAYS LEFT",
    "STATUS",
];

/// Splits the table at the header's column offsets (so misaligned cells
/// show up as garbage) and returns each row by NAME.
fn parse_table(out: &str) -> BTreeMap<String, BTreeMap<&'static str, String>> {
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let offsets: Vec<usize> = COLUMNS
        .iter()
        .map(|c| {
            header
                .find(c)
                .unwrap_or_else(|| panic!("column {c} missing from {header:?}"))
        })
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "columns out of order: {header:?}"
    );
    assert_eq!(
        header
            .split("  ")
            .filter(|c| !c.is_empty())
            .map(str::trim)
            .collect::<Vec<_>>(),
        COLUMNS
    );
    let mut rows = BTreeMap::new();
    for line in lines {
        let chars: Vec<char> = line.chars().collect();
        let mut row = BTreeMap::new();
        for (i, col) in COLUMNS.iter().enumerate() {
            let start = offsets[i];
            let end = offsets
                .get(i + 1)
                .copied()
                .unwrap_or(chars.len())
                .min(chars.len());
            assert!(
                start == 0 || chars[start - 1] == ' ',
                "cell {col} does not start at its column in {line:?}"
            );
            row.insert(
                *col,
                chars[start.min(end)..end]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string(),
            );
        }
        rows.insert(row["NAME"].clone(), row);
    }
    rows
}

fn json_array(out: &Cli) -> Vec<Value> {
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout));
    v.as_array().expect("a JSON array").clone()
}

fn by_name(arr: &[Value]) -> BTreeMap<String, Value> {
    arr.iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect()
}

/// `portcullis certs --config CONFIG --within WITHIN`.
async fn certs_within(config: &std::path::Path, within: &str) -> Cli {
    cli(
        [
            "certs".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--within".as_ref(),
            within.as_ref(),
        ],
        &[],
    )
    .await
}

#[tokio::test]
async fn certs_table_from_admin_lists_each_certificate_with_dates_and_status() {
    let oc = OnCall::start().await;
    let out = cli(["certs", "--admin", &oc.admin_url()], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let rows = parse_table(&out.stdout);
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["expired", "normal", "soon"],
        "{}",
        out.stdout
    );
    let want = [
        ("normal", &oc.normal, oc.dates[0].1, "90.0", "ok"),
        ("soon", &oc.soon, oc.dates[1].1, "5.0", "ok"),
        ("expired", &oc.expired, oc.dates[2].1, "-2.0", "EXPIRED"),
    ];
    for (name, leaf, not_after, days, status) in want {
        let row = &rows[name];
        assert_eq!(row["SOURCE"], "file", "{name}");
        assert_eq!(row["HOSTS"], format!("{name}.test"));
        assert_eq!(row["ISSUER"], "portcullis test intermediate");
        assert_eq!(row["SERIAL"], leaf.serial);
        assert_eq!(row["NOT AFTER"], rfc3339_of(not_after));
        assert_eq!(row["DAYS LEFT"], days, "{name}");
        assert_eq!(row["STATUS"], status, "{name}");
    }
}

#[tokio::test]
async fn certs_json_from_admin_and_from_config_carry_every_field() {
    let oc = OnCall::start().await;
    let admin = cli(["certs", "--admin", &oc.admin_url(), "--json"], &[]).await;
    assert_eq!(admin.code, Some(0), "{admin:?}");
    let config_path = oc.path("portcullis.toml");
    let config = cli(
        [
            "certs".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
            "--json".as_ref(),
        ],
        &[],
    )
    .await;
    assert_eq!(config.code, Some(0), "{config:?}");
    let (admin, config) = (by_name(&json_array(&admin)), by_name(&json_array(&config)));
    assert_eq!(admin.len(), 3);

    let want = [
        ("normal", &oc.normal, oc.dates[0], "ECDSA-P256", 90.0, true),
        ("soon", &oc.soon, oc.dates[1], "RSA-2048", 5.0, false),
        (
            "expired",
            &oc.expired,
            oc.dates[2],
            "ECDSA-P256",
            -2.0,
            false,
        ),
    ];
    for (name, leaf, (nb, na), key_type, days, default) in want {
        for (from, r) in [("admin", &admin[name]), ("config", &config[name])] {
            let ctx = format!("{from} {name}: {r:#}");
            assert_eq!(
                r["hosts"],
                serde_json::json!([format!("{name}.test")]),
                "{ctx}"
            );
            assert_eq!(
                r["sans"],
                serde_json::json!([format!("{name}.test")]),
                "{ctx}"
            );
            assert_eq!(r["source"], "file", "{ctx}");
            assert_eq!(
                r["cert_path"].as_str().map(std::path::PathBuf::from),
                Some(oc.path(&format!("{name}-cert.pem"))),
                "{ctx}"
            );
            assert_eq!(
                r["key_path"].as_str().map(std::path::PathBuf::from),
                Some(oc.path(&format!("{name}-key.pem"))),
                "{ctx}"
            );
            assert_eq!(r["default"], default, "{ctx}");
            assert_eq!(r["subject"], format!("{name}.test"), "{ctx}");
            assert_eq!(r["issuer"], "portcullis test intermediate", "{ctx}");
            assert_eq!(r["serial"], leaf.serial.as_str(), "{ctx}");
            assert_eq!(r["key_type"], key_type, "{ctx}");
            assert_eq!(r["not_before"], rfc3339_of(nb), "{ctx}");
            assert_eq!(r["not_after"], rfc3339_of(na), "{ctx}");
            assert_eq!(r["not_after_unix"], na, "{ctx}");
            let left = r["days_left"].as_f64().unwrap();
            assert!(
                (left - days).abs() < 0.01,
                "days_left {left}, want {days}: {ctx}"
            );
            assert_eq!(r["auto_renew"], false, "{ctx}");
            assert_eq!(r["next_renewal"], Value::Null, "{ctx}");
            assert_eq!(r["last_result"], "ok", "{ctx}");
            assert_eq!(r["last_error"], Value::Null, "{ctx}");
            let chain = r["chain"].as_array().unwrap();
            assert_eq!(chain.len(), 1, "{ctx}");
            assert_eq!(chain[0]["subject"], "portcullis test intermediate", "{ctx}");
            assert_eq!(chain[0]["issuer"], "portcullis test root", "{ctx}");
            assert!(r["last_loaded"].is_string(), "{ctx}");
        }
    }
}

#[tokio::test]
async fn certs_within_exits_1_for_the_soon_and_the_expired_certificate() {
    let oc = OnCall::start().await;
    let admin = oc.admin_url();

    let out = cli(["certs", "--admin", &admin, "--within", "30d"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "soon: expires {} (within 30d)",
            rfc3339_of(oc.dates[1].1)
        )),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains(&format!("expired: expires {}", rfc3339_of(oc.dates[2].1))),
        "{out:?}"
    );
    assert!(!out.stderr.contains("normal"), "{out:?}");
    assert_eq!(
        parse_table(&out.stdout).len(),
        3,
        "the table is still printed"
    );

    // Within a day: only the expired one, and that is enough.
    let out = cli(["certs", "--admin", &admin, "--within", "1d"], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("expired: expires"), "{out:?}");
    assert!(!out.stderr.contains("soon"), "{out:?}");

    // JSON output keeps the exit code.
    let out = cli(
        ["certs", "--admin", &admin, "--json", "--within", "1d"],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(json_array(&out).len(), 3);

    // From the config, the same answer.
    let config = oc.path("portcullis.toml");
    let out = certs_within(&config, "30d").await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("soon: expires") && out.stderr.contains("expired: expires"),
        "{out:?}"
    );

    // Only the 90-day certificate: nothing within 30 days.
    let only = oc.path("only-normal.toml");
    let out = certs_within(&only, "30d").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        parse_table(&out.stdout).keys().collect::<Vec<_>>(),
        ["normal"]
    );
    assert_eq!(out.stderr, "");
    // ...but within 100 days it is.
    let out = certs_within(&only, "100d").await;
    assert_eq!(out.code, Some(1), "{out:?}");
}

#[tokio::test]
async fn certs_shows_a_pending_reload_error_while_the_last_good_certificate_serves() {
    let oc = OnCall::start().await;
    let mut events = oc.certs.subscribe();
    let cert_path = oc.path("normal-cert.pem");
    replace_file(
        &cert_path,
        &oc.normal.chain_pem[..oc.normal.chain_pem.len() / 3],
    );
    let ev = wait_cert_event(
        &mut events,
        Duration::from_secs(10),
        |e| matches!(e, CertEvent::Rejected { name, .. } if name == "normal"),
    )
    .await;
    let CertEvent::Rejected { error, .. } = ev else {
        unreachable!()
    };

    let out = cli(["certs", "--admin", &oc.admin_url(), "--json"], &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let r = &by_name(&json_array(&out))["normal"];
    assert_eq!(r["last_result"], "error", "{r:#}");
    assert_eq!(r["last_error"], error.as_str(), "{r:#}");
    assert!(
        error.contains("normal-cert.pem"),
        "the error names the file: {error}"
    );
    assert!(r["last_error_at"].is_string(), "{r:#}");
    // The previous certificate is still what is served and reported.
    assert_eq!(r["serial"], oc.normal.serial.as_str());
    assert_eq!(r["not_after"], rfc3339_of(oc.dates[0].1));

    let out = cli(["certs", "--admin", &oc.admin_url()], &[]).await;
    let rows = parse_table(&out.stdout);
    assert_eq!(rows["normal"]["STATUS"], format!("error: {error}"));
    assert_eq!(rows["soon"]["STATUS"], "ok");
}

#[tokio::test]
async fn certs_from_config_does_not_count_internal_certificates_as_expiring() {
    let oc = OnCall::start().await;
    let config = oc.path("with-internal.toml");
    let only = std::fs::read_to_string(oc.path("only-normal.toml")).unwrap();
    std::fs::write(
        &config,
        format!(
            "{only}[[sites]]\nname = \"tools\"\nhosts = [\"tools.test\"]\ntls = \"internal\"\n\
             [[sites.routes]]\nrespond = {{ status = 200 }}\n"
        ),
    )
    .unwrap();
    let out = certs_within(&config, "30d").await;
    // An internal certificate only exists inside a running proxy, which
    // renews it by itself: read from a config it has no dates, and that
    // is not "expires within 30 days".
    assert_eq!(out.code, Some(0), "{out:?}");
    let rows = parse_table(&out.stdout);
    assert_eq!(rows["tools"]["SOURCE"], "internal");
    assert_eq!(rows["tools"]["NOT AFTER"], "-");
    assert_ne!(
        rows["tools"]["STATUS"], "ok",
        "no certificate was checked; do not say ok"
    );
}

#[tokio::test]
async fn certs_admin_unreachable_is_a_clear_error() {
    // Refuses connections while held (a bound socket that never listens).
    let closed = Refusing::new();
    let out = cli(["certs", "--admin", &format!("http://{closed}")], &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&closed.to_string()), "{out:?}");
    assert!(out.stderr.contains("is portcullis running"), "{out:?}");
    assert_eq!(out.stdout, "");
}
