//! One order, start to finish: new order (with `replaces` when the CA
//! offers renewal information), authorizations, challenge answers
//! (HTTP-01 and TLS-ALPN-01 through the certificate store, DNS-01 through
//! the user's hook), finalize with a fresh key, download, validate.
//! Control path only.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    Order, OrderStatus,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::client::{self, retry_nonce};
use super::error::AcmeError;
use crate::certstore::{load, CertStore, Checks, ServedCert};
use crate::config::{AcmeConfig, AcmeKeyType, ChallengeKind, HostPattern};

/// A certificate fresh from the CA, validated like any file would be.
pub struct Issued {
    /// The chain as the CA sent it (PEM, leaf first).
    pub chain_pem: String,
    /// Its new private key (PKCS#8 PEM).
    pub key_pem: String,
    /// Ready to publish.
    pub served: ServedCert,
}

/// What one order needs.
pub struct OrderInput<'a> {
    /// The site's settings.
    pub config: &'a AcmeConfig,
    /// Names to order.
    pub hosts: &'a [HostPattern],
    /// Where challenge answers go.
    pub store: &'a Arc<CertStore>,
    /// Challenge types in the order to try them this time.
    pub challenges: &'a [ChallengeKind],
    /// The certificate this one replaces (ARI), when the CA offers it.
    pub replaces: Option<CertificateIdentifier<'static>>,
    /// Counts `badNonce` retries.
    pub nonce_retries: &'a AtomicU64,
    /// Counts orders created.
    pub orders: &'a AtomicU64,
    /// Used in validation messages (the stored bundle's path).
    pub bundle: &'a std::path::Path,
}

/// Challenge answers put in place for one order; removed when dropped (and
/// DNS records cleaned up by [`Presented::cleanup`]).
struct Presented {
    store: Arc<CertStore>,
    http_tokens: Vec<String>,
    alpn_names: Vec<String>,
    dns: Vec<(String, String, String)>,
    hook: Option<Vec<String>>,
    timeout: Duration,
}

impl Presented {
    /// Runs the DNS hook's `cleanup` for every record presented.
    async fn cleanup(&mut self) {
        if let Some(hook) = &self.hook {
            for (domain, token, value) in std::mem::take(&mut self.dns) {
                if let Err(e) =
                    run_hook(hook, "cleanup", &domain, &token, &value, self.timeout).await
                {
                    tracing::warn!(%domain, error = %e, "dns_hook cleanup failed; remove the TXT record by hand");
                }
            }
        }
    }
}

impl Drop for Presented {
    fn drop(&mut self) {
        for t in &self.http_tokens {
            self.store.challenges.remove_http01(t);
        }
        for n in &self.alpn_names {
            self.store.challenges.remove_tls_alpn01(n);
        }
        if !self.dns.is_empty() {
            // Dropped mid-order (cancelled): clean up in the background.
            if let (Some(hook), Ok(rt)) = (self.hook.clone(), tokio::runtime::Handle::try_current())
            {
                let dns = std::mem::take(&mut self.dns);
                let timeout = self.timeout;
                rt.spawn(async move {
                    for (domain, token, value) in dns {
                        let _ = run_hook(&hook, "cleanup", &domain, &token, &value, timeout).await;
                    }
                });
            }
        }
    }
}

fn identifiers(hosts: &[HostPattern]) -> Vec<Identifier> {
    hosts
        .iter()
        .map(|h| Identifier::Dns(h.to_string()))
        .collect()
}

fn ca_err(config: &AcmeConfig, context: &str, e: instant_acme::Error) -> AcmeError {
    AcmeError::from_lib(context, &config.directory, e)
}

