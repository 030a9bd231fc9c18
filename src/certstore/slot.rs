//! One certificate in service (a slot) and the SNI map over the slots.
//! Hot path: a handshake loads the map, looks a name up and loads the
//! slot's certificate, with no lock. Filling a slot is the store's job.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;

use super::types::{CertSource, ServedCert};
use crate::config::HostPattern;
use crate::hostmap::HostMap;

/// Outcome of the last load attempt of a slot (control path).
#[derive(Debug, Clone, Default)]
pub struct SlotStatus {
    /// When the current certificate was published.
    pub last_loaded: Option<SystemTime>,
    /// The last failure, if it is still pending (cleared by a success).
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_error_at: Option<SystemTime>,
    /// When the certificate will be renewed (automatic sources).
    pub next_renewal: Option<SystemTime>,
}

/// One certificate in service: the unit that is swapped.
pub struct CertSlot {
    /// The site's name.
    pub name: String,
    /// The names it must cover.
    pub hosts: Vec<HostPattern>,
    /// Where it comes from.
    pub source: CertSource,
    /// Whether it serves unknown names.
    pub is_default: bool,
    /// The chain in service; `None` until a first certificate exists.
    current: ArcSwapOption<ServedCert>,
    /// Load outcomes (control path only; never locked during a handshake).
    status: Mutex<SlotStatus>,
    /// Hash of the file bytes last tried, so an unchanged file is not re-parsed.
    pub(crate) last_hash: AtomicU64,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl CertSlot {
    /// A slot with nothing in service yet.
    pub fn new(
        name: String,
        hosts: Vec<HostPattern>,
        source: CertSource,
        is_default: bool,
    ) -> Self {
        CertSlot {
            name,
            hosts,
            source,
            is_default,
            current: ArcSwapOption::empty(),
            status: Mutex::new(SlotStatus::default()),
            last_hash: AtomicU64::new(0),
        }
    }

    /// The chain in service.
    pub fn current(&self) -> Option<Arc<ServedCert>> {
        self.current.load_full()
    }

    /// What a handshake gets (hot path).
    #[inline]
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }

    /// Fills the slot and clears any pending error. Only for a slot being
    /// built (not in a map in service yet: a start, a config reload, the
    /// offline inventory); a replacement goes through `CertStore::publish`,
    /// which counts, logs and announces it.
    pub(crate) fn install(&self, cert: ServedCert) {
        self.current.store(Some(Arc::new(cert)));
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.last_loaded = Some(SystemTime::now());
        st.last_error = None;
        st.last_error_at = None;
    }

    /// Records a failure; returns true when it differs from the pending one
    /// (so the caller logs each distinct failure once).
    pub(crate) fn record_error(&self, error: &str) -> bool {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let new = st.last_error.as_deref() != Some(error);
        st.last_error = Some(error.to_string());
        st.last_error_at = Some(SystemTime::now());
        new
    }

    /// Records when the certificate will next be renewed.
    pub(crate) fn set_next_renewal(&self, at: Option<SystemTime>) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_renewal = at;
    }

    /// Clears a pending error (the files are back to what is served).
    pub(crate) fn clear_error(&self) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.last_error = None;
        st.last_error_at = None;
    }

    /// Whether a certificate is in service (hot path).
    #[inline]
    pub fn has_cert(&self) -> bool {
        self.current.load().is_some()
    }

    /// Whether `other` describes the same certificate source for the same names.
    pub fn same_source(&self, other: &CertSlot) -> bool {
        self.name == other.name
            && self.hosts == other.hosts
            && self.source == other.source
            && self.is_default == other.is_default
    }

    /// A copy of the status.
    pub fn status(&self) -> SlotStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The SNI map: names to slots. Replaced as a whole only when the set of
/// sites changes; a certificate replacement goes into its slot instead.
#[derive(Debug, Default)]
pub struct SniMap {
    /// Names to slots.
    hosts: HostMap<Arc<CertSlot>>,
    /// Every slot, in config order.
    slots: Vec<Arc<CertSlot>>,
}

impl SniMap {
    /// Builds a map over `slots` (the first `is_default` one is the default).
    pub fn new(slots: Vec<Arc<CertSlot>>) -> Self {
        let mut hosts = HostMap::default();
        for slot in &slots {
            for h in &slot.hosts {
                hosts.insert(h, slot.clone());
            }
            if slot.is_default && hosts.default_value().is_none() {
                hosts.set_default(slot.clone());
            }
        }
        SniMap { hosts, slots }
    }

    /// The slot for an SNI name (hot path).
    #[inline]
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<CertSlot>> {
        self.hosts.lookup(sni)
    }

    /// Every slot.
    pub fn slots(&self) -> &[Arc<CertSlot>] {
        &self.slots
    }
}
