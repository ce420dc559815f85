//! The termination record: one per container death, joining the exit, the
//! signals that led to it, their senders and any OOM kill into a reason and
//! a sentence a person on call understands in five seconds.

use std::{borrow::Cow, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    metadata::PodIdentity,
    probes::oom::{OomScope, ScopeReading, VictimMemory},
};

/// Why the container ended, in Kubernetes' vocabulary where it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The main process exited with code 0 on its own.
    Completed,
    /// The main process exited with a non-zero code on its own.
    Error,
    /// Killed by the OOM killer because the container's or the pod's limit was hit.
    #[serde(rename = "OOMKilled")]
    OomKilled,
    /// Killed by the OOM killer while no container or pod limit was hit.
    #[serde(rename = "NodeOOMKilled")]
    NodeOomKilled,
    /// Stopped by the runtime or kubelet: SIGTERM, then it ended in time.
    GracefulStop,
    /// SIGTERM from the runtime, then SIGKILL when the grace period ran out.
    KilledAfterGracePeriod,
    /// Killed by a signal somebody else (or itself) sent.
    KilledBySignal,
    /// A fault of its own: SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, or a core dump.
    Crashed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Completed => "Completed",
            Reason::Error => "Error",
            Reason::OomKilled => "OOMKilled",
            Reason::NodeOomKilled => "NodeOOMKilled",
            Reason::GracefulStop => "GracefulStop",
            Reason::KilledAfterGracePeriod => "KilledAfterGracePeriod",
            Reason::KilledBySignal => "KilledBySignal",
            Reason::Crashed => "Crashed",
        }
    }

    pub const ALL: [Reason; 8] = [
        Reason::Completed,
        Reason::Error,
        Reason::OomKilled,
        Reason::NodeOomKilled,
        Reason::GracefulStop,
        Reason::KilledAfterGracePeriod,
        Reason::KilledBySignal,
        Reason::Crashed,
    ];
}

/// Who sent a signal, as a closed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderKind {
    /// The container runtime (runc, crun, containerd-shim, conmon, …): a stop.
    Runtime,
    Kubelet,
    OomKiller,
    /// The process faulted (SIGSEGV, SIGBUS, …): the kernel raised it.
    KernelFault,
    /// The pid namespace's init ended and the kernel killed what was left.
    PidNamespaceTeardown,
    /// The kernel on its own behalf for another reason (e.g. an rlimit).
    Kernel,
    SameContainer,
    OtherContainer,
    HostProcess,
}

impl SenderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SenderKind::Runtime => "runtime",
            SenderKind::Kubelet => "kubelet",
            SenderKind::OomKiller => "oom_killer",
            SenderKind::KernelFault => "kernel_fault",
            SenderKind::PidNamespaceTeardown => "pid_namespace_teardown",
            SenderKind::Kernel => "kernel",
            SenderKind::SameContainer => "same_container",
            SenderKind::OtherContainer => "other_container",
            SenderKind::HostProcess => "host_process",
        }
    }

    /// A stop ordered by Kubernetes (through the runtime).
    pub fn is_stop(self) -> bool {
        matches!(self, SenderKind::Runtime | SenderKind::Kubelet)
    }
}

/// The sender of the signal that ended (or began ending) the container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sender {
    pub kind: SenderKind,
    pub pid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub container: Option<String>,
}

/// SIGTERM → SIGKILL, as the main process lived it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StopTimeline {
    #[serde(with = "opt_time", default)]
    pub sigterm_at: Option<SystemTime>,
    pub sigterm_sender: Option<SenderKind>,
    /// Whether the main process had a SIGTERM handler and the signal reached it
    /// (false: default action, ignored, or dropped because PID 1 has no handler).
    pub sigterm_handled: Option<bool>,
    /// The kernel discarded SIGTERM: the target is a PID namespace's init
    /// with no handler (SIG_DFL is ignored there), so it never saw it.
    #[serde(default)]
    pub sigterm_discarded: Option<bool>,
    #[serde(with = "opt_time", default)]
    pub sigkill_at: Option<SystemTime>,
    pub sigkill_sender: Option<SenderKind>,
    /// From SIGTERM to SIGKILL (the grace period used), or to the exit.
    pub grace_used_seconds: Option<f64>,
}