/// Orders, proves control, finalizes with a fresh key and validates the result.
/// [`AcmeError::AccountGone`] means the CA no longer knows the account:
/// the caller makes a new one and tries again.
pub async fn issue(account: &Account, input: OrderInput<'_>) -> Result<Issued, AcmeError> {
    let cfg = input.config;
    let started = Instant::now();
    let deadline = started + cfg.order_timeout;
    let ids = identifiers(input.hosts);

    if let Some(profile) = &cfg.profile {
        let offered: Vec<String> = account.profiles().map(|p| p.name.to_string()).collect();
        if !offered.iter().any(|p| p == profile) {
            return Err(AcmeError::Config(format!(
                "{}: the CA does not offer the profile \"{profile}\" (it offers: {}); change or remove profile",
                cfg.origin,
                if offered.is_empty() { "none".to_string() } else { offered.join(", ") }
            )));
        }
    }

    let new_order = |replaces: Option<CertificateIdentifier<'static>>| {
        let mut o = NewOrder::new(&ids);
        if let Some(r) = replaces {
            o = o.replaces(r);
        }
        if let Some(p) = &cfg.profile {
            o = o.profile(p);
        }
        o
    };
    let mut replaces = input.replaces.clone();
    let mut order: Order = loop {
        let req = new_order(replaces.clone());
        match retry_nonce!(input.nonce_retries, account.new_order(&req).await) {
            Ok(o) => break o,
            Err(e) if client::is_account_gone(&e) => return Err(AcmeError::AccountGone),
            // A CA may refuse `replaces` (already replaced, or it does not
            // reflect it, with any problem type): order once without it
            // rather than not at all. A refusal with another cause comes
            // back on that order and is reported. A rate limit is not
            // retried at once.
            Err(e)
                if replaces.is_some()
                    && matches!(client::problem(&e), Some(p) if p != client::Problem::RateLimited) =>
            {
                tracing::warn!(error = %client::chain(&e), "the CA refused \"replaces\"; ordering without it");
                replaces = None;
            }
            Err(e) => return Err(ca_err(cfg, "creating the order", e)),
        }
    };
    client::count(input.orders);
    tracing::info!(names = ?input.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(), order = %order.url(), "ACME order created");

    // Authorizations: fetch each state (retrying refused nonces; a stream
    // that failed is simply walked again, finished ones are cached).
    let mut tries = 0;
    loop {
        let mut auths = order.authorizations();
        let mut failed = None;
        while let Some(r) = auths.next().await {
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        match failed {
            None => break,
            Some(e) if client::is_bad_nonce(&e) && tries < client::NONCE_RETRIES => {
                tries += 1;
                client::count(input.nonce_retries);
            }
            Some(e) => return Err(ca_err(cfg, "fetching the authorizations", e)),
        }
    }

    let mut presented = Presented {
        store: input.store.clone(),
        http_tokens: Vec::new(),
        alpn_names: Vec::new(),
        dns: Vec::new(),
        hook: cfg.dns_hook.clone(),
        timeout: cfg.order_timeout,
    };
    // Which challenge each pending authorization uses, for messages.
    let mut used: Vec<(String, ChallengeKind)> = Vec::new();
    {
        let mut auths = order.authorizations();
        while let Some(r) = auths.next().await {
            let mut authz = r.map_err(|e| ca_err(cfg, "fetching the authorizations", e))?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Ca {
                        context: "authorization".into(),
                        directory: cfg.directory.clone(),
                        problem: None,
                        message: format!("{} is {other:?}; it cannot be used", authz.identifier()),
                    })
                }
            }
            let name = authz.identifier().to_string();
            let domain = match authz.identifier().identifier {
                Identifier::Dns(d) => d.clone(),
                other => format!("{other:?}"),
            };
            let wildcard = authz.wildcard;
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let kind = input
                .challenges
                .iter()
                .copied()
                .find(|k| offered.contains(&challenge_type(*k)) && (!wildcard || *k == ChallengeKind::Dns01))
                .ok_or_else(|| AcmeError::Ca {
                    context: "authorization".into(),
                    directory: cfg.directory.clone(),
                    problem: None,
                    message: format!(
                        "for {name} the CA offers {} and the config allows {}; none of them can be answered",
                        offered.iter().map(challenge_name).collect::<Vec<_>>().join(", "),
                        input.challenges.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                })?;
            let mut ch = authz
                .challenge(challenge_type(kind))
                .expect("the challenge type was offered");
            let key_auth = ch.key_authorization();
            match kind {
                ChallengeKind::Http01 => {
                    input
                        .store
                        .challenges
                        .add_http01(&ch.token, key_auth.as_str());
                    presented.http_tokens.push(ch.token.clone());
                }
                ChallengeKind::TlsAlpn01 => {
                    let key = alpn_cert(&domain, key_auth.digest().as_ref())?;
                    input.store.challenges.add_tls_alpn01(&domain, key);
                    presented.alpn_names.push(domain.clone());
                }
                ChallengeKind::Dns01 => {
                    let hook = cfg.dns_hook.as_ref().ok_or_else(|| {
                        AcmeError::Config(format!("{}: dns-01 needs dns_hook", cfg.origin))
                    })?;
                    let value = key_auth.dns_value();
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    run_hook(hook, "present", &domain, &ch.token, &value, remaining).await?;
                    presented
                        .dns
                        .push((domain.clone(), ch.token.clone(), value));
                }
            }
            retry_nonce!(input.nonce_retries, ch.set_ready().await)
                .map_err(|e| challenge_err(cfg, kind, &name, e))?;
            tracing::debug!(name = %name, challenge = kind.as_str(), "challenge ready");
            used.push((name, kind));
        }
    }

    // Wait until the CA has validated every authorization.
    let status = poll(&mut order, input.nonce_retries, deadline, cfg, |s| {
        matches!(
            s,
            OrderStatus::Ready | OrderStatus::Invalid | OrderStatus::Valid
        )
    })
    .await;
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            presented.cleanup().await;
            return Err(e);
        }
    };
    if status == OrderStatus::Invalid {
        let err = invalid_reason(&mut order, &used, cfg, input.nonce_retries).await;
        presented.cleanup().await;
        return Err(err);
    }
    presented.cleanup().await;
    drop(presented);

    // Finalize with a fresh key.
    let names: Vec<String> = input.hosts.iter().map(ToString::to_string).collect();
    let key = new_key(cfg.key_type)?;
    let mut params =
        CertificateParams::new(names).map_err(|e| AcmeError::Issued(format!("CSR: {e}")))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| AcmeError::Issued(format!("CSR: {e}")))?;
    if status != OrderStatus::Valid {
        retry_nonce!(input.nonce_retries, order.finalize_csr(csr.der()).await)
            .map_err(|e| ca_err(cfg, "finalizing the order", e))?;
    }
    let status = poll(&mut order, input.nonce_retries, deadline, cfg, |s| {
        matches!(s, OrderStatus::Valid | OrderStatus::Invalid)
    })
    .await?;
    if status == OrderStatus::Invalid {
        return Err(ca_err(
            cfg,
            "finalizing the order",
            instant_acme::Error::Str("the CA marked the order invalid after finalization"),
        ));
    }
    let chain_pem = retry_nonce!(input.nonce_retries, order.certificate().await)
        .map_err(|e| ca_err(cfg, "downloading the certificate", e))?
        .ok_or_else(|| AcmeError::Issued("the CA sent no certificate".into()))?;

    // Validate exactly like a certificate file.
    let chain = load::parse_chain(chain_pem.as_bytes(), input.bundle)
        .map_err(|e| AcmeError::Issued(e.to_string()))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut served = load::build(
        chain,
        key_der,
        input.bundle,
        input.bundle,
        input.hosts,
        Checks {
            allow_expired: false,
        },
    )
    .map_err(|e| AcmeError::Issued(format!("the CA's certificate is not usable: {e}")))?;
    served.info.cert_path = Some(input.bundle.to_path_buf());
    served.info.key_path = Some(input.bundle.to_path_buf());
    tracing::info!(
        serial = %served.info.serial,
        not_after = %crate::certstore::rfc3339(served.info.not_after),
        took_ms = started.elapsed().as_millis() as u64,
        "ACME certificate issued"
    );
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
        served,
    })
}

