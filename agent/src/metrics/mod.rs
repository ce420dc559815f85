//! Prometheus metrics (names are public contracts: dashboards and alerts use
//! them). The agent-wide series live here; each family's per-workload series
//! live in a module of their own ([`exits`]) and register themselves.
//!
//! Cardinality is bounded: per-workload series go through a [`SeriesBook`]
//! that caps how many exist (counting refusals) and drops the series of pods
//! that are gone once the retention has passed.

pub mod exits;
pub mod journal;
pub mod net;
pub mod terminations;
pub mod throttle;

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    events::Event,
    pipeline::{Pipeline, SourceStats},
    probes::Attachment,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
    pub attach_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub kernel: String,
    pub node: String,
}

/// Per-workload series with a cap and a retention.
pub struct SeriesBook<L> {
    last_update: HashMap<L, Instant>,
    cap: usize,
    retention: Duration,
}

impl<L: Clone + Hash + Eq> SeriesBook<L> {
    pub fn new(cap: usize, retention: Duration) -> Self {
        SeriesBook {
            last_update: HashMap::new(),
            cap,
            retention,
        }
    }

    /// Whether `labels` may be updated: a new series beyond the cap is refused.
    pub fn admit(&mut self, labels: &L, now: Instant, refused: &Counter) -> bool {
        if let Some(t) = self.last_update.get_mut(labels) {
            *t = now;
            return true;
        }
        if self.last_update.len() >= self.cap {
            refused.inc();
            return false;
        }
        self.last_update.insert(labels.clone(), now);
        true
    }

    /// The series to drop: not updated for the retention, and `gone` says
    /// their pod no longer exists.
    pub fn expire(&mut self, now: Instant, gone: impl Fn(&L) -> bool) -> Vec<L> {
        let retention = self.retention;
        let expired: Vec<L> = self
            .last_update
            .iter()
            .filter(|(l, t)| now.duration_since(**t) >= retention && gone(l))
            .map(|(l, _)| l.clone())
            .collect();
        for l in &expired {
            self.last_update.remove(l);
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.last_update.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_update.is_empty()
    }
}

#[derive(Clone, Debug)]
pub struct MetricsOptions {
    pub max_series: usize,
    pub series_retention: Duration,
    /// The node's name, on `podscope_build_info`.
    pub node_name: String,
}

pub struct Metrics {
    pub registry: Registry,
    events: Family<SourceLabels, Counter>,
    lost: Family<SourceLabels, Counter>,
    probe_attached: Family<ProbeLabels, Gauge>,
    tracked_containers: Gauge,
    series_refused: Counter,
    cri_errors: Counter,
    /// Events a slow `/api/v1/events` reader missed.
    pub stream_dropped: Counter,
    exits: exits::ExitMetrics,
    terminations: terminations::TerminationMetrics,
    journal: journal::JournalMetrics,
    unexplained: Counter,
    unexplained_seen: u64,
    net: net::NetMetrics,
    throttle: throttle::ThrottleMetrics,
    /// Kernel counters already exported, to add only the difference.
    lost_seen: HashMap<&'static str, u64>,
    cri_errors_seen: u64,
}

impl Metrics {
    pub fn new(opts: &MetricsOptions) -> Metrics {
        let mut registry = Registry::with_prefix("podscope");
        let events = Family::<SourceLabels, Counter>::default();
        registry.register(
            "events",
            "Events delivered, by source (event family)",
            events.clone(),
        );
        let lost = Family::<SourceLabels, Counter>::default();
        registry.register(
            "events_lost",
            "Events lost in the kernel because a ring buffer was full, by source",
            lost.clone(),
        );
        let probe_attached = Family::<ProbeLabels, Gauge>::default();
        registry.register(
            "probe_attached",
            "1 when the probe is attached (with the hook type used), 0 when it could not be",
            probe_attached.clone(),
        );
        let tracked_containers = Gauge::default();
        registry.register(
            "tracked_containers",
            "Containers the agent can name (known to CRI and alive)",
            tracked_containers.clone(),
        );
        let series_refused = Counter::default();
        registry.register(
            "series_refused",
            "Per-workload series not created because --max-series was reached",
            series_refused.clone(),
        );
        let cri_errors = Counter::default();
        registry.register(
            "cri_errors",
            "Failed calls to the container runtime's CRI socket",
            cri_errors.clone(),
        );
        let stream_dropped = Counter::default();
        registry.register(
            "stream_events_dropped",
            "Events an /api/v1/events reader missed because it read too slowly",
            stream_dropped.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "The agent's version and the node's kernel",
            build.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                node: opts.node_name.clone(),
            })
            .set(1);
        let journal = journal::JournalMetrics::register(&mut registry);
        let unexplained = Counter::default();
        registry.register(
            "container_ends_unexplained",
            "Containers that ended without a termination record (their main process was not known, or its exit event was lost)",
            unexplained.clone(),
        );
        let exits = exits::ExitMetrics::register(&mut registry, opts);
        let terminations = terminations::TerminationMetrics::register(&mut registry, opts);
        let net = net::NetMetrics::register(&mut registry, opts);
        let throttle = throttle::ThrottleMetrics::register(&mut registry, opts);
        Metrics {
            registry,
            events,
            lost,
            probe_attached,
            tracked_containers,
            series_refused,
            cri_errors,
            stream_dropped,
            exits,
            terminations,
            journal,
            unexplained,
            unexplained_seen: 0,
            net,
            throttle,
            lost_seen: HashMap::new(),
            cri_errors_seen: 0,
        }
    }

