//! The access log: one line per finished request, written without ever
//! blocking the request.
//!
//! Hot path, then one writer thread. A request formats its line into a
//! small buffer ([`AccessLog::log`]) and `try_send`s it on a bounded queue
//! (std's `sync_channel`: a lock-free array). When the queue is full the
//! line is dropped and counted in `portcullis_access_log_dropped_total`;
//! the request never waits. One std thread owns the destination (a file,
//! stderr or stdout): it drains the queue into a buffer, writes it with
//! blocking writes and flushes whenever the queue is empty.
//!
//! The writer never parks on the queue while lines keep coming: it sleeps
//! for a tick ([`TICK`]) between drains, so a request's `try_send` finds no
//! sleeping receiver to wake and costs no system call. Only after a second
//! without a line does it block on the queue (the next line wakes it once).
//!
//! Control path: [`AccessLog::switch`] (config reload), [`AccessLog::reopen`]
//! (`SIGUSR1`, log rotation) and [`AccessLog::flush_and_close`] (shutdown)
//! hand the writer a flag and wake it; the writer acts between two drains.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Version;
use prometheus::IntCounter;

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget, Origin};

/// Lines the queue holds: about 20 MiB of lines at most, and more than a
/// second of traffic at any rate one process serves, so none is dropped
/// unless the destination stalls.
pub const QUEUE_LINES: usize = 64 * 1024;

/// How long the writer sleeps between drains while lines keep coming.
pub const TICK: Duration = Duration::from_millis(10);

/// Empty ticks after which the writer blocks on the queue instead.
const IDLE_TICKS: u32 = 100;

/// Bytes buffered before a write (a write also happens whenever the queue
/// is empty).
const WRITE_BUF: usize = 64 * 1024;

const OFF: u8 = 0;
const JSON: u8 = 1;
const COMMON: u8 = 2;
const COMBINED: u8 = 3;

/// The process-wide default format when the config names none: set once by
/// the binary (`--log-format json` makes it `json`, so stderr carries one
/// format). `combined` when unset.
static DEFAULT_FORMAT: std::sync::OnceLock<AccessLogFormat> = std::sync::OnceLock::new();

/// Sets the format used when `access_log_format` is not in the config.
/// Only the first call counts.
pub fn set_default_format(f: AccessLogFormat) {
    let _ = DEFAULT_FORMAT.set(f);
}

/// The facts of one finished request, borrowed from it.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// The `Host` (or `:authority`) the request named; empty when unknown.
    pub host: &'a str,
    /// The TLS server name the client sent.
    pub sni: Option<&'a str>,
    /// The request method.
    pub method: &'a str,
    /// Path and query, as the client sent them.
    pub target: &'a str,
    /// HTTP version of the request.
    pub version: Version,
    /// Status sent.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Request received to response body done.
    pub duration: Duration,
    /// The upstream that answered, for forwarded requests.
    pub upstream: Option<&'a str>,
    /// The `Referer` header; only gathered when [`AccessLog::needs_headers`].
    pub referer: Option<&'a [u8]>,
    /// The `User-Agent` header; only gathered when [`AccessLog::needs_headers`].
    pub user_agent: Option<&'a [u8]>,
}

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file could not be opened for appending.
    #[error("{origin}: cannot open {} for appending: {source}; create its directory, fix its permissions or choose another path", .path.display())]
    Open {
        /// The `access_log` value in the config.
        origin: Origin,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// An opened destination and its format, ready to hand to the writer.
pub struct Output {
    dest: Dest,
    format: u8,
}

enum Dest {
    Off,
    Stderr,
    Stdout,
    File {
        path: PathBuf,
        file: File,
    },
    #[cfg(test)]
    Writer(Box<dyn Write + Send>),
}

impl Output {
    /// Opens what `cfg` names. Console destinations (stderr, stdout) also
    /// follow the `access` target of `RUST_LOG`, read now: `RUST_LOG=warn`
    /// turns them off as it always did. A file is only switched by the
    /// config.
    pub fn open(cfg: &AccessLogConfig) -> Result<Output, AccessLogError> {
        let format = match cfg
            .format
            .or_else(|| DEFAULT_FORMAT.get().copied())
            .unwrap_or(AccessLogFormat::Combined)
        {
            AccessLogFormat::Json => JSON,
            AccessLogFormat::Common => COMMON,
            AccessLogFormat::Combined => COMBINED,
        };
        let console_on = || tracing::enabled!(target: "access", tracing::Level::INFO);
        let dest = match &cfg.target {
            AccessLogTarget::Off => Dest::Off,
            AccessLogTarget::Stderr if console_on() => Dest::Stderr,
            AccessLogTarget::Stdout if console_on() => Dest::Stdout,
            AccessLogTarget::Stderr | AccessLogTarget::Stdout => Dest::Off,
            AccessLogTarget::File(path) => Dest::File {
                file: open_append(path).map_err(|source| AccessLogError::Open {
                    origin: cfg.origin.clone(),
                    path: path.clone(),
                    source,
                })?,
                path: path.clone(),
            },
        };
        let format = if matches!(dest, Dest::Off) {
            OFF
        } else {
            format
        };
        Ok(Output { dest, format })
    }

    /// Lines in `format` to `w` (tests).
    #[cfg(test)]
    fn writer(w: Box<dyn Write + Send>, format: u8) -> Output {
        Output {
            dest: Dest::Writer(w),
            format,
        }
    }
}

fn open_append(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Dest {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Dest::Off => Ok(()),
            // One locked write per buffer: tracing's lines on the same
            // stream never land inside one of ours.
            Dest::Stderr => io::stderr().lock().write_all(buf),
            Dest::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Dest::File { file, .. } => file.write_all(buf),
            #[cfg(test)]
            Dest::Writer(w) => {
                w.write_all(buf)?;
                w.flush()
            }
        }
    }

    /// Opens the file again at its path (after logrotate renamed it); on
    /// failure keeps writing to the open one.
    fn reopen(&mut self) {
        if let Dest::File { path, file } = self {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => tracing::error!(
                    path = %path.display(), error = %e,
                    "cannot reopen the access log; still writing to the old file"
                ),
            }
        }
    }
}

