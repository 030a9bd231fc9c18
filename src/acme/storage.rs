//! ACME state on disk, under `state_dir/acme/` (0700):
//!
//! - `accounts/DIRECTORY[_kid-KID]/account.json` (0600): the account key and
//!   URL, created once per CA (and EAB key id) and reused by every site.
//! - `certs/SITE/cert.pem` (0600): the chain then its private key, in one
//!   file so a crash can never pair a new chain with an old key.
//! - `certs/SITE/meta.json`: which CA issued it, for which names, when.
//!
//! Every write is temp file -> fsync -> rename ([`crate::fsutil`]).
//! Control path only.
//!
//! This is the one module that knows this layout: every path under
//! `state_dir/acme/` is computed here. It is a leaf (it imports nothing
//! else of `acme`), so the certificate store can ask it where a site's
//! certificate is without an import cycle.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// A file under `state_dir/acme/` could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot {what} {}: {reason}", path.display())]
pub struct StorageError {
    /// What was being done (`read`, `write`, ...).
    what: &'static str,
    /// Which file.
    path: PathBuf,
    /// Why, and what to do when there is something to do.
    reason: String,
}

/// The account as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAccount {
    /// instant-acme's credentials (key, account URL, directory), opaque here.
    pub credentials: serde_json::Value,
    /// The contacts the account was last given.
    #[serde(default)]
    pub contacts: Vec<String>,
    /// When it was created (RFC 3339).
    #[serde(default)]
    pub created: String,
}

/// What is known about a stored certificate besides the PEM.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertMeta {
    /// The directory URL of the CA that issued it.
    pub directory: String,
    /// The names ordered.
    pub names: Vec<String>,
    /// When it was stored (RFC 3339).
    pub issued: String,
    /// Leaf serial (hex).
    pub serial: String,
    /// Key type, e.g. `ecdsa-p256`.
    pub key_type: String,
}

/// `state_dir/acme/`.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The ACME directory in the state directory.
    root: PathBuf,
}

fn io_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// `state_dir/acme/`.
fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("acme")
}

/// Where the certificate of site `name` is stored:
/// `state_dir/acme/certs/NAME/cert.pem`.
pub fn bundle_path(state_dir: &Path, name: &str) -> PathBuf {
    // Site names are [A-Za-z0-9._-]; keep "." and ".." from naming a parent.
    let dir = if name.starts_with('.') {
        format!("_{name}")
    } else {
        name.to_string()
    };
    root(state_dir).join("certs").join(dir).join("cert.pem")
}

/// A file-name-safe rendering of a directory URL (and EAB key id): readable
/// and stable across versions (no hash).
pub fn account_slug(directory: &str, eab_kid: Option<&str>) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    let rest = directory.strip_prefix("https://").unwrap_or(directory);
    let mut slug = clean(rest.trim_end_matches('/'));
    slug.truncate(150);
    if let Some(kid) = eab_kid {
        let mut k = clean(kid);
        k.truncate(60);
        slug.push_str("_kid-");
        slug.push_str(&k);
    }
    slug.trim_start_matches('.').to_string()
}

impl Storage {
    /// Storage under `state_dir/acme`.
    pub fn new(state_dir: &Path) -> Storage {
        Storage {
            root: root(state_dir),
        }
    }

    fn ensure_root(&self) -> Result<(), StorageError> {
        fsutil::ensure_private_dir(&self.root).map_err(|e| io_err("create", &self.root, e))
    }

    fn account_path(&self, slug: &str) -> PathBuf {
        self.root.join("accounts").join(slug).join("account.json")
    }

