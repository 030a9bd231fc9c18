//! Property tests for the configuration loader (`Config::load`): whatever
//! the file holds, loading never panics, and a refusal names the file and
//! the line of every problem.
//!
//! The error format (src/config/mod.rs, `Origin`'s `Display`) is
//! `FILE:LINE: FIELD: MESSAGE`, except for the few errors about the whole
//! file rather than a line of it, which read `FILE: FIELD: MESSAGE` (line
//! 0): see [`WHOLE_FILE_FIELDS`]. Every case loads from its own temporary
//! directory, since relative paths in a config (certificates, CA files)
//! are resolved against the file's directory.
//!
//! The normal test command runs a bounded number of cases per property
//! (see `CASES`; the whole file takes a few seconds in debug). A longer
//! job, for a nightly run or before touching src/config:
//!
//! ```text
//! PROPTEST_CASES=20000 cargo test --release --test fuzz_config
//! ```
//!
//! A failing case is written to `tests/fuzz_config.proptest-regressions`
//! (commit it) and becomes a named `#[test]` at the end of this file.

mod common;

use std::path::Path;

use portcullis::config::{Config, ConfigErrors};
use proptest::prelude::*;
use proptest::sample::Index;

/// Cases per property in the normal test run; `PROPTEST_CASES` overrides.
const CASES: u32 = 128;

/// Fields of the errors that are about the whole file and carry no line:
/// a file with sites but no https listener. (An unreadable file is one
/// too, but every file here is readable; one that is not UTF-8 gets the
/// line of its first bad byte.)
const WHOLE_FILE_FIELDS: &[&str] = &["listeners"];

const QUICKSTART: &str = include_str!("../config/quickstart.toml");
const REFERENCE: &str = include_str!("../config/reference.toml");

fn config() -> ProptestConfig {
    common::fuzz::proptest_config(CASES)
}

/// Loads `bytes` as `portcullis.toml` in a fresh directory and checks the
/// shape of every error. Returns whether the file was accepted.
fn load_checked(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, bytes).unwrap();
    match Config::load(&path) {
        Ok(_) => Ok(true),
        Err(errors) => {
            check_errors(&path, bytes, &errors)?;
            Ok(false)
        }
    }
}

/// Every error names `path`, and a line that exists in the file (or none,
/// for the whole-file errors).
fn check_errors(path: &Path, bytes: &[u8], errors: &ConfigErrors) -> Result<(), TestCaseError> {
    prop_assert!(!errors.0.is_empty(), "an Err with no error in it");
    let file = path.display().to_string();
    // A line past the end is the end of the file (a missing `]`, say).
    let last_line = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
    for e in &errors.0 {
        let shown = e.to_string();
        prop_assert_eq!(&e.origin.file, path, "{}", shown);
        if e.origin.line == 0 {
            prop_assert!(
                WHOLE_FILE_FIELDS.contains(&e.origin.field.as_str()),
                "error without a line: {}",
                shown
            );
            prop_assert!(shown.starts_with(&format!("{file}: ")), "{}", shown);
        } else {
            prop_assert!(e.origin.line <= last_line, "line past the end: {}", shown);
            let prefix = format!("{file}:{}: ", e.origin.line);
            prop_assert!(shown.starts_with(&prefix), "{}", shown);
        }
        prop_assert!(!e.message.is_empty(), "no message: {}", shown);
    }
    // The multi-error display is one error per line.
    prop_assert_eq!(errors.to_string().lines().count(), errors.0.len());
    Ok(())
}

/// Keys that the file format knows, from config/reference.toml and
/// src/config/raw.rs, plus a few it does not.
#[rustfmt::skip]
const KEYS: &[&str] = &[
    "state_dir", "listen", "protocol", "https_port", "name", "hosts", "tls", "default", "cert",
    "key", "acme", "path", "upstream", "upstreams", "url", "weight", "strip_prefix",
    "preserve_host", "respond", "status", "body", "content_type", "redirect", "to", "lb",
    "retries", "retry_budget", "ca", "tls_server_name", "client_cert", "client_key",
    "health_check", "passive_health", "interval", "timeout", "healthy_threshold",
    "unhealthy_threshold", "failures", "window", "cooldown", "rate", "burst", "mode",
    "tls_handshake", "request_header", "request_body", "response_write", "idle",
    "upstream_connect", "upstream_response", "upstream_idle", "shutdown_grace",
    "max_header_bytes", "max_headers", "max_connections", "max_upstream_idle_per_host",
    "poll_interval", "trusted_proxies", "max_keys", "purge_interval", "directory", "email",
    "challenges", "key_type", "renew_before", "retry_base", "retry_max", "order_timeout",
    "until_issued", "ca_root", "dns_hook", "eab", "profile", "kid", "hmac_key", "bogus",
    "sites", "listeners", "routes", "rate_limits",
];

