//! Reading the global `[acme]` table and a site's `tls.acme` table into
//! an [`AcmeConfig`], and the checks that need the whole config
//! (challenges against listeners and names). Every key comes with its
//! place in the file from serde ([`RawAcme`]), so an error names its line;
//! all errors are collected. Control path only.

use std::ops::Range;
use std::path::PathBuf;

use base64::Engine as _;

use super::ctx::Ctx;
use crate::config::acme::{LETSENCRYPT, LETSENCRYPT_STAGING};
use crate::config::raw::RawAcme;
use crate::config::{
    parse_duration, AcmeConfig, AcmeKeyType, ChallengeKind, ExternalAccount, HostPattern,
    ListenerConfig, ListenerProtocol, Origin, RenewBefore, UntilIssued,
};

const KEYS: &str = "directory, email, eab, challenges, dns_hook, key_type, profile, ca_root, renew_before, retry_base, retry_max, order_timeout, until_issued";

/// A table of ACME keys and its field path.
pub(in crate::config) struct AcmeTable<'a> {
    /// The keys, each with its place in the file.
    pub table: &'a RawAcme,
    /// Field path, e.g. `acme` or `sites[2].tls.acme`.
    pub field: String,
}

/// Reads the global `[acme]` table (defaults for every ACME site); its
/// errors are reported once here, not once per site.
pub(in crate::config) fn global(
    cx: &mut Ctx<'_>,
    table: Option<&AcmeTable<'_>>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> AcmeConfig {
    let mut out = AcmeConfig::defaults(Origin {
        file: PathBuf::new(),
        line: 0,
        field: "acme".into(),
    });
    if let Some(t) = table {
        apply(cx, t, &mut out, resolve);
    }
    out
}

