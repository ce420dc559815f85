//! Per-container CPU throttling: what the sched_switch probe measured
//! (throttles, their durations, grouped into periods) beside what the
//! kernel's own `cpu.stat` counts, for `podscope top`, the metrics and the
//! self-check between the two.
//!
//! Both sides are counted from the moment podscope first sees a container
//! (the `cpu.stat` counters as a difference from that first reading), so
//! they cover the same window. The probe attributes a throttle to the
//! container whose task stalled, whichever level's quota ran out; `cpu.stat`
//! of the container counts only its own quota's throttles, so a pod-level
//! quota shows up as a difference (and in the events' `ancestor` flag).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    kernel::{
        cgroups::CgroupLayout,
        cpu_stat::{CpuFiles, CpuStat},
    },
    metadata::PodIdentity,
    probes::throttle::Throttle,
};

/// Upper bounds (seconds) of the throttle-duration histogram: fine below
/// 10 ms (a burst that overran its quota at the end of a period) and around
/// 50–100 ms (a container starved for most of a 100 ms period).
pub const DURATION_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

/// What the probe measured for one container.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Measured {
    /// Periods with at least one throttle: throttles on several CPUs that
    /// overlap in time are one period, as `nr_throttled` counts them.
    pub periods: u64,
    /// Throttles (one per CPU run queue).
    pub throttles: u64,
    /// Summed over CPUs, like `cpu.stat`'s throttled time.
    pub throttled_ns: u64,
    /// Throttles whose quota was an ancestor's (e.g. the pod's).
    pub ancestor_throttles: u64,
    /// Counts per [`DURATION_BUCKETS`] bound (not cumulative), the last one above all.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Boot-clock end of the current period's throttles.
    #[serde(skip)]
    period_end_ns: u64,
}

impl Measured {
    /// Counts one throttle. `period` is the cgroup's enforcement period
    /// when known: a throttle longer than it means the period timer fired
    /// late, and the kernel then counts every period it overran as
    /// throttled (`nr_throttled += overrun`), so the periods it spans are
    /// counted here too (seen on an emulated arm64 guest: 4 of 33).
    pub fn add(&mut self, t: &Throttle, period: Option<Duration>) {
        let end = t.start_boot_ns.saturating_add(t.duration_ns);
        let period_ns = period.map_or(0, |p| p.as_nanos() as u64);
        if t.start_boot_ns >= self.period_end_ns {
            self.periods += if period_ns == 0 {
                1
            } else {
                t.duration_ns.div_ceil(period_ns).max(1)
            };
        } else if period_ns > 0 && end > self.period_end_ns {
            // Overlaps this period's throttles on other CPUs and outlasts
            // them by whole periods.
            self.periods += (end - self.period_end_ns) / period_ns;
        }
        self.period_end_ns = self.period_end_ns.max(end);
        self.throttles += 1;
        self.throttled_ns += t.duration_ns;
        self.ancestor_throttles += u64::from(t.ancestor);
        let secs = t.duration_ns as f64 / 1e9;
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
    }
}

/// One container's line.
#[derive(Clone, Debug, Serialize)]
pub struct ContainerThrottle {
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub pod: PodIdentity,
    /// Measured by the probe since podscope first saw the container.
    pub measured: Measured,
    /// `cpu.stat` and the usage over the same window (None: unreadable,
    /// e.g. gone); the limit is the one in force now.
    pub kernel: Option<CpuStat>,
    /// measured − kernel throttled periods: the self-check (0 is agreement).
    pub periods_difference: Option<i64>,
    /// How long podscope has watched it.
    pub window_seconds: f64,
}

struct Entry {
    pod: PodIdentity,
    measured: Measured,
    baseline: Option<CpuStat>,
    current: Option<CpuStat>,
    since: Instant,
    alive: bool,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            pod: PodIdentity::default(),
            measured: Measured::default(),
            baseline: None,
            current: None,
            since: Instant::now(),
            alive: true,
        }
    }
}