/// Table headers, including nested and unknown ones.
#[rustfmt::skip]
const HEADERS: &[&str] = &[
    "[admin]", "[timeouts]", "[limits]", "[certificates]", "[rate_limit]", "[acme]",
    "[acme.eab]", "[[listeners]]", "[[sites]]", "[[sites.routes]]",
    "[[sites.routes.rate_limits]]", "[sites.routes.health_check]",
    "[sites.routes.passive_health]", "[sites.tls]", "[sites.tls.acme]", "[[sites.routes.upstreams]]",
    "[bogus]", "[[admin]]", "[sites]",
];

/// Strings that mean something to some key (addresses, URLs, durations,
/// rates, paths, names) and some that mean nothing.
#[rustfmt::skip]
const STRINGS: &[&str] = &[
    "", "off", "127.0.0.1:0", "0.0.0.0:443", "[::]:443", "127.0.0.1:99999", "localhost:80",
    "http://127.0.0.1:3000", "https://10.0.0.1:8443", "http//x", "http://h/path", "ws://x",
    "10s", "0s", "1m", "4h", "-1s", "18446744073709551616s", "1/3", "0/0", "3/2", "100/s",
    "0/s", "6000/min", "1/d", "x/s", "cert.pem", "key.pem", "/nonexistent/cert.pem", "..",
    "internal", "acme", "letsencrypt", "letsencrypt-staging", "https://ca.test/dir", "http",
    "https", "http1", "http2", "auto", "least_requests", "round_robin", "random", "ip",
    "route", "header:x-api-key", "header:", "shadow", "enforce", "ecdsa-p256", "rsa4096",
    "http-01", "tls-alpn-01", "dns-01", "none", "ops@example.com", "*.example.com", "*",
    "a..b", "api.test", "/", "/v1/", "v1", "https://x{uri}", "{uri", "10.0.0.0/8",
    "10.0.0.0/33", "::1/129", "é", "\u{0}",
];

/// A random TOML value: strings, numbers of all sizes, bools, floats,
/// dates, lists and inline tables nested a few levels.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => prop::sample::select(STRINGS).prop_map(quote),
        1 => "[ -~]{0,12}".prop_map(|s| quote(&s)),
        1 => "[ -~]{0,12}".prop_map(|s| format!("'{}'", s.replace('\'', ""))),
        2 => prop_oneof![
            Just(0i64), Just(1), Just(-1), Just(443), Just(65536), Just(i64::MAX), Just(i64::MIN),
            any::<i64>()
        ].prop_map(|n| n.to_string()),
        1 => prop::sample::select(&["1.5", "-0.0", "inf", "nan", "1e400", "0x10", "0o7", "0b1"][..])
            .prop_map(str::to_string),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..4).prop_map(|v| {
                let kv: Vec<String> = v.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

/// `s` as a TOML basic string (Rust's `{:?}` escapes are not all TOML).
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A new value for a line of reference.toml.
#[derive(Debug, Clone)]
enum Replacement {
    /// A string and a whole number: the one of the line's type is used.
    SameType(String, String),
    /// Any value, of any type.
    Any(String),
}

fn replacement() -> impl Strategy<Value = Replacement> {
    let int = prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(3),
        Just(65536),
        Just(i64::MAX),
        any::<i64>()
    ];
    prop_oneof![
        29 => (prop::sample::select(STRINGS).prop_map(quote), int.prop_map(|n| n.to_string()))
            .prop_map(|(s, n)| Replacement::SameType(s, n)),
        1 => value().prop_map(Replacement::Any),
    ]
}

/// A line of a structured document.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => prop::sample::select(HEADERS).prop_map(str::to_string),
        1 => (prop::sample::select(KEYS), prop::sample::select(KEYS), value())
            .prop_map(|(a, b, v)| format!("{a}.{b} = {v}")),
        1 => Just("# comment".to_string()),
        1 => Just(String::new()),
    ]
}

/// Documents made of known headers, known keys and random values.
fn document() -> impl Strategy<Value = String> {
    prop::collection::vec(line(), 0..40).prop_map(|lines| lines.join("\n") + "\n")
}

/// One change to a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(Index),
    Duplicate(Index),
    /// The value of line `Index` (if it has one) becomes this one.
    Retype(Index, String),
    Insert(Index, String),
    /// Cut the file at a byte (on a char boundary).
    Truncate(Index),
}

fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,30}",
        Just("[".to_string()),
        Just("[[".to_string()),
        Just("]]".to_string()),
        Just("= 1".to_string()),
        Just("\"unterminated".to_string()),
        Just("x = \"\"\"".to_string()),
        Just("a.b.c.d = {".to_string()),
        line(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Duplicate),
        (any::<Index>(), value()).prop_map(|(i, v)| Mutation::Retype(i, v)),
        (any::<Index>(), garbage()).prop_map(|(i, g)| Mutation::Insert(i, g)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        match m {
            Mutation::Delete(i) => {
                lines.remove(i.index(lines.len()));
            }
            Mutation::Duplicate(i) => {
                let i = i.index(lines.len());
                lines.insert(i, lines[i].clone());
            }
            Mutation::Retype(i, v) => {
                let i = i.index(lines.len());
                if let Some((k, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{k}= {v}");
                }
            }
            Mutation::Insert(i, g) => {
                let i = i.index(lines.len() + 1);
                lines.insert(i, g.clone());
            }
            Mutation::Truncate(i) => {
                let joined = lines.join("\n");
                let mut at = i.index(joined.len() + 1);
                while !joined.is_char_boundary(at) {
                    at -= 1;
                }
                lines = joined[..at].lines().map(str::to_string).collect();
            }
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn shipped_configs_load() {
    // The mutation properties start from these; they must be valid as is
    // (in a directory of their own: relative paths point nowhere).
    for text in [QUICKSTART, REFERENCE] {
        assert!(
            load_checked(text.as_bytes()).unwrap(),
            "shipped config refused"
        );
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes (not even UTF-8): no panic, and file:line errors.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        load_checked(&bytes)?;
    }

    /// Printable text with TOML punctuation.
    #[test]
    fn random_toml_ish_text_never_panics(text in "[a-z_ =\\[\\]{}\".,0-9#'\n]{0,300}") {
        load_checked(text.as_bytes())?;
    }

    /// Known headers and keys with values of random types and nesting.
    #[test]
    fn structured_documents_never_panic(doc in document()) {
        load_checked(doc.as_bytes())?;
    }

    /// quickstart.toml with a few lines deleted, duplicated, retyped,
    /// inserted or cut off.
    #[test]
    fn mutated_quickstart_never_panics(ms in prop::collection::vec(mutation(), 1..4)) {
        load_checked(mutate(QUICKSTART, &ms).as_bytes())?;
    }

    /// reference.toml with some values replaced by random ones, mostly of
    /// the type the key has there, so most cases get past serde into the
    /// checks of src/config/validate.rs.
    #[test]
    fn reference_with_random_values_never_panics(
        values in prop::collection::vec(prop::option::weighted(0.1, replacement()), 300),
    ) {
        let mut values = values.into_iter();
        let text: Vec<String> = REFERENCE
            .lines()
            .map(|l| {
                let Some((k, old)) = l.split_once(" = ") else {
                    return l.to_string();
                };
                let Some(r) = values.next().flatten() else {
                    return l.to_string();
                };
                let old = old.trim_start();
                // Comments, a multi-line list's first line, its elements.
                if l.trim_start().starts_with(['#', '{']) || old.starts_with('[') {
                    return l.to_string();
                }
                let v = match r {
                    Replacement::SameType(s, _) if old.starts_with('"') => s,
                    Replacement::SameType(_, n) if old.starts_with(|c: char| c.is_ascii_digit()) => n,
                    Replacement::SameType(..) => return l.to_string(),
                    Replacement::Any(v) => v,
                };
                format!("{k} = {v}")
            })
            .collect();
        load_checked((text.join("\n") + "\n").as_bytes())?;
    }

    /// reference.toml (every key) mutated the same way.
    #[test]
    fn mutated_reference_never_panics(ms in prop::collection::vec(mutation(), 1..4)) {
        load_checked(mutate(REFERENCE, &ms).as_bytes())?;
    }
}

/// `random_bytes_never_panic` accepted line-less "file" errors at first;
/// asking it for a line in every error showed that a file that is not
/// UTF-8 was refused as a whole
/// ("cannot read the configuration file: stream did not contain valid
/// UTF-8"), with no line to look at.
#[test]
fn non_utf8_file_error_names_the_line_of_the_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(
        &path,
        b"[admin]\nlisten = \"off\"\nstate_dir = \"/v\xffr\"\n",
    )
    .unwrap();
    let e = Config::load(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:3: file: byte 16 of this line is not UTF-8; save the file as UTF-8",
            path.display()
        )
    );
}