    pub fn set_probes(&self, attached: &[Attachment], unavailable: &[(&'static str, String)]) {
        for a in attached {
            self.probe_attached
                .get_or_create(&ProbeLabels {
                    probe: a.family.to_string(),
                    attach_type: a.attach_type.to_string(),
                })
                .set(1);
        }
        for (family, _) in unavailable {
            self.probe_attached
                .get_or_create(&ProbeLabels {
                    probe: family.to_string(),
                    attach_type: "none".into(),
                })
                .set(0);
        }
    }

    /// One delivered event.
    pub fn observe(&mut self, event: &Event, now: Instant) {
        let source = match event {
            Event::Exit(e) => {
                self.exits.observe(e, now, &self.series_refused);
                crate::probes::exits::FAMILY
            }
            Event::Signal(_) => crate::probes::signals::FAMILY,
            Event::Oom(o) => {
                self.terminations.oom(o, now, &self.series_refused);
                crate::probes::oom::FAMILY
            }
            Event::Termination(t) => {
                self.terminations.termination(t, now, &self.series_refused);
                "terminations"
            }
            Event::BackgroundDeath(d) => {
                self.terminations
                    .background_death(d, now, &self.series_refused);
                "background_deaths"
            }
            Event::Connection(c) => {
                self.net.observe_connection(c, now, &self.series_refused);
                crate::probes::net::FAMILY_CONNS
            }
            Event::Drop(d) => {
                self.net.observe_drop(d, now, &self.series_refused);
                crate::probes::net::FAMILY_DROPS
            }
            Event::Throttle(t) => {
                self.throttle.observe(t, now, &self.series_refused);
                crate::probes::throttle::FAMILY
            }
        };
        self.events
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    /// Kernel and attribution counters, about once a second.
    pub fn update(&mut self, sources: &[SourceStats], pipeline: &Pipeline) {
        for s in sources {
            let seen = self.lost_seen.entry(s.source).or_default();
            if s.stats.lost > *seen {
                self.lost
                    .get_or_create(&SourceLabels {
                        source: s.source.to_string(),
                    })
                    .inc_by(s.stats.lost - *seen);
                *seen = s.stats.lost;
            } else {
                // Create the series at 0 so that alerts on it can fire from the start.
                let _ = self.lost.get_or_create(&SourceLabels {
                    source: s.source.to_string(),
                });
            }
        }
        let unknown = pipeline.forensics_stats().unknown_main;
        self.unexplained
            .inc_by(unknown.saturating_sub(self.unexplained_seen));
        self.unexplained_seen = unknown;
        let rs = pipeline.resolver_stats();
        if rs.cri_errors > self.cri_errors_seen {
            self.cri_errors.inc_by(rs.cri_errors - self.cri_errors_seen);
            self.cri_errors_seen = rs.cri_errors;
        }
        self.tracked_containers
            .set(pipeline.resolver().live_containers() as i64);
        self.throttle.update(
            pipeline.throttle_book(),
            Instant::now(),
            &self.series_refused,
        );
        self.net.update_rules(pipeline.rule_errors());
    }

    pub fn update_journal(&mut self, j: &crate::forensics::store::JournalStats) {
        self.journal.update(j);
    }

    /// Drops the series of pods gone for longer than the retention.
    pub fn gc(&mut self, pipeline: &Pipeline, now: Instant) {
        let gone = |ns: &str, pod: &str| !pipeline.resolver().pod_alive(ns, pod);
        self.exits.gc(now, gone);
        self.terminations.gc(now, gone);
        self.net.gc(now, gone);
        self.throttle.gc(now, gone);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn series(&self) -> usize {
        self.exits.series()
            + self.terminations.series()
            + self.net.series()
            + self.throttle.series()
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition,
/// for clients that do not ask for OpenMetrics (curl, promtool, older
/// scrapers): counter families are named with their `_total` suffix there,
/// and there is no `# EOF` or `# UNIT`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total() {
        let om = "# HELP podscope_events Events.\n# TYPE podscope_events counter\npodscope_events_total{source=\"exits\"} 3\n# HELP podscope_tracked_containers Containers.\n# TYPE podscope_tracked_containers gauge\npodscope_tracked_containers 2\n# EOF\n";
        let text = to_prometheus_text(om);
        assert!(text.contains("# HELP podscope_events_total Events."));
        assert!(text.contains("# TYPE podscope_events_total counter"));
        assert!(text.contains("# TYPE podscope_tracked_containers gauge"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn the_book_caps_and_expires_series() {
        let refused = Counter::default();
        let mut b = SeriesBook::<u32>::new(2, Duration::from_secs(600));
        let t0 = Instant::now();
        assert!(b.admit(&1, t0, &refused));
        assert!(b.admit(&2, t0, &refused));
        assert!(!b.admit(&3, t0, &refused), "over the cap");
        assert!(b.admit(&1, t0, &refused), "existing series still update");
        assert_eq!(refused.get(), 1);
        // Not yet: within the retention.
        assert!(b.expire(t0 + Duration::from_secs(60), |_| true).is_empty());
        // Series 2's pod is alive: kept; series 1's is gone: dropped.
        let gone = b.expire(t0 + Duration::from_secs(601), |l| *l == 1);
        assert_eq!(gone, vec![1]);
        assert_eq!(b.len(), 1);
        assert!(b.admit(&3, t0, &refused), "room again");
    }
}