/// What travels on the queue.
enum Msg {
    /// One formatted line, newline included.
    Line(Vec<u8>),
    /// Look at the control flags.
    Wake,
    /// Lines after this one go to a new destination (config reload).
    Switch(Box<Output>),
}

/// Flags from the control path to the writer.
#[derive(Default)]
struct Control {
    /// Reopen the file at its path.
    reopen: AtomicBool,
    /// Write what is queued, then exit.
    close: AtomicBool,
    /// A new destination that did not fit in the full queue; taken by
    /// the writer at its next look.
    switch: Mutex<Option<Output>>,
}

/// The access-log sink: cheap to call from any request, one writer thread
/// behind it.
pub struct AccessLog {
    /// Format of the lines being written, [`OFF`] when there is no log:
    /// read once per request, changed by [`AccessLog::switch`].
    format: AtomicU8,
    /// The bounded queue to the writer.
    tx: SyncSender<Msg>,
    /// Flags for the writer.
    control: Arc<Control>,
    /// Lines lost (queue full, write failed).
    dropped: IntCounter,
    /// The writer thread, joined by [`AccessLog::flush_and_close`].
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// A log that is off (until [`AccessLog::switch`]), with its writer
    /// thread started; lost lines are counted in `dropped`.
    pub fn new(dropped: IntCounter) -> AccessLog {
        AccessLog::with_queue(QUEUE_LINES, dropped)
    }

