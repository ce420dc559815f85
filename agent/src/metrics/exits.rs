//! `podscope_process_exits_total{namespace,pod,container,outcome}`: every
//! process exit in a pod, by how it ended. Host processes have no series.

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{MetricsOptions, SeriesBook};
use crate::probes::exits::Exit;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Exit status 0.
    ok,
    /// A non-zero exit status.
    error,
    /// Ended by a signal.
    signaled,
}

impl Outcome {
    pub fn of(e: &Exit) -> Outcome {
        match (e.signal.is_some(), e.exit_code) {
            (true, _) => Outcome::signaled,
            (false, Some(0)) => Outcome::ok,
            _ => Outcome::error,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub outcome: Outcome,
}

pub struct ExitMetrics {
    exits: Family<ExitLabels, Counter>,
    book: SeriesBook<ExitLabels>,
}

impl ExitMetrics {
    pub fn register(registry: &mut Registry, opts: &MetricsOptions) -> ExitMetrics {
        let exits = Family::<ExitLabels, Counter>::default();
        registry.register(
            "process_exits",
            "Process exits in pods (every process, not only PID 1), by outcome: ok (status 0), error (non-zero status), signaled",
            exits.clone(),
        );
        ExitMetrics {
            exits,
            book: SeriesBook::new(&opts.budget, opts.series_retention),
        }
    }

    pub fn observe(&mut self, e: &Exit, now: Instant, refused: &Counter) {
        // A thread's end is not a process's.
        if e.thread {
            return;
        }
        let (Some(namespace), Some(pod)) = (&e.pod.namespace, &e.pod.pod) else {
            return;
        };
        let labels = ExitLabels {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: e.pod.container.clone().unwrap_or_default(),
            outcome: Outcome::of(e),
        };
        if self.book.admit(&labels, now, refused) {
            self.exits.get_or_create(&labels).inc();
        }
    }

    pub fn gc(&mut self, now: Instant, gone: impl Fn(&str, &str) -> bool) {
        for labels in self.book.expire(now, |l| gone(&l.namespace, &l.pod)) {
            self.exits.remove(&labels);
        }
    }

    pub fn series(&self) -> usize {
        self.book.len()
    }
}
