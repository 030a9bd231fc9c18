//! Per-route rate limits against a running proxy, over TLS, all on
//! loopback: each route admits exactly its burst and then answers 429 with
//! `Retry-After`, `RateLimit-Policy` / `RateLimit` and the configured body;
//! client addresses (127.0.0.2, 127.0.0.3, ... as source addresses), header
//! values and the whole route as keys; `X-Forwarded-For` / `Forwarded`
//! believed from a trusted proxy only; shadow mode; HTTP/2 counted like
//! HTTP/1.1; limits kept across a config reload unless they changed.
//!
//! Rates are slow (per minute or per hour) so no refill can happen while a
//! test runs; refill timing is covered by the fake-clock unit tests in
//! `src/proxy/ratelimit.rs`.

mod common;

use std::net::IpAddr;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

const HOST: &str = "rl.test";
const LIMITED: &str = "portcullis_ratelimit_limited_total";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A proxy with one site `rl` (host `rl.test`) whose routes are `routes`,
/// with `[rate_limit]` settings `settings`, and an admin listener.
struct Rl {
    proxy: Proxy,
    pki: Pki,
}

/// The config text around `settings` (lines of `[rate_limit]`) and `routes`.
fn config(settings: &str, routes: &str) -> String {
    OneSite::new()
        .admin()
        .top(&format!("[rate_limit]\n{settings}"))
        .name("rl")
        .host(HOST)
        .routes(routes)
        .toml()
}

/// One route answering `ok` limited to 1 request a minute with `burst`.
fn ok_route(burst: u32) -> String {
    format!(
        "[[sites.routes]]\nrespond = {{ status = 200, body = \"ok\\n\" }}\n\
         [[sites.routes.rate_limits]]\nrate = \"1/min\"\nburst = {burst}\n"
    )
}

impl Rl {
    async fn start(settings: &str, routes: &str) -> Rl {
        let pki = Pki::new();
        let site = OneSite::new().host(HOST);
        let proxy = Proxy::start_in(site.dir(&pki), &config(settings, routes)).await;
        Rl { proxy, pki }
    }

    /// `GET path` from the local address `from` over `alpn` with extra headers.
    async fn get_with(&self, from: &str, alpn: &[u8], path: &str, headers: &[(&str, &str)]) -> Got {
        let mut b = req_builder(alpn, HOST, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        request_from(
            ip(from),
            self.proxy.https,
            HOST,
            self.pki.client_config(&[alpn]),
            req,
        )
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {from}: {e}"))
    }

    /// `GET path` from `from` over HTTP/1.1.
    async fn get(&self, from: &str, path: &str) -> Got {
        self.get_with(from, b"http/1.1", path, &[]).await
    }

    /// Statuses of `n` requests from `from`, in order.
    async fn statuses(
        &self,
        n: usize,
        from: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Vec<u16> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.get_with(from, b"http/1.1", path, headers).await.status);
        }
        out
    }

    /// The value of the `limited_total` counter for a route, limit and mode
    /// (0 when the series does not exist).
    async fn limited(&self, route: &str, limit: &str, mode: &str) -> f64 {
        scrape(&self.proxy).await.sum(
            LIMITED,
            &[
                ("site", "rl"),
                ("route", route),
                ("limit", limit),
                ("mode", mode),
            ],
        )
    }

    /// Rewrites the config file and reloads it through `POST /reload`.
    async fn reload(&self, settings: &str, routes: &str) {
        self.proxy
            .write("portcullis.toml", &config(settings, routes));
        let (status, body) = admin_post(self.proxy.admin(), "/reload").await;
        assert_eq!(status, 200, "reload refused: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ok"], true, "{body}");
    }
}

fn header<'a>(got: &'a Got, name: &str) -> &'a str {
    got.headers
        .get(name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} header in {} response: {:?}",
                got.status, got.headers
            )
        })
        .to_str()
        .unwrap()
}