    /// Like [`AccessLog::new`] with a queue of `lines` lines.
    pub fn with_queue(lines: usize, dropped: IntCounter) -> AccessLog {
        let (tx, rx) = mpsc::sync_channel(lines.max(1));
        let control = Arc::new(Control::default());
        let c2 = control.clone();
        let d2 = dropped.clone();
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, c2, d2))
            .map_err(|e| tracing::error!(error = %e, "cannot start the access-log writer; access log off"))
            .ok();
        AccessLog {
            format: AtomicU8::new(OFF),
            tx,
            control,
            dropped,
            writer: Mutex::new(writer),
        }
    }

    /// Whether requests should gather their facts for [`AccessLog::log`].
    #[inline]
    pub fn enabled(&self) -> bool {
        self.format.load(Ordering::Relaxed) != OFF
    }

    /// Whether the format prints `Referer` and `User-Agent` (combined), so
    /// a request should keep them.
    #[inline]
    pub fn needs_headers(&self) -> bool {
        self.format.load(Ordering::Relaxed) == COMBINED
    }

    /// Queues one line; never blocks. A full queue drops the line and
    /// counts it.
    pub fn log(&self, e: &Entry<'_>) {
        let format = self.format.load(Ordering::Relaxed);
        if format == OFF {
            return;
        }
        let mut line = String::with_capacity(256);
        format_line(&mut line, format, e, SystemTime::now());
        match self.tx.try_send(Msg::Line(line.into_bytes())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Puts `out` in service (start, config reload). The change travels
    /// on the queue: lines queued before it go to the old destination,
    /// lines after it to the new one (in the new format, but for requests
    /// finishing at that very moment). With the queue full, the writer
    /// takes it at its next look instead. Never blocks.
    pub fn switch(&self, out: Output) {
        let writer_alive = self.writer.lock().map(|w| w.is_some()).unwrap_or(false);
        let format = if writer_alive { out.format } else { OFF };
        if let Err(TrySendError::Full(Msg::Switch(out))) =
            self.tx.try_send(Msg::Switch(Box::new(out)))
        {
            *self
                .control
                .switch
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(*out);
        }
        self.format.store(format, Ordering::Relaxed);
    }

    /// Reopens a file destination at its path (`SIGUSR1`, after logrotate
    /// renamed it). Lines already queued go to the new file.
    pub fn reopen(&self) {
        self.control.reopen.store(true, Ordering::Release);
        self.wake();
    }

    /// Stops logging, writes and flushes every queued line and waits for
    /// the writer to exit (shutdown). Blocks: call it off the async
    /// runtime's workers (`spawn_blocking`) or at the very end. Later
    /// calls do nothing.
    pub fn flush_and_close(&self) {
        self.format.store(OFF, Ordering::Relaxed);
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        let Some(handle) = handle else { return };
        self.control.close.store(true, Ordering::Release);
        self.wake();
        if handle.join().is_err() {
            tracing::error!("the access-log writer panicked");
        }
    }

    /// Makes a writer blocked on the empty queue look at its flags. When
    /// the queue is full the writer is awake anyway.
    fn wake(&self) {
        let _ = self.tx.try_send(Msg::Wake);
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush_and_close();
    }
}

/// The writer thread.
fn write_loop(rx: Receiver<Msg>, control: Arc<Control>, dropped: IntCounter) {
    let mut w = Writer {
        dest: Dest::Off,
        buf: Vec::with_capacity(WRITE_BUF),
        dropped,
        failing: false,
    };
    let mut idle = 0u32;
    loop {
        if let Some(out) = control
            .switch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.flush();
            w.dest = out.dest;
        }
        if control.reopen.swap(false, Ordering::AcqRel) {
            w.flush();
            w.dest.reopen();
        }
        // Read before the drain: every line queued before the close is written.
        let closing = control.close.load(Ordering::Acquire);
        let (got, gone) = w.drain(&rx);
        // The queue is empty: flush.
        w.flush();
        if gone || closing {
            return;
        }
        idle = if got { 0 } else { idle.saturating_add(1) };
        if idle < IDLE_TICKS {
            // Not registered as a receiver: senders wake nobody.
            std::thread::sleep(TICK);
        } else {
            match rx.recv() {
                Ok(msg) => {
                    idle = 0;
                    w.handle(msg);
                }
                Err(_) => return,
            }
        }
    }
}

/// The writer's destination and buffer.
struct Writer {
    dest: Dest,
    buf: Vec<u8>,
    dropped: IntCounter,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
}

