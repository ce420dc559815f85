//! Why the runtime stopped a container: the trigger behind a stop (a failed
//! liveness or startup probe, the pod's deletion or eviction, a restart of
//! the container, the runtime or node going away), and the preStop hook's
//! timeline, both from what the kernel shows.
//!
//! - Exec probes and exec hooks are processes the runtime execs into the
//!   container: their parent is a runtime process (containerd-shim, runc,
//!   conmon…), not a process of the container. Their exits carry the
//!   command, start, end and exit status.
//! - kubelet runs the preStop hook, then asks the runtime to stop the
//!   container (SIGTERM), so the hook is the runtime exec that was running
//!   at, or ended just before, the SIGTERM (matched against kubelet's
//!   `io.kubernetes.container.preStopHandler` annotation when CRI gave it).
//! - A deletion stops the pod's sandbox right after its containers; a
//!   restart starts a new container in the same pod. Neither is known at the
//!   moment of the exit, so a record the probes do not explain waits up to
//!   [`TRIGGER_WAIT`] for what happens next, and says so when it is written
//!   without it.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::record::{opt_time, time};

/// How long a stop that the probes do not explain waits for the sandbox's
/// stop or a new container of the pod.
pub const TRIGGER_WAIT: Duration = Duration::from_secs(5);
/// A probe failure this long before the stop can still have caused it
/// (kubelet acts on the failure threshold at once; periods are seconds).
const PROBE_WINDOW_NS: u64 = 30_000_000_000;
/// A hook that ended this long before SIGTERM is still the preStop hook when
/// no annotation names it (kubelet calls StopContainer right after it).
const HOOK_GAP_NS: u64 = 500_000_000;
/// A grace this much shorter than the pod's means an override (eviction).
const GRACE_OVERRIDE_MARGIN: f64 = 1.5;

/// Why the runtime stopped the container, as a closed set (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    LivenessProbe,
    StartupProbe,
    PodDeleted,
    Evicted,
    ContainerRestart,
    RuntimeOrNode,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::LivenessProbe => "liveness_probe",
            Trigger::StartupProbe => "startup_probe",
            Trigger::PodDeleted => "pod_deleted",
            Trigger::Evicted => "evicted",
            Trigger::ContainerRestart => "container_restart",
            Trigger::RuntimeOrNode => "runtime_or_node",
        }
    }

    pub const ALL: [Trigger; 6] = [
        Trigger::LivenessProbe,
        Trigger::StartupProbe,
        Trigger::PodDeleted,
        Trigger::Evicted,
        Trigger::ContainerRestart,
        Trigger::RuntimeOrNode,
    ];
}

/// A process the runtime exec'd into the container (an exec probe or hook), as it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeExec {
    pub pid: u32,
    pub command: String,
    #[serde(with = "time")]
    pub started_at: SystemTime,
    pub duration_seconds: f64,
    pub exit_code: Option<u8>,
    pub signal: Option<String>,
    #[serde(skip)]
    pub start_boot_ns: u64,
    #[serde(skip)]
    pub end_boot_ns: u64,
}

impl RuntimeExec {
    pub fn failed(&self) -> bool {
        self.signal.is_some() || self.exit_code != Some(0)
    }
}

/// The trigger, its evidence, and whether it was seen or deduced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriggerInfo {
    pub trigger: Trigger,
    /// `observed`: the deciding events were seen; `inferred`: deduced from
    /// what was (and was not) seen.
    pub basis: Basis,
    /// One sentence: what decided it.
    pub evidence: String,
    /// The failing exec probe runs before the stop, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_failures: Vec<RuntimeExec>,
    /// The connections from the node to the pod's probed port before the
    /// stop (httpGet and tcpSocket probes), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_connections: Vec<super::netprobe::ProbeConnection>,
    /// False when the record was written after [`TRIGGER_WAIT`] without the
    /// evidence that decides (the sandbox's fate or a new container).
    pub decided: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    Observed,
    Inferred,
}