    /// The stored account for `slug`, if any.
    pub fn load_account(&self, slug: &str) -> Result<Option<StoredAccount>, StorageError> {
        let path = self.account_path(slug);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path, e)),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            io_err(
                "parse",
                &path,
                format!("{e}; move it away to create a new account"),
            )
        })
    }

    /// Stores an account (0600).
    pub fn save_account(&self, slug: &str, account: &StoredAccount) -> Result<(), StorageError> {
        self.ensure_root()?;
        let path = self.account_path(slug);
        let text = serde_json::to_vec_pretty(account).map_err(|e| io_err("encode", &path, e))?;
        fsutil::atomic_write(&path, &text, 0o600).map_err(|e| io_err("write", &path, e))
    }

    /// Moves an account the CA no longer knows aside (kept for forensics).
    pub fn retire_account(&self, slug: &str) -> Result<(), StorageError> {
        let path = self.account_path(slug);
        let aside = path.with_extension(format!("json.retired-{}", unix_now()));
        match std::fs::rename(&path, &aside) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("move aside", &path, e)),
        }
    }

    /// Stores a certificate: chain then key in `bundle` (0600), then its
    /// metadata beside it.
    pub fn save_cert(
        &self,
        bundle: &Path,
        chain_pem: &str,
        key_pem: &str,
        meta: &CertMeta,
    ) -> Result<(), StorageError> {
        self.ensure_root()?;
        let mut pem = String::with_capacity(chain_pem.len() + key_pem.len() + 1);
        pem.push_str(chain_pem.trim_end());
        pem.push('\n');
        pem.push_str(key_pem.trim_end());
        pem.push('\n');
        fsutil::atomic_write(bundle, pem.as_bytes(), 0o600)
            .map_err(|e| io_err("write", bundle, e))?;
        let meta_path = meta_path(bundle);
        let text = serde_json::to_vec_pretty(meta).map_err(|e| io_err("encode", &meta_path, e))?;
        fsutil::atomic_write(&meta_path, &text, 0o644).map_err(|e| io_err("write", &meta_path, e))
    }

    /// The metadata of a stored certificate (missing or unreadable: `None`).
    pub fn load_meta(&self, bundle: &Path) -> Option<CertMeta> {
        let text = std::fs::read_to_string(meta_path(bundle)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

fn meta_path(bundle: &Path) -> PathBuf {
    bundle.with_file_name("meta.json")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_readable_and_safe() {
        assert_eq!(
            account_slug("https://acme-v02.api.letsencrypt.org/directory", None),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            account_slug("https://127.0.0.1:14000/dir/", Some("kid/1")),
            "127.0.0.1_14000_dir_kid-kid_1"
        );
        assert!(!account_slug("https://../..", None).starts_with('.'));
    }

    #[test]
    fn cert_and_account_round_trip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let st = Storage::new(dir.path());
        assert!(st.load_account("x").unwrap().is_none());
        let acc = StoredAccount {
            credentials: serde_json::json!({"id": "u"}),
            contacts: vec!["mailto:a@b.c".into()],
            created: "now".into(),
        };
        st.save_account("x", &acc).unwrap();
        assert_eq!(
            st.load_account("x").unwrap().unwrap().contacts,
            acc.contacts
        );
        let bundle = bundle_path(dir.path(), "site");
        assert_eq!(bundle, dir.path().join("acme/certs/site/cert.pem"));
        assert_eq!(
            bundle_path(dir.path(), ".."),
            dir.path().join("acme/certs/_../cert.pem")
        );
        let meta = CertMeta {
            directory: "https://ca/dir".into(),
            ..CertMeta::default()
        };
        st.save_cert(&bundle, "CHAIN\n", "KEY\n", &meta).unwrap();
        assert_eq!(std::fs::read_to_string(&bundle).unwrap(), "CHAIN\nKEY\n");
        assert_eq!(st.load_meta(&bundle), Some(meta));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&bundle), 0o600);
            assert_eq!(
                mode(&dir.path().join("acme/accounts/x/account.json")),
                0o600
            );
            assert_eq!(mode(&dir.path().join("acme")), 0o700);
        }
        st.retire_account("x").unwrap();
        assert!(st.load_account("x").unwrap().is_none());
    }
}
