//! Prometheus metrics (names are public contracts: dashboards and alerts use
//! them). The agent-wide series live here; each family's per-workload series
//! live in a module of their own ([`exits`]) and register themselves.
//!
//! Cardinality is bounded: per-workload series go through a [`SeriesBook`];
//! every book of every family draws on one [`SeriesBudget`] (`--max-series`
//! is the cap of them all together), refusals are counted, and the series
//! of pods that are gone are dropped once the retention has passed.
//!
//! The metrics read nothing of the driver's internals: events arrive from
//! its broadcast ([`Metrics::observe`]), counters from the status it
//! publishes ([`Metrics::update`]).

pub mod exits;
pub mod journal;
pub mod net;
pub mod terminations;
pub mod throttle;

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    deps::DependencyReport, driver::DriverStatus, events::Event, probes::Attachment,
    throttle::ThrottleBook,
};

/// The cap on per-workload series shared by every [`SeriesBook`].
#[derive(Clone, Debug)]
pub struct SeriesBudget {
    used: Arc<AtomicUsize>,
    cap: usize,
}

impl SeriesBudget {
    pub fn new(cap: usize) -> SeriesBudget {
        SeriesBudget {
            used: Arc::new(AtomicUsize::new(0)),
            cap,
        }
    }

    /// Takes one series from the budget; false when it is spent.
    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.cap).then_some(u + 1)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// A kernel family's name (static: counting an event allocates nothing).
    pub source: &'static str,
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

/// Per-workload series with a retention, drawing on a shared budget.
pub struct SeriesBook<L> {
    last_update: HashMap<L, Instant>,
    budget: SeriesBudget,
    retention: Duration,
}

impl<L: Clone + Hash + Eq> SeriesBook<L> {
    pub fn new(budget: &SeriesBudget, retention: Duration) -> Self {
        SeriesBook {
            last_update: HashMap::new(),
            budget: budget.clone(),
            retention,
        }
    }

