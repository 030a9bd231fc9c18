//! The one accept loop, shared by the HTTPS, plain-HTTP and admin
//! listeners, and the connection drivers of the first two. Hot path.
//!
//! [`accept_loop`] takes a connection slot from the listener's budget
//! before it accepts (so a full budget leaves new connections in the
//! kernel's backlog instead of holding sockets open), accepts, and runs
//! the connection in a tracked task that holds the slot until it ends.
//! [`drive`] runs one hyper connection to its end, closing it when it has
//! been idle too long or when shutdown starts.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::{Admitted, Shedder};
use super::clock::{instant_of, now_ms};
use super::context::Peer;
use super::handler::{self, ConnCtx};
use super::io::{ConnIo, ConnShared, ScanH1};
use super::redirect;
use super::route::Snapshot;
use super::runtime::Runtime;
use super::tls;

/// How long the accept loop waits for a free slot before it asks idle
/// connections to make room, and again between each step.
const SHED_STEP: Duration = Duration::from_millis(50);

/// Makes room at the connection cap: asks connections idle for at least
/// half of `idle`, then a quarter, and so on down to any idle connection,
/// one step every [`SHED_STEP`], until a slot frees.
pub struct Shed {
    /// Where the request goes.
    pub shedder: Arc<Shedder>,
    /// The keep-alive idle timeout (the first cutoff is half of it).
    pub idle: Duration,
}

async fn acquire(slots: &Arc<Semaphore>, shed: Option<&Shed>) -> Option<OwnedSemaphorePermit> {
    let Some(shed) = shed else {
        return slots.clone().acquire_owned().await.ok();
    };
    let mut idle_ms = shed.idle.as_millis() as u64;
    loop {
        match tokio::time::timeout(SHED_STEP, slots.clone().acquire_owned()).await {
            Ok(p) => return p.ok(),
            Err(_) => {
                idle_ms /= 2;
                shed.shedder.shed_idle_for(idle_ms);
            }
        }
    }
}

/// Accepts on `listener` until `stop` is cancelled; each connection runs
/// `serve(tcp, peer)` in a task of `tracker`, holding one of `slots`.
/// With `shed`, a full budget closes idle connections to make room.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    shed: Option<Shed>,
    tracker: TaskTracker,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = acquire(&slots, shed.as_ref()) => match p { Some(p) => p, None => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let conn = serve(tcp, peer);
        tracker.spawn(async move {
            let _permit = permit;
            conn.await;
        });
    }
    tracing::debug!(addr = ?local, "listener closed");
}

/// Accepts TLS connections on `listener` until `stop` is cancelled.
pub async fn serve_https(listener: TcpListener, rt: Arc<Runtime>, stop: CancellationToken) {
    let (slots, tracker, shed) = (rt.conn_limit.clone(), rt.tracker.clone(), shed_of(&rt));
    accept_loop(listener, slots, Some(shed), tracker, stop, |tcp, peer| {
        let admitted = admit(&rt, peer, true);
        let rt = rt.clone();
        async move {
            if let Some(a) = admitted {
                serve_tls_conn(tcp, peer, rt, a).await;
            }
        }
    })
    .await;
}

fn shed_of(rt: &Runtime) -> Shed {
    Shed {
        shedder: rt.shedder.clone(),
        idle: rt.snapshot.load().timeouts.idle,
    }
}

/// Admits a connection from `peer`, or counts and logs its refusal (the
/// caller then drops the socket, which closes it).
fn admit(rt: &Arc<Runtime>, peer: SocketAddr, tls: bool) -> Option<Admitted> {
    match rt
        .admission
        .admit(peer.ip(), tls, &rt.snapshot.load().limits)
    {
        Ok(a) => Some(a),
        Err(why) => {
            rt.counters.refused(why);
            tracing::debug!(%peer, reason = why.as_str(), "connection refused");
            None
        }
    }
}

/// Accepts plain-HTTP connections (redirects and HTTP-01 answers) until
/// `stop` is cancelled.
pub async fn serve_http(
    listener: TcpListener,
    rt: Arc<Runtime>,
    https_port: Option<u16>,
    stop: CancellationToken,
) {
    let (slots, tracker, shed) = (rt.conn_limit.clone(), rt.tracker.clone(), shed_of(&rt));
    accept_loop(listener, slots, Some(shed), tracker, stop, |tcp, peer| {
        let admitted = admit(&rt, peer, false);
        let rt = rt.clone();
        async move {
            if let Some(_admitted) = admitted {
                serve_plain_conn(tcp, rt, https_port).await;
            }
        }
    })
    .await;
}

/// Keeps `portcullis_connections_open` right however the connection ends.
struct OpenConn(prometheus::IntGauge);

