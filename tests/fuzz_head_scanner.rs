//! Property tests for the HTTP/1.1 request-head scanner
//! (`portcullis::proxy::io`), the code that reads every raw byte a client
//! sends on an h1 connection to find each request head and flag
//! `Content-Length` together with `Transfer-Encoding`.
//!
//! It sees bytes in whatever pieces the network hands over, so its verdict
//! (heads found, first ambiguous head, whether it stopped following the
//! framing) must not depend on where the stream was cut, it must never
//! panic, and on well-formed pipelined requests it must count exactly.
//!
//! The normal test command runs a bounded number of cases per property
//! (see `CASES`; the whole file takes a few seconds in debug). A longer
//! job, for a nightly run or before touching the scanner:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release --test fuzz_head_scanner
//! ```
//!
//! A failing case is written to `tests/fuzz_head_scanner.proptest-regressions`
//! (commit it) and becomes a named `#[test]` at the end of this file.

mod common;

use portcullis::proxy::io::{scan_for_tests, ScanVerdict};
use proptest::prelude::*;
use proptest::sample::Index;

/// Cases per property in the normal test run; `PROPTEST_CASES` overrides.
const CASES: u32 = 256;

/// The `max_head` the proxy uses by default (`limits.max_header_bytes`).
const MAX_HEAD: usize = 65536;

fn config() -> ProptestConfig {
    common::fuzz::proptest_config(CASES)
}

/// `bytes` cut at `cuts` (positions taken modulo the length, sorted).
fn split<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for a in at {
        out.push(&bytes[from..a]);
        from = a;
    }
    out.push(&bytes[from..]);
    out
}

fn whole(bytes: &[u8], max_head: usize) -> ScanVerdict {
    scan_for_tests([bytes], max_head)
}

fn pieces(bytes: &[u8], cuts: &[Index], max_head: usize) -> ScanVerdict {
    scan_for_tests(split(bytes, cuts), max_head)
}

fn byte_by_byte(bytes: &[u8], max_head: usize) -> ScanVerdict {
    scan_for_tests(bytes.chunks(1), max_head)
}

/// Fragments of HTTP/1.1 framing, so that random streams reach deep states
/// (bodies, chunk lines, trailers, the CL+TE check) and not only "garbage
/// head".
const FRAGMENTS: &[&str] = &[
    "GET / HTTP/1.1\r\n",
    "POST /up HTTP/1.1\r\n",
    "CONNECT a:443 HTTP/1.1\r\n",
    "Host: a\r\n",
    "Content-Length: 3\r\n",
    "content-length: 0\r\n",
    "Content-Length: 18446744073709551615\r\n",
    "Content-Length: x\r\n",
    "Transfer-Encoding: chunked\r\n",
    "transfer-encoding: gzip, chunked\r\n",
    "Transfer-Encoding: gzip\r\n",
    "Upgrade: websocket\r\n",
    "X: y\r\n",
    "\r\n",
    "\r\n\r\n",
    "\n",
    "\r",
    "0\r\n",
    "3\r\n",
    "a;ext=1\r\n",
    "ffffffffffffffff\r\n",
    "abc",
    "T: 1\r\n",
    ":",
    " ",
];

/// A stream made of framing fragments and random bytes.
fn http_ish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => prop::sample::select(FRAGMENTS).prop_map(|f| f.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..8),
    ];
    prop::collection::vec(piece, 0..64).prop_map(|v| v.concat())
}

/// Random bytes or HTTP-ish text.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..512), http_ish()]
}

/// Small limits reach the "head too large" path; the default one does not.
fn max_head() -> impl Strategy<Value = usize> {
    prop_oneof![Just(MAX_HEAD), 0usize..200]
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..24)
}

/// How one generated request frames its body.
#[derive(Debug, Clone)]
enum Body {
    None,
    Length(Vec<u8>),
    /// Chunks (data, extension) then trailer lines.
    Chunked(Vec<(Vec<u8>, Option<String>)>, Vec<String>),
}

#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Body,
    /// Stray CRLFs before the request line (allowed between requests).
    leading_crlfs: usize,
}

