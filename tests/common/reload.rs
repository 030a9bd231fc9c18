//! Certificate files replaced the way deploy tools do (in place, rename,
//! certbot, Kubernetes, delete and re-create), and the certificate events
//! a test awaits instead of sleeping.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::pki::Leaf;

/// Writes `contents` to `path` the way deploy tools do: a temp file in the
/// same directory, then a rename over the old one.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-replace");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits (at most `limit`) for a certificate event about `name` that
/// `pred` accepts; panics on timeout.
pub async fn wait_cert_event(
    rx: &mut tokio::sync::broadcast::Receiver<portcullis::certstore::CertEvent>,
    limit: Duration,
    mut pred: impl FnMut(&portcullis::certstore::CertEvent) -> bool,
) -> portcullis::certstore::CertEvent {
    tokio::time::timeout(limit, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(e) => panic!("certificate events: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no matching certificate event within {limit:?}"))
}

/// How a tool replaces a certificate and its key on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WritePattern {
    /// Both files rewritten in place (same inodes): `cp`, an editor.
    InPlace,
    /// Each file written to a temp name, then renamed over the old one.
    Rename,
    /// certbot: new `archive/NAME/fullchainN.pem` and `privkeyN.pem`, then
    /// each `live/NAME/` symlink unlinked and re-created pointing at them.
    Certbot,
    /// A Kubernetes Secret volume: a new `..<timestamp>` directory, a
    /// `..data_tmp` symlink to it renamed over `..data`, the old directory
    /// removed; `tls.crt -> ..data/tls.crt` never changes.
    Kubernetes,
    /// Both files deleted, then written again.
    DeleteRecreate,
}

impl WritePattern {
    /// Every pattern.
    pub const ALL: [WritePattern; 5] = [
        WritePattern::InPlace,
        WritePattern::Rename,
        WritePattern::Certbot,
        WritePattern::Kubernetes,
        WritePattern::DeleteRecreate,
    ];
}

/// A site's certificate files, laid out for one [`WritePattern`] under `root`.
pub struct CertFiles {
    pub pattern: WritePattern,
    pub root: PathBuf,
    /// Replacements so far (certbot's N, part of the Kubernetes directory name).
    pub generation: u32,
}

impl CertFiles {
    /// Creates `root` and lays out `leaf` the way the pattern's tool does.
    pub fn create(root: &Path, pattern: WritePattern, leaf: &Leaf) -> CertFiles {
        std::fs::create_dir_all(root).unwrap();
        let mut files = CertFiles {
            pattern,
            root: root.to_path_buf(),
            generation: 0,
        };
        match pattern {
            WritePattern::Certbot => {
                std::fs::create_dir_all(root.join("archive/site")).unwrap();
                std::fs::create_dir_all(root.join("live/site")).unwrap();
            }
            WritePattern::Kubernetes => {}
            _ => {
                std::fs::write(files.cert_path(), &leaf.chain_pem).unwrap();
                std::fs::write(files.key_path(), &leaf.key_pem).unwrap();
                return files;
            }
        }
        files.replace(leaf);
        files
    }

    /// The chain path to configure.
    pub fn cert_path(&self) -> PathBuf {
        match self.pattern {
            WritePattern::Certbot => self.root.join("live/site/fullchain.pem"),
            WritePattern::Kubernetes => self.root.join("tls.crt"),
            _ => self.root.join("cert.pem"),
        }
    }

    /// The key path to configure.
    pub fn key_path(&self) -> PathBuf {
        match self.pattern {
            WritePattern::Certbot => self.root.join("live/site/privkey.pem"),
            WritePattern::Kubernetes => self.root.join("tls.key"),
            _ => self.root.join("key.pem"),
        }
    }

    /// Replaces the certificate and key with `leaf`'s.
    pub fn replace(&mut self, leaf: &Leaf) {
        self.generation += 1;
        let n = self.generation;
        let (cert, key) = (self.cert_path(), self.key_path());
        match self.pattern {
            WritePattern::InPlace => {
                for (path, data) in [(&cert, &leaf.chain_pem), (&key, &leaf.key_pem)] {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(path)
                        .unwrap();
                    f.write_all(data.as_bytes()).unwrap();
                }
            }
            WritePattern::Rename => {
                replace_file(&cert, &leaf.chain_pem);
                replace_file(&key, &leaf.key_pem);
            }
            WritePattern::DeleteRecreate => {
                std::fs::remove_file(&cert).unwrap();
                std::fs::remove_file(&key).unwrap();
                std::fs::write(&cert, &leaf.chain_pem).unwrap();
                std::fs::write(&key, &leaf.key_pem).unwrap();
            }
            WritePattern::Certbot => {
                let archive = self.root.join("archive/site");
                std::fs::write(archive.join(format!("fullchain{n}.pem")), &leaf.chain_pem).unwrap();
                std::fs::write(archive.join(format!("privkey{n}.pem")), &leaf.key_pem).unwrap();
                // certbot's `_update_link_to`: unlink, then symlink (privkey before fullchain).
                for (link, kind) in [(&key, "privkey"), (&cert, "fullchain")] {
                    let _ = std::fs::remove_file(link);
                    std::os::unix::fs::symlink(format!("../../archive/site/{kind}{n}.pem"), link)
                        .unwrap();
                }
            }
            WritePattern::Kubernetes => {
                // kubelet's AtomicWriter.
                let stamp = format!("..2026_01_01_00_00_00.{n:09}");
                let new_dir = self.root.join(&stamp);
                std::fs::create_dir(&new_dir).unwrap();
                std::fs::write(new_dir.join("tls.crt"), &leaf.chain_pem).unwrap();
                std::fs::write(new_dir.join("tls.key"), &leaf.key_pem).unwrap();
                let data = self.root.join("..data");
                let old_dir = std::fs::read_link(&data).ok();
                let tmp = self.root.join("..data_tmp");
                std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
                std::fs::rename(&tmp, &data).unwrap();
                for name in ["tls.crt", "tls.key"] {
                    let link = self.root.join(name);
                    if std::fs::symlink_metadata(&link).is_err() {
                        std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
                    }
                }
                if let Some(old) = old_dir {
                    std::fs::remove_dir_all(self.root.join(old)).unwrap();
                }
            }
        }
    }
}

/// Waits (at most `limit`) until `serial` is published for site `name`;
/// returns the rejections seen on the way (a pair caught half-written is
/// refused, which is fine: the previous one keeps serving).
pub async fn wait_published(
    rx: &mut tokio::sync::broadcast::Receiver<portcullis::certstore::CertEvent>,
    name: &str,
    serial: &str,
    limit: Duration,
) -> Result<Vec<String>, String> {
    use portcullis::certstore::CertEvent;
    let mut rejected = Vec::new();
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(CertEvent::Published { name: n, serial: s }) if n == name && s == serial => {
                    return Ok(())
                }
                Ok(CertEvent::Rejected { name: n, error }) if n == name => rejected.push(error),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                    return Err(format!("lagged by {k} events"))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(Ok(())) => Ok(rejected),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "{serial} not published for {name} within {limit:?}; rejected on the way: {rejected:?}"
        )),
    }
}
