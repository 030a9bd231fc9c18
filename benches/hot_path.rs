//! Criterion micro-benchmarks of the hot path and of the control-path
//! operations whose cost grows with the number of certificates.
//!
//! cargo bench --bench hot_path

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Version};

use portcullis::certstore::{
    self, CertSlot, CertSource, CertStore, Checks, PublishCause, ServedCert, SniMap,
};
use portcullis::config::{HostPattern, LimitKey, RateLimitConfig, RouteAction};
use portcullis::metrics::Metrics;
use portcullis::proxy::headers;
use portcullis::proxy::ratelimit::{Key, Limiter};
use portcullis::proxy::{Route, Site};

/// One certificate, issued by the internal CA, reused for every slot (the
/// lookup cost does not depend on the certificate).
fn sample_cert(dir: &Path) -> ServedCert {
    let ca = certstore::InternalCa::load_or_create(dir).unwrap();
    ca.issue(&[HostPattern::Exact("bench.test".into())])
        .unwrap()
}

fn store_with(n: usize, cert: &ServedCert) -> CertStore {
    let slots = (0..n)
        .map(|i| {
            let slot = CertSlot::new(
                format!("site{i}"),
                vec![HostPattern::Exact(format!("host{i}.bench.test"))],
                CertSource::Internal,
                false,
            );
            Arc::new(slot)
        })
        .collect::<Vec<_>>();
    let store = CertStore::new();
    store.replace_map(SniMap::new(slots.clone()));
    for slot in &slots {
        store.publish(slot, cert.clone(), PublishCause::File);
    }
    store
}

fn sni_resolve(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cert = sample_cert(dir.path());
    let mut g = c.benchmark_group("sni_resolve");
    for n in [10usize, 10_000] {
        let store = store_with(n, &cert);
        let names: Vec<String> = (0..64)
            .map(|i| format!("host{}.bench.test", (i * 7919) % n))
            .collect();
        let mut i = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) & 63;
                let map = store.map();
                black_box(map.lookup(Some(&names[i])).and_then(|s| s.certified_key()))
            })
        });
    }
    g.finish();
}

fn cert_replace(c: &mut Criterion) {
    // Replacing one certificate among 10,000: validate the files, then
    // publish into the one slot (the other 9,999 are not touched).
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = certstore::InternalCa::load_or_create(&ca_dir).unwrap();
    let hosts = vec![HostPattern::Exact("one.bench.test".into())];
    let served = ca.issue(&hosts).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let (cert_pem, key_pem) = issue_pair(&ca_dir, &hosts);
    std::fs::write(&cert_path, cert_pem).unwrap();
    std::fs::write(&key_path, key_pem).unwrap();

    let store = store_with(9_999, &served);
    let mut slots = store.slots();
    let slot = Arc::new(CertSlot::new(
        "one".into(),
        hosts.clone(),
        CertSource::File {
            cert: cert_path.clone(),
            key: key_path.clone(),
        },
        false,
    ));
    slots.push(slot.clone());
    store.replace_map(SniMap::new(slots));

    let mut g = c.benchmark_group("cert_replace_1_of_10000");
    g.bench_function("validate_and_publish", |b| {
        // Reading and parsing run on a blocking thread, as in the server.
        let rt = tokio::runtime::Runtime::new().unwrap();
        b.iter(|| black_box(rt.block_on(certstore::watch::reload_slot(&store, &slot, true))))
    });
    let ready = certstore::load::load_files(
        &cert_path,
        &key_path,
        &hosts,
        Checks {
            allow_expired: false,
        },
    )
    .unwrap();
    g.bench_function("publish_only", |b| {
        b.iter(|| store.publish(&slot, black_box(ready.clone()), PublishCause::File))
    });
    g.finish();
}

/// A certificate and key for `hosts`, signed by the internal CA in `ca_dir`.
fn issue_pair(ca_dir: &Path, hosts: &[HostPattern]) -> (String, String) {
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join("internal-ca/ca.key")).unwrap(),
    )
    .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("internal-ca/ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
    let params = rcgen::CertificateParams::new(names).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn route_match(c: &mut Criterion) {
    let routes = [
        "/v1/users/",
        "/v1/orders/",
        "/v1/",
        "/static/",
        "/healthz",
        "/",
    ]
    .iter()
    .map(|p| Route {
        prefix: p.to_string(),
        action: RouteAction::Respond {
            status: http::StatusCode::OK,
            body: bytes::Bytes::new(),
            content_type: String::new(),
        },
        limits: Vec::new(),
        limited: Vec::new(),
        upstream: None,
        metrics: Default::default(),
    })
    .collect();
    let site = Site {
        name: "bench".into(),
        routes,
    };
    c.bench_function("route_match", |b| {
        b.iter(|| black_box(site.route(black_box("/v1/orders/1234/items"))))
    });
}

fn header_rewrite(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("authorization", "Bearer abcdefghijklmnopqrstuvwxyz"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("x-request-id", "0123456789abcdef"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    // Formatted once per connection by the proxy.
    let client = HeaderValue::from_static("203.0.113.7");
    let host = HeaderValue::from_static("api.example.com");
    c.bench_function("header_rewrite", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h);
                headers::add_forwarded(&mut h, &client, Some(&host), Version::HTTP_11);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn limiter_check(c: &mut Criterion) {
    let cfg = RateLimitConfig {
        name: "ip".into(),
        count: std::num::NonZeroU32::new(1_000_000_000).unwrap(),
        per: Duration::from_secs(1),
        burst: std::num::NonZeroU32::new(1_000_000).unwrap(),
        key: LimitKey::ClientIp,
        shadow: false,
    };
    let lim = Limiter::new(cfg, 1_000_000);
    let ips: Vec<IpAddr> = (0..1024u32)
        .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
        .collect();
    let mut i = 0;
    c.bench_function("limiter_check", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(lim.check(Key::Ip(ips[i])))
        })
    });
}

fn metrics_scrape(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cert = sample_cert(dir.path());
    let store = store_with(10_000, &cert);
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("metrics_scrape");
    g.sample_size(20);
    g.bench_function("10000_certs", |b| {
        b.iter(|| black_box(metrics.render(&store).len()))
    });
    g.finish();
}

criterion_group!(
    benches,
    sni_resolve,
    route_match,
    header_rewrite,
    limiter_check,
    cert_replace,
    metrics_scrape
);
criterion_main!(benches);