/// One container's `cpu.stat` reading.
pub struct CpuReading {
    pub cgroup_id: u64,
    pub pod: PodIdentity,
    /// None: no cpu controller files for it; Err: the read failed (e.g. gone).
    pub stat: Option<Result<CpuStat, ()>>,
}

/// One round of readings, and how long it took.
pub struct CpuReadings {
    /// Boot-clock time the round began.
    pub started_boot_ns: u64,
    pub containers: Vec<CpuReading>,
    pub took: Duration,
}

/// Reads every listed container's `cpu.stat` and `cpu.max` (cgroupfs I/O:
/// never on the drain thread).
pub fn read_cpu_stats(
    layout: &CgroupLayout,
    containers: &[(u64, Arc<str>, PodIdentity)],
) -> CpuReadings {
    let t0 = Instant::now();
    let started_boot_ns = crate::kernel::clock::boot_ns();
    let containers = containers
        .iter()
        .map(|(id, path, pod)| CpuReading {
            cgroup_id: *id,
            pod: pod.clone(),
            stat: CpuFiles::locate(layout, path).map(|f| f.read().map_err(|_| ())),
        })
        .collect();
    CpuReadings {
        started_boot_ns,
        containers,
        took: t0.elapsed(),
    }
}

/// Every container's throttling, bounded by the containers that exist (and
/// those gone, until `forget_gone`).
pub struct ThrottleBook {
    layout: CgroupLayout,
    entries: HashMap<u64, Entry>,
    /// cpu.stat reads that failed (a container removed between listing and reading).
    pub read_errors: u64,
    /// Time spent reading cpu.stat files, for the benchmark.
    pub read_time: Duration,
    pub reads: u64,
    /// Throttle events the book's feeder missed (it fell behind the drain).
    pub missed: u64,
    /// The first refresh is done: containers seen after it are new, and
    /// their cpu.stat counts from 0 (their creation), like the probe.
    primed: bool,
    /// Boot-clock time of the first cpu.stat round.
    baseline_boot_ns: Option<u64>,
    /// Boot-clock time of the latest cpu.stat round.
    read_boot_ns: Option<u64>,
    /// Throttles that began after the latest round, counted at the next.
    later: Vec<Throttle>,
}

impl ThrottleBook {
    /// Containers whose throttling is kept, and throttles waiting for the next round.
    pub fn entries(&self) -> (usize, usize) {
        (self.entries.len(), self.later.len())
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    pub fn new(layout: CgroupLayout) -> ThrottleBook {
        ThrottleBook {
            layout,
            entries: HashMap::new(),
            read_errors: 0,
            read_time: Duration::ZERO,
            reads: 0,
            missed: 0,
            primed: false,
            baseline_boot_ns: None,
            read_boot_ns: None,
            later: vec![],
        }
    }

    /// A throttle the probe measured, attributed.
    pub fn observe(&mut self, t: &Throttle) {
        // Both sides count from the first cpu.stat round: a throttle that
        // began before it (the probe attaches first) is the kernel's
        // baseline's, not ours.
        let Some(read) = self.read_boot_ns else {
            return;
        };
        if self.baseline_boot_ns.is_none_or(|b| t.start_boot_ns < b) {
            return;
        }
        // Counted when cpu.stat has been read past it: both sides of the
        // self-check end at the same instant.
        if t.start_boot_ns >= read {
            self.later.push(t.clone());
            return;
        }
        self.count(t);
    }

    fn count(&mut self, t: &Throttle) {
        let e = self.entries.entry(t.cgroup_id).or_insert_with(Entry::new);
        if e.pod.is_host() && !t.pod.is_host() {
            e.pod = t.pod.clone();
        }
        let period = e.current.as_ref().map(|s| s.period);
        e.measured.add(t, period);
    }

    /// Re-reads `cpu.stat` for the containers that exist now: (v2 id, path,
    /// identity). Containers no longer listed keep their last figures until
    /// [`forget_gone`](Self::forget_gone). Reads cgroupfs: the agent does
    /// this off the drain thread ([`read_cpu_stats`] then [`Self::apply`]).
    pub fn refresh(&mut self, containers: &[(u64, Arc<str>, PodIdentity)]) {
        let readings = read_cpu_stats(&self.layout, containers);
        self.apply(readings);
    }

    /// Takes one round of [`read_cpu_stats`].
    pub fn apply(&mut self, readings: CpuReadings) {
        for e in self.entries.values_mut() {
            e.alive = false;
        }
        self.read_time += readings.took;
        for r in readings.containers {
            let e = self.entries.entry(r.cgroup_id).or_insert_with(Entry::new);
            e.alive = true;
            e.pod = r.pod;
            let Some(read) = r.stat else { continue };
            self.reads += 1;
            match read {
                Ok(s) => {
                    // Containers there at start count from the first
                    // reading; those created since, from their creation.
                    let primed = self.primed;
                    e.baseline
                        .get_or_insert_with(|| if primed { CpuStat::default() } else { s });
                    e.current = Some(s);
                }
                Err(()) => self.read_errors += 1,
            }
        }
        self.primed = true;
        self.baseline_boot_ns
            .get_or_insert(readings.started_boot_ns);
        self.read_boot_ns = Some(readings.started_boot_ns);
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.later)
            .into_iter()
            .partition(|t| t.start_boot_ns < readings.started_boot_ns);
        self.later = later;
        for t in &now {
            self.count(t);
        }
    }