impl Request {
    /// The request on the wire; `extra` headers are inserted at `at`
    /// (modulo the header count).
    fn encode(&self, extra: &[(String, String)], at: usize) -> Vec<u8> {
        let mut out = "\r\n".repeat(self.leading_crlfs).into_bytes();
        out.extend_from_slice(format!("{} {} HTTP/1.1\r\n", self.method, self.path).as_bytes());
        let mut headers = self.headers.clone();
        match &self.body {
            Body::None => {}
            Body::Length(b) => headers.push(("Content-Length".into(), b.len().to_string())),
            Body::Chunked(..) => headers.push(("Transfer-Encoding".into(), "chunked".into())),
        }
        let at = at % (headers.len() + 1);
        for (i, h) in extra.iter().enumerate() {
            headers.insert(at + i, h.clone());
        }
        for (n, v) in &headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        match &self.body {
            Body::None => {}
            Body::Length(b) => out.extend_from_slice(b),
            Body::Chunked(chunks, trailers) => {
                for (data, ext) in chunks {
                    out.extend_from_slice(format!("{:x}", data.len()).as_bytes());
                    if let Some(e) = ext {
                        out.extend_from_slice(format!(";{e}").as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                for t in trailers {
                    out.extend_from_slice(format!("{t}\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }
}

/// Body bytes that look like framing, so a scanner that reads into a body
/// instead of skipping it gets caught.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 1..16),
        1 => prop::sample::select(FRAGMENTS).prop_map(|f| f.as_bytes().to_vec()),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop::sample::select(
        &[
            "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE",
        ][..],
    );
    let path = "/[A-Za-z0-9/._~%-]{0,24}(\\?[A-Za-z0-9=&]{0,12})?";
    // Names that cannot collide with the framing headers.
    let header = (token().prop_map(|t| format!("X-{t}")), "[ -~]{0,24}")
        .prop_map(|(n, v)| (n, v.trim().to_string()));
    let ext = prop::option::of("[a-z]{1,6}(=[a-z0-9]{0,6})?");
    let chunk = (prop::collection::vec(any::<u8>(), 1..40), ext);
    let body = prop_oneof![
        Just(Body::None),
        body_bytes().prop_map(Body::Length),
        (
            prop::collection::vec(chunk, 0..5),
            prop::collection::vec("X-[a-z]{1,6}: [a-z0-9]{0,6}", 0..3)
        )
            .prop_map(|(c, t)| Body::Chunked(c, t)),
    ];
    (
        method,
        path,
        prop::collection::vec(header, 0..6),
        body,
        prop_oneof![4 => Just(0usize), 1 => 1usize..3],
    )
        .prop_map(|(method, path, mut headers, body, leading_crlfs)| {
            headers.insert(0, ("Host".into(), "example.test".into()));
            Request {
                method,
                path,
                headers,
                body,
                leading_crlfs,
            }
        })
}

/// `Content-Length` and `Transfer-Encoding` in any order and spelling.
fn ambiguous_pair() -> impl Strategy<Value = Vec<(String, String)>> {
    let cl_name = prop::sample::select(&["Content-Length", "content-length", "CONTENT-LENGTH"][..]);
    let te_name = prop::sample::select(
        &[
            "Transfer-Encoding",
            "transfer-encoding",
            "TRANSFER-ENCODING",
        ][..],
    );
    let te_value = prop::sample::select(&["chunked", "gzip, chunked", "identity"][..]);
    (cl_name, 0u32..100, te_name, te_value, any::<bool>()).prop_map(
        |(cl, len, te, tev, cl_first)| {
            let cl = (cl.to_string(), len.to_string());
            let te = (te.to_string(), tev.to_string());
            if cl_first {
                vec![cl, te]
            } else {
                vec![te, cl]
            }
        },
    )
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes, cut anywhere: no panic, and the verdict is the
    /// same whole, in pieces and byte by byte.
    #[test]
    fn verdict_does_not_depend_on_where_reads_are_cut(
        bytes in stream(),
        cuts in cuts(),
        max_head in max_head(),
    ) {
        let w = whole(&bytes, max_head);
        prop_assert_eq!(pieces(&bytes, &cuts, max_head), w);
        prop_assert_eq!(byte_by_byte(&bytes, max_head), w);
    }

    /// Well-formed pipelined requests are all counted, none is flagged,
    /// and the scanner is still following the framing at the end.
    #[test]
    fn counts_well_formed_pipelined_requests(
        reqs in prop::collection::vec(request(), 1..8),
        cuts in cuts(),
    ) {
        let bytes: Vec<u8> = reqs.iter().flat_map(|r| r.encode(&[], 0)).collect();
        let expect = ScanVerdict {
            heads: reqs.len() as u64,
            first_bad_head: None,
            stopped: false,
        };
        prop_assert_eq!(whole(&bytes, MAX_HEAD), expect);
        prop_assert_eq!(pieces(&bytes, &cuts, MAX_HEAD), expect);
    }

    /// `Content-Length` with `Transfer-Encoding` in request `k` of a
    /// well-formed pipeline flags request `k`, and nothing before it.
    #[test]
    fn flags_the_request_with_content_length_and_transfer_encoding(
        reqs in prop::collection::vec(request(), 1..8),
        k in any::<Index>(),
        pair in ambiguous_pair(),
        at in any::<usize>(),
        cuts in cuts(),
    ) {
        let k = k.index(reqs.len());
        // Request k keeps no framing of its own: the pair is its framing.
        let mut bad = reqs[k].clone();
        bad.body = Body::None;
        let mut bytes = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if i == k {
                bytes.extend(bad.encode(&pair, at));
            } else {
                bytes.extend(r.encode(&[], 0));
            }
        }
        let v = whole(&bytes, MAX_HEAD);
        prop_assert_eq!(v.first_bad_head, Some(k as u64));
        prop_assert_eq!(v.heads, k as u64 + 1);
        prop_assert_eq!(pieces(&bytes, &cuts, MAX_HEAD), v);
    }
}

// Crashes found by the properties above, kept as plain tests.

/// Found by `verdict_does_not_depend_on_where_reads_are_cut` (max_head 0):
/// a head larger than `max_head` stopped the scanner when it came in
/// several reads, but was parsed (and could be flagged) when it came in
/// one.
#[test]
fn oversized_head_stops_the_scanner_in_one_read_or_many() {
    let bytes: &[u8] = b"transfer-encoding: gzip, chunked\r\nGET / HTTP/1.1\r\n\
        Content-Length: 18446744073709551615\r\nGET / HTTP/1.1\r\nGET / HTTP/1.1\r\n\
        GET / HTTP/1.1\r\nGET / HTTP/1.1\r\nGET / HTTP/1.1\r\nGET / HTTP/1.1\r\n\r\n";
    let stopped = ScanVerdict {
        heads: 0,
        first_bad_head: None,
        stopped: true,
    };
    assert_eq!(whole(bytes, 0), stopped);
    assert_eq!(byte_by_byte(bytes, 0), stopped);
    // At the limit exactly (head length = max_head + 4) it is still read.
    let ok = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let max_head = ok.len() - 4;
    assert_eq!(whole(ok, max_head), byte_by_byte(ok, max_head));
    assert_eq!(whole(ok, max_head).heads, 1);
    assert!(whole(ok, max_head - 1).stopped);
    assert!(byte_by_byte(ok, max_head - 1).stopped);
}

/// Found while writing the properties (the same shape as the head limit,
/// on the chunk-size line limit, which random streams do not reach): a
/// chunk-size line over 4096 bytes stopped the scanner when split, and was
/// followed when whole, so a later CL+TE head was flagged only in one case.
#[test]
fn long_chunk_size_line_stops_the_scanner_in_one_read_or_many() {
    let mut bytes = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 5000));
    bytes.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
    bytes.extend_from_slice(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let w = whole(&bytes, MAX_HEAD);
    assert_eq!(w, byte_by_byte(&bytes, MAX_HEAD));
    assert!(w.stopped);
    assert_eq!(w.heads, 1);
}
