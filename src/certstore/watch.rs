//! Reloading certificate files: validate, then publish into the one slot,
//! keeping the last good certificate on any failure. Changes are seen
//! through `notify` on the *directories* holding each file and each
//! symlink's target (so in-place writes, temp+rename, certbot's `live/`
//! symlinks and Kubernetes' `..data` swaps are all caught), debounced, with
//! a periodic content-hash check as the fallback for filesystems that send
//! no events. Control path only.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::{load, CertSlot, CertSource, CertStore, Checks, PublishCause, ServedCert};

/// Quiet time that ends a burst of file events (a cert and its key written
/// a moment apart are one change).
const DEBOUNCE: Duration = Duration::from_millis(75);
/// A burst is cut off after this long even if events keep coming.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

/// What a reload attempt of one slot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Files unchanged since the last attempt (or same certificate).
    Unchanged,
    /// A new certificate is in service.
    Published {
        /// Its serial.
        serial: String,
    },
    /// The files could not be used; the previous certificate stays.
    Rejected {
        /// Why.
        error: String,
    },
}

/// What reading a file slot's files found.
enum Checked {
    /// Same bytes as last time, or the certificate already in service.
    Unchanged,
    /// A new, validated certificate, to publish (boxed: it is large).
    Ready(Box<ServedCert>),
    /// The files cannot be used.
    Failed(String),
}

/// Reads and validates a file slot's files. Blocking: runs on a blocking
/// thread, never on an async worker. With `force`, validates even if the
/// bytes did not change.
fn check_files(slot: &CertSlot, force: bool) -> Checked {
    let CertSource::File { cert, key } = &slot.source else {
        return Checked::Unchanged;
    };
    let read = |p: &Path| load::read(p).map_err(|e| e.to_string());
    let (c, k) = match (read(cert), read(key)) {
        (Err(e), _) | (_, Err(e)) => {
            slot.last_hash.store(0, Ordering::Release);
            return Checked::Failed(e);
        }
        (Ok(c), Ok(k)) => (c, k),
    };
    let hash = load::content_hash(&c, &k);
    if !force && slot.last_hash.swap(hash, Ordering::AcqRel) == hash {
        return Checked::Unchanged;
    }
    slot.last_hash.store(hash, Ordering::Release);
    let checks = Checks {
        allow_expired: false,
    };
    match load::from_pem(&c, cert, &k, key, &slot.hosts, checks) {
        Err(e) => Checked::Failed(e.to_string()),
        Ok(mut served) => {
            served.info.cert_path = Some(cert.clone());
            served.info.key_path = Some(key.clone());
            let same = slot.current().is_some_and(|cur| {
                cur.key.cert == served.key.cert && cur.info.serial == served.info.serial
            });
            if same {
                // The files are back to what is served.
                slot.clear_error();
                Checked::Unchanged
            } else {
                Checked::Ready(Box::new(served))
            }
        }
    }
}

/// Re-reads file slots: reads and parses on a blocking thread, then
/// publishes each new certificate (or refuses it, keeping the previous
/// one) through [`CertStore::publish`]. Serialised with every other file
/// re-read by the store's control-path lock.
async fn reload_slots(store: &CertStore, slots: Vec<Arc<CertSlot>>, force: bool) -> Vec<Outcome> {
    let slots: Vec<Arc<CertSlot>> = slots
        .into_iter()
        .filter(|s| matches!(s.source, CertSource::File { .. }))
        .collect();
    if slots.is_empty() {
        return Vec::new();
    }
    let _serial = store.lock_file_reloads().await;
    let work = slots.clone();
    let checked = match tokio::task::spawn_blocking(move || {
        work.iter()
            .map(|s| check_files(s, force))
            .collect::<Vec<_>>()
    })
    .await
    {
        Ok(c) => c,
        Err(e) => {
            let error = format!("reading the certificate files failed: {e}");
            slots
                .iter()
                .map(|_| Checked::Failed(error.clone()))
                .collect()
        }
    };
    slots
        .iter()
        .zip(checked)
        .map(|(slot, checked)| match checked {
            Checked::Unchanged => Outcome::Unchanged,
            Checked::Ready(served) => Outcome::Published {
                serial: store.publish(slot, *served, PublishCause::File),
            },
            Checked::Failed(error) => {
                store.reject(slot, &error, PublishCause::File);
                Outcome::Rejected { error }
            }
        })
        .collect()
}

