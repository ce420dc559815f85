//! Termination forensics' series, per namespace/pod/container:
//! - `podscope_container_terminations_total{…,reason}`
//! - `podscope_container_last_termination_timestamp_seconds{…,reason}`
//! - `podscope_container_restarts_total{…,trigger}`: why the runtime stopped
//!   the container (`liveness_probe`, `startup_probe`, `pod_deleted`,
//!   `evicted`, `container_restart`, `runtime_or_node`), or `none` when it
//!   ended on its own
//! - `podscope_oom_kills_total{…,scope}` (every OOM kill in a pod, PID 1 or not)
//! - `podscope_container_background_deaths_total{…,cause}`: processes other
//!   than PID 1 that were killed, crashed or OOM-killed while the container
//!   lived on — deaths Kubernetes never reports.
//! - `podscope_container_respawns_total{…,command}`: a command a process of
//!   the container (a supervisor, a shell loop) started again after it
//!   failed, while PID 1 lived — restarts Kubernetes never counts. `command`
//!   is the kernel's comm (15 bytes), at most 8 per container
//!   (`forensics::respawn::COMMANDS_KEPT`), under the shared series budget.
//! - `podscope_container_runtime_contradictions_total{…,reason,runtime_reason}`:
//!   terminations whose reason as the runtime reported it (what `kubectl`
//!   shows) contradicts the kernel's view: an OOM kill the runtime missed,
//!   `OOMKilled` for a container whose main process was not OOM-killed.

