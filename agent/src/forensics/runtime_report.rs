//! What Kubernetes shows beside what the kernel saw: the runtime's reason
//! and exit code for a container's end (CRI ContainerStatus, which kubelet
//! copies into the pod's status), set in the termination record, with a
//! sentence where the runtime's word misleads.
//!
//! The runtime learns of an OOM kill by watching the container's cgroup,
//! which it begins only once the process runs (containerd's shim adds the
//! cgroup to its OOM monitor after the start returns): a kill in the first
//! instant is reported as `Error`/137. And the cgroup's OOM event is the
//! container's, whichever process was killed (v1 and v2 alike, as the test
//! node shows on v1): a worker killed before the main
//! process exits on its own makes the container `OOMKilled`. The kernel's
//! view has neither blind spot.
//!
//! A record waits for the runtime's word a short while
//! ([`RUNTIME_WAIT`]): the runtime reports the end just after the exit the
//! kernel showed; without it (CRI down or slow) the record goes out alone.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::record::{DeathCause, Reason, TerminationRecord};
use crate::metadata::{Resolver, cri::RuntimeEnd};

/// How long a finished record waits for the runtime to report the end.
pub const RUNTIME_WAIT: Duration = Duration::from_secs(3);

/// How the runtime reported the container's end: what `kubectl` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeReport {
    pub exit_code: i32,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Where Kubernetes' word would mislead, why (None: it agrees or only
    /// says less, as `Error` for a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl RuntimeReport {
    pub fn new(record: &TerminationRecord, end: &RuntimeEnd) -> RuntimeReport {
        RuntimeReport {
            exit_code: end.exit_code,
            reason: end.reason.clone(),
            message: end.message.clone(),
            note: note(record, end),
        }
    }
}

/// The sentence for a runtime's report that contradicts the kernel's view.
pub fn note(r: &TerminationRecord, end: &RuntimeEnd) -> Option<String> {
    let shows = format!(
        "Kubernetes shows {} (exit code {})",
        if end.reason.is_empty() {
            "no reason"
        } else {
            &end.reason
        },
        end.exit_code
    );
    let runtime_oom = end.reason == "OOMKilled";
    match r.reason {
        Reason::OomKilled if !runtime_oom => {
            let ran = r
                .finished_at
                .duration_since(r.started_at)
                .unwrap_or_default()
                .as_secs_f64();
            let early = if ran < 1.0 {
                format!(
                    " (it came {ran:.2} s after the start: a runtime watches a container for OOM kills only once it runs)"
                )
            } else {
                String::new()
            };
            Some(format!(
                "{shows}: the runtime did not see the OOM kill{early}"
            ))
        }
        Reason::NodeOomKilled if !runtime_oom => Some(format!(
            "{shows}: the node ran out of memory, no limit of the container was hit, and the runtime did not see an OOM kill"
        )),
        Reason::OomKilled | Reason::NodeOomKilled => None,
        _ if runtime_oom => {
            let other = r
                .previous_deaths
                .iter()
                .rev()
                .find(|d| d.cause == DeathCause::OomKilled);
            // PID 1 returned its child's 128 + SIGKILL (a shell, tini): the
            // OOM kill did end the container, as the runtime says.
            if r.exit_code == 137 && r.signal.is_none() && other.is_some() {
                return None;
            }
            Some(match other {
                Some(d) => format!(
                    "{shows}, but the OOM killer ended {} (pid {}), another process of the container; the main process was not OOM-killed",
                    d.comm, d.pid
                ),
                None => format!(
                    "{shows}, but the main process was not OOM-killed (the runtime counts an OOM kill of any process of the container)"
                ),
            })
        }
        _ if i64::from(end.exit_code) != i64::from(r.exit_code) => Some(format!(
            "{shows}, but the main process (pid {}) ended with {}",
            r.pid, r.exit_code
        )),
        _ => None,
    }
}

/// What the runtime's word on a container's end is, for a record queued
/// at `queued`.
enum Word<'a> {
    Reported(&'a RuntimeEnd),
    NotYet,
    /// CRI is off or down, its answer failed, the container exited before
    /// the first listing, or a listing made since does not know it (not a
    /// Kubernetes container, or already removed): waiting cannot help.
    WillNotCome,
}

fn word<'a>(resolver: &'a Resolver, id: &str, queued: Instant) -> Word<'a> {
    if let Some(end) = resolver.runtime_end(id) {
        return Word::Reported(end);
    }
    let names = resolver.names();
    let listed_since = names.listed_at.is_some_and(|t| t > queued);
    if resolver.names_unavailable()
        || names.no_ends.contains(id)
        || (listed_since && !names.containers.contains_key(id))
    {
        return Word::WillNotCome;
    }
    Word::NotYet
}