/// The preStop hook, as the kernel saw it (exec hooks only: an httpGet or
/// sleep hook runs in kubelet and shows only as a delay before SIGTERM).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PreStopTimeline {
    pub ran: bool,
    pub command: Option<String>,
    pub pid: Option<u32>,
    #[serde(with = "opt_time", default)]
    pub started_at: Option<SystemTime>,
    pub duration_seconds: Option<f64>,
    pub exit_code: Option<u8>,
    pub signal: Option<String>,
    /// Still running when SIGTERM came: the grace period ran out first.
    pub cut_short_by_grace: bool,
    /// From the hook's end to SIGTERM (negative: SIGTERM came while it ran).
    pub gap_to_sigterm_seconds: Option<f64>,
    /// What kubelet's annotation says the hook is, when CRI gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<String>,
}

/// kubelet's `io.kubernetes.container.preStopHandler` annotation, reduced
/// to what the kernel can match: the exec command, or the kind of hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeclaredHook {
    Exec(Vec<String>),
    /// httpGet or sleep: run by kubelet, invisible in the container.
    Other(String),
    None,
}

impl DeclaredHook {
    /// From the annotation's JSON (absent: no hook).
    pub fn parse(annotation: Option<&str>) -> DeclaredHook {
        let Some(json) = annotation else {
            return DeclaredHook::None;
        };
        let v: serde_json::Value = match serde_json::from_str(json) {
            Ok(v) => v,
            Err(_) => return DeclaredHook::Other("unreadable".into()),
        };
        if let Some(cmd) = v.pointer("/exec/command").and_then(|c| c.as_array()) {
            return DeclaredHook::Exec(
                cmd.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect(),
            );
        }
        let kind = ["httpGet", "sleep", "tcpSocket"]
            .into_iter()
            .find(|k| v.get(k).is_some())
            .unwrap_or("unknown");
        DeclaredHook::Other(kind.to_string())
    }

    fn describe(&self) -> Option<String> {
        match self {
            DeclaredHook::Exec(c) => Some(format!("exec {}", c.join(" "))),
            DeclaredHook::Other(k) => Some(k.clone()),
            DeclaredHook::None => None,
        }
    }

    /// Whether an exec'd process is this hook (the kernel's comm is the
    /// program's base name, cut to 15 bytes).
    /// A shell may exec the last command of `sh -c "…"`, so any word of
    /// the command line counts, not only the program.
    fn matches(&self, comm: &str) -> bool {
        let DeclaredHook::Exec(c) = self else {
            return false;
        };
        !comm.is_empty()
            && c.iter()
                .flat_map(|arg| arg.split(|ch: char| ch.is_whitespace() || ch == ';' || ch == '&'))
                .any(|word| {
                    let base = word.rsplit('/').next().unwrap_or(word);
                    base.len() >= comm.len() && base.starts_with(comm)
                })
    }
}

/// Finds the preStop hook among the runtime's execs: the one running at
/// the stop (`stop_ns`: SIGTERM, or the exit without one) or ended just
/// before it. Returns its index and timeline.
pub fn pre_stop(
    execs: &[RuntimeExec],
    stop_ns: u64,
    sigterm_seen: bool,
    declared: &DeclaredHook,
) -> (Option<usize>, PreStopTimeline) {
    let mut t = PreStopTimeline {
        declared: declared.describe(),
        ..Default::default()
    };
    if matches!(declared, DeclaredHook::Other(_)) {
        return (None, t);
    }
    let unknown = *declared == DeclaredHook::None;
    let found = execs
        .iter()
        .enumerate()
        .filter(|(_, e)| e.start_boot_ns <= stop_ns)
        .filter(|(_, e)| {
            let near = e.end_boot_ns + HOOK_GAP_NS >= stop_ns;
            // Without the annotation, only a hook that ran into or right up
            // to the stop counts (a probe ends well before kubelet acts).
            if unknown {
                near && (e.end_boot_ns >= stop_ns || stop_ns - e.end_boot_ns < 100_000_000)
            } else {
                near && declared.matches(&e.command)
            }
        })
        .max_by_key(|(_, e)| e.start_boot_ns);
    // No annotation and no hook-like exec: say nothing was seen.
    let Some((i, e)) = found else {
        return (None, t);
    };
    if unknown && !sigterm_seen {
        return (None, t);
    }
    t.ran = true;
    t.command = Some(e.command.clone());
    t.pid = Some(e.pid);
    t.started_at = Some(e.started_at);
    t.duration_seconds = Some(e.duration_seconds);
    t.exit_code = e.exit_code;
    t.signal = e.signal.clone();
    if sigterm_seen {
        t.cut_short_by_grace = e.end_boot_ns > stop_ns;
        t.gap_to_sigterm_seconds = Some((stop_ns as f64 - e.end_boot_ns as f64) / 1e9);
    }
    (Some(i), t)
}