/// Refreshes the order until `done(status)`, backing off from 250 ms to 3 s.
async fn poll(
    order: &mut Order,
    nonce_retries: &AtomicU64,
    deadline: Instant,
    cfg: &AcmeConfig,
    done: impl Fn(OrderStatus) -> bool,
) -> Result<OrderStatus, AcmeError> {
    let mut delay = Duration::from_millis(250);
    loop {
        let state = retry_nonce!(nonce_retries, order.refresh().await.map(|s| s.status))
            .map_err(|e| ca_err(cfg, "polling the order", e))?;
        if done(state) {
            return Ok(state);
        }
        if Instant::now() + delay > deadline {
            return Err(AcmeError::Timeout(format!(
                "the order is still {state:?} after {}s (order_timeout); the CA may be slow or unable to reach this proxy",
                cfg.order_timeout.as_secs()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 3 / 2).min(Duration::from_secs(3));
    }
}

/// Why an order went invalid: the failed challenge's problem, by name.
async fn invalid_reason(
    order: &mut Order,
    used: &[(String, ChallengeKind)],
    cfg: &AcmeConfig,
    nonce_retries: &AtomicU64,
) -> AcmeError {
    let mut auths = order.authorizations();
    while let Some(Ok(mut authz)) = auths.next().await {
        if retry_nonce!(nonce_retries, authz.refresh().await.map(|_| ())).is_err() {
            continue;
        }
        if authz.status != AuthorizationStatus::Invalid {
            continue;
        }
        let name = authz.identifier().to_string();
        for ch in &authz.challenges {
            if let Some(problem) = &ch.error {
                let kind = used
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, k)| *k)
                    .unwrap_or(ChallengeKind::Http01);
                return AcmeError::Challenge {
                    kind,
                    name,
                    message: problem.to_string(),
                };
            }
        }
    }
    AcmeError::Ca {
        context: "validating the challenges".into(),
        directory: cfg.directory.clone(),
        problem: None,
        message: "the CA marked the order invalid".into(),
    }
}

fn challenge_err(
    cfg: &AcmeConfig,
    kind: ChallengeKind,
    name: &str,
    e: instant_acme::Error,
) -> AcmeError {
    match &e {
        instant_acme::Error::Api(p) if !client::is_bad_nonce(&e) => AcmeError::Challenge {
            kind,
            name: name.to_string(),
            message: p.to_string(),
        },
        _ => ca_err(cfg, "answering the challenge", e),
    }
}

fn challenge_type(k: ChallengeKind) -> ChallengeType {
    match k {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        ChallengeKind::Dns01 => ChallengeType::Dns01,
    }
}

fn challenge_name(t: &ChallengeType) -> String {
    match t {
        ChallengeType::Http01 => "http-01".into(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        ChallengeType::Dns01 => "dns-01".into(),
        ChallengeType::DeviceAttest01 => "device-attest-01".into(),
        ChallengeType::Unknown(s) => s.clone(),
        _ => "unknown".into(),
    }
}

/// A fresh private key of the configured type.
pub fn new_key(t: AcmeKeyType) -> Result<KeyPair, AcmeError> {
    let r = match t {
        AcmeKeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        AcmeKeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        AcmeKeyType::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
        AcmeKeyType::Rsa3072 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072)
        }
        AcmeKeyType::Rsa4096 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
        }
    };
    r.map_err(|e| AcmeError::Issued(format!("cannot generate a {} key: {e}", t.as_str())))
}