impl Writer {
    /// Takes everything queued: (anything came, sender gone).
    fn drain(&mut self, rx: &Receiver<Msg>) -> (bool, bool) {
        let mut got = false;
        loop {
            match rx.try_recv() {
                Ok(msg) => {
                    got = true;
                    self.handle(msg);
                }
                Err(TryRecvError::Empty) => return (got, false),
                Err(TryRecvError::Disconnected) => return (got, true),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(l) => self.push(&l),
            Msg::Wake => {}
            Msg::Switch(out) => {
                self.flush();
                self.dest = out.dest;
            }
        }
    }

    fn push(&mut self, line: &[u8]) {
        if !self.buf.is_empty() && self.buf.len() + line.len() > WRITE_BUF {
            self.flush();
        }
        self.buf.extend_from_slice(line);
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.dest.write_all(&self.buf) {
            Ok(()) => self.failing = false,
            Err(e) => {
                let lost = self.buf.iter().filter(|&&b| b == b'\n').count();
                self.dropped.inc_by(lost as u64);
                if !self.failing {
                    tracing::error!(error = %e, lines = lost, "cannot write the access log; lines dropped");
                }
                self.failing = true;
            }
        }
        self.buf.clear();
    }
}

// ---- formatting (on the request's thread) ----

fn format_line(out: &mut String, format: u8, e: &Entry<'_>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    match format {
        JSON => json_line(out, e, since),
        _ => {
            clf_line(out, e, since.as_secs());
            if format == COMBINED {
                out.push_str(" \"");
                clf_bytes(out, e.referer);
                out.push_str("\" \"");
                clf_bytes(out, e.user_agent);
                out.push('"');
            }
        }
    }
    out.push('\n');
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// `$remote_addr - - [$time_local] "$request" $status $body_bytes_sent`,
/// time in UTC.
fn clf_line(out: &mut String, e: &Entry<'_>, secs: u64) {
    push_ip(out, e.client);
    out.push_str(" - - [");
    with_stamp(secs, |st| out.push_str(&st.clf));
    out.push_str("] \"");
    clf_bytes(out, Some(e.method.as_bytes()));
    out.push(' ');
    clf_bytes(out, Some(e.target.as_bytes()));
    out.push(' ');
    out.push_str(proto(e.version));
    out.push_str("\" ");
    push_u64(out, e.status.into());
    out.push(' ');
    push_u64(out, e.bytes);
}

/// The current second, formatted once per second and thread.
struct Stamp {
    secs: u64,
    /// `07/Dec/2026:23:14:01 +0000`
    clf: String,
    /// `2026-12-07T23:14:01`
    iso: String,
}

thread_local! {
    static STAMP: std::cell::RefCell<Stamp> = const {
        std::cell::RefCell::new(Stamp { secs: u64::MAX, clf: String::new(), iso: String::new() })
    };
}

fn with_stamp(secs: u64, f: impl FnOnce(&Stamp)) {
    STAMP.with_borrow_mut(|st| {
        if st.secs != secs {
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let (y, mo, d, h, mi, s) = civil(secs);
            st.secs = secs;
            st.clf.clear();
            st.iso.clear();
            let month = MONTHS[(mo - 1) as usize];
            let _ = write!(st.clf, "{d:02}/{month}/{y}:{h:02}:{mi:02}:{s:02} +0000");
            let _ = write!(st.iso, "{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
        }
        f(st)
    })
}

/// A field of a CLF line, escaped as nginx does (`"`, `\`, control and
/// non-ASCII bytes as `\xHH`); `-` when absent or empty.
fn clf_bytes(out: &mut String, v: Option<&[u8]>) {
    let v = match v {
        Some(v) if !v.is_empty() => v,
        _ => {
            out.push('-');
            return;
        }
    };
    let plain = |b: &u8| *b != b'"' && *b != b'\\' && (0x20..0x7f).contains(b);
    if v.iter().all(plain) {
        // Printable ASCII only: valid UTF-8 as is.
        out.push_str(std::str::from_utf8(v).unwrap_or_default());
        return;
    }
    for &b in v {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn json_line(out: &mut String, e: &Entry<'_>, since: Duration) {
    let (path, query) = match e.target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (e.target, None),
    };
    out.push_str("{\"time\":\"");
    with_stamp(since.as_secs(), |st| out.push_str(&st.iso));
    out.push('.');
    push_3(out, since.subsec_millis());
    out.push_str("Z\",\"client\":\"");
    push_ip(out, e.client);
    out.push_str("\",\"host\":");
    json_str(out, Some(e.host).filter(|h| !h.is_empty()));
    out.push_str(",\"sni\":");
    json_str(out, e.sni);
    out.push_str(",\"method\":");
    json_str(out, Some(e.method));
    out.push_str(",\"path\":");
    json_str(out, Some(path));
    if query.is_some() {
        out.push_str(",\"query\":");
        json_str(out, query);
    }
    out.push_str(",\"proto\":\"");
    out.push_str(proto(e.version));
    out.push_str("\",\"status\":");
    push_u64(out, e.status.into());
    out.push_str(",\"bytes\":");
    push_u64(out, e.bytes);
    out.push_str(",\"duration_ms\":");
    let micros = u64::try_from(e.duration.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    out.push('.');
    push_3(out, (micros % 1000) as u32);
    out.push_str(",\"upstream\":");
    json_str(out, e.upstream);
    out.push('}');
}

// Numbers and addresses by hand: through `Display` and `write!` they were
// a third of the line's cost (callgrind).

/// `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or("?"));
}

/// `n` (below 1000) as three digits.
fn push_3(out: &mut String, n: u32) {
    let n = n % 1000;
    for d in [n / 100, n / 10 % 10, n % 10] {
        out.push(char::from(b'0' + d as u8));
    }
}

fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, o.into());
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// A JSON string (or `null`).
fn json_str(out: &mut String, v: Option<&str>) {
    let Some(v) = v else {
        out.push_str("null");
        return;
    };
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// UTC calendar fields of a Unix time (Howard Hinnant's `civil_from_days`).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            client: "192.0.2.7".parse().unwrap(),
            host: "api.example.com",
            sni: Some("api.example.com"),
            method: "GET",
            target: "/v1/items?id=3",
            version: Version::HTTP_11,
            status: 200,
            bytes: 1234,
            duration: Duration::from_micros(2500),
            upstream: Some("http://127.0.0.1:8080"),
            referer: None,
            user_agent: Some(b"curl/8.5 \"x\""),
        }
    }