/// Re-reads a file slot. With `force`, validates even if the bytes did not change.
pub async fn reload_slot(store: &CertStore, slot: &Arc<CertSlot>, force: bool) -> Outcome {
    reload_slots(store, vec![slot.clone()], force)
        .await
        .pop()
        .unwrap_or(Outcome::Unchanged)
}

/// Re-reads every file slot; returns how many changed and how many failed.
pub(crate) async fn reload_all(store: &CertStore, force: bool) -> (usize, usize) {
    let mut changed = 0;
    let mut failed = 0;
    for outcome in reload_slots(store, store.slots(), force).await {
        match outcome {
            Outcome::Published { .. } => changed += 1,
            Outcome::Rejected { .. } => failed += 1,
            Outcome::Unchanged => {}
        }
    }
    (changed, failed)
}

/// Directories to watch for a file: its parent, and the parent of every
/// symlink hop (certbot `live/` -> `archive/`, Kubernetes `..data` -> timestamped dir).
fn dirs_for(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    if let Some(p) = abs.parent() {
        out.push(p.to_path_buf());
    }
    if let Ok(real) = std::fs::canonicalize(&abs) {
        if let Some(p) = real.parent() {
            out.push(p.to_path_buf());
        }
    }
    // One intermediate hop: `tls.crt -> ..data/tls.crt` lives under `..data`.
    if let Ok(target) = std::fs::read_link(&abs) {
        let target = abs.parent().map(|p| p.join(&target)).unwrap_or(target);
        if let Some(p) = target.parent() {
            out.push(p.to_path_buf());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Starts the watcher task. `refresh` is notified after a config reload
/// changes the set of files; `poll_every` is the content-hash fallback.
pub(crate) fn spawn_watcher(
    store: Arc<CertStore>,
    refresh: Arc<Notify>,
    poll_every: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
        let mut watcher = match notify::recommended_watcher(
            move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if ev.need_rescan() => {
                    // The kernel queue overflowed: events were lost.
                    let _ = tx.send(PathBuf::new());
                }
                Ok(ev) if changes_files(&ev.kind) => {
                    for p in ev.paths {
                        let _ = tx.send(p);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "file watch error; the periodic check still runs")
                }
            },
        ) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch certificate files; relying on the periodic check");
                None
            }
        };
        let mut watched: HashMap<PathBuf, Option<DirId>> = HashMap::new();
        let mut index: HashMap<PathBuf, Vec<Arc<CertSlot>>> = HashMap::new();
        rewatch(&store, watcher.as_mut(), &mut watched, &mut index);
        // Files replaced between the initial load and the watches being in
        // place sent no event we could see: look once now (unchanged files
        // are only hashed).
        reload_all(&store, false).await;
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = refresh.notified() => {
                    rewatch(&store, watcher.as_mut(), &mut watched, &mut index);
                    reload_all(&store, false).await;
                }
                _ = poll.tick() => {
                    let (changed, _) = reload_all(&store, false).await;
                    if changed > 0 {
                        rewatch(&store, watcher.as_mut(), &mut watched, &mut index);
                    }
                }
                Some(first) = rx.recv() => {
                    let mut dirs: HashSet<PathBuf> = HashSet::new();
                    add_dir(&mut dirs, &first);
                    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
                    loop {
                        let quiet = tokio::time::Instant::now() + DEBOUNCE;
                        tokio::select! {
                            more = rx.recv() => match more {
                                Some(p) => { add_dir(&mut dirs, &p); }
                                None => break,
                            },
                            _ = tokio::time::sleep_until(quiet.min(deadline)) => break,
                        }
                    }
                    let mut any = false;
                    if dirs.contains(Path::new("")) {
                        // Lost events: look at everything.
                        reload_all(&store, false).await;
                        any = true;
                    }
                    let mut seen = HashSet::new();
                    let touched: Vec<Arc<CertSlot>> = dirs
                        .iter()
                        .flat_map(|d| index.get(d).into_iter().flatten())
                        .filter(|slot| seen.insert(slot.name.clone()))
                        .cloned()
                        .collect();
                    if !touched.is_empty() {
                        reload_slots(&store, touched, false).await;
                        any = true;
                    }
                    if any {
                        // Symlinks may now point into new directories.
                        rewatch(&store, watcher.as_mut(), &mut watched, &mut index);
                    }
                }
            }
        }
    });
}