impl OpenConn {
    fn new(g: &prometheus::IntGauge) -> OpenConn {
        g.inc();
        OpenConn(g.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_plain_conn(tcp: TcpStream, rt: Arc<Runtime>, https_port: Option<u16>) {
    let snap = rt.snapshot.load_full();
    let shared = Arc::new(ConnShared::default());
    shared.last_done_ms.store(now_ms(), Ordering::Release);
    let io = ConnIo::new(
        tcp,
        snap.timeouts.response_write,
        Some(scan_h1(&shared, &snap)),
    );
    let rt2 = rt.clone();
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let answer = redirect::answer(&rt2.certs, &req, https_port);
        async move { Ok::<_, Infallible>(answer) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Heads are timed by `ConnIo` from their first byte; idle
        // keep-alive connections by `drive`.
        .header_read_timeout(None)
        .max_buf_size(snap.limits.max_header_bytes.max(8192));
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let conn = std::pin::pin!(conn);
    drive(
        conn,
        |c| c.graceful_shutdown(),
        &rt,
        &shared,
        snap.timeouts.idle,
    )
    .await;
}

async fn serve_tls_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    rt: Arc<Runtime>,
    mut admitted: Admitted,
) {
    let _open = OpenConn::new(&rt.metrics.connections);
    let snap = rt.snapshot.load_full();
    // A handshake still under way when shutdown starts is abandoned: no
    // request has been sent on it yet, and it would otherwise hold the
    // shutdown for up to the handshake timeout.
    let accept = tls::accept(tcp, &rt.tls, &rt.certs, snap.timeouts.tls_handshake);
    let outcome = tokio::select! {
        r = accept => Some(r),
        _ = rt.shutdown.cancelled() => None,
    };
    // Handshake over: its budgets are free for the next client.
    admitted.handshake_done();
    let stream = match outcome {
        Some(Ok(s)) => s,
        Some(Err(reason)) => {
            rt.counters.handshake_failure(reason);
            tracing::debug!(%peer, reason = reason.as_str(), "TLS handshake failed");
            return;
        }
        None => {
            tracing::debug!(%peer, "shutting down; TLS handshake abandoned");
            return;
        }
    };
    let session = stream.get_ref().1;
    rt.counters.handshake(session.protocol_version());
    let is_h2 = session.alpn_protocol() == Some(b"h2");
    let sni: Option<Arc<str>> = session.server_name().map(Into::into);
    let shared = Arc::new(ConnShared::default());
    shared.last_done_ms.store(now_ms(), Ordering::Release);
    let shared_for_idle = shared.clone();
    let io = ConnIo::new(
        stream,
        snap.timeouts.response_write,
        (!is_h2).then(|| scan_h1(&shared, &snap)),
    );
    let io = if is_h2 { io.watch_h2() } else { io };
    let ctx = Arc::new(ConnCtx {
        rt: rt.clone(),
        peer: Peer::new(peer, sni),
        shared,
    });
    let svc = service_fn(move |req: hyper::Request<Incoming>| handler::handle(ctx.clone(), req));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Heads are timed by `ConnIo` from their first byte; idle
        // keep-alive connections by `drive`.
        .header_read_timeout(None)
        .max_buf_size(snap.limits.max_header_bytes.max(8192))
        .max_headers(snap.limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(snap.limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        // A client that stops reading stops answering pings too: it is
        // dropped within about `response_write` (flow control keeps the
        // socket itself from ever blocking a write).
        .keep_alive_interval(Some(snap.timeouts.response_write / 2))
        .keep_alive_timeout(snap.timeouts.response_write / 2);
    let conn = if is_h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let conn = conn.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let conn = std::pin::pin!(conn);
    drive(
        conn,
        |c| c.graceful_shutdown(),
        &rt,
        &shared_for_idle,
        snap.timeouts.idle,
    )
    .await;
}

/// The HTTP/1 head scanner of a connection, with the snapshot's limits.
fn scan_h1(shared: &Arc<ConnShared>, snap: &Snapshot) -> ScanH1 {
    ScanH1 {
        shared: shared.clone(),
        max_head: snap.limits.max_header_bytes,
        head_timeout: snap.timeouts.request_header,
    }
}

/// Runs a connection until it ends, closing it when it has been idle too
/// long or when shutdown starts (in-flight requests then finish first, for
/// at most `timeouts.shutdown_grace`; then the connection is dropped, so a
/// request that outlives the grace period is cut off instead of living on
/// after [`crate::Server::run`] has returned).
pub(crate) async fn drive<F, E>(
    mut conn: Pin<&mut F>,
    graceful: fn(Pin<&mut F>),
    rt: &Runtime,
    shared: &ConnShared,
    idle: Duration,
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut closing = false;
    // Set when shutdown starts: past it the connection is dropped.
    let mut hard_stop: Option<Instant> = None;
    loop {
        let last = shared.last_done_ms.load(Ordering::Acquire);
        let idle_at = instant_of(last) + idle;
        // Never reached while `hard_stop` is unset (that branch is off then).
        let stop_at = hard_stop.unwrap_or(idle_at);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = rt.shutdown.cancelled(), if hard_stop.is_none() => {
                let grace = rt.snapshot.load().timeouts.shutdown_grace;
                hard_stop = Some(Instant::now() + grace);
                if !closing {
                    closing = true;
                    graceful(conn.as_mut());
                }
            }
            _ = tokio::time::sleep_until(stop_at.into()), if hard_stop.is_some() => {
                tracing::debug!(
                    in_flight = shared.in_flight.load(Ordering::Acquire),
                    "shutdown grace period over; dropping the connection"
                );
                return;
            }
            _ = rt.shedder.requested(), if !closing => {
                if shared.in_flight.load(Ordering::Acquire) == 0
                    && rt.shedder.applies_to(shared.last_done_ms.load(Ordering::Acquire))
                {
                    closing = true;
                    rt.metrics.connections_shed.inc();
                    graceful(conn.as_mut());
                }
            }
            _ = tokio::time::sleep_until(idle_at.into()), if !closing => {
                let quiet = shared.in_flight.load(Ordering::Acquire) == 0
                    && shared.last_done_ms.load(Ordering::Acquire) == last;
                if quiet {
                    closing = true;
                    graceful(conn.as_mut());
                } else if shared.in_flight.load(Ordering::Acquire) > 0 {
                    // Busy: look again one idle period after it ends.
                    shared.last_done_ms.store(now_ms(), Ordering::Release);
                }
            }
        }
    }
}
