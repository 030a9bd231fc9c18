//! Broken configurations and broken certificate files: every error names the
//! file, the line, the field and what to do, and all of them are reported
//! at once. Certificate problems are checked both where the server starts
//! (`Server::bind`) and through `portcullis validate`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use portcullis::config::Config;
use tokio_util::sync::CancellationToken;

/// A valid file; tests replace one line at a time. Kept as literal text,
/// not built with `OneSite`: the expected messages and `replace_line`
/// count its lines, so they must be visible right here. Line numbers:
/// 1 `[admin]`, 4 listeners[0].listen, 5 `[[sites]]`, 6 hosts, 7 tls,
/// 8 `[[sites.routes]]`, 9 upstream.
const BASE: &str = r#"[admin]
listen = "off"
[[listeners]]
listen = "127.0.0.1:0"
[[sites]]
hosts = ["api.test"]
tls = { cert = "cert.pem", key = "key.pem" }
  [[sites.routes]]
  upstream = "http://127.0.0.1:3000"
"#;

/// A second site, appended to [`BASE`] (its lines are 10 to 14).
const SECOND_SITE: &str = r#"[[sites]]
hosts = ["b.test"]
tls = { cert = "cert.pem", key = "key.pem" }
  [[sites.routes]]
  upstream = "http://127.0.0.1:3000"
"#;