    /// Drops containers that are gone.
    pub fn forget_gone(&mut self) {
        self.entries.retain(|_, e| e.alive);
    }

    /// Every container, most throttled first (throttled time, then periods).
    pub fn snapshot(&self) -> Vec<ContainerThrottle> {
        let mut out: Vec<ContainerThrottle> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.pod.is_host())
            .map(|(id, e)| {
                let kernel = match (e.baseline, e.current) {
                    (Some(b), Some(c)) => Some(CpuStat {
                        periods: c.periods.saturating_sub(b.periods),
                        throttled_periods: c.throttled_periods.saturating_sub(b.throttled_periods),
                        throttled_ns: c.throttled_ns.saturating_sub(b.throttled_ns),
                        usage_ns: c
                            .usage_ns
                            .map(|u| u.saturating_sub(b.usage_ns.unwrap_or(0))),
                        ..c
                    }),
                    _ => None,
                };
                ContainerThrottle {
                    cgroup_id: *id,
                    pod: e.pod.clone(),
                    measured: e.measured.clone(),
                    periods_difference: kernel
                        .map(|k| e.measured.periods as i64 - k.throttled_periods as i64),
                    kernel,
                    window_seconds: e.since.elapsed().as_secs_f64(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.measured
                .throttled_ns
                .cmp(&a.measured.throttled_ns)
                .then(b.measured.periods.cmp(&a.measured.periods))
                .then_with(|| a.pod.pod.cmp(&b.pod.pod))
                .then_with(|| a.pod.container.cmp(&b.pod.container))
        });
        out
    }
}

#[cfg(feature = "daemon")]
/// Feeds a shared book with the throttles the driver publishes; returns
/// the task. Misses (a book consumer that fell behind) are counted in the book.
pub fn spawn_observer(
    mut events: tokio::sync::broadcast::Receiver<Arc<crate::driver::Published>>,
    book: Arc<std::sync::Mutex<ThrottleBook>>,
) -> tokio::task::JoinHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(p) => {
                    if let crate::events::Event::Throttle(t) = &p.event
                        && let Ok(mut b) = book.lock()
                    {
                        b.observe(t);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    if let Ok(mut b) = book.lock() {
                        b.missed += n;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(start_ms: u64, dur_ms: u64) -> Throttle {
        Throttle {
            ts: std::time::SystemTime::UNIX_EPOCH,
            duration_ns: dur_ms * 1_000_000,
            cpu: 0,
            ancestor: false,
            cgroup_id: 1,
            start_boot_ns: start_ms * 1_000_000,
            pod: PodIdentity::default(),
        }
    }

    #[test]
    fn overlapping_throttles_on_several_cpus_are_one_period() {
        let mut m = Measured::default();
        // Period 1: CPU 0 at 20 ms, CPU 1 at 25 ms, both until 100 ms.
        let p = Some(Duration::from_millis(100));
        m.add(&throttle(20, 80), p);
        m.add(&throttle(25, 75), p);
        // Period 2: one CPU.
        m.add(&throttle(120, 80), p);
        assert_eq!((m.periods, m.throttles), (2, 3));
        assert_eq!(m.throttled_ns, 235_000_000);
    }

    /// A refill that came late: the kernel counts each period the timer
    /// overran as throttled, and so does the book.
    #[test]
    fn a_throttle_longer_than_its_period_counts_every_period_it_spans() {
        let mut m = Measured::default();
        let p = Some(Duration::from_millis(100));
        // 230 ms without a refill: three periods.
        m.add(&throttle(20, 230), p);
        // On another CPU, inside the same stretch and 120 ms past its end:
        // one more whole period.
        m.add(&throttle(200, 170), p);
        assert_eq!(m.periods, 4);
        // Without the period, one per stretch, as before.
        let mut n = Measured::default();
        n.add(&throttle(20, 230), None);
        assert_eq!(n.periods, 1);
    }

    #[test]
    fn the_histogram_separates_short_from_long() {
        let mut m = Measured::default();
        m.add(&throttle(0, 3), None);
        m.add(&throttle(100, 80), None);
        m.add(&throttle(1000, 2000), None);
        let short = DURATION_BUCKETS.iter().position(|b| *b == 0.005).unwrap();
        let long = DURATION_BUCKETS.iter().position(|b| *b == 0.1).unwrap();
        assert_eq!(m.buckets[short], 1);
        assert_eq!(m.buckets[long], 1);
        assert_eq!(m.buckets[DURATION_BUCKETS.len()], 1);
    }

    #[test]
    fn cpu_stat_is_counted_from_the_first_reading() {
        let dir = std::env::temp_dir().join(format!("podscope-book-{}", std::process::id()));
        let cg = dir.join("kubepods/podx/c1");
        std::fs::create_dir_all(&cg).unwrap();
        let write = |n: u64| {
            std::fs::write(
                cg.join("cpu.stat"),
                format!("usage_usec 5\nnr_periods {n}\nnr_throttled {n}\nthrottled_usec 0\n"),
            )
            .unwrap()
        };
        write(10);
        let mut book = ThrottleBook::new(CgroupLayout::V2 { root: dir.clone() });
        let pod = PodIdentity {
            pod_uid: Some("x".into()),
            ..Default::default()
        };
        let list = vec![(1u64, Arc::<str>::from("/kubepods/podx/c1"), pod.clone())];
        book.refresh(&list);
        write(13);
        book.refresh(&list);
        // A container created after the first refresh counts from 0.
        let later = vec![(2u64, Arc::<str>::from("/kubepods/podx/c1"), pod)];
        book.refresh(&later);
        let snap = book.snapshot();
        let c2 = snap.iter().find(|c| c.cgroup_id == 2).unwrap();
        assert_eq!(c2.kernel.unwrap().throttled_periods, 13);
        // One before the baseline (not counted), three after it.
        // Rounded up: after the baseline even within the same millisecond.
        let base_ms = crate::kernel::clock::boot_ns() / 1_000_000 + 1;
        book.observe(&throttle(1, 80));
        for s in [0, 2, 4] {
            book.observe(&throttle(base_ms + s, 1));
        }
        // Counted once cpu.stat has been read past them.
        std::thread::sleep(std::time::Duration::from_millis(10));
        book.refresh(&list);
        let snap = book.snapshot();
        std::fs::remove_dir_all(&dir).unwrap();
        let c1 = snap.iter().find(|c| c.cgroup_id == 1).unwrap();
        assert_eq!(c1.kernel.unwrap().throttled_periods, 3);
        assert_eq!(c1.periods_difference, Some(0));
    }
}