/// A site's settings: `base` (from [`global`]) with the site's own table over it.
pub(in crate::config) fn site(
    cx: &mut Ctx<'_>,
    base: &AcmeConfig,
    table: Option<&AcmeTable<'_>>,
    origin: Origin,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> AcmeConfig {
    let mut out = base.clone();
    out.origin = origin;
    if let Some(t) = table {
        apply(cx, t, &mut out, resolve);
    }
    out
}

fn apply(
    cx: &mut Ctx<'_>,
    t: &AcmeTable<'_>,
    out: &mut AcmeConfig,
    resolve: &dyn Fn(&str) -> PathBuf,
) {
    for (key, v) in t.table {
        let k = key.get_ref();
        let field = format!("{}.{k}", t.field);
        let span = key.span();
        let bad = |cx: &mut Ctx<'_>, msg: String| cx.err(&span, &field, msg);
        let v = v.get_ref();
        match k.as_str() {
            "directory" => match v.as_str() {
                Some("letsencrypt") => out.directory = LETSENCRYPT.into(),
                Some("letsencrypt-staging") => out.directory = LETSENCRYPT_STAGING.into(),
                Some(s) => match s.parse::<http::Uri>() {
                    Ok(u) if u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()) => {
                        out.directory = s.to_string()
                    }
                    Ok(u) if u.scheme_str() == Some("http") => bad(
                        cx,
                        format!("\"{s}\": an ACME directory is served over https; write https://..."),
                    ),
                    _ => bad(
                        cx,
                        format!("\"{s}\" is not a directory URL; write \"letsencrypt\", \"letsencrypt-staging\" or https://host/directory"),
                    ),
                },
                None => bad(cx, "must be a string: \"letsencrypt\", \"letsencrypt-staging\" or an https:// URL".into()),
            },
            "email" => {
                let list: Vec<&toml::Value> = match v {
                    toml::Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                let mut contacts = Vec::new();
                for e in list {
                    match e.as_str() {
                        Some(s) if valid_email(s) => contacts.push(format!("mailto:{}", s.trim())),
                        Some(s) => bad(cx, format!("\"{s}\" is not an email address; write e.g. \"ops@example.com\"")),
                        None => bad(cx, "must be an email address or a list of them".into()),
                    }
                }
                out.contacts = contacts;
            }
            "eab" => match v.as_table() {
                Some(tab) => {
                    let kid = tab.get("kid").and_then(|v| v.as_str());
                    let key = tab.get("hmac_key").and_then(|v| v.as_str());
                    if let Some(other) = tab.keys().find(|k| *k != "kid" && *k != "hmac_key") {
                        bad(cx, format!("unknown key \"{other}\"; expected kid and hmac_key"));
                    }
                    match (kid, key) {
                        (Some(kid), Some(key)) if !kid.is_empty() => match decode_b64url(key) {
                            Some(bytes) if !bytes.is_empty() => {
                                out.eab = Some(ExternalAccount {
                                    kid: kid.to_string(),
                                    hmac_key: bytes,
                                })
                            }
                            _ => bad(cx, "hmac_key is not base64url; paste the key exactly as the CA gave it".into()),
                        },
                        _ => bad(
                            cx,
                            "needs kid and hmac_key strings: eab = { kid = \"...\", hmac_key = \"...\" }".into(),
                        ),
                    }
                }
                None => bad(cx, "must be a table: eab = { kid = \"...\", hmac_key = \"...\" }".into()),
            },
            "challenges" => {
                let Some(list) = v.as_array() else {
                    bad(cx, "must be a list such as [\"http-01\", \"tls-alpn-01\"]".into());
                    continue;
                };
                let mut kinds = Vec::new();
                for c in list {
                    match c.as_str() {
                        Some("http-01") => kinds.push(ChallengeKind::Http01),
                        Some("tls-alpn-01") => kinds.push(ChallengeKind::TlsAlpn01),
                        Some("dns-01") => kinds.push(ChallengeKind::Dns01),
                        Some(other) => bad(
                            cx,
                            format!("\"{other}\" is not a challenge type; use \"http-01\", \"tls-alpn-01\" or \"dns-01\""),
                        ),
                        None => bad(cx, "must be a list of strings".into()),
                    }
                }
                kinds.dedup();
                if list.is_empty() {
                    bad(cx, "is empty; list at least one of \"http-01\", \"tls-alpn-01\", \"dns-01\"".into());
                }
                out.challenges = kinds;
            }
            "dns_hook" => {
                let argv: Option<Vec<String>> = match v {
                    toml::Value::String(s) => Some(vec![s.clone()]),
                    toml::Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
                    _ => None,
                };
                match argv {
                    Some(mut argv) if !argv.is_empty() && !argv[0].trim().is_empty() => {
                        // A program given by a relative path is relative to the config file.
                        if argv[0].contains('/') {
                            argv[0] = resolve(&argv[0]).display().to_string();
                        }
                        out.dns_hook = Some(argv);
                    }
                    _ => bad(
                        cx,
                        "must be a program path or a list [\"/path/to/hook\", \"arg\", ...]; it is run as HOOK present|cleanup DOMAIN TOKEN VALUE".into(),
                    ),
                }
            }
            "key_type" => match v.as_str() {
                Some("ecdsa-p256" | "ecdsa" | "p256") => out.key_type = AcmeKeyType::EcdsaP256,
                Some("ecdsa-p384" | "p384") => out.key_type = AcmeKeyType::EcdsaP384,
                Some("rsa2048") => out.key_type = AcmeKeyType::Rsa2048,
                Some("rsa3072") => out.key_type = AcmeKeyType::Rsa3072,
                Some("rsa4096") => out.key_type = AcmeKeyType::Rsa4096,
                other => bad(
                    cx,
                    format!(
                        "{} is not a key type; use \"ecdsa-p256\" (default), \"ecdsa-p384\", \"rsa2048\", \"rsa3072\" or \"rsa4096\"",
                        other.map(|s| format!("\"{s}\"")).unwrap_or_else(|| v.to_string())
                    ),
                ),
            },
            "profile" => match v.as_str() {
                Some(s) if !s.trim().is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) => out.profile = Some(s.to_string()),
                _ => bad(cx, "must be the name of a profile the CA offers, e.g. \"shortlived\"".into()),
            },
            "ca_root" => match v.as_str() {
                Some(s) if !s.trim().is_empty() => out.ca_root = Some(resolve(s)),
                _ => bad(cx, "must be the path of a PEM file with the root(s) to trust for the CA's HTTPS".into()),
            },
            "renew_before" => match v.as_str().map(parse_renew_before) {
                Some(Some(r)) => out.renew_before = r,
                _ => bad(
                    cx,
                    format!("{v} is not valid; write a fraction of the lifetime such as \"1/3\" or a duration such as \"30d\""),
                ),
            },
            "retry_base" | "retry_max" | "order_timeout" => match v.as_str().map(parse_duration) {
                Some(Ok(d)) if !d.is_zero() => match k.as_str() {
                    "retry_base" => out.retry_base = d,
                    "retry_max" => out.retry_max = d,
                    _ => out.order_timeout = d,
                },
                Some(Ok(_)) => bad(cx, "must be greater than zero".into()),
                Some(Err(e)) => bad(cx, e),
                None => bad(cx, "must be a duration string such as \"1m\"".into()),
            },
            "until_issued" => match v.as_str() {
                Some("none") => out.until_issued = UntilIssued::Nothing,
                Some("internal") => out.until_issued = UntilIssued::Internal,
                _ => bad(
                    cx,
                    format!("{v} is not valid; use \"none\" (handshakes fail until issued) or \"internal\" (serve an internal-CA certificate meanwhile)"),
                ),
            },
            other => bad(cx, format!("unknown key \"{other}\"; expected one of {KEYS}")),
        }
    }
}