/// A parameter (`r`, `t`) of a `RateLimit` header `"name";r=N;t=M`.
fn param(got: &Got, key: &str) -> u64 {
    let v = header(got, "ratelimit");
    v.split(';')
        .find_map(|p| p.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in RateLimit: {v}"))
        .parse()
        .unwrap()
}

/// `Retry-After` as whole seconds (it must be an integer).
fn retry_after(got: &Got) -> u64 {
    let v = header(got, "retry-after");
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not integer seconds"))
}

/// Checks a 429: exact body, `Retry-After` within `[period - 1, period]`
/// seconds (the time to the next cell, rounded up), the policy, and a
/// `RateLimit` with nothing remaining and `t` equal to `Retry-After`.
fn assert_limited(got: &Got, body: &str, policy: &str, period_secs: u64) {
    assert_eq!(got.status, 429, "{got:?}");
    assert_eq!(got.body, body.as_bytes(), "429 body");
    assert_eq!(header(got, "content-type"), "text/plain; charset=utf-8");
    let ra = retry_after(got);
    assert!(
        ra >= 1 && ra <= period_secs && ra + 1 >= period_secs,
        "Retry-After {ra} for one request per {period_secs} s"
    );
    assert_eq!(header(got, "ratelimit-policy"), policy);
    assert_eq!(param(got, "r"), 0);
    assert_eq!(param(got, "t"), ra, "RateLimit t= and Retry-After agree");
}

#[tokio::test]
async fn each_route_admits_exactly_its_burst_then_429_with_retry_after_and_ratelimit_headers() {
    let (up, _stop) = echo_upstream().await;
    let rl = Rl::start(
        r#"body = "slow down, please\n""#,
        &format!(
            r#"
  [[sites.routes]]
  path = "/a"
  upstream = "http://{up}"
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = 2

  [[sites.routes]]
  path = "/b"
  respond = {{ status = 200, body = "b\n" }}
    [[sites.routes.rate_limits]]
    rate = "3/h"
    burst = 4
"#
        ),
    )
    .await;
    const BODY: &str = "slow down, please\n";

    // /a: 1 per 60 s, burst 2 -> a full burst refills in 120 s.
    for want_r in [1, 0] {
        let got = rl.get("127.0.0.1", "/a/x").await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.seen()[":path"],
            "/a/x",
            "admitted requests reach the upstream"
        );
        assert_eq!(header(&got, "ratelimit-policy"), "\"ip\";q=2;w=120");
        assert_eq!(param(&got, "r"), want_r, "remaining counts down");
        assert!(param(&got, "t") <= 120);
        assert!(got.headers.get("retry-after").is_none());
    }
    let got = rl.get("127.0.0.1", "/a/x").await;
    assert_limited(&got, BODY, "\"ip\";q=2;w=120", 60);

    // /b has its own limit: 3 per hour (one per 1200 s), burst 4.
    for want_r in [3, 2, 1, 0] {
        let got = rl.get("127.0.0.1", "/b").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "b\n");
        assert_eq!(header(&got, "ratelimit-policy"), "\"ip\";q=4;w=4800");
        assert_eq!(param(&got, "r"), want_r);
    }
    let got = rl.get("127.0.0.1", "/b").await;
    assert_limited(&got, BODY, "\"ip\";q=4;w=4800", 1200);

    // /a is still limited; HTTP/2 sees the same 429.
    let got = rl.get_with("127.0.0.1", b"h2", "/a", &[]).await;
    assert_eq!(got.version, http::Version::HTTP_2);
    assert_limited(&got, BODY, "\"ip\";q=2;w=120", 60);

    assert_eq!(rl.limited("/a", "ip", "enforce").await, 2.0);
    assert_eq!(rl.limited("/b", "ip", "enforce").await, 1.0);
    assert_eq!(rl.limited("/a", "ip", "shadow").await, 0.0);
}

#[tokio::test]
async fn client_addresses_are_limited_independently() {
    let rl = Rl::start("", &ok_route(2)).await;
    assert_eq!(rl.statuses(3, "127.0.0.2", "/", &[]).await, [200, 200, 429]);
    // Another address has its own full burst.
    assert_eq!(rl.statuses(3, "127.0.0.3", "/", &[]).await, [200, 200, 429]);
    assert_eq!(rl.statuses(1, "127.0.0.2", "/", &[]).await, [429]);
    assert_eq!(rl.statuses(3, "127.0.0.1", "/", &[]).await, [200, 200, 429]);
}