use std::{
    sync::Arc,
    time::{Instant, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{MetricsOptions, SeriesBook};
use crate::{
    forensics::{BackgroundDeath, record::TerminationRecord, respawn::RespawnReport},
    metadata::PodIdentity,
    probes::oom::OomKill,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContradictionLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub reason: String,
    pub runtime_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub container: Arc<str>,
    pub cause: String,
}

pub struct TerminationMetrics {
    terminations: Family<ReasonLabels, Counter>,
    last: Family<ReasonLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    ooms: Family<ScopeLabels, Counter>,
    deaths: Family<CauseLabels, Counter>,
    restarts: Family<TriggerLabels, Counter>,
    respawns: Family<CommandLabels, Counter>,
    contradictions: Family<ContradictionLabels, Counter>,
    contradicted: SeriesBook<ContradictionLabels>,
    commands: SeriesBook<CommandLabels>,
    reasons: SeriesBook<ReasonLabels>,
    triggers: SeriesBook<TriggerLabels>,
    scopes: SeriesBook<ScopeLabels>,
    causes: SeriesBook<CauseLabels>,
}

/// namespace, pod, container of a pod's event; None for the host's.
fn workload(p: &PodIdentity) -> Option<(Arc<str>, Arc<str>, Arc<str>)> {
    Some((
        p.namespace.clone()?,
        p.pod.clone()?,
        p.container.clone().unwrap_or_default(),
    ))
}

impl TerminationMetrics {
    pub fn register(registry: &mut Registry, opts: &MetricsOptions) -> TerminationMetrics {
        let terminations = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "container_terminations",
            "Container terminations (the main process ended), by podscope's reason: Completed, Error, OOMKilled, NodeOOMKilled, GracefulStop, KilledAfterGracePeriod, KilledBySignal, Crashed",
            terminations.clone(),
        );
        let last = Family::<ReasonLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "container_last_termination_timestamp_seconds",
            "When the container last ended for this reason (Unix time)",
            last.clone(),
        );
        let ooms = Family::<ScopeLabels, Counter>::default();
        registry.register(
            "oom_kills",
            "OOM kills of processes in pods, by the limit that was hit: container, pod, or node (no container or pod limit)",
            ooms.clone(),
        );
        let deaths = Family::<CauseLabels, Counter>::default();
        registry.register(
            "container_background_deaths",
            "Processes other than the container's main process that died while the container kept running, by cause: killed, crashed, oom_killed",
            deaths.clone(),
        );
        let restarts = Family::<TriggerLabels, Counter>::default();
        registry.register(
            "container_restarts",
            "Container stops by what made the runtime stop them: liveness_probe, startup_probe, pod_deleted, evicted, container_restart, runtime_or_node; none when the container ended on its own",
            restarts.clone(),
        );
        let respawns = Family::<CommandLabels, Counter>::default();
        registry.register(
            "container_respawns",
            "Commands a process of the container (a supervisor, a shell loop) started again after they failed, while the container's PID 1 lived: restarts Kubernetes does not count",
            respawns.clone(),
        );
        let contradictions = Family::<ContradictionLabels, Counter>::default();
        registry.register(
            "container_runtime_contradictions",
            "Container terminations whose reason as the runtime reported it (runtime_reason, what kubectl shows) contradicts the kernel's view (reason): an OOM kill the runtime did not see, or OOMKilled for a container whose main process was not OOM-killed",
            contradictions.clone(),
        );
        TerminationMetrics {
            respawns,
            contradictions,
            contradicted: SeriesBook::new(&opts.budget, opts.series_retention),
            commands: SeriesBook::new(&opts.budget, opts.series_retention),
            terminations,
            last,
            ooms,
            deaths,
            restarts,
            triggers: SeriesBook::new(&opts.budget, opts.series_retention),
            reasons: SeriesBook::new(&opts.budget, opts.series_retention),
            scopes: SeriesBook::new(&opts.budget, opts.series_retention),
            causes: SeriesBook::new(&opts.budget, opts.series_retention),
        }
    }

    pub fn termination(&mut self, r: &TerminationRecord, now: Instant, refused: &Counter) {
        let Some((namespace, pod, container)) = workload(&r.pod) else {
            return;
        };
        let by_trigger = TriggerLabels {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: container.clone(),
            trigger: r
                .trigger
                .as_ref()
                .map_or("none", |t| t.trigger.as_str())
                .to_string(),
        };
        if self.triggers.admit(&by_trigger, now, refused) {
            self.restarts.get_or_create(&by_trigger).inc();
        }
        if let Some(rt) = r.runtime_reported.as_ref().filter(|x| x.note.is_some()) {
            let labels = ContradictionLabels {
                namespace: namespace.clone(),
                pod: pod.clone(),
                container: container.clone(),
                reason: r.reason.as_str().to_string(),
                runtime_reason: rt.reason.clone(),
            };
            if self.contradicted.admit(&labels, now, refused) {
                self.contradictions.get_or_create(&labels).inc();
            }
        }
        let labels = ReasonLabels {
            namespace,
            pod,
            container,
            reason: r.reason.as_str().to_string(),
        };
        if self.reasons.admit(&labels, now, refused) {
            self.terminations.get_or_create(&labels).inc();
            let at = r
                .finished_at
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last.get_or_create(&labels).set(at);
        }
    }

    pub fn oom(&mut self, o: &OomKill, now: Instant, refused: &Counter) {
        let Some((namespace, pod, container)) = workload(&o.pod) else {
            return;
        };
        let labels = ScopeLabels {
            namespace,
            pod,
            container,
            scope: o
                .scope
                .as_ref()
                .map_or("node", |s| s.scope.as_str())
                .to_string(),
        };
        if self.scopes.admit(&labels, now, refused) {
            self.ooms.get_or_create(&labels).inc();
        }
    }

    pub fn background_death(&mut self, d: &BackgroundDeath, now: Instant, refused: &Counter) {
        let Some((namespace, pod, container)) = workload(&d.pod) else {
            return;
        };
        let labels = CauseLabels {
            namespace,
            pod,
            container,
            cause: d.death.cause.as_str().to_string(),
        };
        if self.causes.admit(&labels, now, refused) {
            self.deaths.get_or_create(&labels).inc();
        }
    }

    pub fn respawn(&mut self, r: &RespawnReport, now: Instant, refused: &Counter) {
        let Some((namespace, pod, container)) = workload(&r.pod) else {
            return;
        };
        let labels = CommandLabels {
            namespace,
            pod,
            container,
            command: r.respawn.command.clone(),
        };
        if self.commands.admit(&labels, now, refused) {
            self.respawns.get_or_create(&labels).inc();
        }
    }

    pub fn gc(&mut self, now: Instant, gone: impl Fn(&str, &str) -> bool) {
        for l in self.reasons.expire(now, |l| gone(&l.namespace, &l.pod)) {
            self.terminations.remove(&l);
            self.last.remove(&l);
        }
        for l in self.scopes.expire(now, |l| gone(&l.namespace, &l.pod)) {
            self.ooms.remove(&l);
        }
        for l in self.causes.expire(now, |l| gone(&l.namespace, &l.pod)) {
            self.deaths.remove(&l);
        }
        for l in self.triggers.expire(now, |l| gone(&l.namespace, &l.pod)) {
            self.restarts.remove(&l);
        }
        for l in self.commands.expire(now, |l| gone(&l.namespace, &l.pod)) {
            self.respawns.remove(&l);
        }
        for l in self
            .contradicted
            .expire(now, |l| gone(&l.namespace, &l.pod))
        {
            self.contradictions.remove(&l);
        }
    }

    pub fn series(&self) -> usize {
        self.reasons.len() * 2
            + self.scopes.len()
            + self.causes.len()
            + self.triggers.len()
            + self.commands.len()
            + self.contradicted.len()
    }
}