/// Records waiting for the runtime's report.
#[derive(Default)]
pub struct RuntimeReports {
    waiting: VecDeque<(Instant, Box<TerminationRecord>)>,
    /// Records that began waiting since the last [`RuntimeReports::began_waiting`].
    new_waiters: usize,
    pub stats: RuntimeReportStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RuntimeReportStats {
    /// Records written with the runtime's report.
    pub reported: u64,
    /// … of which the runtime's report contradicts the kernel's view.
    pub contradicted: u64,
    /// Records written without it (CRI down, slow, or not asked).
    pub missing: u64,
}

impl RuntimeReports {
    /// A finished record, to wait for the runtime's report.
    pub fn add(&mut self, record: Box<TerminationRecord>, now: Instant) {
        self.waiting.push_back((now + RUNTIME_WAIT, record));
        self.new_waiters += 1;
    }

    /// The records whose report came, or that waited long enough, in the
    /// order they were finished (a record still waiting holds back those
    /// after it: `why` and the journal read them in order).
    pub fn take(&mut self, resolver: &Resolver, now: Instant) -> Vec<Box<TerminationRecord>> {
        let mut out = vec![];
        while let Some((due, r)) = self.waiting.front() {
            let queued = due.checked_sub(RUNTIME_WAIT).unwrap_or(*due);
            let word = r
                .pod
                .container_id
                .as_deref()
                .map_or(Word::WillNotCome, |id| word(resolver, id, queued));
            let report = match word {
                Word::NotYet if now < *due => break,
                Word::Reported(end) => Some(RuntimeReport::new(r, end)),
                Word::NotYet | Word::WillNotCome => None,
            };
            let Some((_, mut r)) = self.waiting.pop_front() else {
                break;
            };
            match report {
                Some(report) => {
                    self.stats.reported += 1;
                    self.stats.contradicted += u64::from(report.note.is_some());
                    r.runtime_reported = Some(report);
                }
                None => self.stats.missing += 1,
            }
            out.push(r);
        }
        out
    }

    /// Whether records began waiting since the last call (then a listing
    /// is asked for: a runtime without an event stream lists only every
    /// few seconds).
    pub fn began_waiting(&mut self) -> bool {
        std::mem::take(&mut self.new_waiters) > 0
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::{
        forensics::{journal::tests::record, record::Death},
        metadata::{CriState, Names, ResolverOptions},
    };

    fn end(code: i32, reason: &str) -> RuntimeEnd {
        RuntimeEnd {
            exit_code: code,
            reason: reason.into(),
            message: String::new(),
        }
    }

    fn oom_record(ran: Duration) -> TerminationRecord {
        let mut r = record(1);
        r.reason = Reason::OomKilled;
        r.exit_code = 137;
        r.signal = Some("SIGKILL".into());
        r.started_at = r.finished_at - ran;
        r
    }

    /// The OOM kill in a container's first instant, which containerd's
    /// shim does not see: kubectl says Error/137, the record says why.
    #[test]
    fn an_oom_kill_the_runtime_missed_is_named() {
        let r = oom_record(Duration::from_millis(40));
        let n = note(&r, &end(137, "Error")).expect("a contradiction");
        assert!(
            n.starts_with("Kubernetes shows Error (exit code 137)"),
            "{n}"
        );
        assert!(n.contains("did not see the OOM kill"), "{n}");
        assert!(n.contains("0.04 s after the start"), "{n}");
        // Later in its life the timing is not the explanation.
        let n = note(&oom_record(Duration::from_secs(30)), &end(137, "Error")).unwrap();
        assert!(!n.contains("after the start"), "{n}");
        let mut node = oom_record(Duration::from_secs(30));
        node.reason = Reason::NodeOomKilled;
        let n = note(&node, &end(137, "Error")).unwrap();
        assert!(n.contains("the node ran out of memory"), "{n}");
    }

    /// An OOM-killed worker makes the whole container OOMKilled
    /// to the runtime, although its main process exited on its own.
    #[test]
    fn oomkilled_for_a_main_process_that_was_not_oom_killed_is_named() {
        let mut r = record(1);
        r.previous_deaths.push(Death {
            at: SystemTime::UNIX_EPOCH,
            pid: 42,
            comm: "worker".into(),
            cause: DeathCause::OomKilled,
            exit_code: None,
            signal: Some("SIGKILL".into()),
            sender: None,
        });
        let n = note(&r, &end(3, "OOMKilled")).expect("a contradiction");
        assert!(n.contains("the OOM killer ended worker (pid 42)"), "{n}");
        assert!(n.contains("the main process was not OOM-killed"), "{n}");
        // A shell returning its OOM-killed child's 128 + SIGKILL: the OOM
        // kill did end the container, as the runtime says.
        r.exit_code = 137;
        assert_eq!(note(&r, &end(137, "OOMKilled")), None);
        r.exit_code = 3;
        r.previous_deaths.clear();
        let n = note(&r, &end(3, "OOMKilled")).unwrap();
        assert!(n.contains("any process of the container"), "{n}");
    }

    /// Agreement, and a runtime that only says less (Error for a crash),
    /// are no contradiction; another exit code is.
    #[test]
    fn agreement_and_less_detail_are_not_contradictions() {
        assert_eq!(
            note(&oom_record(Duration::from_secs(1)), &end(137, "OOMKilled")),
            None
        );
        let mut crash = record(1);
        crash.reason = Reason::Crashed;
        crash.exit_code = 139;
        assert_eq!(note(&crash, &end(139, "Error")), None);
        assert_eq!(note(&record(1), &end(3, "Error")), None);
        let n = note(&record(1), &end(1, "Error")).expect("another exit code");
        assert!(n.contains("ended with 3"), "{n}");
    }

    fn resolver(ends: &[(&str, RuntimeEnd)]) -> Resolver {
        let mut r = Resolver::new(&ResolverOptions {
            use_cri: false,
            ..Default::default()
        });
        let mut names = Names {
            state: CriState::Up,
            ..Names::default()
        };
        for (id, e) in ends {
            names.ends.insert(id.to_string(), Arc::new(e.clone()));
        }
        r.set_names(Arc::new(names));
        r
    }

    /// A record waits for the runtime's word while CRI is up, in order:
    /// a later record whose report came does not overtake an earlier one.
    #[test]
    fn records_wait_for_the_report_in_order() {
        let (a, b) = (record(1), record(2));
        let (ida, idb) = (
            a.pod.container_id.as_deref().unwrap().to_string(),
            b.pod.container_id.as_deref().unwrap().to_string(),
        );
        let mut w = RuntimeReports::default();
        let t0 = Instant::now();
        w.add(Box::new(a), t0);
        w.add(Box::new(b), t0);
        assert!(w.began_waiting());
        assert!(!w.began_waiting());
        let only_b = resolver(&[(&idb, end(3, "Error"))]);
        assert!(w.take(&only_b, t0).is_empty(), "the first still waits");
        let both = resolver(&[(&ida, end(3, "Error")), (&idb, end(3, "Error"))]);
        let out = w.take(&both, t0);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].pid, 1);
        assert_eq!(
            out[1].runtime_reported.as_ref().map(|x| x.reason.as_str()),
            Some("Error")
        );
        assert_eq!(w.stats.reported, 2);
        assert!(w.is_empty());
    }