#[tokio::test]
async fn trusted_proxys_forwarded_for_names_the_client() {
    let rl = Rl::start(r#"trusted_proxies = ["127.0.0.2"]"#, &ok_route(1)).await;
    let via = "127.0.0.2";
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    // Each forwarded client has its own bucket behind the one proxy.
    assert_eq!(
        rl.statuses(2, via, "/", &xff("198.51.100.1")).await,
        [200, 429]
    );
    assert_eq!(
        rl.statuses(2, via, "/", &xff("198.51.100.2")).await,
        [200, 429]
    );
    // The right-most address is the one the trusted proxy saw.
    assert_eq!(
        rl.statuses(1, via, "/", &xff("203.0.113.9, 198.51.100.3"))
            .await,
        [200]
    );
    assert_eq!(rl.statuses(1, via, "/", &xff("198.51.100.3")).await, [429]);
    // Whatever the client wrote left of its address is not looked at:
    // neither other addresses nor garbage move it to a fresh bucket.
    for spoof in [
        "10.0.0.1, 198.51.100.1",
        "nonsense, 198.51.100.1",
        "198.51.100.99,198.51.100.2",
    ] {
        assert_eq!(
            rl.statuses(1, via, "/", &xff(spoof)).await,
            [429],
            "X-Forwarded-For: {spoof}"
        );
    }
    // `Forwarded: for=` works the same way.
    let fwd = [("forwarded", "for=\"198.51.100.4:4711\";proto=https")];
    assert_eq!(rl.statuses(2, via, "/", &fwd).await, [200, 429]);
    // Without a header the proxy itself is the client.
    assert_eq!(rl.statuses(2, via, "/", &[]).await, [200, 429]);
}

#[tokio::test]
async fn untrusted_clients_forwarded_for_is_ignored_so_spoofing_cannot_escape_the_limit() {
    let rl = Rl::start(r#"trusted_proxies = ["127.0.0.2"]"#, &ok_route(2)).await;
    let spoofer = "127.0.0.3";
    let mut statuses = Vec::new();
    for i in 0..12 {
        let addr = format!("198.51.100.{}", 10 + i);
        let forwarded = format!("for={addr}");
        let h: [(&str, &str); 2] = [("x-forwarded-for", &addr), ("forwarded", &forwarded)];
        statuses.push(rl.get_with(spoofer, b"http/1.1", "/", &h).await.status);
    }
    let mut want = vec![200, 200];
    want.extend([429; 10]);
    assert_eq!(
        statuses, want,
        "a new X-Forwarded-For per request changes nothing"
    );
    // And the addresses it named were not charged: a real client of the
    // trusted proxy with one of them still has its full burst.
    let h = [("x-forwarded-for", "198.51.100.10")];
    assert_eq!(rl.statuses(3, "127.0.0.2", "/", &h).await, [200, 200, 429]);
    assert_eq!(rl.limited("/", "ip", "enforce").await, 11.0);
}

#[tokio::test]
async fn header_keyed_limit_gives_each_key_its_own_bucket() {
    let rl = Rl::start(
        "",
        r#"
  [[sites.routes]]
  respond = { status = 200, body = "ok\n" }
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = 2
    key = "header:x-api-key"
"#,
    )
    .await;
    let alpha = [("x-api-key", "alpha")];
    let beta = [("x-api-key", "beta")];
    // The key, not the address, is counted: alpha from two addresses shares.
    assert_eq!(rl.statuses(1, "127.0.0.2", "/", &alpha).await, [200]);
    assert_eq!(rl.statuses(1, "127.0.0.3", "/", &alpha).await, [200]);
    let got = rl.get_with("127.0.0.2", b"http/1.1", "/", &alpha).await;
    assert_limited(&got, "too many requests\n", "\"x-api-key\";q=2;w=120", 60);
    // Another key is independent, from the same address.
    assert_eq!(
        rl.statuses(3, "127.0.0.2", "/", &beta).await,
        [200, 200, 429]
    );
    // Requests without the header share one bucket of their own.
    assert_eq!(rl.statuses(3, "127.0.0.2", "/", &[]).await, [200, 200, 429]);
    assert_eq!(
        rl.statuses(1, "127.0.0.3", "/", &[("x-api-key", "gamma")])
            .await,
        [200]
    );
}

#[tokio::test]
async fn route_keyed_limit_is_shared_by_every_client() {
    let rl = Rl::start(
        "",
        r#"
  [[sites.routes]]
  path = "/global"
  respond = { status = 200, body = "ok\n" }
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = 3
    key = "route"

  [[sites.routes]]
  respond = { status = 200, body = "other\n" }
"#,
    )
    .await;
    let mut got = Vec::new();
    for from in [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    ] {
        got.push(rl.get(from, "/global").await.status);
    }
    assert_eq!(got, [200, 200, 200, 429, 429]);
    let last = rl.get("127.0.0.5", "/global").await;
    assert_limited(&last, "too many requests\n", "\"route\";q=3;w=180", 60);
    // Routes without limits are not touched.
    assert_eq!(rl.statuses(5, "127.0.0.2", "/other", &[]).await, [200; 5]);
}

#[tokio::test]
async fn client_over_its_own_limit_does_not_drain_the_routes_shared_limit() {
    // The shared limit is listed first on purpose: per-client limits are
    // still checked before it.
    let rl = Rl::start(
        "",
        r#"
  [[sites.routes]]
  respond = { status = 200, body = "ok\n" }
    [[sites.routes.rate_limits]]
    name = "global"
    rate = "1/min"
    burst = 3
    key = "route"
    [[sites.routes.rate_limits]]
    name = "per-ip"
    rate = "1/min"
    burst = 1
"#,
    )
    .await;
    // A noisy client: one admitted, the rest refused by its own limit.
    let noisy: Vec<(u16, String)> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let g = rl.get("127.0.0.2", "/").await;
            v.push((g.status, header(&g, "ratelimit-policy").to_string()));
        }
        v
    };
    assert_eq!(noisy[0].0, 200);
    for (status, policy) in &noisy[1..] {
        assert_eq!(*status, 429);
        assert_eq!(policy, "\"per-ip\";q=1;w=60");
    }
    // The route's budget of 3 lost only the one admitted request.
    assert_eq!(rl.get("127.0.0.3", "/").await.status, 200);
    assert_eq!(rl.get("127.0.0.4", "/").await.status, 200);
    let got = rl.get("127.0.0.5", "/").await;
    assert_limited(&got, "too many requests\n", "\"global\";q=3;w=180", 60);
}