    /// Whether `labels` may be updated: a new series beyond the cap is refused.
    pub fn admit(&mut self, labels: &L, now: Instant, refused: &Counter) -> bool {
        if let Some(t) = self.last_update.get_mut(labels) {
            *t = now;
            return true;
        }
        if !self.budget.take() {
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
        self.budget.give_back(expired.len());
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
    /// `--max-series`, shared by every family.
    pub budget: SeriesBudget,
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
    runtime_missing: Counter,
    runtime_missing_seen: u64,
    net: net::NetMetrics,
    throttle: throttle::ThrottleMetrics,
    /// Kernel counters already exported, to add only the difference.
    lost_seen: HashMap<&'static str, u64>,
    cri_errors_seen: u64,
    degraded: Family<DependencyLabels, Gauge>,
    degradations: Family<DependencyLabels, Counter>,
    episodes_seen: HashMap<&'static str, u64>,
    names_waited_out: Counter,
    names_waited_seen: u64,
    drain_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The agent's own live heap and resident size (see [`crate::heap`]).
    heap: Gauge,
    resident: Gauge,
    tables: Family<TableLabels, Gauge>,
    /// Connections the HTTP listener closed at once (at its connection cap).
    pub http_refused: Counter,
    /// Events a consumer inside the agent (metrics, records) missed.
    pub consumer_lagged: Family<ConsumerLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    pub dependency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
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
            "Per-workload series not created because --max-series (shared by every family) was reached",
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
        let runtime_missing = Counter::default();
        registry.register(
            "terminations_without_runtime_report",
            "Termination records written without the runtime's report of the end (what kubectl shows), because no CRI socket is known, or CRI was down, slow or failed to answer",
            runtime_missing.clone(),
        );
        let degraded = Family::<DependencyLabels, Gauge>::default();
        registry.register(
            "dependency_degraded",
            "1 while an outside dependency (cri, kube_proxy_rules, cgroupfs, journal) is slow or gone and its feature degraded; the probes keep draining",
            degraded.clone(),
        );
        let degradations = Family::<DependencyLabels, Counter>::default();
        registry.register(
            "dependency_degradations",
            "Times an outside dependency became slow or unavailable",
            degradations.clone(),
        );
        let names_waited_out = Counter::default();
        registry.register(
            "events_unnamed_after_wait",
            "Events of containers that CRI had not named within the wait, published with pod uid and container id only",
            names_waited_out.clone(),
        );
        let drain_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "drain_lag_seconds",
            "Longest time an event waited between its drain and its publication over the last second (waiting for names)",
            drain_lag.clone(),
        );
        let heap = Gauge::default();
        let resident = Gauge::default();
        if crate::heap::live_bytes().is_some() {
            registry.register(
                "agent_heap_bytes",
                "Bytes the agent holds allocated on its heap: flat when nothing leaks, whatever its resident size does",
                heap.clone(),
            );
        }
        registry.register(
            "agent_resident_memory_bytes",
            "The agent's resident memory (VmRSS): its heap, code, the kernel's ring buffers it maps, and free pages its allocator keeps",
            resident.clone(),
        );
        let tables = Family::<TableLabels, Gauge>::default();
        registry.register(
            "agent_table_entries",
            "Entries in each table the agent keeps in memory (attribution, forensics, series books): every one is bounded, and the one that keeps growing on a node is where its memory goes",
            tables.clone(),
        );
        let http_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at once because the listener had its maximum open",
            http_refused.clone(),
        );
        let consumer_lagged = Family::<ConsumerLabels, Counter>::default();
        registry.register(
            "consumer_events_missed",
            "Events a consumer inside the agent (metrics, records) missed because it fell behind the drain",
            consumer_lagged.clone(),
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
            runtime_missing,
            runtime_missing_seen: 0,
            net,
            throttle,
            lost_seen: HashMap::new(),
            cri_errors_seen: 0,
            degraded,
            degradations,
            episodes_seen: HashMap::new(),
            names_waited_out,
            names_waited_seen: 0,
            drain_lag,
            heap,
            resident,
            tables,
            http_refused,
            consumer_lagged,
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
        let refused = &self.series_refused;
        match event {
            Event::Exit(e) => self.exits.observe(e, now, refused),
            Event::Signal(_) => {}
            Event::Oom(o) => self.terminations.oom(o, now, refused),
            Event::Termination(t) => self.terminations.termination(t, now, refused),
            Event::BackgroundDeath(d) => self.terminations.background_death(d, now, refused),
            Event::Respawn(r) => self.terminations.respawn(r, now, refused),
            Event::Connection(c) => self.net.observe_connection(c, now, refused),
            Event::Drop(d) => self.net.observe_drop(d, now, refused),
            Event::Throttle(t) => self.throttle.observe(t, now, refused),
        }
        self.events
            .get_or_create(&SourceLabels {
                source: event.source(),
            })
            .inc();
    }

    /// Kernel and attribution counters from the driver's status, about
    /// once a second.
    pub fn update(
        &mut self,
        status: &DriverStatus,
        throttle: Option<&ThrottleBook>,
        rule_errors: u64,
    ) {
        for s in &status.sources {
            let seen = self.lost_seen.entry(s.source).or_default();
            if s.stats.lost > *seen {
                self.lost
                    .get_or_create(&SourceLabels { source: s.source })
                    .inc_by(s.stats.lost - *seen);
                *seen = s.stats.lost;
            } else {
                // Create the series at 0 so that alerts on it can fire from the start.
                let _ = self.lost.get_or_create(&SourceLabels { source: s.source });
            }
        }
        let unknown = status.forensics.unknown_main;
        self.unexplained
            .inc_by(unknown.saturating_sub(self.unexplained_seen));
        self.unexplained_seen = unknown;
        let missing = status.forensics.runtime.missing;
        self.runtime_missing
            .inc_by(missing.saturating_sub(self.runtime_missing_seen));
        self.runtime_missing_seen = missing;
        let rs = status.resolver;
        if rs.cri_errors > self.cri_errors_seen {
            self.cri_errors.inc_by(rs.cri_errors - self.cri_errors_seen);
            self.cri_errors_seen = rs.cri_errors;
        }
        self.tracked_containers
            .set(status.tracked_containers as i64);
        self.names_waited_out.inc_by(
            status
                .names_waited_out
                .saturating_sub(self.names_waited_seen),
        );
        self.names_waited_seen = status.names_waited_out;
        self.drain_lag.set(status.drain_lag.as_secs_f64());
        if let Some(book) = throttle {
            self.throttle
                .update(book, Instant::now(), &self.series_refused);
        }
        self.net.update_rules(rule_errors);
    }