    /// 2026-12-07T23:14:01.123Z
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_685_241_123)
    }

    fn line(format: u8, e: &Entry<'_>) -> String {
        let mut s = String::new();
        format_line(&mut s, format, e, at());
        s
    }

    #[test]
    fn common_and_combined_match_nginx() {
        assert_eq!(
            line(COMMON, &entry()),
            "192.0.2.7 - - [07/Dec/2026:23:14:01 +0000] \"GET /v1/items?id=3 HTTP/1.1\" 200 1234\n"
        );
        assert_eq!(
            line(COMBINED, &entry()),
            "192.0.2.7 - - [07/Dec/2026:23:14:01 +0000] \"GET /v1/items?id=3 HTTP/1.1\" 200 1234 \"-\" \"curl/8.5 \\x22x\\x22\"\n"
        );
    }

    #[test]
    fn json_is_one_object_per_line() {
        let l = line(JSON, &entry());
        assert!(l.ends_with("}\n") && l.matches('\n').count() == 1, "{l}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["time"], "2026-12-07T23:14:01.123Z");
        assert_eq!(v["client"], "192.0.2.7");
        assert_eq!(v["path"], "/v1/items");
        assert_eq!(v["query"], "id=3");
        assert_eq!(v["proto"], "HTTP/1.1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 1234);
        assert_eq!(v["duration_ms"], 2.5);
        assert_eq!(v["upstream"], "http://127.0.0.1:8080");
        let mut e = entry();
        e.sni = None;
        e.upstream = None;
        e.host = "a\"b\n";
        let v: serde_json::Value = serde_json::from_str(&line(JSON, &e)).unwrap();
        assert!(v["sni"].is_null() && v["upstream"].is_null());
        assert_eq!(v["host"], "a\"b\n");
    }

    #[test]
    fn numbers_and_addresses() {
        let mut s = String::new();
        push_u64(&mut s, 0);
        s.push(' ');
        push_u64(&mut s, u64::MAX);
        s.push(' ');
        push_3(&mut s, 7);
        s.push(' ');
        push_ip(&mut s, "10.0.255.1".parse().unwrap());
        s.push(' ');
        push_ip(&mut s, "2001:db8::1".parse().unwrap());
        assert_eq!(s, "0 18446744073709551615 007 10.0.255.1 2001:db8::1");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_796_685_241), (2026, 12, 7, 23, 14, 1));
    }

    /// A destination whose first write blocks until the test lets it go.
    struct Gate {
        entered: mpsc::Sender<()>,
        release: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
        seen: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            if let Some(rx) = self.release.lock().unwrap().take() {
                let _ = rx.recv();
            }
            self.seen.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let log = AccessLog::with_queue(2, dropped.clone());
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        log.switch(Output::writer(
            Box::new(Gate {
                entered: entered_tx,
                release: Arc::new(Mutex::new(Some(release_rx))),
                seen: seen.clone(),
            }),
            COMMON,
        ));
        let mut e = entry();
        e.status = 201;
        log.log(&e);
        // The writer holds line 1 and is stuck writing it.
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        e.status = 202;
        let t = std::time::Instant::now();
        for _ in 0..12 {
            log.log(&e);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "log() waited");
        assert_eq!(dropped.get(), 10, "2 queued, 10 dropped");
        release.send(()).unwrap();
        log.flush_and_close();
        let text = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches(" 201 ").count(), 1, "{text}");
        assert_eq!(text.matches(" 202 ").count(), 2, "{text}");
        assert_eq!(dropped.get(), 10);
        // Closed: later lines are not gathered.
        assert!(!log.enabled());
    }

    #[test]
    fn every_line_is_written_at_close() {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::new(dropped.clone());
        let cfg = AccessLogConfig {
            target: AccessLogTarget::File(path.clone()),
            format: Some(AccessLogFormat::Json),
            ..Default::default()
        };
        log.switch(Output::open(&cfg).unwrap());
        assert!(log.enabled() && !log.needs_headers());
        for _ in 0..5000 {
            log.log(&entry());
        }
        log.flush_and_close();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5000);
        assert_eq!(dropped.get(), 0);
    }
}