/// Whether an event can mean a file's contents or a name changed. Opens,
/// reads and read-only closes are not changes; they must be ignored or the
/// watcher's own reads of the files it watches (inotify reports `IN_OPEN`)
/// would trigger a re-read every debounce period, forever.
fn changes_files(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    use notify::EventKind;
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any
        | EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Other => true,
    }
}

/// Identity of a directory (device and inode, through symlinks), so a
/// directory that was replaced under the same name gets a fresh watch: the
/// old watch stays on the old inode and would see nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId(u64, u64);

#[cfg(unix)]
fn dir_id(d: &Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(d).ok().map(|m| DirId(m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn dir_id(d: &Path) -> Option<DirId> {
    d.exists().then_some(DirId(0, 0))
}

fn add_dir(dirs: &mut HashSet<PathBuf>, p: &Path) {
    dirs.insert(p.to_path_buf());
    if let Some(parent) = p.parent() {
        dirs.insert(parent.to_path_buf());
    }
}

fn rewatch(
    store: &CertStore,
    watcher: Option<&mut notify::RecommendedWatcher>,
    watched: &mut HashMap<PathBuf, Option<DirId>>,
    index: &mut HashMap<PathBuf, Vec<Arc<CertSlot>>>,
) {
    index.clear();
    for slot in store.slots() {
        if let CertSource::File { cert, key } = &slot.source {
            let mut dirs = dirs_for(cert);
            dirs.extend(dirs_for(key));
            dirs.sort();
            dirs.dedup();
            for d in dirs {
                index.entry(d).or_default().push(slot.clone());
            }
        }
    }
    let Some(w) = watcher else { return };
    let wanted: HashMap<PathBuf, Option<DirId>> =
        index.keys().map(|d| (d.clone(), dir_id(d))).collect();
    for (gone, _) in watched
        .iter()
        .filter(|(d, id)| id.is_some() && !wanted.contains_key(*d))
    {
        let _ = w.unwatch(gone);
    }
    let mut now_watched = HashMap::with_capacity(wanted.len());
    for (d, id) in wanted {
        let before = watched.get(&d).copied().flatten();
        if before.is_some() && before == id {
            now_watched.insert(d, id);
            continue;
        }
        if before.is_some() {
            // Same name, another directory (deleted and recreated, or a
            // symlink such as Kubernetes' `..data` re-pointed): the old
            // watch is on the old inode and sees nothing more.
            let _ = w.unwatch(&d);
        }
        // Not there (yet): the parent's watch or the poll will see it appear,
        // and the reload that follows calls this again.
        let ok = id.is_some()
            && w.watch(&d, RecursiveMode::NonRecursive)
                .inspect_err(
                    |e| tracing::debug!(dir = %d.display(), error = %e, "cannot watch directory"),
                )
                .is_ok();
        // Only a watch in place is remembered, so a failed one is tried again.
        now_watched.insert(d, if ok { id } else { None });
    }
    *watched = now_watched;
}

#[cfg(test)]
mod tests {
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode,
    };
    use notify::EventKind;

    use super::changes_files;

    #[test]
    fn reads_of_watched_files_are_not_changes() {
        assert!(!changes_files(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Read)));
    }

    #[test]
    fn writes_renames_and_removals_are_changes() {
        assert!(changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_files(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(changes_files(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(changes_files(&EventKind::Create(CreateKind::File)));
        assert!(changes_files(&EventKind::Remove(RemoveKind::File)));
        assert!(changes_files(&EventKind::Other));
    }
}