/// The OOM kill that ended the container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OomDetails {
    pub scope: OomScope,
    /// The cgroup whose limit was reached (relative path), if any.
    pub cgroup: Option<String>,
    pub victim_pid: u32,
    pub victim_comm: String,
    pub usage_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub victim_memory: Option<VictimMemory>,
}

impl OomDetails {
    pub fn new(
        victim_pid: u32,
        victim_comm: &str,
        scope: Option<&ScopeReading>,
        mem: Option<VictimMemory>,
    ) -> OomDetails {
        OomDetails {
            scope: scope.map_or(OomScope::Node, |s| s.scope),
            cgroup: scope.and_then(|s| s.cgroup.clone()),
            victim_pid,
            victim_comm: victim_comm.to_string(),
            usage_bytes: scope.and_then(|s| s.usage_bytes),
            limit_bytes: scope.and_then(|s| s.limit_bytes),
            victim_memory: mem,
        }
    }
}

/// Why a process other than the main one died.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathCause {
    OomKilled,
    Crashed,
    Killed,
    /// Exited with a non-zero code (kept in records; not counted as a death).
    Error,
}

impl DeathCause {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathCause::OomKilled => "oom_killed",
            DeathCause::Crashed => "crashed",
            DeathCause::Killed => "killed",
            DeathCause::Error => "error",
        }
    }
}

/// A process of the container that died while the container lived on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Death {
    #[serde(with = "time")]
    pub at: SystemTime,
    pub pid: u32,
    pub comm: String,
    pub cause: DeathCause,
    pub exit_code: Option<u8>,
    pub signal: Option<String>,
    pub sender: Option<Sender>,
}

/// One container death.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TerminationRecord {
    /// namespace, pod, pod_uid, container, container_id.
    #[serde(flatten)]
    pub pod: PodIdentity,
    pub restart_attempt: Option<u32>,
    #[serde(with = "time")]
    pub started_at: SystemTime,
    #[serde(with = "time")]
    pub finished_at: SystemTime,
    /// The main process.
    pub pid: u32,
    pub comm: String,
    /// As Kubernetes reports it: the exit status, or 128 + the signal.
    pub exit_code: u32,
    pub signal: Option<String>,
    pub core_dumped: bool,
    pub reason: Reason,
    pub explanation: String,
    pub sender: Option<Sender>,
    pub stop: StopTimeline,
    pub oom: Option<OomDetails>,
    /// The last deaths of other processes of the container, oldest first.
    pub previous_deaths: Vec<Death>,
    /// Why the runtime stopped it (None: it was not stopped by the runtime).
    #[serde(default)]
    pub trigger: Option<super::trigger::TriggerInfo>,
    /// The preStop hook of a runtime stop, as the kernel saw it.
    #[serde(default)]
    pub pre_stop: Option<super::trigger::PreStopTimeline>,
    /// New connections its pod received after SIGTERM (endpoint removal
    /// lagging behind termination), filled by the packet path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_connections: Option<crate::net::dying::LateConnections>,
    /// How the runtime reported the end (what `kubectl` shows), with a
    /// note where that contradicts the kernel's view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_reported: Option<super::runtime_report::RuntimeReport>,
    /// Init, app or ephemeral container, and how that is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_type: Option<super::role::ContainerType>,
    /// Commands that a process of the container kept restarting while PID 1
    /// lived (a supervisor, a shell loop), over the container's life.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub respawns: Vec<super::respawn::Respawn>,
}

/// The main process's end, as the exit event tells it.
pub struct MainExit<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub exit_code: Option<u8>,
    pub signal: Option<(u32, Cow<'static, str>)>,
    pub core_dumped: bool,
}

/// What the signals said, for the decision.
pub struct Evidence<'a> {
    pub fatal_sender: Option<&'a Sender>,
    pub fatal_was_fault: bool,
    pub oom: Option<&'a OomDetails>,
    pub stop: &'a StopTimeline,
}

/// Signals that mean the process broke on its own when they kill it.
fn crash_signal(sig: u32) -> bool {
    // SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS
    matches!(sig, 4 | 5 | 6 | 7 | 8 | 11 | 31)
}

