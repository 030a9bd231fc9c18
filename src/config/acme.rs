//! Validated ACME settings: the typed [`AcmeConfig`] a site with
//! `tls = "acme"` or `tls = { acme = { ... } }` ends up with. Reading and
//! checking the `[acme]` and `tls.acme` tables is `validate/acme.rs`'s job;
//! this file imports nothing from validation. Control path only; nothing
//! here talks to a CA.

use std::path::PathBuf;
use std::time::Duration;

use super::origin::Origin;

/// Let's Encrypt production.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt staging (untrusted certificates, generous rate limits).
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// A challenge type the proxy can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChallengeKind {
    /// `http-01`: a token served on the plain-HTTP listener.
    Http01,
    /// `tls-alpn-01`: a special certificate on the TLS listener (RFC 8737).
    TlsAlpn01,
    /// `dns-01`: a TXT record published by the user's hook command.
    Dns01,
}

impl ChallengeKind {
    /// The name the CA uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Dns01 => "dns-01",
        }
    }
}

/// The key type of ordered certificates (a fresh key every order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AcmeKeyType {
    /// ECDSA P-256 (default).
    EcdsaP256,
    /// ECDSA P-384.
    EcdsaP384,
    /// RSA 2048.
    Rsa2048,
    /// RSA 3072.
    Rsa3072,
    /// RSA 4096.
    Rsa4096,
}

impl AcmeKeyType {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeKeyType::EcdsaP256 => "ecdsa-p256",
            AcmeKeyType::EcdsaP384 => "ecdsa-p384",
            AcmeKeyType::Rsa2048 => "rsa2048",
            AcmeKeyType::Rsa3072 => "rsa3072",
            AcmeKeyType::Rsa4096 => "rsa4096",
        }
    }
}

/// When a certificate without renewal information from the CA is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RenewBefore {
    /// When `num/den` of its lifetime is left (default 1/3).
    Fraction {
        /// Numerator.
        num: u32,
        /// Denominator.
        den: u32,
    },
    /// A fixed time before expiry (certbot's `renew_before_expiry`).
    Duration(Duration),
}

impl RenewBefore {
    /// How long before `not_after` to renew a certificate of this lifetime.
    pub fn lead(&self, lifetime: Duration) -> Duration {
        match *self {
            RenewBefore::Fraction { num, den } => {
                lifetime.mul_f64(f64::from(num) / f64::from(den.max(1)))
            }
            RenewBefore::Duration(d) => d.min(lifetime),
        }
    }
}

/// External Account Binding (required by some CAs, e.g. ZeroSSL, private CAs).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExternalAccount {
    /// Key identifier given by the CA.
    pub kid: String,
    /// The HMAC key, decoded from base64url.
    pub hmac_key: Vec<u8>,
}

impl std::fmt::Debug for ExternalAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The HMAC key is a secret: never in logs.
        f.debug_struct("ExternalAccount")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// What a site with an ACME certificate serves before its first certificate exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UntilIssued {
    /// Nothing: handshakes for its names fail with `unrecognized_name`.
    Nothing,
    /// A certificate from the internal CA.
    Internal,
}

/// A site's validated ACME settings (the global `[acme]` table merged with
/// the site's own). Equality ignores `origin`: a reload that only moves the
/// site to another line keeps its slot and its renewal task.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// Directory URL of the CA.
    pub directory: String,
    /// Contact URIs (`mailto:`), sent when the account is created.
    pub contacts: Vec<String>,
    /// External Account Binding, when the CA needs one.
    pub eab: Option<ExternalAccount>,
    /// Challenge types in order of preference.
    pub challenges: Vec<ChallengeKind>,
    /// Command run as `HOOK present|cleanup DOMAIN TOKEN VALUE` for dns-01.
    pub dns_hook: Option<Vec<String>>,
    /// Key type of each new certificate.
    pub key_type: AcmeKeyType,
    /// ACME profile to ask for (e.g. `shortlived`), when the CA offers profiles.
    pub profile: Option<String>,
    /// Trust only these roots (PEM) for the CA's own HTTPS (private CAs, Pebble).
    pub ca_root: Option<PathBuf>,
    /// Renewal time when the CA gives no renewal information (ARI).
    pub renew_before: RenewBefore,
    /// First retry delay after a failed order; doubles each failure.
    pub retry_base: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
    /// Longest one order may take (challenges, polling, the DNS hook).
    pub order_timeout: Duration,
    /// What is served before the first certificate exists.
    pub until_issued: UntilIssued,
    /// The site's `tls` value, for messages.
    pub origin: Origin,
}

impl PartialEq for AcmeConfig {
    fn eq(&self, o: &Self) -> bool {
        let AcmeConfig {
            directory,
            contacts,
            eab,
            challenges,
            dns_hook,
            key_type,
            profile,
            ca_root,
            renew_before,
            retry_base,
            retry_max,
            order_timeout,
            until_issued,
            origin: _,
        } = self;
        *directory == o.directory
            && *contacts == o.contacts
            && *eab == o.eab
            && *challenges == o.challenges
            && *dns_hook == o.dns_hook
            && *key_type == o.key_type
            && *profile == o.profile
            && *ca_root == o.ca_root
            && *renew_before == o.renew_before
            && *retry_base == o.retry_base
            && *retry_max == o.retry_max
            && *order_timeout == o.order_timeout
            && *until_issued == o.until_issued
    }
}

impl Eq for AcmeConfig {}

impl AcmeConfig {
    /// Defaults before any table is read.
    pub(super) fn defaults(origin: Origin) -> AcmeConfig {
        AcmeConfig {
            directory: LETSENCRYPT.to_string(),
            contacts: Vec::new(),
            eab: None,
            challenges: Vec::new(),
            dns_hook: None,
            key_type: AcmeKeyType::EcdsaP256,
            profile: None,
            ca_root: None,
            renew_before: RenewBefore::Fraction { num: 1, den: 3 },
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(4 * 3600),
            order_timeout: Duration::from_secs(300),
            until_issued: UntilIssued::Nothing,
            origin,
        }
    }
}
