//! The internal CA's renewer: re-issues `tls = "internal"` certificates
//! when a third of their life is left and publishes them through the
//! store's one publish path. Control path only.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::internal::{renew_at, InternalCa};
use super::types::{CertError, CertSource, PublishCause};
use super::CertStore;

/// How often the renewer looks at internal certificates.
const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Re-issues internal certificates when a third of their life is left,
/// looking every hour.
pub(crate) fn spawn_renewer(
    store: Arc<CertStore>,
    ca: Arc<InternalCa>,
    shutdown: CancellationToken,
) {
    spawn_renewer_every(store, ca, CHECK_EVERY, shutdown);
}

/// [`spawn_renewer`], looking every `every` (tests use a short period).
pub(crate) fn spawn_renewer_every(
    store: Arc<CertStore>,
    ca: Arc<InternalCa>,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            renew_due(&store, &ca).await;
        }
    });
}

/// One pass of the renewer: re-issues every internal certificate that is
/// due and publishes it through [`CertStore::publish`]. Key generation and
/// signing run on a blocking thread. Returns how many were re-issued.
async fn renew_due(store: &CertStore, ca: &Arc<InternalCa>) -> usize {
    let mut renewed = 0;
    for slot in store.slots() {
        if slot.source != CertSource::Internal {
            continue;
        }
        let due = slot
            .current()
            .is_none_or(|c| SystemTime::now() >= renew_at(&c.info));
        if !due {
            continue;
        }
        let (ca, hosts) = (ca.clone(), slot.hosts.clone());
        let issued = tokio::task::spawn_blocking(move || ca.issue(&hosts))
            .await
            .unwrap_or_else(|e| Err(CertError::Internal(format!("issuing failed: {e}"))));
        match issued {
            Ok(cert) => {
                store.publish(&slot, cert, PublishCause::InternalCa);
                renewed += 1;
            }
            Err(e) => {
                if slot.record_error(&e.to_string()) {
                    tracing::warn!(site = %slot.name, error = %e, "keeping previous certificate");
                }
            }
        }
    }
    renewed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certstore::{CertEvent, CertSlot, SniMap};
    use crate::config::HostPattern;

    /// A background re-issue goes through the one publish path: it is
    /// counted in `portcullis_tls_cert_reloads_total` and announced.
    #[tokio::test]
    async fn internal_ca_reissue_is_counted_and_announced() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(InternalCa::load_or_create(dir.path()).unwrap());
        let hosts = vec![HostPattern::Exact("internal.test".into())];
        let slot = Arc::new(CertSlot::new(
            "inner".into(),
            hosts.clone(),
            CertSource::Internal,
            false,
        ));
        // Issued five minutes ago for six minutes: past two thirds of its
        // life, so due now.
        let old = ca.issue_for(&hosts, Duration::from_secs(60)).unwrap();
        let old_serial = old.info.serial.clone();
        slot.install(old);
        let store = Arc::new(CertStore::new());
        store.replace_map(SniMap::new(vec![slot.clone()]));
        let mut events = store.subscribe();
        let metrics = crate::metrics::Metrics::new();
        let reloads = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("portcullis_tls_cert_reloads_total{result=\"success\"}"))
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(reloads(&metrics.render(&store)).as_deref(), Some("0"));

        let stop = CancellationToken::new();
        spawn_renewer_every(
            store.clone(),
            ca.clone(),
            Duration::from_millis(20),
            stop.clone(),
        );
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no event within 10 s")
            .unwrap();
        stop.cancel();
        let CertEvent::Published { name, serial } = ev else {
            panic!("{ev:?}");
        };
        assert_eq!(name, "inner");
        assert_ne!(serial, old_serial);
        assert_eq!(slot.current().unwrap().info.serial, serial);
        assert_eq!(reloads(&metrics.render(&store)).as_deref(), Some("1"));
        assert!(slot.status().last_loaded.is_some());
    }
}
