//! The one parser of the Prometheus text exposition that `/metrics`
//! serves, and queries over a scrape by name and labels.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::common::client::admin_get;
use crate::common::proxy::Proxy;

/// One sample of the text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape, with the raw text kept for `contains` checks.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

/// Parses `name{a="b",c="d"} value` lines (label values unescaped).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                let (n, v) = line
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad line {line:?}"));
                out.push(Sample {
                    name: n.to_string(),
                    labels: BTreeMap::new(),
                    value: v
                        .trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line:?}")),
                });
                continue;
            }
        };
        let mut labels = BTreeMap::new();
        let mut chars = rest.chars();
        loop {
            let mut key = String::new();
            let mut c = chars
                .next()
                .unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
            if c == '}' {
                break;
            }
            if c == ',' {
                c = chars.next().unwrap();
                if c == '}' {
                    break;
                }
            }
            while c != '=' {
                key.push(c);
                c = chars
                    .next()
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
            }
            assert_eq!(
                chars.next(),
                Some('"'),
                "label value not quoted in {line:?}"
            );
            let mut value = String::new();
            loop {
                match chars
                    .next()
                    .unwrap_or_else(|| panic!("unterminated value in {line:?}"))
                {
                    '\\' => match chars.next().unwrap() {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        }
        let value: String = chars.collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        });
    }
    out
}

/// `GET /metrics` on the admin listener at `admin`, parsed.
pub async fn scrape_at(admin: SocketAddr) -> Scrape {
    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let samples = parse(&text);
    Scrape { text, samples }
}

/// `GET /metrics` on the proxy's admin listener, parsed.
pub async fn scrape(proxy: &Proxy) -> Scrape {
    scrape_at(proxy.admin.expect("admin listener")).await
}

impl Scrape {
    /// Samples of `name` whose labels include every `(k, v)` of `want`.
    pub fn find(&self, name: &str, want: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample of `name` with those labels.
    pub fn one(&self, name: &str, want: &[(&str, &str)]) -> &Sample {
        let found = self.find(name, want);
        assert_eq!(found.len(), 1, "{name} {want:?}: {found:#?}\n{}", self.text);
        found[0]
    }

    /// Sum of every sample of `name` with those labels.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want).iter().map(|s| s.value).sum()
    }

    /// Every label value in the scrape.
    pub fn label_values(&self) -> BTreeSet<&str> {
        self.samples
            .iter()
            .flat_map(|s| s.labels.values().map(String::as_str))
            .collect()
    }

    /// The value of the sample of `name` with exactly the labels `want`
    /// (None when there is no such series).
    pub fn exact(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == want.len()
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The value of one series written as it is rendered
    /// (`name{a="b",c="d"}` or `name`), matched by name and exact labels.
    pub fn series(&self, series: &str) -> Option<f64> {
        let want = parse(&format!("{series} 0")).pop().expect("a series");
        let labels: Vec<(&str, &str)> = want
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.exact(&want.name, &labels)
    }
}

/// `portcullis_upstream_healthy` of `upstream` (`host:port`) on route
/// `route` of site `api.test` (None: no such series).
pub async fn healthy(proxy: &Proxy, route: &str, upstream: &str) -> Option<f64> {
    scrape(proxy).await.exact(
        "portcullis_upstream_healthy",
        &[
            ("site", "api.test"),
            ("route", route),
            ("upstream", upstream),
        ],
    )
}
