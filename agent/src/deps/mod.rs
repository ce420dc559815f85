//! The agent's slow dependencies, each on its own task with a deadline and
//! a bounded queue, so that none of them can stall the drain of the ring
//! buffers ([`crate::driver`]):
//!
//! - [`cri`]: the runtime's CRI socket (pod and container names, pod IPs);
//! - [`rules`]: kube-proxy's rules, read by a subprocess (Service names);
//! - [`cgroupfs`]: periodic cgroupfs scans (lost cgroup events corrected,
//!   containers found at start-up adopted) and `cpu.stat` reads (the
//!   throttling cross-check);
//! - the journal writer (`forensics::store`) and HTTP (`daemon::http`).
//!
//! When one is slow or gone only its feature degrades; [`Health`] records
//! it, logs once when it starts and once when it ends, and feeds `/readyz`,
//! `podscope doctor` and `podscope_dependency_degraded`.

pub mod cgroupfs;
pub mod cri;
pub mod rules;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Instant, SystemTime},
};

use crate::{
    driver::{Driver, DriverOptions, Input},
    families::Kernel,
    kernel::cgroups::CgroupLayout,
    throttle::ThrottleBook,
};

/// The dependency tasks of a running driver, and what consumers read of them.
pub struct Dependencies {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Every container's throttling (fed only when asked for).
    pub book: Arc<Mutex<ThrottleBook>>,
    /// Failed reads of kube-proxy's rules.
    pub rule_errors: Arc<AtomicU64>,
}

/// Starts the tasks that feed `driver`: CRI names (when a socket is
/// configured or found), kube-proxy's rules (when the packet probes are
/// attached), cgroupfs (always; `cpu.stat` into the throttle book when
/// `throttle_book`). Call it inside the async runtime.
pub fn spawn_all(
    driver: &Driver,
    opts: &DriverOptions,
    health: &Arc<Health>,
    rules: rules::RulesOptions,
    throttle_book: bool,
) -> Dependencies {
    let link = driver.link();
    let mut tasks = vec![];
    let l = link.clone();
    tasks.extend(cri::spawn(
        &opts.resolver,
        driver.names_wanted.clone(),
        health.clone(),
        move |names| {
            l.send(Input::Names(names));
        },
    ));
    let rule_errors = Arc::new(AtomicU64::new(0));
    let net_attached = driver
        .attachments
        .iter()
        .any(|a| a.family == Kernel::Netfilter.name() || a.family == Kernel::Drops.name());
    if net_attached {
        let l = link.clone();
        tasks.push(rules::spawn(
            rules,
            health.clone(),
            rule_errors.clone(),
            move |map| {
                l.send(Input::Services(map));
            },
        ));
    }
    let book = Arc::new(Mutex::new(ThrottleBook::new(CgroupLayout::current())));
    if throttle_book {
        tasks.push(crate::throttle::spawn_observer(
            link.subscribe(),
            book.clone(),
        ));
    }
    tasks.push(cgroupfs::spawn(
        Default::default(),
        link,
        throttle_book.then(|| book.clone()),
        health.clone(),
    ));
    Dependencies {
        tasks,
        book,
        rule_errors,
    }
}

impl Dependencies {
    pub fn abort(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

use serde::Serialize;

/// An outside dependency of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dependency {
    Cri,
    KubeProxyRules,
    Cgroupfs,
    Journal,
}

impl Dependency {
    pub const ALL: [Dependency; 4] = [
        Dependency::Cri,
        Dependency::KubeProxyRules,
        Dependency::Cgroupfs,
        Dependency::Journal,
    ];

    /// The label value in metrics and the name in `/readyz` and doctor.
    pub const fn name(self) -> &'static str {
        match self {
            Dependency::Cri => "cri",
            Dependency::KubeProxyRules => "kube_proxy_rules",
            Dependency::Cgroupfs => "cgroupfs",
            Dependency::Journal => "journal",
        }
    }

    /// What a user loses while it is degraded.
    pub const fn feature(self) -> &'static str {
        match self {
            Dependency::Cri => "pod and container names (events carry pod uids and container ids)",
            Dependency::KubeProxyRules => {
                "Service names of connections (connections and drops are still reported)"
            }
            Dependency::Cgroupfs => {
                "the cpu.stat cross-check of throttling and the correction of lost cgroup events"
            }
            Dependency::Journal => {
                "durable termination records (records are kept in memory and served)"
            }
        }
    }
}