/// The decision, in order of what explains the most.
pub fn decide(exit: &MainExit, ev: &Evidence) -> Reason {
    let sig = exit.signal.as_ref().map(|(n, _)| *n);
    let stopped = ev.stop.sigterm_sender.is_some_and(SenderKind::is_stop);
    match sig {
        Some(9) if ev.oom.is_some() => match ev.oom.map(|o| o.scope) {
            Some(OomScope::Node) => Reason::NodeOomKilled,
            _ => Reason::OomKilled,
        },
        Some(9) if stopped && ev.stop.sigkill_sender.is_some_and(SenderKind::is_stop) => {
            Reason::KilledAfterGracePeriod
        }
        Some(s) if exit.core_dumped || ev.fatal_was_fault || (crash_signal(s) && !stopped) => {
            // abort(), a fault, or a dump: the process broke. A crash signal
            // sent by another process is still a kill, unless it dumped core.
            match ev.fatal_sender.map(|s| s.kind) {
                Some(SenderKind::OtherContainer | SenderKind::HostProcess)
                    if !exit.core_dumped && !ev.fatal_was_fault =>
                {
                    Reason::KilledBySignal
                }
                _ => Reason::Crashed,
            }
        }
        Some(_) if stopped && ev.fatal_sender.is_none_or(|s| s.kind.is_stop()) => {
            Reason::GracefulStop
        }
        Some(_) => Reason::KilledBySignal,
        None if stopped => Reason::GracefulStop,
        None if exit.exit_code == Some(0) => Reason::Completed,
        None => Reason::Error,
    }
}