#[tokio::test]
async fn shadow_mode_never_rejects_but_counts() {
    let rl = Rl::start(
        "",
        r#"
  [[sites.routes]]
  path = "/shadow"
  respond = { status = 200, body = "ok\n" }
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = 1
    mode = "shadow"

  [[sites.routes]]
  path = "/enforce"
  respond = { status = 200, body = "ok\n" }
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = 1
"#,
    )
    .await;
    assert_eq!(rl.statuses(6, "127.0.0.2", "/shadow", &[]).await, [200; 6]);
    let got = rl.get_with("127.0.0.2", b"h2", "/shadow", &[]).await;
    assert_eq!(got.status, 200);
    assert!(got.headers.get("retry-after").is_none());
    assert_eq!(
        rl.limited("/shadow", "ip", "shadow").await,
        6.0,
        "every request past the burst is counted"
    );
    assert_eq!(rl.limited("/shadow", "ip", "enforce").await, 0.0);

    // The same limit enforced refuses them, and is counted as enforce.
    assert_eq!(
        rl.statuses(3, "127.0.0.2", "/enforce", &[]).await,
        [200, 429, 429]
    );
    assert_eq!(rl.limited("/enforce", "ip", "enforce").await, 2.0);
    assert_eq!(rl.limited("/enforce", "ip", "shadow").await, 0.0);
}