    /// The agent's own memory, sampled once a second: its heap, its
    /// resident size, and the tables that hold what it keeps.
    pub fn update_process(&mut self, status: &DriverStatus, throttle: Option<&ThrottleBook>) {
        if let Some(b) = crate::heap::live_bytes() {
            self.heap.set(b as i64);
        }
        self.resident
            .set((crate::kernel::resident_kib().0 * 1024) as i64);
        let books = [
            ("series_process_exits", self.exits.series()),
            ("series_terminations", self.terminations.series()),
            ("series_net", self.net.series()),
            ("series_throttle", self.throttle.series()),
        ];
        let (throttled, later) = throttle.map_or((0, 0), ThrottleBook::entries);
        let own = [
            ("throttle_containers", throttled),
            ("throttle_later", later),
        ];
        for (table, n) in status.tables.iter().copied().chain(books).chain(own) {
            self.tables
                .get_or_create(&TableLabels { table })
                .set(n as i64);
        }
    }

    /// Which dependencies are degraded, and how often they were.
    pub fn update_health(&mut self, report: &[DependencyReport]) {
        for d in report {
            let labels = DependencyLabels {
                dependency: d.dependency.name().to_string(),
            };
            self.degraded
                .get_or_create(&labels)
                .set(i64::from(d.state == "degraded"));
            let seen = self.episodes_seen.entry(d.dependency.name()).or_default();
            let c = self.degradations.get_or_create(&labels);
            c.inc_by(d.episodes.saturating_sub(*seen));
            *seen = d.episodes;
        }
    }

    pub fn update_journal(&mut self, j: &crate::forensics::store::JournalStats) {
        self.journal.update(j);
    }

    /// The in-memory termination store: (estimated bytes, items evicted).
    pub fn update_store(&mut self, (bytes, evicted): (usize, u64)) {
        self.journal.update_store(bytes, evicted);
    }

    /// Drops the series of pods gone for longer than the retention (a pod
    /// is gone when the runtime no longer lists it).
    pub fn gc(&mut self, status: &DriverStatus, now: Instant) {
        let live = status.names.live_pods();
        let gone = |ns: &str, pod: &str| !live.contains(&(ns.to_string(), pod.to_string()));
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
        let mut b = SeriesBook::<u32>::new(&SeriesBudget::new(2), Duration::from_secs(600));
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

    #[test]
    fn every_book_draws_on_one_budget() {
        let refused = Counter::default();
        let budget = SeriesBudget::new(3);
        let mut a = SeriesBook::<u32>::new(&budget, Duration::from_secs(600));
        let mut b = SeriesBook::<&str>::new(&budget, Duration::from_secs(600));
        let t0 = Instant::now();
        assert!(a.admit(&1, t0, &refused) && a.admit(&2, t0, &refused));
        assert!(b.admit(&"x", t0, &refused));
        assert!(
            !b.admit(&"y", t0, &refused),
            "the cap is shared, not per book"
        );
        assert_eq!((budget.used(), refused.get()), (3, 1));
        a.expire(t0 + Duration::from_secs(601), |_| true);
        assert_eq!(budget.used(), 1);
        assert!(b.admit(&"y", t0, &refused));
    }
}
