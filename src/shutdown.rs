//! Process signals: SIGTERM and SIGINT start a graceful shutdown, SIGHUP
//! reloads, SIGUSR1 reopens the access log. Control path.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight requests");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Reloads the configuration and certificates on every SIGHUP. The handler
/// is installed before this returns: until then a SIGHUP would terminate
/// the process (its default action), so call it before listening.
pub fn on_reload_signal(control: std::sync::Arc<crate::control::Control>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; use POST /reload instead");
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = hup.recv() => if r.is_none() { return },
                }
                tracing::info!("SIGHUP received; reloading");
                let _ = control.reload().await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (control, stop);
}

/// Reopens the access log file on every SIGUSR1 (logrotate: rename the
/// file, send SIGUSR1, a new file appears). Installed before this returns,
/// for the same reason as [`on_reload_signal`]: SIGUSR1's default action
/// terminates the process.
pub fn on_reopen_signal(rt: std::sync::Arc<crate::proxy::Runtime>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            tracing::warn!("cannot listen for SIGUSR1; the access log cannot be reopened");
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = usr1.recv() => if r.is_none() { return },
                }
                tracing::info!("SIGUSR1 received; reopening the access log");
                rt.access_log.reopen();
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (rt, stop);
}
