//! The downstream connection's byte stream, wrapped for two jobs hyper does
//! not do: a write timeout (a client that stops reading is cut off) and, on
//! HTTP/1.1, a look at each raw request head for framing hyper resolves
//! silently (`Content-Length` together with `Transfer-Encoding`: hyper drops
//! the length, so the service could never see it).
//!
//! Hot path. The head scanner copies only request heads and chunk-size
//! lines; body bytes are skipped by arithmetic.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Per-connection facts shared between the byte stream and the service.
#[derive(Debug)]
pub struct ConnShared {
    /// Index of the first request head with ambiguous framing, or `u64::MAX`.
    pub first_bad_head: AtomicU64,
    /// Requests handed to the service so far (h1 order matches head order).
    pub requests: AtomicU64,
    /// Requests whose response has not finished.
    pub in_flight: AtomicU64,
    /// Milliseconds (on the connection's clock) when the last request ended.
    pub last_done_ms: AtomicU64,
}

impl Default for ConnShared {
    fn default() -> Self {
        ConnShared {
            first_bad_head: AtomicU64::new(u64::MAX),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_done_ms: AtomicU64::new(0),
        }
    }
}

/// A stream with a write timeout and an optional HTTP/1 head scanner, which
/// also times request heads: a head must be complete within the head
/// timeout of its first byte. (hyper's own header timeout starts as soon as
/// it waits for a head, so it would also cut idle keep-alive connections,
/// which the idle timeout governs.)
pub struct ConnIo<S> {
    inner: S,
    write_timeout: Duration,
    write_sleep: Option<Pin<Box<Sleep>>>,
    scanner: Option<Box<HeadScanner>>,
    head_timeout: Duration,
    /// Running while a head is partly received; `.1` is the index of that
    /// head.
    head_sleep: Option<(Pin<Box<Sleep>>, u64)>,
    /// HTTP/2 connections: counts the client's control frames.
    h2: Option<Box<H2Scanner>>,
}

/// What the HTTP/1 head scanner needs.
pub struct ScanH1 {
    /// Shared with the service.
    pub shared: Arc<ConnShared>,
    /// Largest head, bytes.
    pub max_head: usize,
    /// A head must be complete within this of its first byte.
    pub head_timeout: Duration,
}

impl<S> ConnIo<S> {
    /// Wraps `inner`; `scan_h1` turns on the head scanner and timer.
    pub fn new(inner: S, write_timeout: Duration, scan_h1: Option<ScanH1>) -> Self {
        let head_timeout = scan_h1.as_ref().map_or(Duration::MAX, |s| s.head_timeout);
        ConnIo {
            inner,
            write_timeout,
            write_sleep: None,
            scanner: scan_h1.map(|s| Box::new(HeadScanner::new(s.shared, s.max_head))),
            head_timeout,
            head_sleep: None,
            h2: None,
        }
    }