/// One dependency's state, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct DependencyReport {
    pub dependency: Dependency,
    /// `ok`, `degraded`, or `unused` (not configured, or not checked yet).
    pub state: &'static str,
    /// What is degraded while it is.
    pub feature: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::events::rfc3339_opt"
    )]
    pub since: Option<SystemTime>,
    /// How many times it became degraded since the agent started.
    pub episodes: u64,
}

#[derive(Default)]
struct State {
    used: bool,
    degraded: Option<(Instant, SystemTime, String)>,
    episodes: u64,
}

/// Which dependencies are degraded, since when, and why.
#[derive(Default)]
pub struct Health {
    states: Mutex<BTreeMap<Dependency, State>>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// The dependency works (again).
    pub fn ok(&self, d: Dependency) {
        let ended = {
            let Ok(mut states) = self.states.lock() else {
                return;
            };
            let s = states.entry(d).or_default();
            s.used = true;
            s.degraded.take()
        };
        if let Some((since, _, _)) = ended {
            tracing::info!(
                "{} recovered after {:.1} s: {} work again",
                d.name(),
                since.elapsed().as_secs_f64(),
                d.feature()
            );
        }
    }

    /// The dependency is slow or gone; logged when this starts, not again
    /// while it lasts (the reason is updated).
    pub fn degraded(&self, d: Dependency, reason: impl Into<String>) {
        let reason = reason.into();
        let started = {
            let Ok(mut states) = self.states.lock() else {
                return;
            };
            let s = states.entry(d).or_default();
            s.used = true;
            match &mut s.degraded {
                Some((_, _, r)) => {
                    *r = reason.clone();
                    false
                }
                None => {
                    s.degraded = Some((Instant::now(), SystemTime::now(), reason.clone()));
                    s.episodes += 1;
                    true
                }
            }
        };
        if started {
            tracing::warn!(
                "{} degraded ({reason}): without it, {}",
                d.name(),
                d.feature()
            );
        }
    }

    pub fn is_degraded(&self, d: Dependency) -> bool {
        self.states
            .lock()
            .is_ok_and(|s| s.get(&d).is_some_and(|s| s.degraded.is_some()))
    }

    /// Every dependency, in a fixed order.
    pub fn report(&self) -> Vec<DependencyReport> {
        let Ok(states) = self.states.lock() else {
            return vec![];
        };
        Dependency::ALL
            .iter()
            .map(|d| {
                let s = states.get(d);
                let degraded = s.and_then(|s| s.degraded.as_ref());
                DependencyReport {
                    dependency: *d,
                    state: match (s.is_some_and(|s| s.used), degraded) {
                        (_, Some(_)) => "degraded",
                        (true, None) => "ok",
                        (false, None) => "unused",
                    },
                    feature: d.feature(),
                    reason: degraded.map(|(_, _, r)| r.clone()),
                    since: degraded.map(|(_, t, _)| *t),
                    episodes: s.map_or(0, |s| s.episodes),
                }
            })
            .collect()
    }
}

/// Exponential back-off between retries of a failing dependency.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: std::time::Duration,
    pub max: std::time::Duration,
    current: Option<std::time::Duration>,
}

impl Backoff {
    pub const fn new(initial: std::time::Duration, max: std::time::Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: None,
        }
    }

    /// The wait before the next try after a failure.
    pub fn failed(&mut self) -> std::time::Duration {
        let next = match self.current {
            None => self.initial,
            Some(c) => (c * 2).min(self.max),
        };
        self.current = Some(next);
        next
    }

    pub fn succeeded(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn degradation_is_reported_once_per_episode() {
        let h = Health::new();
        assert!(h.report().iter().all(|r| r.state == "unused"));
        h.ok(Dependency::Cri);
        h.degraded(Dependency::Cri, "timed out");
        h.degraded(Dependency::Cri, "still timed out");
        let cri = h
            .report()
            .into_iter()
            .find(|r| r.dependency == Dependency::Cri)
            .unwrap();
        assert_eq!((cri.state, cri.episodes), ("degraded", 1));
        assert_eq!(cri.reason.as_deref(), Some("still timed out"));
        h.ok(Dependency::Cri);
        h.degraded(Dependency::Cri, "again");
        let cri = h
            .report()
            .into_iter()
            .find(|r| r.dependency == Dependency::Cri)
            .unwrap();
        assert_eq!(cri.episodes, 2);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(10));
        let waits: Vec<u64> = (0..5).map(|_| b.failed().as_secs()).collect();
        assert_eq!(waits, vec![2, 4, 8, 10, 10]);
        b.succeeded();
        assert_eq!(b.failed().as_secs(), 2);
    }
}