/// Checks that need the whole config: challenge types against listeners and
/// host names, retry bounds. `listeners` are the validated listeners.
pub(in crate::config) fn check_site(
    cx: &mut Ctx<'_>,
    acme: &mut AcmeConfig,
    hosts: &[HostPattern],
    listeners: &[ListenerConfig],
    span: &Range<usize>,
    field: &str,
) {
    let has_http = listeners
        .iter()
        .any(|l| matches!(l.protocol, ListenerProtocol::Http { .. }));
    let wildcard = hosts.iter().find(|h| matches!(h, HostPattern::Wildcard(_)));
    if acme.challenges.is_empty() {
        // Defaults: whatever the listeners can answer; dns-01 only when a hook is set.
        if acme.dns_hook.is_some() {
            acme.challenges.push(ChallengeKind::Dns01);
        }
        if wildcard.is_none() {
            if has_http {
                acme.challenges.push(ChallengeKind::Http01);
            }
            acme.challenges.push(ChallengeKind::TlsAlpn01);
        }
    }
    for h in hosts {
        if let HostPattern::Exact(name) = h {
            if name.parse::<std::net::IpAddr>().is_ok()
                || name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            {
                cx.err(
                    span,
                    &format!("{field}.acme"),
                    format!("\"{name}\" is an IP address; ACME certificates for IP addresses are not supported, use a DNS name or tls = \"internal\""),
                );
            }
        }
    }
    if let Some(w) = wildcard {
        if !acme.challenges.contains(&ChallengeKind::Dns01) || acme.dns_hook.is_none() {
            cx.err(
                span,
                &format!("{field}.acme.challenges"),
                format!("\"{w}\" is a wildcard, which only dns-01 can prove; set challenges = [\"dns-01\"] and dns_hook = \"/path/to/hook\""),
            );
        }
    }
    if acme.challenges.contains(&ChallengeKind::Dns01) && acme.dns_hook.is_none() {
        cx.err(
            span,
            &format!("{field}.acme.dns_hook"),
            "dns-01 needs a hook that publishes the TXT record; set dns_hook = \"/path/to/hook\" (run as HOOK present|cleanup DOMAIN TOKEN VALUE)",
        );
    }
    if acme.challenges.contains(&ChallengeKind::Http01) && !has_http {
        cx.err(
            span,
            &format!("{field}.acme.challenges"),
            "http-01 is answered on a plain-HTTP listener and there is none; add [[listeners]] with protocol = \"http\" (port 80), or use \"tls-alpn-01\"",
        );
    }
    if acme.retry_max < acme.retry_base {
        cx.err(
            span,
            &format!("{field}.acme.retry_max"),
            format!(
                "is shorter than retry_base ({:?} < {:?}); make it at least retry_base",
                acme.retry_max, acme.retry_base
            ),
        );
    }
}

