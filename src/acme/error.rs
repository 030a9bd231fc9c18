//! Why an ACME operation failed, as a type callers match on: the error
//! enum and the ACME problem types portcullis acts on. A leaf of `acme`
//! (it imports only the storage error), so the client, the order and the
//! manager all use it without importing each other back.

use crate::config::ChallengeKind;

use super::storage::StorageError;

/// Why an ACME operation failed. Each message says what to do or where to look.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcmeError {
    /// A setting cannot be used (unreadable `ca_root`, unknown profile).
    #[error("{0}")]
    Config(String),
    /// The state directory could not be read or written.
    #[error("{0}")]
    Storage(String),
    /// The CA refused or could not be reached.
    #[error("{context} at {directory}: {message}")]
    Ca {
        /// What was being done.
        context: String,
        /// The CA's directory URL.
        directory: String,
        /// The ACME problem type, when the CA answered with one.
        problem: Option<Problem>,
        /// The CA's words, or the network error.
        message: String,
    },
    /// The CA could not validate a challenge.
    #[error("{} challenge for {name} failed: {message}", kind.as_str())]
    Challenge {
        /// Which challenge type.
        kind: ChallengeKind,
        /// For which name.
        name: String,
        /// The CA's explanation.
        message: String,
    },
    /// The DNS hook failed.
    #[error("{0}")]
    Hook(String),
    /// The issued certificate is not usable.
    #[error("{0}")]
    Issued(String),
    /// The order took longer than `order_timeout`.
    #[error("{0}")]
    Timeout(String),
    /// The CA no longer knows the stored account.
    #[error("the CA does not know the stored account")]
    AccountGone,
    /// Nothing to act on (no certificate to revoke, unknown site).
    #[error("{0}")]
    NotFound(String),
}

impl From<StorageError> for AcmeError {
    fn from(e: StorageError) -> AcmeError {
        AcmeError::Storage(e.to_string())
    }
}

impl AcmeError {
    /// Wraps an instant-acme error with what was being done and at which CA.
    pub fn from_lib(context: &str, directory: &str, e: instant_acme::Error) -> AcmeError {
        AcmeError::Ca {
            context: context.to_string(),
            directory: directory.to_string(),
            problem: problem(&e),
            message: chain(&e),
        }
    }

    /// Whether the CA said to slow down.
    pub fn rate_limited(&self) -> bool {
        matches!(
            self,
            AcmeError::Ca {
                problem: Some(Problem::RateLimited),
                ..
            }
        )
    }
}

/// An error and every cause under it, joined: hyper's top-level messages
/// ("client error (Connect)") say little on their own.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// The ACME problem types (RFC 8555 section 6.7, RFC 9773) that change
/// what portcullis does next. Read once from the CA's answer, then
/// matched by type, never by the text of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The request's nonce was refused; it was not processed.
    BadNonce,
    /// The CA does not know the account.
    AccountDoesNotExist,
    /// The CA said to slow down.
    RateLimited,
    /// The certificate named in `replaces` was already replaced.
    AlreadyReplaced,
    /// The request was malformed (how some CAs refuse `replaces`).
    Malformed,
    /// Any other type, without its URN prefix.
    Other(String),
}

impl Problem {
    fn parse(urn: &str) -> Problem {
        match urn
            .strip_prefix("urn:ietf:params:acme:error:")
            .unwrap_or(urn)
        {
            "badNonce" => Problem::BadNonce,
            "accountDoesNotExist" => Problem::AccountDoesNotExist,
            "rateLimited" => Problem::RateLimited,
            "alreadyReplaced" => Problem::AlreadyReplaced,
            "malformed" => Problem::Malformed,
            other => Problem::Other(other.to_string()),
        }
    }
}

/// The ACME problem of an error, if the CA answered with one.
pub(crate) fn problem(e: &instant_acme::Error) -> Option<Problem> {
    match e {
        instant_acme::Error::Api(p) => p.r#type.as_deref().map(Problem::parse),
        _ => None,
    }
}