/// A stop explained by failing exec probes: the same command failing up to
/// the stop. A command that never succeeded in this container is taken
/// for a startup probe (inferred), one that succeeded before for a liveness
/// probe (observed: success, then the failures, then the stop).
pub fn probe_trigger(
    execs: &[RuntimeExec],
    skip: Option<usize>,
    stop_ns: u64,
) -> Option<TriggerInfo> {
    let runs: Vec<&RuntimeExec> = execs
        .iter()
        .enumerate()
        .filter(|(i, e)| Some(*i) != skip && e.end_boot_ns <= stop_ns)
        .map(|(_, e)| e)
        .collect();
    let last = *runs.last()?;
    if !last.failed() || stop_ns.saturating_sub(last.end_boot_ns) > PROBE_WINDOW_NS {
        return None;
    }
    let same: Vec<&RuntimeExec> = runs
        .iter()
        .copied()
        .filter(|e| e.command == last.command)
        .collect();
    let trailing: Vec<RuntimeExec> = same
        .iter()
        .rev()
        .take_while(|e| e.failed())
        .map(|e| (*e).clone())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let succeeded_before = same.iter().any(|e| !e.failed());
    let n = trailing.len();
    let outcome = match (&last.exit_code, &last.signal) {
        (_, Some(s)) => format!("killed by {s}"),
        (Some(c), None) => format!("exit {c}"),
        (None, None) => "failed".into(),
    };
    let gap = (stop_ns - last.end_boot_ns) as f64 / 1e9;
    let (trigger, basis, what) = if succeeded_before {
        (Trigger::LivenessProbe, Basis::Observed, "liveness")
    } else {
        (
            Trigger::StartupProbe,
            Basis::Inferred,
            "startup (it never succeeded)",
        )
    };
    Some(TriggerInfo {
        trigger,
        basis,
        evidence: format!(
            "the {what} probe `{}` exec'd by the runtime failed {n} time{} in a row (last: {outcome}), {gap:.1} s before the stop",
            last.command,
            if n == 1 { "" } else { "s" }
        ),
        probe_failures: trailing,
        probe_connections: vec![],
        decided: true,
    })
}

/// What the pod did after the stop, for the records that wait.
#[derive(Clone, Debug)]
pub enum Aftermath {
    /// The sandbox ended `after` the container's stop (negative: before it).
    SandboxEnded {
        after_seconds: f64,
    },
    NewContainer {
        name: Option<String>,
    },
    /// Nothing decided within [`TRIGGER_WAIT`].
    Nothing,
}

/// What the stop looked like, for deciding between deletion and eviction.
pub struct StopShape {
    /// SIGTERM → SIGKILL, when it came to SIGKILL.
    pub killed_after: Option<f64>,
    /// The pod's terminationGracePeriodSeconds (kubelet's annotation).
    pub pod_grace: Option<i64>,
    pub pre_stop_ran: bool,
    pub pre_stop_declared: bool,
    pub pre_stop_seconds: f64,
}