/// Statuses of `paths` sent as streams of one HTTP/2 connection from `from`.
async fn h2_statuses(rl: &Rl, from: &str, paths: &[&str]) -> Vec<u16> {
    let tls = tls_connect_from(
        ip(from),
        rl.proxy.https,
        HOST,
        rl.pki.client_config(&[b"h2"]),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for p in paths {
        let req = req_builder(b"h2", HOST, p)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        out.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    out
}

#[tokio::test]
async fn http2_requests_count_like_http1() {
    let rl = Rl::start("", &ok_route(5)).await;
    let from = "127.0.0.2";
    let mut remaining = Vec::new();
    for alpn in [&b"h2"[..], b"http/1.1", b"h2"] {
        let got = rl.get_with(from, alpn, "/", &[]).await;
        assert_eq!(got.status, 200);
        remaining.push(param(&got, "r"));
    }
    assert_eq!(remaining, [4, 3, 2], "one bucket across protocols");
    // Streams of one connection count one by one.
    assert_eq!(
        h2_statuses(&rl, from, &["/", "/", "/", "/"]).await,
        [200, 200, 429, 429]
    );
    let got = rl.get_with(from, b"http/1.1", "/", &[]).await;
    assert_limited(&got, "too many requests\n", "\"ip\";q=5;w=300", 60);
    let got = rl.get_with(from, b"h2", "/", &[]).await;
    assert_eq!(got.version, http::Version::HTTP_2);
    assert_limited(&got, "too many requests\n", "\"ip\";q=5;w=300", 60);
    assert_eq!(rl.limited("/", "ip", "enforce").await, 4.0);
}

#[tokio::test]
async fn reload_keeps_unchanged_limits_and_starts_changed_ones_fresh() {
    let routes = |change_burst: u32, extra: &str| {
        format!(
            r#"
  [[sites.routes]]
  path = "/keep"
  respond = {{ status = 200, body = "keep\n" }}
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = 1
    [[sites.routes.rate_limits]]
    name = "everyone"
    rate = "1/min"
    burst = 10
    key = "route"

  [[sites.routes]]
  path = "/change"
  respond = {{ status = 200, body = "change\n" }}
    [[sites.routes.rate_limits]]
    rate = "1/min"
    burst = {change_burst}
{extra}
"#
        )
    };
    let rl = Rl::start(r#"body = "v1\n""#, &routes(1, "")).await;
    let from = "127.0.0.2";
    assert_eq!(rl.statuses(2, from, "/keep", &[]).await, [200, 429]);
    assert_eq!(rl.statuses(2, from, "/change", &[]).await, [200, 429]);
    // The shared limit: 10 per route, 2 spent by now.
    assert_eq!(rl.get("127.0.0.3", "/keep").await.status, 200);
    assert_eq!(rl.statuses(1, "127.0.0.3", "/keep", &[]).await, [429]);

    // A reload that changes other things (the 429 body, a new route, a
    // timeout) is not a way to reset the buckets.
    let extra = r#"
  [[sites.routes]]
  path = "/new"
  respond = { status = 200, body = "new\n" }

[timeouts]
idle = "61s"
"#;
    rl.reload(r#"body = "v2\n""#, &routes(1, extra)).await;
    let got = rl.get(from, "/keep").await;
    assert_eq!(got.status, 429);
    assert_eq!(got.body, "v2\n", "the reload is in service");
    assert_eq!(rl.get(from, "/change").await.status, 429);
    assert_eq!(rl.get(from, "/new").await.status, 200);
    assert_eq!(rl.statuses(1, "127.0.0.3", "/keep", &[]).await, [429]);
    // The route-wide bucket kept its count as well: 2 of 10 were spent
    // before the reload, so exactly 8 new clients get through.
    let mut admitted = 0;
    for i in 1..=10 {
        let g = rl.get(&format!("127.0.1.{i}"), "/keep").await;
        if g.status == 200 {
            admitted += 1;
        } else {
            assert_eq!(header(&g, "ratelimit-policy"), "\"everyone\";q=10;w=600");
        }
    }
    assert_eq!(
        admitted, 8,
        "the route-wide bucket kept its state across the reload"
    );

    // Changing a limit gives it a fresh bucket; the others keep theirs.
    rl.reload(r#"body = "v2\n""#, &routes(2, extra)).await;
    assert_eq!(rl.statuses(3, from, "/change", &[]).await, [200, 200, 429]);
    let got = rl.get(from, "/change").await;
    assert_limited(&got, "v2\n", "\"ip\";q=2;w=120", 60);
    assert_eq!(rl.get(from, "/keep").await.status, 429);
}