fn secs(d: f64) -> String {
    format!("{d:.1} s")
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn who(s: &Sender) -> String {
    let place = match (s.kind, &s.container, &s.pod) {
        (SenderKind::SameContainer, _, _) => " in the same container".to_string(),
        (SenderKind::OtherContainer, Some(c), Some(p)) => format!(" in container {c} of pod {p}"),
        (SenderKind::HostProcess, _, _) => " on the host".to_string(),
        _ => String::new(),
    };
    match s.kind {
        SenderKind::Runtime => format!("the runtime ({})", s.comm),
        SenderKind::Kubelet => "kubelet".to_string(),
        SenderKind::OomKiller => "the OOM killer".to_string(),
        SenderKind::KernelFault => "the kernel (a fault in the process)".to_string(),
        SenderKind::PidNamespaceTeardown => "the kernel (its pid namespace ended)".to_string(),
        SenderKind::Kernel => "the kernel".to_string(),
        _ => format!("{} (pid {}){place}", s.comm, s.pid),
    }
}

/// PID 1 returning 128 + N after a process of its container was killed by
/// signal N (a shell reporting its child's death): the chain in one sentence.
fn chain(exit: &MainExit, deaths: &[Death]) -> Option<String> {
    let code = exit.exit_code?;
    let signo = u32::from(code.checked_sub(128)?);
    let name = crate::signals::name(signo);
    let d = deaths
        .iter()
        .rev()
        .find(|d| d.signal.as_deref() == Some(&*name))?;
    let by = d
        .sender
        .as_ref()
        .map(|s| format!(" from {}", who(s)))
        .unwrap_or_default();
    Some(format!(
        "PID 1 ({}) exited with code {code} = 128 + {name}: it returned the status of {} (pid {}), which was killed by {name}{by}",
        exit.comm, d.comm, d.pid
    ))
}

/// The sentence for the record.
pub fn explain(exit: &MainExit, reason: Reason, ev: &Evidence, deaths: &[Death]) -> String {
    let main = format!("PID 1 ({})", exit.comm);
    let signame = exit
        .signal
        .as_ref()
        .map(|(_, n)| n.to_string())
        .unwrap_or_default();
    let mut s = match reason {
        Reason::Completed => format!("{main} exited with code 0"),
        Reason::Error => match chain(exit, deaths) {
            Some(sentence) => sentence,
            None => format!(
                "{main} exited with code {}",
                exit.exit_code.unwrap_or_default()
            ),
        },
        Reason::OomKilled | Reason::NodeOomKilled if ev.oom.is_none() => {
            format!("{main} was OOM-killed")
        }
        Reason::OomKilled | Reason::NodeOomKilled => {
            let Some(oom) = ev.oom else {
                return format!("{main} was OOM-killed");
            };
            let usage = match (oom.usage_bytes, oom.limit_bytes) {
                (Some(u), Some(l)) => format!(" ({} of {})", mib(u), mib(l)),
                (None, Some(l)) => format!(" ({})", mib(l)),
                _ => String::new(),
            };
            let what = match oom.scope {
                OomScope::Container => format!("the container reached its memory limit{usage}"),
                OomScope::Pod => format!("the pod reached its memory limit{usage}"),
                OomScope::Node => match &oom.cgroup {
                    Some(c) => format!("memory ran out above the pod, in {c}{usage}"),
                    None => "the node ran out of memory (no container or pod limit was reached)"
                        .to_string(),
                },
            };
            let victim = if oom.victim_pid == exit.pid {
                main.clone()
            } else {
                format!("{} (pid {})", oom.victim_comm, oom.victim_pid)
            };
            format!("OOM-killed: {what}; the kernel killed {victim}")
        }
        Reason::KilledAfterGracePeriod => {
            let grace = ev
                .stop
                .grace_used_seconds
                .map(secs)
                .unwrap_or_else(|| "?".into());
            let by = ev.stop.sigkill_sender.map_or("the runtime", |k| {
                if k == SenderKind::Kubelet {
                    "kubelet"
                } else {
                    "the runtime"
                }
            });
            let why = match (ev.stop.sigterm_handled, ev.stop.sigterm_discarded) {
                (Some(true), _) => format!("{main} handled SIGTERM but had not exited"),
                (_, Some(true)) => format!(
                    "the kernel discarded SIGTERM because {main} is its PID namespace's init and has no handler for it"
                ),
                _ => format!("{main} did not handle SIGTERM"),
            };
            format!("killed by {by} with SIGKILL {grace} after SIGTERM: {why}")
        }
        Reason::GracefulStop => {
            let after = ev
                .stop
                .grace_used_seconds
                .map(|g| format!(" {} after SIGTERM", secs(g)))
                .unwrap_or_default();
            match &exit.signal {
                None => format!(
                    "stopped by the runtime: {main} handled SIGTERM and exited with code {}{after}",
                    exit.exit_code.unwrap_or_default()
                ),
                Some(_) => format!("stopped by the runtime: {main} ended by {signame}{after}"),
            }
        }
        Reason::KilledBySignal => match ev.fatal_sender {
            Some(sender) => format!("{main} was killed with {signame} by {}", who(sender)),
            None => format!("{main} was killed with {signame} (sender not seen)"),
        },
        Reason::Crashed => {
            let core = if exit.core_dumped {
                " (core dumped)"
            } else {
                ""
            };
            let how = if ev.fatal_was_fault {
                ": a fault in the process itself"
            } else if exit.signal.as_ref().is_some_and(|(n, _)| *n == 6) {
                ": it aborted itself"
            } else {
                ""
            };
            format!("{main} crashed with {signame}{core}{how}")
        }
    };
    let killed = deaths
        .iter()
        .filter(|d| d.cause != DeathCause::Error)
        .count();
    if killed > 0 {
        s.push_str(&format!(
            "; {killed} other process{} of the container died before it",
            if killed == 1 { "" } else { "es" }
        ));
    }
    s
}

/// RFC 3339 timestamps in JSON, both ways.
pub mod time {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        crate::events::rfc3339(t, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

pub mod opt_time {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => crate::events::rfc3339(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: Option<u8>, sig: Option<u32>) -> MainExit<'static> {
        MainExit {
            pid: 10,
            comm: "sleep",
            exit_code: code,
            signal: sig.map(|s| (s, crate::signals::name(s))),
            core_dumped: false,
        }
    }

    fn sender(kind: SenderKind) -> Sender {
        Sender {
            kind,
            pid: 5,
            comm: "runc".into(),
            namespace: None,
            pod: None,
            container: None,
        }
    }

    #[test]
    fn a_shell_returning_its_childs_signal_is_one_sentence() {
        let none = StopTimeline::default();
        let ev = Evidence {
            fatal_sender: None,
            fatal_was_fault: false,
            oom: None,
            stop: &none,
        };
        let sh = MainExit {
            comm: "sh",
            ..exit(Some(143), None)
        };
        let child = Death {
            at: SystemTime::UNIX_EPOCH,
            pid: 42,
            comm: "sleep".into(),
            cause: DeathCause::Killed,
            exit_code: None,
            signal: Some("SIGTERM".into()),
            sender: Some(Sender {
                comm: "kill".into(),
                pid: 7,
                ..sender(SenderKind::HostProcess)
            }),
        };
        assert_eq!(decide(&sh, &ev), Reason::Error);
        assert_eq!(
            explain(&sh, Reason::Error, &ev, std::slice::from_ref(&child)),
            "PID 1 (sh) exited with code 143 = 128 + SIGTERM: it returned the status of sleep (pid 42), which was killed by SIGTERM from kill (pid 7) on the host; 1 other process of the container died before it"
        );
        // Without such a death, the plain sentence.
        assert_eq!(
            explain(&sh, Reason::Error, &ev, &[]),
            "PID 1 (sh) exited with code 143"
        );
    }

    #[test]
    fn a_discarded_sigterm_is_named() {
        let stop = StopTimeline {
            sigterm_sender: Some(SenderKind::Runtime),
            sigterm_handled: Some(false),
            sigterm_discarded: Some(true),
            sigkill_sender: Some(SenderKind::Runtime),
            grace_used_seconds: Some(30.0),
            ..Default::default()
        };
        let ev = Evidence {
            fatal_sender: None,
            fatal_was_fault: false,
            oom: None,
            stop: &stop,
        };
        let e = exit(None, Some(9));
        assert!(
            explain(&e, Reason::KilledAfterGracePeriod, &ev, &[]).contains(
                "the kernel discarded SIGTERM because PID 1 (sleep) is its PID namespace's init"
            ),
        );
    }

    #[test]
    fn reasons() {
        let none = StopTimeline::default();
        let ev = |stop| Evidence {
            fatal_sender: None,
            fatal_was_fault: false,
            oom: None,
            stop,
        };
        assert_eq!(decide(&exit(Some(0), None), &ev(&none)), Reason::Completed);
        assert_eq!(decide(&exit(Some(3), None), &ev(&none)), Reason::Error);
        let termed = StopTimeline {
            sigterm_sender: Some(SenderKind::Runtime),
            sigterm_handled: Some(false),
            sigkill_sender: Some(SenderKind::Runtime),
            grace_used_seconds: Some(2.0),
            ..Default::default()
        };
        let e = exit(None, Some(9));
        assert_eq!(decide(&e, &ev(&termed)), Reason::KilledAfterGracePeriod);
        assert_eq!(
            explain(&e, Reason::KilledAfterGracePeriod, &ev(&termed), &[]),
            "killed by the runtime with SIGKILL 2.0 s after SIGTERM: PID 1 (sleep) did not handle SIGTERM"
        );
        let graceful = StopTimeline {
            sigterm_sender: Some(SenderKind::Runtime),
            sigterm_handled: Some(true),
            ..Default::default()
        };
        assert_eq!(
            decide(&exit(Some(0), None), &ev(&graceful)),
            Reason::GracefulStop
        );
        let oom = OomDetails::new(
            10,
            "sleep",
            Some(&ScopeReading {
                scope: OomScope::Node,
                cgroup: None,
                usage_bytes: None,
                limit_bytes: None,
            }),
            None,
        );
        let ev_oom = Evidence {
            fatal_sender: None,
            fatal_was_fault: false,
            oom: Some(&oom),
            stop: &none,
        };
        assert_eq!(decide(&e, &ev_oom), Reason::NodeOomKilled);
        let other = Sender {
            kind: SenderKind::OtherContainer,
            container: Some("sidecar".into()),
            pod: Some("p".into()),
            ..sender(SenderKind::OtherContainer)
        };
        let ev_other = Evidence {
            fatal_sender: Some(&other),
            fatal_was_fault: false,
            oom: None,
            stop: &none,
        };
        assert_eq!(
            decide(&exit(None, Some(15)), &ev_other),
            Reason::KilledBySignal
        );
        let fault = Evidence {
            fatal_sender: Some(&sender(SenderKind::KernelFault)),
            fatal_was_fault: true,
            oom: None,
            stop: &none,
        };
        assert_eq!(decide(&exit(None, Some(11)), &fault), Reason::Crashed);
    }
}