/// The trigger of a runtime stop that no probe explains.
pub fn from_aftermath(a: &Aftermath, shape: &StopShape) -> TriggerInfo {
    match a {
        Aftermath::SandboxEnded { after_seconds } if *after_seconds < 0.0 => TriggerInfo {
            trigger: Trigger::RuntimeOrNode,
            basis: Basis::Inferred,
            evidence: format!(
                "the pod's sandbox ended {:.1} s before the container was stopped",
                -after_seconds
            ),
            probe_failures: vec![],
            probe_connections: vec![],
            decided: true,
        },
        Aftermath::SandboxEnded { after_seconds } => {
            // Eviction: kubelet kills with a grace override (0 → 2 s for a
            // hard eviction) and skips the preStop hook.
            let used = shape.killed_after.map(|k| k + shape.pre_stop_seconds);
            let overridden = match (used, shape.pod_grace) {
                (Some(u), Some(g)) => u + GRACE_OVERRIDE_MARGIN < g as f64,
                _ => false,
            };
            let skipped_hook = shape.pre_stop_declared && !shape.pre_stop_ran;
            if overridden || skipped_hook {
                let why = match (overridden, used, shape.pod_grace) {
                    (true, Some(u), Some(g)) => format!(
                        "SIGKILL came {u:.1} s after SIGTERM where the pod's grace period is {g} s"
                    ),
                    _ => "its preStop hook was skipped".to_string(),
                };
                TriggerInfo {
                    trigger: Trigger::Evicted,
                    basis: Basis::Inferred,
                    evidence: format!(
                        "the pod's sandbox stopped {after_seconds:.1} s later and {why}: a deletion with a grace override, as kubelet's eviction does"
                    ),
                    probe_failures: vec![],
                    probe_connections: vec![],
                    decided: true,
                }
            } else {
                TriggerInfo {
                    trigger: Trigger::PodDeleted,
                    basis: Basis::Observed,
                    evidence: format!(
                        "the pod's sandbox was stopped {after_seconds:.1} s after the container"
                    ),
                    probe_failures: vec![],
                    probe_connections: vec![],
                    decided: true,
                }
            }
        }
        Aftermath::NewContainer { name } => TriggerInfo {
            trigger: Trigger::ContainerRestart,
            basis: Basis::Observed,
            evidence: format!(
                "a new container{} started in the same pod, with no failing exec probe before the stop",
                name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
            ),
            probe_failures: vec![],
            probe_connections: vec![],
            decided: true,
        },
        Aftermath::Nothing => TriggerInfo {
            trigger: Trigger::ContainerRestart,
            basis: Basis::Inferred,
            evidence: format!(
                "the runtime stopped it while the sandbox lived on, and no failing exec probe was seen; nothing else happened to the pod within {} s (an httpGet or tcpSocket probe is not seen here)",
                TRIGGER_WAIT.as_secs()
            ),
            probe_failures: vec![],
            probe_connections: vec![],
            decided: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn exec(command: &str, start_s: f64, end_s: f64, code: u8) -> RuntimeExec {
        RuntimeExec {
            pid: 100,
            command: command.into(),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(start_s),
            duration_seconds: end_s - start_s,
            exit_code: Some(code),
            signal: None,
            start_boot_ns: (start_s * 1e9) as u64,
            end_boot_ns: (end_s * 1e9) as u64,
        }
    }

    #[test]
    fn a_liveness_probe_that_starts_failing() {
        let execs = [
            exec("cat", 1.0, 1.01, 0),
            exec("cat", 2.0, 2.01, 0),
            exec("cat", 3.0, 3.01, 1),
            exec("cat", 4.0, 4.01, 1),
            exec("sh", 4.5, 5.5, 0),
        ];
        let declared = DeclaredHook::parse(Some(r#"{"exec":{"command":["sh","-c","sleep 1"]}}"#));
        let (i, hook) = pre_stop(&execs, 55 * S / 10 + 1_000_000, true, &declared);
        assert_eq!(i, Some(4));
        assert!(hook.ran && !hook.cut_short_by_grace, "{hook:?}");
        assert_eq!(hook.command.as_deref(), Some("sh"));
        assert!(hook.gap_to_sigterm_seconds.unwrap() < 0.01);
        let t = probe_trigger(&execs, i, 55 * S / 10).expect("a probe trigger");
        assert_eq!(
            (t.trigger, t.basis),
            (Trigger::LivenessProbe, Basis::Observed)
        );
        assert_eq!(t.probe_failures.len(), 2);
        assert!(
            t.evidence.contains("`cat`") && t.evidence.contains("2 times"),
            "{}",
            t.evidence
        );
    }

    #[test]
    fn never_succeeding_is_a_startup_probe_and_old_failures_are_not_a_cause() {
        let execs = [exec("check", 1.0, 1.1, 1), exec("check", 2.0, 2.1, 1)];
        let t = probe_trigger(&execs, None, 3 * S).unwrap();
        assert_eq!(
            (t.trigger, t.basis),
            (Trigger::StartupProbe, Basis::Inferred)
        );
        // A failure long before the stop, followed by a success: no probe trigger.
        let execs = [exec("check", 1.0, 1.1, 1), exec("check", 2.0, 2.1, 0)];
        assert!(probe_trigger(&execs, None, 3 * S).is_none());
        assert!(probe_trigger(&[exec("check", 1.0, 1.1, 1)], None, 100 * S).is_none());
    }

    #[test]
    fn a_hook_cut_short_by_the_grace_period() {
        let execs = [exec("sleep", 1.0, 3.2, 137)];
        let declared = DeclaredHook::parse(Some(r#"{"exec":{"command":["/bin/sleep","30"]}}"#));
        let (_, hook) = pre_stop(&execs, 3 * S, true, &declared);
        assert!(hook.ran && hook.cut_short_by_grace, "{hook:?}");
        assert!(hook.gap_to_sigterm_seconds.unwrap() < 0.0);
        // A sleep hook runs in kubelet: nothing to match.
        let (i, hook) = pre_stop(
            &execs,
            3 * S,
            true,
            &DeclaredHook::parse(Some(r#"{"sleep":{"seconds":3}}"#)),
        );
        assert_eq!(
            (i, hook.ran, hook.declared.as_deref()),
            (None, false, Some("sleep"))
        );
        // Without the annotation, a probe that ended well before is no hook.
        let (i, _) = pre_stop(
            &[exec("cat", 1.0, 1.1, 1)],
            2 * S,
            true,
            &DeclaredHook::None,
        );
        assert_eq!(i, None);
    }

    #[test]
    fn deletion_eviction_restart_and_undecided() {
        let shape = |killed_after, ran| StopShape {
            killed_after,
            pod_grace: Some(30),
            pre_stop_ran: ran,
            pre_stop_declared: true,
            pre_stop_seconds: 0.0,
        };
        let sandbox = Aftermath::SandboxEnded { after_seconds: 0.2 };
        let t = from_aftermath(&sandbox, &shape(None, true));
        assert_eq!((t.trigger, t.basis), (Trigger::PodDeleted, Basis::Observed));
        let t = from_aftermath(&sandbox, &shape(Some(2.0), false));
        assert_eq!(t.trigger, Trigger::Evicted);
        assert!(
            t.evidence.contains("2.0 s after SIGTERM") && t.evidence.contains("30 s"),
            "{}",
            t.evidence
        );
        let t = from_aftermath(
            &Aftermath::SandboxEnded {
                after_seconds: -1.0,
            },
            &shape(None, true),
        );
        assert_eq!(t.trigger, Trigger::RuntimeOrNode);
        let t = from_aftermath(
            &Aftermath::NewContainer {
                name: Some("app".into()),
            },
            &shape(None, true),
        );
        assert_eq!((t.trigger, t.decided), (Trigger::ContainerRestart, true));
        let t = from_aftermath(&Aftermath::Nothing, &shape(None, true));
        assert_eq!(
            (t.trigger, t.basis, t.decided),
            (Trigger::ContainerRestart, Basis::Inferred, false)
        );
    }
}