    /// No report within the wait, or CRI down: the record goes out alone,
    /// counted.
    #[test]
    fn without_a_report_the_record_goes_out_counted() {
        let mut w = RuntimeReports::default();
        let t0 = Instant::now();
        w.add(Box::new(record(1)), t0);
        let up = resolver(&[]);
        assert!(w.take(&up, t0 + RUNTIME_WAIT / 2).is_empty());
        let out = w.take(&up, t0 + RUNTIME_WAIT);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].runtime_reported, None);
        w.add(Box::new(record(2)), t0);
        let off = Resolver::new(&ResolverOptions {
            use_cri: false,
            ..Default::default()
        });
        assert_eq!(w.take(&off, t0).len(), 1, "CRI off: nothing to wait for");
        assert_eq!(w.stats.missing, 2);
    }

    /// A report that cannot come does not hold the record (nor those after
    /// it) for the whole wait: the end was not asked or failed, or a
    /// listing made since does not know the container.
    #[test]
    fn a_report_that_cannot_come_is_not_waited_for() {
        let r = record(1);
        let id = r.pod.container_id.as_deref().unwrap().to_string();
        let mut w = RuntimeReports::default();
        let t0 = Instant::now();
        w.add(Box::new(r.clone()), t0);
        let mut resolver = resolver(&[]);
        let mut names = Names {
            state: CriState::Up,
            ..Names::default()
        };
        names.no_ends.insert(id.clone());
        resolver.set_names(Arc::new(names));
        assert_eq!(w.take(&resolver, t0).len(), 1, "its end will not be asked");

        w.add(Box::new(r), t0);
        let listed_before = Names {
            state: CriState::Up,
            listed_at: Some(t0 - Duration::from_millis(10)),
            ..Names::default()
        };
        resolver.set_names(Arc::new(listed_before));
        assert!(
            w.take(&resolver, t0).is_empty(),
            "not listed since: it waits"
        );
        let listed_after = Names {
            state: CriState::Up,
            listed_at: Some(Instant::now() + Duration::from_millis(10)),
            ..Names::default()
        };
        resolver.set_names(Arc::new(listed_after));
        assert_eq!(
            w.take(&resolver, t0).len(),
            1,
            "a listing since does not know it"
        );
        assert_eq!(w.stats.missing, 2);
    }
}
