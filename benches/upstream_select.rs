//! Criterion micro-benchmark of upstream selection: the per-request cost
//! of `Group::pick` (health flags and in-flight counters are atomics read
//! per candidate) for every policy, over groups of 4 and 64 upstreams
//! with mixed weights, and the cost of the hash key of a client address.
//!
//! cargo bench --bench upstream_select

use std::hint::black_box;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use portcullis::config::{LbPolicy, Limits, Timeouts, UpstreamConfig, UpstreamTarget};
use portcullis::proxy::clock;
use portcullis::proxy::upstream::{balance, Group};

fn group(n: usize, lb: LbPolicy) -> Arc<Group> {
    let mut cfg = UpstreamConfig::single("http://127.0.0.1:1/".parse().unwrap());
    cfg.targets = (0..n)
        .map(|i| UpstreamTarget {
            uri: format!("http://127.0.0.1:{}/", 10_000 + i).parse().unwrap(),
            weight: NonZeroU32::new(1 + (i % 3) as u32).unwrap(),
        })
        .collect();
    cfg.lb = lb;
    Group::reuse_or_build(
        &"bench".into(),
        "/",
        &cfg,
        &Timeouts::default(),
        &Limits::default(),
        None,
    )
}

fn pick(c: &mut Criterion) {
    let policies = [
        ("round_robin", LbPolicy::RoundRobin),
        ("least_requests", LbPolicy::LeastRequests),
        ("p2c", LbPolicy::PowerOfTwo),
        ("hash_ip", LbPolicy::HashIp),
    ];
    let keys: Vec<u64> = (0..256u32)
        .map(|i| balance::hash_ip(IpAddr::from([10, 0, (i >> 8) as u8, i as u8])))
        .collect();
    for (name, lb) in policies {
        let mut g = c.benchmark_group(format!("upstream_pick/{name}"));
        for n in [4usize, 64] {
            let grp = group(n, lb.clone());
            let mut i = 0usize;
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    i = (i + 1) & 255;
                    let now = clock::now_ms();
                    black_box(grp.pick(black_box(keys[i]), &[], now))
                })
            });
        }
        g.finish();
    }
}

fn hash_key(c: &mut Criterion) {
    let ip = IpAddr::from([192, 0, 2, 7]);
    c.bench_function("upstream_hash_key/ip", |b| {
        b.iter(|| black_box(balance::hash_ip(black_box(ip))))
    });
    let v = "user-8f14e45fceea167a5a36dedd4bea2543";
    c.bench_function("upstream_hash_key/header", |b| {
        b.iter(|| black_box(balance::hash_bytes(black_box(v.as_bytes()))))
    });
}

criterion_group!(benches, pick, hash_key);
criterion_main!(benches);