/// Writes `toml` as `portcullis.toml` in a fresh directory.
fn write_config(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

/// Loads `toml` and returns every error, one per line, with the file path
/// written as `{f}`.
fn config_errors(toml: &str) -> String {
    let (_dir, path) = write_config(toml);
    match Config::load(&path) {
        Ok(_) => panic!("config was accepted:\n{toml}"),
        Err(e) => e.to_string().replace(&path.display().to_string(), "{f}"),
    }
}

fn replace_line(toml: &str, line: usize, with: &str) -> String {
    let mut lines: Vec<&str> = toml.lines().collect();
    lines[line - 1] = with;
    lines.join("\n") + "\n"
}

#[test]
fn unknown_key_names_its_full_path_and_the_keys_allowed() {
    let toml = format!("{BASE}  colour = \"blue\"\n");
    assert_eq!(
        config_errors(&toml),
        "{f}:10: sites[0].routes[0].colour: unknown key \"colour\"; remove it or fix its spelling \
         (expected one of `path`, `upstream`, `strip_prefix`, `preserve_host`, `respond`, `redirect`, `rate_limits`, \
         `upstreams`, `lb`, `protocol`, `ca`, `tls_server_name`, `client_cert`, `client_key`, `retries`, \
         `retry_budget`, `health_check`, `passive_health`)"
    );
    // In the second element of a nested array of tables, and in an inline table.
    let toml = format!(
        "{BASE}{SECOND_SITE}  [[sites.routes]]\n  path = \"/x\"\n  respond = {{ status = 200, bdy = \"x\" }}\n"
    );
    assert_eq!(
        config_errors(&toml),
        "{f}:17: sites[1].routes[1].respond.bdy: unknown key \"bdy\"; remove it or fix its spelling \
         (expected one of `status`, `body`, `content_type`)"
    );
    let toml = format!("{BASE}[timeouts]\nidel = \"5s\"\n");
    assert_eq!(
        config_errors(&toml),
        "{f}:11: timeouts.idel: unknown key \"idel\"; remove it or fix its spelling (expected one of \
         `tls_handshake`, `request_header`, `request_body`, `response_write`, `idle`, `upstream_connect`, \
         `upstream_response`, `upstream_idle`, `shutdown_grace`)"
    );
}

#[test]
fn bad_listen_address_says_to_write_ip_and_port() {
    let toml = replace_line(BASE, 4, "listen = \"localhost:443\"");
    // Only this error: the listener is not also reported as missing.
    assert_eq!(
        config_errors(&toml),
        "{f}:4: listeners[0].listen: \"localhost:443\" is not an address; write IP:PORT such as \
         \"0.0.0.0:443\" or \"[::]:443\""
    );
}

#[test]
fn bad_durations_say_which_unit_to_use() {
    let toml = format!(
        "{BASE}[timeouts]\nidle = \"5x\"\nupstream_response = \"30\"\nshutdown_grace = \"0s\"\n"
    );
    assert_eq!(
        config_errors(&toml),
        "{f}:11: timeouts.idle: \"5x\" has an unknown unit \"x\"; use ms, s, m, h or d\n\
         {f}:12: timeouts.upstream_response: \"30\" has no unit; write e.g. \"30s\" (units: ms, s, m, h, d)\n\
         {f}:13: timeouts.shutdown_grace: must be greater than zero"
    );
}

#[test]
fn missing_tls_says_how_to_set_it() {
    let toml = BASE.replace("tls = { cert = \"cert.pem\", key = \"key.pem\" }\n", "");
    assert_eq!(
        config_errors(&toml),
        "{f}:5: sites[0].tls: is missing; set tls = { cert = \"fullchain.pem\", key = \"key.pem\" } or \
         tls = \"internal\""
    );
    let toml = replace_line(BASE, 7, "tls = { cert = \"cert.pem\" }");
    assert_eq!(
        config_errors(&toml),
        "{f}:7: sites[0].tls.key: is missing; write tls = \"internal\" or tls = { cert = \"fullchain.pem\", \
         key = \"privkey.pem\" }"
    );
}

#[test]
fn bad_upstream_url_says_how_to_write_it() {
    let toml = replace_line(BASE, 9, "  upstream = \"http//x\"");
    assert_eq!(
        config_errors(&toml),
        "{f}:9: sites[0].routes[0].upstream: \"http//x\" is not a URL; write it as \"http://host:port\""
    );
    let toml = replace_line(BASE, 9, "  upstream = \"http://127.0.0.1:3000/api\"");
    assert_eq!(
        config_errors(&toml),
        "{f}:9: sites[0].routes[0].upstream: \"http://127.0.0.1:3000/api\": an upstream URL takes no path; \
         the request path is forwarded as is (use strip_prefix = true to drop the route prefix)"
    );
}

#[test]
fn route_with_two_actions_is_refused() {
    let toml = format!("{BASE}  respond = {{ status = 200 }}\n");
    assert_eq!(
        config_errors(&toml),
        "{f}:8: sites[0].routes[0]: has more than one action; keep exactly one of upstream, respond and redirect"
    );
}

#[test]
fn host_already_served_by_another_site_is_refused() {
    let toml = format!("{BASE}{}", SECOND_SITE.replace("b.test", "API.test"));
    // One error: the site name taken from that host is not reported too.
    assert_eq!(
        config_errors(&toml),
        "{f}:11: sites[1].hosts[0]: \"api.test\" is already served by sites[0]; a host belongs to one site"
    );
}

#[test]
fn second_default_site_is_refused() {
    let toml = format!(
        "{}{}",
        replace_line(BASE, 6, "hosts = [\"api.test\"]\ndefault = true"),
        SECOND_SITE.replace(
            "hosts = [\"b.test\"]",
            "hosts = [\"b.test\"]\ndefault = true"
        )
    );
    assert_eq!(
        config_errors(&toml),
        "{f}:13: sites[1].default: sites[0] is already the default site; only one site may set default = true"
    );
}

#[test]
fn bad_host_names_are_refused() {
    let toml = replace_line(BASE, 6, "hosts = [\"https://api.test/\", \"*.test\"]");
    assert_eq!(
        config_errors(&toml),
        "{f}:6: sites[0].hosts[0]: \"https://api.test/\" is not a host name; write a name such as \
         \"api.example.com\" or \"*.example.com\" (no scheme, port or path)\n\
         {f}:6: sites[0].hosts[1]: \"*.test\" is too broad; a wildcard needs at least two labels after \"*.\""
    );
}

#[test]
fn bad_redirect_status_is_refused() {
    let toml = replace_line(
        BASE,
        9,
        "  redirect = { to = \"https://new.test{uri}\", status = 200 }",
    );
    assert_eq!(
        config_errors(&toml),
        "{f}:9: sites[0].routes[0].redirect.status: 200 is not a redirect status; use 301, 302, 303, 307 or 308"
    );
}

#[test]
fn toml_syntax_error_names_the_line_and_what_was_expected() {
    let toml = replace_line(BASE, 2, "listen = \"off");
    assert_eq!(
        config_errors(&toml),
        "{f}:2: admin.listen: is not valid TOML: invalid basic string, expected `\"`"
    );
    let toml = replace_line(BASE, 5, "[[sites]");
    assert_eq!(
        config_errors(&toml),
        "{f}:5: sites[0]: is not valid TOML: unclosed array table, expected `]`"
    );
    let toml = replace_line(BASE, 7, "tls = \"internal\"\ntls = \"internal\"");
    assert_eq!(
        config_errors(&toml),
        "{f}:8: sites[0].tls: is not valid TOML: duplicate key; keep only one of them"
    );
}

#[test]
fn value_of_the_wrong_type_says_what_to_write() {
    let toml = replace_line(BASE, 4, "listen = 443");
    assert_eq!(
        config_errors(&toml),
        "{f}:4: listeners[0].listen: integer `443` is the wrong type, expected a string; put the value in \
         double quotes"
    );
    let toml = format!("{BASE}[limits]\nmax_headers = \"many\"\n");
    assert_eq!(
        config_errors(&toml),
        "{f}:11: limits.max_headers: string \"many\" is the wrong type, expected a whole number; write a whole \
         number, without quotes"
    );
}

#[test]
fn missing_required_key_names_the_table() {
    let toml = BASE.replace("hosts = [\"api.test\"]\n", "");
    assert_eq!(
        config_errors(&toml),
        "{f}:5: sites[0].hosts: required key \"hosts\" is missing from this table; add it"
    );
}

#[test]
fn no_https_listener_is_reported_for_the_file() {
    let toml = BASE.replace("[[listeners]]\nlisten = \"127.0.0.1:0\"\n", "");
    assert_eq!(
        config_errors(&toml),
        "{f}: listeners: no https listener; add [[listeners]] with listen = \"0.0.0.0:443\""
    );
}

#[test]
fn several_errors_are_reported_at_once_in_file_order() {
    let toml = format!(
        "{}[timeouts]\nidle = \"forever\"\n",
        replace_line(
            &replace_line(BASE, 4, "listen = \"443\""),
            9,
            "  upstream = \"ftp://x\""
        )
    );
    assert_eq!(
        config_errors(&toml),
        "{f}:4: listeners[0].listen: \"443\" is not an address; write IP:PORT such as \"0.0.0.0:443\" or \
         \"[::]:443\"\n\
         {f}:9: sites[0].routes[0].upstream: \"ftp://x\": scheme \"ftp\" is not supported; use http:// or https://\n\
         {f}:11: timeouts.idle: \"forever\" is not a duration; write a number with a unit: ms, s, m, h or d \
         (e.g. \"30s\")"
    );
}

// ---------------------------------------------------------------------------
// Certificate files: reported by `Server::bind` and by `portcullis validate`.

/// A directory holding [`BASE`] as `portcullis.toml`, plus a PKI.
struct CertCase {
    pki: Pki,
    dir: tempfile::TempDir,
}

impl CertCase {
    fn new() -> CertCase {
        let (dir, _) = write_config(BASE);
        CertCase {
            pki: Pki::new(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.path(name), contents).unwrap();
    }

    /// A good `cert.pem` + `key.pem` for api.test.
    fn good(&self) -> Leaf {
        let leaf = self.pki.leaf(&["api.test"], Alg::Ecdsa);
        leaf.write(self.dir.path(), "");
        leaf
    }

    /// Asserts that both `Server::bind` and `portcullis validate` report
    /// exactly `expected` (`{f}` is the config file, `{d}` its directory).
    async fn assert_reports(&self, expected: &str) {
        let config_path = self.path("portcullis.toml");
        let expected = expected
            .replace("{f}", &config_path.display().to_string())
            .replace("{d}", &self.dir.path().display().to_string());

        let config = Config::load(&config_path).unwrap();
        match portcullis::Server::bind(config, CancellationToken::new()).await {
            Err(e @ portcullis::Error::Certs(_)) => {
                assert_eq!(e.to_string(), expected, "Server::bind")
            }
            Err(e) => panic!("Server::bind failed for another reason: {e}"),
            Ok(_) => panic!("Server::bind accepted the certificates"),
        }

        let (code, stdout, stderr) = validate_cli(&config_path);
        assert_eq!(
            code,
            Some(1),
            "validate exit code; stdout: {stdout}; stderr: {stderr}"
        );
        assert_eq!(
            stderr,
            format!(
                "{expected}\nconfiguration {} is invalid\n",
                config_path.display()
            ),
            "validate stderr"
        );
        assert_eq!(stdout, "");
    }
}

/// Runs `portcullis validate --config F`: exit code, stdout, stderr.
fn validate_cli(config: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config"])
        .arg(config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn empty_certificate_file_is_reported() {
    let c = CertCase::new();
    c.good();
    c.write("cert.pem", "\n");
    c.assert_reports("{f}:7: sites[0].tls: {d}/cert.pem: the file is empty")
        .await;
}

#[tokio::test]
async fn truncated_certificate_pem_is_reported() {
    let c = CertCase::new();
    let leaf = c.good();
    // Cut inside the leaf's base64: no END line.
    c.write("cert.pem", &leaf.chain_pem[..200]);
    c.assert_reports(
        "{f}:7: sites[0].tls: {d}/cert.pem: the PEM is damaged or truncated (\"-----END CERTIFICATE-----\" is \
         missing); copy the complete file again",
    )
    .await;
}

#[tokio::test]
async fn key_that_does_not_match_the_certificate_is_reported() {
    let c = CertCase::new();
    c.good();
    let other = c.pki.leaf(&["api.test"], Alg::Ecdsa);
    c.write("key.pem", &other.key_pem);
    c.assert_reports(
        "{f}:7: sites[0].tls: the private key in {d}/key.pem does not match the certificate in {d}/cert.pem; \
         install the key that was issued with this certificate",
    )
    .await;
}

#[tokio::test]
async fn certificate_not_covering_the_site_host_is_reported() {
    let c = CertCase::new();
    c.pki
        .leaf(&["other.test", "*.other.test"], Alg::Ecdsa)
        .write(c.dir.path(), "");
    c.assert_reports(
        "{f}:7: sites[0].tls: {d}/cert.pem: the certificate does not cover \"api.test\" (it covers: other.test, \
         *.other.test); get a certificate for that name or remove it from hosts",
    )
    .await;
}

#[tokio::test]
async fn garbage_key_file_is_reported() {
    let c = CertCase::new();
    c.good();
    c.write("key.pem", "this is not a key\n");
    c.assert_reports(
        "{f}:7: sites[0].tls: {d}/key.pem: no private key found (expected \"-----BEGIN PRIVATE KEY-----\", \
         \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
    )
    .await;
}

#[tokio::test]
async fn missing_certificate_file_is_reported() {
    let c = CertCase::new();
    c.good();
    std::fs::remove_file(c.path("cert.pem")).unwrap();
    c.assert_reports("{f}:7: sites[0].tls: cannot read {d}/cert.pem: file not found")
        .await;
}

#[tokio::test]
async fn chain_out_of_order_is_reported() {
    let c = CertCase::new();
    let leaf = c.good();
    let leaf_pem = leaf.chain_pem.strip_suffix(&c.pki.inter_pem).unwrap();
    c.write("cert.pem", &format!("{}{leaf_pem}", c.pki.inter_pem));
    c.assert_reports(
        "{f}:7: sites[0].tls: {d}/cert.pem: the chain is out of order: certificate 1 is issued by \
         \"CN=portcullis test root\" but the next one is \"CN=api.test\"; put the leaf first, then each issuer \
         in turn",
    )
    .await;
}

#[tokio::test]
async fn every_broken_site_certificate_is_reported_at_once() {
    let c = CertCase::new();
    c.good();
    std::fs::write(
        c.path("portcullis.toml"),
        format!("{BASE}{}", SECOND_SITE.replace("cert.pem", "b-cert.pem")),
    )
    .unwrap();
    c.write("key.pem", "");
    c.assert_reports(
        "{f}:7: sites[0].tls: {d}/key.pem: the file is empty\n\
         {f}:12: sites[1].tls: cannot read {d}/b-cert.pem: file not found",
    )
    .await;
}

#[test]
fn validate_exits_0_for_a_valid_config() {
    let c = CertCase::new();
    c.good();
    let config = c.path("portcullis.toml");
    let (code, stdout, stderr) = validate_cli(&config);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(
        stdout,
        format!("configuration {} is valid\n", config.display())
    );
    assert_eq!(stderr, "");
}

#[test]
fn validate_reports_every_config_error_and_exits_1() {
    let (_dir, config) = write_config(&format!(
        "{}{}",
        replace_line(BASE, 9, "  upstream = \"http//x\""),
        SECOND_SITE.replace("b.test", "api.test")
    ));
    let (code, stdout, stderr) = validate_cli(&config);
    let f = config.display();
    assert_eq!(code, Some(1));
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!(
            "{f}:9: sites[0].routes[0].upstream: \"http//x\" is not a URL; write it as \"http://host:port\"\n\
             {f}:11: sites[1].hosts[0]: \"api.test\" is already served by sites[0]; a host belongs to one site\n\
             configuration {f} is invalid\n"
        )
    );
}
