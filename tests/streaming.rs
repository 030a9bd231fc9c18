//! Large bodies stream through the proxy in both directions, over HTTP/1.1
//! and HTTP/2, without the proxy buffering them: the real binary runs as a
//! child process so its peak resident memory (`VmHWM`) can be read.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

use common::*;

/// Bytes moved per transfer.
const TOTAL: u64 = 200 * 1024 * 1024;
/// Frame size of the generated bodies.
const CHUNK: usize = 64 * 1024;
/// The proxy's peak RSS must stay under this, far below one body (200 MiB).
const PEAK_RSS_LIMIT: u64 = 80 * 1024 * 1024;
/// Upper bound for one 200 MiB transfer on a loaded 2-core machine.
const TRANSFER_LIMIT: Duration = Duration::from_secs(180);

/// A body of `total` bytes produced frame by frame (never held in memory).
/// Every chunk holds the same non-trivial pattern; only one copy exists.
fn generated(
    total: u64,
) -> StreamBody<
    impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + Unpin,
> {
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let frames = total.div_ceil(CHUNK as u64);
    StreamBody::new(stream::iter((0..frames).map(move |i| {
        let left = total - i * CHUNK as u64;
        let n = left.min(CHUNK as u64) as usize;
        Ok(Frame::data(chunk.slice(..n)))
    })))
}

/// Reads a body to the end, counting data bytes. The first and last byte of
/// every frame are checked against the pattern of [`generated`], which
/// catches lost, repeated or shifted data cheaply (frames are re-cut on the
/// way, so their edges land all over the pattern).
async fn count(mut body: Incoming) -> Result<u64, hyper::Error> {
    let expected = |offset: u64| ((offset % CHUNK as u64) % 251) as u8;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            if let (Some(first), Some(last)) = (d.first(), d.last()) {
                let end = n + d.len() as u64 - 1;
                assert_eq!(*first, expected(n), "byte {n} is corrupt");
                assert_eq!(*last, expected(end), "byte {end} is corrupt");
            }
            n += d.len() as u64;
        }
    }
    Ok(n)
}

fn start_binary(pki: &Pki, up: std::net::SocketAddr) -> BinProxy {
    OneSite::new().upstream(up).start_bin(pki)
}

/// Reports one transfer and fails if the proxy's peak RSS shows the body
/// was buffered.
fn check_peak_rss(proxy: &BinProxy, what: &str, alpn: &[u8], started: Instant, baseline: u64) {
    let alpn = String::from_utf8_lossy(alpn);
    let peak = proxy.peak_rss();
    eprintln!(
        "{what} {alpn}: {:.1} MiB in {:.2?}; proxy peak RSS {:.1} MiB (baseline {:.1} MiB)",
        mib(TOTAL),
        started.elapsed(),
        mib(peak),
        mib(baseline)
    );
    assert!(
        peak < PEAK_RSS_LIMIT,
        "proxy peak RSS {:.1} MiB after a {alpn} {what} exceeds {:.0} MiB: the body was buffered",
        mib(peak),
        mib(PEAK_RSS_LIMIT)
    );
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_200mb_streams_through_h1_and_h2_with_bounded_proxy_memory() {
    let pki = Pki::new();
    // The upstream counts what it receives and answers the count.
    let (up, _stop) = upstream(|req: Request<Incoming>| async move {
        let answer = match count(req.into_body()).await {
            Ok(n) => n.to_string(),
            Err(e) => format!("error after a short body: {e}"),
        };
        Response::new(full(answer))
    })
    .await;
    let proxy = start_binary(&pki, up);
    let baseline = proxy.peak_rss();

    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let started = Instant::now();
        let req = req_builder(alpn, "api.test", "/upload")
            .method("POST")
            .body(generated(TOTAL))
            .unwrap();
        let got = tokio::time::timeout(TRANSFER_LIMIT, async {
            let resp = send(proxy.https, "api.test", pki.client_config(&[alpn]), req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} upload took over {TRANSFER_LIMIT:?}",
                String::from_utf8_lossy(alpn)
            )
        });
        let (status, body) =
            got.unwrap_or_else(|e| panic!("upload over {}: {e}", String::from_utf8_lossy(alpn)));
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            TOTAL.to_string(),
            "upstream's byte count"
        );
        check_peak_rss(&proxy, "upload", alpn, started, baseline);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_200mb_streams_through_h1_and_h2_with_bounded_proxy_memory() {
    let pki = Pki::new();
    // The upstream generates the body frame by frame.
    let (up, _stop) =
        upstream(|_req: Request<Incoming>| async move { Response::new(generated(TOTAL).boxed()) })
            .await;
    let proxy = start_binary(&pki, up);
    let baseline = proxy.peak_rss();

    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let started = Instant::now();
        let req = req_builder(alpn, "api.test", "/download")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let got = tokio::time::timeout(TRANSFER_LIMIT, async {
            let resp = send(proxy.https, "api.test", pki.client_config(&[alpn]), req).await?;
            let status = resp.status();
            let n = count(resp.into_body()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, n))
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} download took over {TRANSFER_LIMIT:?}",
                String::from_utf8_lossy(alpn)
            )
        });
        let (status, n) =
            got.unwrap_or_else(|e| panic!("download over {}: {e}", String::from_utf8_lossy(alpn)));
        assert_eq!(status, 200);
        assert_eq!(n, TOTAL, "bytes the client received");
        check_peak_rss(&proxy, "download", alpn, started, baseline);
    }
}