    /// Watches an HTTP/2 connection for control-frame floods
    /// ([`MAX_CONTROL_FRAMES_PER_SEC`]).
    pub fn watch_h2(mut self) -> Self {
        self.h2 = Some(Box::new(H2Scanner::new()));
        self
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if Pin::new(&mut this.inner).poll_read(cx, buf)?.is_pending() {
            if let Some((sleep, _)) = this.head_sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    this.head_sleep = None;
                    this.scanner = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head timed out (client too slow)",
                    )));
                }
            }
            return Poll::Pending;
        }
        if let Some(h2) = this.h2.as_mut() {
            if !h2.feed(&buf.filled()[before..]) {
                this.h2 = None;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/2 control-frame flood (SETTINGS/PING) or invalid preface",
                )));
            }
        }
        if let Some(scanner) = this.scanner.as_mut() {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                scanner.feed(new);
                match scanner.head_in_progress() {
                    Some(head) => {
                        if this.head_sleep.as_ref().is_none_or(|(_, h)| *h != head) {
                            let sleep = Box::pin(tokio::time::sleep(this.head_timeout));
                            this.head_sleep = Some((sleep, head));
                        }
                    }
                    None => this.head_sleep = None,
                }
                if scanner.state == ScanState::Done {
                    this.scanner = None;
                    this.head_sleep = None;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> ConnIo<S> {
    /// Runs a write-side poll under the write timeout.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match f(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.write_sleep = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let sleep = self
                    .write_sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    self.write_sleep = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "response write timed out (client not reading)",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().timed(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .timed(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().timed(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Control frames (SETTINGS and PING that ask for an answer) one HTTP/2
/// client may send per second before its connection is closed as a flood.
/// Real clients send a handful per connection; a flood sends thousands.
pub const MAX_CONTROL_FRAMES_PER_SEC: u32 = 100;

/// Follows HTTP/2 frame headers on the read side, just far enough to
/// count the control frames a client sends. The h2 stack answers each one
/// and stops reading while the answers cannot be written; a client that
/// floods them and never reads would hold its connection until the write
/// timeout. This cuts it within a second of the flood. (GOAWAY
/// `ENHANCE_YOUR_CALM` cannot be sent from here: the h2 stack owns the
/// write side, and a frame written past it could split one of its own.)
struct H2Scanner {
    /// Bytes of the client preface still to skip.
    preface: usize,
    /// A frame header being collected.
    header: [u8; 9],
    have: usize,
    /// Payload bytes still to skip.
    skip: u64,
    /// Control frames counted in the current one-second window.
    control: u32,
    window_start: std::time::Instant,
}

impl H2Scanner {
    fn new() -> Self {
        H2Scanner {
            preface: 24,
            header: [0; 9],
            have: 0,
            skip: 0,
            control: 0,
            window_start: std::time::Instant::now(),
        }
    }

    /// Feeds bytes read from the client; `false` once it floods, or when
    /// its connection preface is wrong (hyper's h2 server would otherwise
    /// wait on such a connection until a timeout).
    fn feed(&mut self, mut data: &[u8]) -> bool {
        const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let skip = self.preface.min(data.len());
        let at = 24 - self.preface;
        if data[..skip] != PREFACE[at..at + skip] {
            return false;
        }
        self.preface -= skip;
        data = &data[skip..];
        while !data.is_empty() {
            if self.skip > 0 {
                let take = (data.len() as u64).min(self.skip);
                self.skip -= take;
                data = &data[take as usize..];
                continue;
            }
            let take = (9 - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have < 9 {
                break;
            }
            self.have = 0;
            let h = &self.header;
            self.skip = u64::from(h[0]) << 16 | u64::from(h[1]) << 8 | u64::from(h[2]);
            let (kind, ack) = (h[3], h[4] & 0x1 != 0);
            // SETTINGS (0x4) and PING (0x6) without ACK each demand an answer.
            if matches!(kind, 0x4 | 0x6) && !ack {
                let now = std::time::Instant::now();
                if now.duration_since(self.window_start) >= Duration::from_secs(1) {
                    self.window_start = now;
                    self.control = 0;
                }
                self.control += 1;
                if self.control > MAX_CONTROL_FRAMES_PER_SEC {
                    return false;
                }
            }
        }
        true
    }
}

use std::future::Future;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    /// Collecting a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkSize,
    /// Skipping chunk data.
    ChunkData(u64),
    /// Skipping the CRLF after chunk data (bytes left).
    ChunkEnd(u8),
    /// Collecting trailer lines until an empty one.
    Trailers,
    /// Not HTTP/1 framing any more (upgrade, CONNECT, confusion): stop.
    Done,
}

/// Longest chunk-size or trailer line followed (without its LF), bytes.
const MAX_LINE: usize = 4096;

/// Follows HTTP/1.1 request framing just far enough to find each head.
struct HeadScanner {
    state: ScanState,
    buf: Vec<u8>,
    heads: u64,
    shared: Arc<ConnShared>,
    max_head: usize,
}

impl HeadScanner {
    fn new(shared: Arc<ConnShared>, max_head: usize) -> Self {
        HeadScanner {
            state: ScanState::Head,
            buf: Vec::new(),
            heads: 0,
            shared,
            max_head,
        }
    }

    /// The index of the head being received, if one has started.
    fn head_in_progress(&self) -> Option<u64> {
        (self.state == ScanState::Head && !self.buf.is_empty()).then_some(self.heads)
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                ScanState::Done => return,
                ScanState::Head => {
                    if self.buf.is_empty() {
                        // Stray CRLFs between requests are allowed.
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let start = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(data);
                    match find(&self.buf[start..], b"\r\n\r\n") {
                        Some(pos) => {
                            let end = start + pos + 4;
                            if end > self.max_head + 4 {
                                // Too large, however the reads were cut (the
                                // check below only sees heads split across
                                // reads).
                                self.state = ScanState::Done;
                                return;
                            }
                            let rest_len = self.buf.len() - end;
                            self.finish_head(end);
                            // Continue with what followed the head in this read.
                            let consumed = data.len() - rest_len;
                            data = &data[consumed..];
                            self.buf.clear();
                        }
                        None => {
                            // No terminator yet: the head will be longer
                            // than this buffer.
                            if self.buf.len() >= self.max_head + 4 {
                                self.state = ScanState::Done;
                            }
                            return;
                        }
                    }
                }
                ScanState::Body(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if n == take {
                        ScanState::Head
                    } else {
                        ScanState::Body(n - take)
                    };
                }
                ScanState::ChunkData(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if n == take {
                        ScanState::ChunkEnd(2)
                    } else {
                        ScanState::ChunkData(n - take)
                    };
                }
                ScanState::ChunkEnd(left) => {
                    let take = (left as usize).min(data.len());
                    data = &data[take..];
                    let left = left - take as u8;
                    self.state = if left == 0 {
                        ScanState::ChunkSize
                    } else {
                        ScanState::ChunkEnd(left)
                    };
                }
                ScanState::ChunkSize | ScanState::Trailers => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > MAX_LINE {
                            self.state = ScanState::Done;
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    if self.buf.len() - 1 > MAX_LINE {
                        // The same limit when the line came in one read.
                        self.state = ScanState::Done;
                        return;
                    }
                    let line = std::mem::take(&mut self.buf);
                    let line = trim_crlf(&line);
                    if self.state == ScanState::Trailers {
                        if line.is_empty() {
                            self.state = ScanState::Head;
                        }
                    } else {
                        let hex = line.split(|b| *b == b';').next().unwrap_or(&[]);
                        let hex = std::str::from_utf8(hex).unwrap_or("").trim();
                        match u64::from_str_radix(hex, 16) {
                            Ok(0) => self.state = ScanState::Trailers,
                            Ok(n) => self.state = ScanState::ChunkData(n),
                            Err(_) => self.state = ScanState::Done,
                        }
                    }
                }
            }
        }
    }

    fn finish_head(&mut self, end: usize) {
        let index = self.heads;
        self.heads += 1;
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.buf[..end]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => {
                // hyper will reject it on its own.
                self.state = ScanState::Done;
                return;
            }
        }
        let mut cl = false;
        let mut te = false;
        let mut chunked = false;
        let mut len = None;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl = true;
                len = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|v| trim(v).eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if cl && te {
            let _ = self.shared.first_bad_head.compare_exchange(
                u64::MAX,
                index,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            // The connection is closed after the 400; nothing more to follow.
            self.state = ScanState::Done;
            return;
        }
        if upgrade || req.method == Some("CONNECT") {
            self.state = ScanState::Done;
        } else if te {
            self.state = if chunked {
                ScanState::ChunkSize
            } else {
                ScanState::Done
            };
        } else if cl {
            self.state = match len {
                Some(0) => ScanState::Head,
                Some(n) => ScanState::Body(n),
                None => ScanState::Done,
            };
        } else {
            self.state = ScanState::Head;
        }
    }
}

/// What [`scan_for_tests`] concluded about a byte stream.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanVerdict {
    /// Request heads found (complete ones, well-formed or not).
    pub heads: u64,
    /// Index of the first head with `Content-Length` and
    /// `Transfer-Encoding` (what [`ConnShared::first_bad_head`] records).
    pub first_bad_head: Option<u64>,
    /// The scanner gave up following the framing (upgrade, CONNECT, an
    /// unparsable head or chunk line, a head over `max_head`).
    pub stopped: bool,
}

/// Runs the head scanner over `reads`, one `feed` per read, as
/// [`ConnIo`] does with what each `poll_read` returns. Not an API: the
/// scanner stays private; this is the one door the property tests in
/// `tests/fuzz_head_scanner.rs` go through.
#[doc(hidden)]
pub fn scan_for_tests<'a>(
    reads: impl IntoIterator<Item = &'a [u8]>,
    max_head: usize,
) -> ScanVerdict {
    let shared = Arc::new(ConnShared::default());
    let mut s = HeadScanner::new(shared.clone(), max_head);
    for r in reads {
        s.feed(r);
    }
    let bad = shared.first_bad_head.load(Ordering::Acquire);
    ScanVerdict {
        heads: s.heads,
        first_bad_head: (bad != u64::MAX).then_some(bad),
        stopped: s.state == ScanState::Done,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn h2_scanner_counts_control_frames_split_anywhere() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // Data, acks and headers do not count.
        stream.extend(frame(0x0, 0, &[7; 100]));
        stream.extend(frame(0x4, 1, &[]));
        stream.extend(frame(0x6, 1, &[0; 8]));
        for _ in 0..MAX_CONTROL_FRAMES_PER_SEC {
            stream.extend(frame(0x6, 0, &[0; 8]));
        }
        for split in [1, 3, 9, 17, 1000] {
            let mut s = H2Scanner::new();
            assert!(stream.chunks(split).all(|c| s.feed(c)), "split {split}");
            assert!(
                !s.feed(&frame(0x4, 0, &[])),
                "split {split}: one more is a flood"
            );
        }
    }

    fn scan(chunks: &[&[u8]]) -> (u64, u64) {
        let shared = Arc::new(ConnShared::default());
        let mut s = HeadScanner::new(shared.clone(), 65536);
        for c in chunks {
            s.feed(c);
        }
        (s.heads, shared.first_bad_head.load(Ordering::Acquire))
    }

    #[test]
    fn follows_content_length_and_chunked_bodies() {
        let reqs: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        let all: Vec<u8> = reqs.concat();
        // Byte by byte and all at once must agree.
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(scan(&bytes), (3, u64::MAX));
        assert_eq!(scan(&[&all]), (3, u64::MAX));
    }

    #[test]
    fn flags_content_length_with_transfer_encoding() {
        let (_, bad) = scan(&[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]);
        assert_eq!(bad, 1);
    }
}
