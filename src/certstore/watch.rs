//! Reloading certificate files: validate, then publish into the one slot,
//! keeping the last good certificate on any failure. Changes are seen
//! through `notify` on the *directories* holding each file and each
//! symlink's target (so in-place writes, temp+rename, certbot's `live/`
//! symlinks and Kubernetes' `..data` swaps are all caught), debounced, with
//! a periodic content-hash check as the fallback for filesystems that send
//! no events. Control path only.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::{load, CertEvent, CertSlot, CertSource, CertStore, Checks};

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

pub(crate) fn content_hash(cert: &[u8], key: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cert.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// Re-reads a file slot. With `force`, validates even if the bytes did not change.
pub fn reload_slot(store: &CertStore, slot: &CertSlot, force: bool) -> Outcome {
    let CertSource::File { cert, key } = &slot.source else {
        return Outcome::Unchanged;
    };
    let read = |p: &Path| load::read(p).map_err(|e| e.to_string());
    let outcome = match (read(cert), read(key)) {
        (Err(e), _) | (_, Err(e)) => {
            slot.last_hash.store(0, Ordering::Release);
            Outcome::Rejected { error: e }
        }
        (Ok(c), Ok(k)) => {
            let hash = content_hash(&c, &k);
            if !force && slot.last_hash.swap(hash, Ordering::AcqRel) == hash {
                return Outcome::Unchanged;
            }
            slot.last_hash.store(hash, Ordering::Release);
            match load::from_pem(&c, cert, &k, key, &slot.hosts, Checks { allow_expired: false }) {
                Err(e) => Outcome::Rejected { error: e.to_string() },
                Ok(mut served) => {
                    served.info.cert_path = Some(cert.clone());
                    served.info.key_path = Some(key.clone());
                    let same = slot
                        .current()
                        .is_some_and(|cur| cur.key.cert == served.key.cert && cur.info.serial == served.info.serial);
                    if same {
                        slot.clear_error();
                        return Outcome::Unchanged;
                    }
                    let serial = served.info.serial.clone();
                    slot.publish(served);
                    Outcome::Published { serial }
                }
            }
        }
    };
    report(store, slot, &outcome);
    outcome
}

/// Logs, counts and broadcasts an outcome.
pub(crate) fn report(store: &CertStore, slot: &CertSlot, outcome: &Outcome) {
    match outcome {
        Outcome::Unchanged => {}
        Outcome::Published { serial } => {
            store.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
            store.stats.last_success.store(unix_now(), Ordering::Relaxed);
            tracing::info!(site = %slot.name, %serial, "certificate replaced");
            let _ = store.events.send(CertEvent::Published {
                name: slot.name.clone(),
                serial: serial.clone(),
            });
        }
        Outcome::Rejected { error } => {
            store.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
            if slot.record_error(error) {
                tracing::warn!(site = %slot.name, %error, "keeping previous certificate");
            }
            let _ = store.events.send(CertEvent::Rejected {
                name: slot.name.clone(),
                error: error.clone(),
            });
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Re-reads every file slot; returns how many changed and how many failed.
pub fn reload_all(store: &CertStore, force: bool) -> (usize, usize) {
    let mut changed = 0;
    let mut failed = 0;
    for slot in store.slots() {
        match reload_slot(store, &slot, force) {
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
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
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
pub fn spawn_watcher(store: Arc<CertStore>, refresh: Arc<Notify>, poll_every: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
        let mut watcher = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
            Err(e) => tracing::warn!(error = %e, "file watch error; the periodic check still runs"),
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch certificate files; relying on the periodic check");
                None
            }
        };
        let mut watched: HashSet<PathBuf> = HashSet::new();
        let mut index: HashMap<PathBuf, Vec<Arc<CertSlot>>> = HashMap::new();
        rewatch(&store, watcher.as_mut(), &mut watched, &mut index);
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = refresh.notified() => {
                    rewatch(&store, watcher.as_mut(), &mut watched, &mut index);
                    reload_all(&store, false);
                }
                _ = poll.tick() => {
                    let (changed, _) = reload_all(&store, false);
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
                    let mut seen = HashSet::new();
                    let mut any = false;
                    for d in &dirs {
                        for slot in index.get(d).into_iter().flatten() {
                            if seen.insert(slot.name.clone()) {
                                reload_slot(&store, slot, false);
                                any = true;
                            }
                        }
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

fn add_dir(dirs: &mut HashSet<PathBuf>, p: &Path) {
    dirs.insert(p.to_path_buf());
    if let Some(parent) = p.parent() {
        dirs.insert(parent.to_path_buf());
    }
}

fn rewatch(
    store: &CertStore,
    watcher: Option<&mut notify::RecommendedWatcher>,
    watched: &mut HashSet<PathBuf>,
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
    let wanted: HashSet<PathBuf> = index.keys().cloned().collect();
    for gone in watched.difference(&wanted) {
        let _ = w.unwatch(gone);
    }
    for d in &wanted {
        if !watched.contains(d) {
            if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                tracing::debug!(dir = %d.display(), error = %e, "cannot watch directory");
            }
        }
    }
    // A directory that was deleted and recreated needs a fresh watch.
    for d in watched.intersection(&wanted) {
        if !d.exists() {
            let _ = w.unwatch(d);
        }
    }
    *watched = wanted.into_iter().filter(|d| d.exists()).collect();
}