/// The TLS-ALPN-01 certificate (RFC 8737): self-signed, the one name as
/// SAN, and the critical `acmeIdentifier` extension holding the SHA-256 of
/// the key authorization.
pub fn alpn_cert(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let err =
        |e: rcgen::Error| AcmeError::Issued(format!("tls-alpn-01 certificate for {domain}: {e}"));
    let mut params = CertificateParams::new(vec![domain.to_string()]).map_err(err)?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let signing = load::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| AcmeError::Issued(format!("tls-alpn-01 key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Runs the DNS hook: `HOOK ACTION DOMAIN TOKEN VALUE`, with the same in
/// `ACME_ACTION`, `ACME_DOMAIN`, `ACME_TOKEN`, `ACME_VALUE` and the record
/// name in `ACME_RECORD` (`_acme-challenge.DOMAIN`). `present` must return
/// once the record is published.
pub async fn run_hook(
    hook: &[String],
    action: &str,
    domain: &str,
    token: &str,
    value: &str,
    timeout: Duration,
) -> Result<(), AcmeError> {
    let record = format!("_acme-challenge.{domain}");
    let mut cmd = tokio::process::Command::new(&hook[0]);
    cmd.args(&hook[1..])
        .args([action, domain, token, value])
        .env("ACME_ACTION", action)
        .env("ACME_DOMAIN", domain)
        .env("ACME_TOKEN", token)
        .env("ACME_VALUE", value)
        .env("ACME_RECORD", &record)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| AcmeError::Hook(format!("dns_hook {}: cannot run it: {e}", hook[0])))?;
    let out = match tokio::time::timeout(
        timeout.max(Duration::from_secs(1)),
        child.wait_with_output(),
    )
    .await
    {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(AcmeError::Hook(format!("dns_hook {}: {e}", hook[0]))),
        Err(_) => {
            return Err(AcmeError::Hook(format!(
                "dns_hook {} {action} {domain} did not finish within {}s",
                hook[0],
                timeout.as_secs()
            )))
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    Err(AcmeError::Hook(format!(
        "dns_hook {} {action} {domain} failed ({}){}{}",
        hook[0],
        out.status,
        if tail.is_empty() { "" } else { ": " },
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    )))
}