fn valid_email(s: &str) -> bool {
    let s = s.trim();
    match s.split_once('@') {
        Some((user, domain)) => {
            !user.is_empty()
                && domain.contains('.')
                && !s.contains([' ', ',', '<', '>', ':'])
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        }
        None => false,
    }
}

fn decode_b64url(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .or_else(|| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(s)
                .ok()
        })
}

/// `"1/3"`, `"0.25"` (fractions of the lifetime) or `"30d"`.
pub(in crate::config) fn parse_renew_before(s: &str) -> Option<RenewBefore> {
    let s = s.trim();
    if let Some((n, d)) = s.split_once('/') {
        let (num, den): (u32, u32) = (n.trim().parse().ok()?, d.trim().parse().ok()?);
        return (num > 0 && den > num).then_some(RenewBefore::Fraction { num, den });
    }
    if let Ok(f) = s.parse::<f64>() {
        return (f > 0.0 && f < 1.0).then(|| RenewBefore::Fraction {
            num: (f * 1000.0).round().max(1.0) as u32,
            den: 1000,
        });
    }
    parse_duration(s)
        .ok()
        .filter(|d| !d.is_zero())
        .map(RenewBefore::Duration)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn renew_before_forms() {
        assert_eq!(
            parse_renew_before("1/3"),
            Some(RenewBefore::Fraction { num: 1, den: 3 })
        );
        assert_eq!(
            parse_renew_before("0.25"),
            Some(RenewBefore::Fraction {
                num: 250,
                den: 1000
            })
        );
        assert_eq!(
            parse_renew_before("30d"),
            Some(RenewBefore::Duration(Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(parse_renew_before("3/1"), None);
        assert_eq!(parse_renew_before("1.5"), None);
        let life = Duration::from_secs(90 * 86_400);
        assert_eq!(
            RenewBefore::Fraction { num: 1, den: 3 }.lead(life),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            RenewBefore::Duration(Duration::from_secs(100 * 86_400)).lead(life),
            life
        );
    }

    #[test]
    fn emails_and_keys() {
        assert!(valid_email("ops@example.com"));
        assert!(!valid_email("ops"));
        assert!(!valid_email("a b@example.com"));
        assert_eq!(
            decode_b64url("zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W")
                .map(|b| b.len()),
            Some(48)
        );
    }

    fn parse(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(std::path::Path::new("/etc/p.toml"), text)
            .map_err(|e| e.to_string())
    }

    fn acme_of(c: &crate::config::Config, i: usize) -> AcmeConfig {
        match &c.sites[i].tls {
            crate::config::TlsSource::Acme(a) => (**a).clone(),
            other => panic!("not acme: {other:?}"),
        }
    }

    const LISTENERS: &str = "[[listeners]]\nlisten = \"127.0.0.1:443\"\n[[listeners]]\nlisten = \"127.0.0.1:80\"\nprotocol = \"http\"\n";

    #[test]
    fn global_defaults_and_site_overrides() {
        let text = format!(
            "{LISTENERS}[acme]\ndirectory = \"letsencrypt-staging\"\nemail = \"ops@example.com\"\nretry_base = \"2s\"\n\
             [[sites]]\nhosts = [\"a.example.com\"]\ntls = \"acme\"\n[[sites.routes]]\nrespond = {{ status = 200 }}\n\
             [[sites]]\nhosts = [\"b.example.com\"]\n[sites.tls.acme]\nkey_type = \"rsa3072\"\nchallenges = [\"tls-alpn-01\"]\n\
             ca_root = \"roots.pem\"\neab = {{ kid = \"k1\", hmac_key = \"zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W\" }}\n\
             [[sites.routes]]\nrespond = {{ status = 200 }}\n"
        );
        let c = parse(&text).unwrap();
        let a = acme_of(&c, 0);
        assert_eq!(a.directory, LETSENCRYPT_STAGING);
        assert_eq!(a.contacts, vec!["mailto:ops@example.com".to_string()]);
        assert_eq!(a.retry_base, Duration::from_secs(2));
        assert_eq!(
            a.challenges,
            vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01]
        );
        assert_eq!(a.key_type, AcmeKeyType::EcdsaP256);
        let b = acme_of(&c, 1);
        assert_eq!(b.directory, LETSENCRYPT_STAGING);
        assert_eq!(b.key_type, AcmeKeyType::Rsa3072);
        assert_eq!(b.challenges, vec![ChallengeKind::TlsAlpn01]);
        assert_eq!(
            b.ca_root.as_deref(),
            Some(std::path::Path::new("/etc/roots.pem"))
        );
        assert_eq!(b.eab.as_ref().map(|e| e.kid.as_str()), Some("k1"));
    }

    #[test]
    fn bad_values_name_their_line_and_field() {
        let text = format!(
            "{LISTENERS}[acme]\nemail = \"nobody\"\n\
             [[sites]]\nhosts = [\"a.example.com\"]\n[sites.tls.acme]\ndirectory = \"http://ca.example/dir\"\nkey_type = \"rsa1024\"\nbogus = 1\n\
             [[sites.routes]]\nrespond = {{ status = 200 }}\n"
        );
        let e = parse(&text).unwrap_err();
        assert!(
            e.contains("/etc/p.toml:7: acme.email: \"nobody\" is not an email address"),
            "{e}"
        );
        assert!(e.contains("/etc/p.toml:11: sites[0].tls.acme.directory: \"http://ca.example/dir\": an ACME directory is served over https"), "{e}");
        assert!(
            e.contains("/etc/p.toml:12: sites[0].tls.acme.key_type: \"rsa1024\" is not a key type"),
            "{e}"
        );
        assert!(
            e.contains("/etc/p.toml:13: sites[0].tls.acme.bogus: unknown key \"bogus\""),
            "{e}"
        );
    }

    #[test]
    fn unanswerable_challenges_are_refused() {
        let https_only = "[[listeners]]\nlisten = \"127.0.0.1:443\"\n";
        let site = |tls: &str, host: &str| {
            format!("{https_only}[[sites]]\nhosts = [\"{host}\"]\ntls = {tls}\n[[sites.routes]]\nrespond = {{ status = 200 }}\n")
        };
        let e = parse(&site(
            "{ acme = { challenges = [\"http-01\"] } }",
            "a.example.com",
        ))
        .unwrap_err();
        assert!(e.contains("/etc/p.toml:5: sites[0].tls.acme.challenges: http-01 is answered on a plain-HTTP listener"), "{e}");
        let e = parse(&site("\"acme\"", "*.example.com")).unwrap_err();
        assert!(e.contains("sites[0].tls.acme.challenges: \"*.example.com\" is a wildcard, which only dns-01 can prove"), "{e}");
        let e = parse(&site(
            "{ acme = { challenges = [\"dns-01\"] } }",
            "a.example.com",
        ))
        .unwrap_err();
        assert!(
            e.contains("sites[0].tls.acme.dns_hook: dns-01 needs a hook"),
            "{e}"
        );
        let e = parse(&site("{ acme = {}, cert = \"c.pem\" }", "a.example.com")).unwrap_err();
        assert!(
            e.contains("sites[0].tls.cert: cannot be combined with acme"),
            "{e}"
        );
        let ok = parse(&site(
            "{ acme = { challenges = [\"dns-01\"], dns_hook = [\"./hook.sh\", \"x\"] } }",
            "*.example.com",
        ))
        .unwrap();
        assert_eq!(
            acme_of(&ok, 0).dns_hook,
            Some(vec!["/etc/./hook.sh".to_string(), "x".to_string()])
        );
        // Only tls-alpn-01 by default without a plain-HTTP listener.
        let ok = parse(&site("\"acme\"", "a.example.com")).unwrap();
        assert_eq!(acme_of(&ok, 0).challenges, vec![ChallengeKind::TlsAlpn01]);
    }
}
