//! The per-upstream metric families, rendered at scrape time from the
//! groups in service, so upstreams removed by a reload disappear from
//! `/metrics` and a cool-down that ended shows as healthy without any
//! event. Control path (scrape).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::core::Desc;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::group::Group;
use super::state::CLASSES;
use crate::proxy::clock::now_ms;

/// Lists the groups in service (read at each scrape).
pub type GroupsFn = Box<dyn Fn() -> Vec<Arc<Group>> + Send + Sync>;

/// Renders the per-upstream series at scrape time from the snapshot in
/// service, so upstreams removed by a reload disappear from `/metrics`
/// and a cool-down that ended shows as healthy without any event.
pub struct Collector {
    groups: GroupsFn,
    descs: Vec<Desc>,
}

/// Metric names.
pub mod names {
    /// 1 while an upstream is in service, 0 while out.
    pub const HEALTHY: &str = "portcullis_upstream_healthy";
    /// Attempts by upstream and status class (`error`: no response).
    pub const REQUESTS: &str = "portcullis_upstream_requests_total";
    /// Requests in flight per upstream.
    pub const IN_FLIGHT: &str = "portcullis_upstream_in_flight";
    /// Retries made after an attempt on an upstream failed.
    pub const RETRIES: &str = "portcullis_upstream_retries_total";
}

const FAMILIES: [(&str, &str, bool); 4] = [
    (
        names::HEALTHY,
        "1 while an upstream is in service (active and passive checks), 0 while out",
        false,
    ),
    (
        names::REQUESTS,
        "Requests sent to each upstream by status class (error: no response)",
        true,
    ),
    (names::IN_FLIGHT, "Requests in flight per upstream", false),
    (
        names::RETRIES,
        "Retries made on another upstream after an attempt on this one failed",
        true,
    ),
];

impl Collector {
    /// A collector over the groups `groups` lists at each scrape.
    pub fn new(groups: GroupsFn) -> Collector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                let mut labels = vec![
                    "site".to_string(),
                    "route".to_string(),
                    "upstream".to_string(),
                ];
                if *name == names::REQUESTS {
                    labels.push("status".into());
                }
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels,
                    Default::default(),
                )
                .expect("valid metric")
            })
            .collect();
        Collector { groups, descs }
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

impl prometheus::core::Collector for Collector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = now_ms();
        let mut series: [Vec<Metric>; 4] = Default::default();
        for g in (self.groups)() {
            {
                for up in g.upstreams.iter() {
                    let base = || {
                        vec![
                            label("site", &g.site),
                            label("route", &g.route),
                            label("upstream", &up.label),
                        ]
                    };
                    let gauge = |labels: Vec<LabelPair>, v: f64| {
                        let mut m = Metric::from_label(labels);
                        let mut x = Gauge::default();
                        x.set_value(v);
                        m.set_gauge(x);
                        m
                    };
                    let counter = |labels: Vec<LabelPair>, v: u64| {
                        let mut m = Metric::from_label(labels);
                        let mut x = Counter::default();
                        x.set_value(v as f64);
                        m.set_counter(x);
                        m
                    };
                    let st = &up.state;
                    series[0].push(gauge(base(), if st.in_service(now) { 1.0 } else { 0.0 }));
                    for (i, class) in CLASSES.iter().enumerate() {
                        let mut l = base();
                        l.push(label("status", class));
                        series[1].push(counter(l, st.counts[i].load(Ordering::Relaxed)));
                    }
                    series[2].push(gauge(base(), st.in_flight.load(Ordering::Relaxed) as f64));
                    series[3].push(counter(base(), st.retried.load(Ordering::Relaxed)));
                }
            }
        }
        FAMILIES
            .iter()
            .zip(series)
            .map(|((name, help, is_counter), metrics)| {
                let mut f = MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(if *is_counter {
                    MetricType::COUNTER
                } else {
                    MetricType::GAUGE
                });
                f.set_metric(metrics);
                f
            })
            .collect()
    }
}
