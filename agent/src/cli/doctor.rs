//! `podscope doctor`: what this kernel and node support, tested by loading
//! tiny programs, and what each finding means for podscope.

#[cfg(feature = "daemon")]
use std::{io::Write, process::ExitCode};

#[cfg(feature = "daemon")]
use anyhow::Result;
#[cfg(feature = "daemon")]
use clap::Args;
use serde::Serialize;

#[cfg(feature = "daemon")]
use super::Output;
use crate::{
    kernel::{bpf_sys, btf::Btf, cgroups::CgroupLayout, privilege::Privileges, tracefs},
    probes::{
        self, KernelOffsets,
        capabilities::{self, Hook},
    },
};

#[cfg(feature = "daemon")]
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Output format: a table, or one JSON object.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The local agent, asked for its dependencies' state.
    #[command(flatten)]
    pub agent: super::client::AgentFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Works.
    Ok,
    /// Absent, and podscope uses something else instead.
    Fallback,
    /// Absent, and something podscope does is lost.
    Missing,
    /// Could not be tested (e.g. without root).
    Untested,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What it means for podscope.
    pub meaning: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
}

#[cfg(feature = "daemon")]
impl Report {
    fn status(&self, name: &str) -> Option<Status> {
        self.checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.status)
    }
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    meaning: impl Into<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        meaning: meaning.into(),
    }
}

#[cfg(feature = "daemon")]
pub fn run(args: DoctorArgs) -> Result<ExitCode> {
    let mut report = diagnose();
    report.checks.push(agent_check(&args.agent));
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(&report)?)?,
        Output::Table => {
            use super::escape::escape;
            writeln!(out, "kernel {}", escape(&report.kernel))?;
            for c in &report.checks {
                let status = serde_json::to_value(c.status)?
                    .as_str()
                    .unwrap_or_default()
                    .to_uppercase();
                writeln!(out, "{status:<9} {:<16} {}", c.name, escape(&c.detail))?;
                writeln!(out, "{:<9} {:<16} → {}", "", "", escape(&c.meaning))?;
            }
        }
    }
    // Fail when podscope could not trace at all, so scripts can tell.
    let essential = ["privileges", "btf", "ring_buffer", "exits"];
    let broken = essential
        .iter()
        .any(|n| report.status(n).is_some_and(|s| s != Status::Ok));
    Ok(if broken {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs every check.
pub fn diagnose() -> Report {
    let mut checks = vec![];
    let privileges = Privileges::current();
    let privileged = privileges.can_trace();
    checks.push(if privileged {
        check("privileges", Status::Ok, privileges.describe(), "podscope can load and attach eBPF programs")
    } else {
        check(
            "privileges",
            Status::Missing,
            privileges.describe(),
            "podscope cannot load eBPF programs: run it as root (or with CAP_BPF and CAP_PERFMON); the hook checks below need it",
        )
    });

    checks.push(architecture_check(std::env::consts::ARCH));

    let btf = Btf::from_sys_fs();
    checks.push(match &btf {
        Ok(b) => check(
            "btf",
            Status::Ok,
            format!(
                "{} ({} types{})",
                crate::kernel::btf::kernel_btf_path().display(),
                b.len(),
                match b.skipped() {
                    (0, _, None) => String::new(),
                    (n, kinds, None) => format!(", {n} of unknown kinds {kinds:?} skipped"),
                    (_, kinds, Some(id)) => format!(
                        ", unknown kinds {kinds:?}: types after {id} unread, a newer podscope reads them"
                    ),
                }
            ),
            "kernel struct offsets are resolved at start-up; tp_btf and fentry can be used",
        ),
        Err(e) => check(
            "btf",
            Status::Missing,
            e.to_string(),
            "podscope cannot find kernel struct fields and will not start",
        ),
    });
    let exit_offsets = btf.as_ref().ok().map(probes::exits::resolve_offsets);
    if let Some(Err(e)) = &exit_offsets {
        checks.push(check(
            "exit_offsets",
            Status::Missing,
            e.to_string(),
            "exit tracing cannot read exit codes on this kernel",
        ));
    }

    checks.push(match tracefs::mounted() {
        Some(p) => check(
            "tracefs",
            Status::Ok,
            format!("mounted at {p}"),
            "plain tracepoints can be attached by name",
        ),
        None => check(
            "tracefs",
            Status::Fallback,
            "not mounted",
            "podscope mounts it at /sys/kernel/tracing when it must fall back to plain tracepoints",
        ),
    });

    let untested = |name| {
        check(
            name,
            Status::Untested,
            "needs root to test",
            "run `sudo podscope doctor`",
        )
    };
    if !privileged {
        for name in [
            "ring_buffer",
            "tracepoint",
            "raw_tp",
            "tp_btf",
            "fentry",
            "kprobe",
            "lsm",
            "netfilter_link",
            "exits",
        ] {
            checks.push(untested(name));
        }
    } else {
        checks.push(match bpf_sys::probe_ringbuf() {
            Ok(()) => check(
                "ring_buffer",
                Status::Ok,
                "BPF_MAP_TYPE_RINGBUF created",
                "events reach userspace in order, without per-CPU copies",
            ),
            Err(e) => check(
                "ring_buffer",
                Status::Missing,
                e.to_string(),
                "podscope needs ring buffers (kernel ≥ 5.8) and will not start",
            ),
        });
        checks.extend(hook_checks());
    }

    // The node's services, asked as the agent asks them (the kernel
    // matrix's test binaries, built without the daemon, have no clients).
    #[cfg(feature = "daemon")]
    {
        checks.push(cri_check());
        checks.extend(kube_proxy_checks());
    }

    checks.push({
        let layout = CgroupLayout::current();
        let (status, meaning) = match layout {
            CgroupLayout::V2 { .. } => (Status::Ok, "cgroup ids in events are v2 directory inodes; resource files are in the unified tree"),
            CgroupLayout::Hybrid { .. } => (Status::Ok, "cgroup ids come from the controller-less v2 tree; cpu and memory files are read from v1"),
            CgroupLayout::V1 { .. } => (Status::Fallback, "no v2 tree: events carry no usable cgroup id, containers are found by pid"),
            CgroupLayout::None => (Status::Missing, "no cgroups mounted: no container attribution"),
        };
        let detail = match &layout {
            CgroupLayout::V2 { root } => format!("v2 at {}", root.display()),
            CgroupLayout::Hybrid { v2_root, controllers } => format!(
                "hybrid: v2 at {}, v1 controllers {}",
                v2_root.display(),
                controllers.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(",")
            ),
            CgroupLayout::V1 { controllers } => {
                format!("v1 controllers {}", controllers.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(","))
            }
            CgroupLayout::None => "none".into(),
        };
        check("cgroups", status, detail, meaning)
    });

    if privileged {
        checks.push(exits_check(&btf));
        checks.extend(forensics_checks(&btf));
    }

    Report {
        kernel: kernel_release(),
        checks,
    }
}

#[cfg(feature = "daemon")]
/// Whether the container runtime answers over CRI, where pod and container
/// names come from.
fn cri_check() -> Check {
    use crate::metadata::cri::{Cri, KNOWN_SOCKETS, detect_socket};
    let socket = std::env::var_os("PODSCOPE_CRI_SOCKET")
        .map(std::path::PathBuf::from)
        .or_else(detect_socket);
    let Some(socket) = socket else {
        return check(
            "cri",
            Status::Missing,
            format!("no CRI socket in {}", KNOWN_SOCKETS.join(", ")),
            "events carry pod uids and container ids from cgroup paths, but no names; set PODSCOPE_CRI_SOCKET or --cri-socket",
        );
    };
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                // A frozen runtime must not hang doctor.
                tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    let mut cri = Cri::connect(&socket).await?;
                    cri.containers().await.map(|c| c.len())
                })
                .await
                .map_err(|_| format!("{} did not answer within 5 s", socket.display()))?
            })
        });
    match answer {
        Ok(n) => check(
            "cri",
            Status::Ok,
            format!("{} answers ({n} containers)", socket.display()),
            "events are attributed to pods and containers by name",
        ),
        Err(e) => check(
            "cri",
            Status::Missing,
            e,
            "names are missing until the runtime answers; pod uids and container ids still come from cgroup paths",
        ),
    }
}

#[cfg(feature = "daemon")]
/// Whether kube-proxy's rules can be read here, as the agent reads them
/// (in this process's network namespace: the node's, for a hostNetwork
/// pod), with the agent's deadline; and which mode kube-proxy is in.
fn kube_proxy_checks() -> [Check; 2] {
    use crate::deps::rules::{ProxyMode, RulesOptions, SaveError, no_rules_meaning, read};
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SaveError::Failed(e.to_string()))
        .and_then(|rt| rt.block_on(read("", &RulesOptions::default())));
    let mode = match &answer {
        Ok(r) => r.mode,
        Err(_) => ProxyMode::None,
    };
    let rules = match answer {
        Ok(r) if r.map.is_empty() => check(
            "kube_proxy_rules",
            Status::Missing,
            format!("{} works but shows no kube-proxy Services", r.program),
            if r.has_kube_chains {
                "kube-proxy's rules are there but name no Service yet: connections are attributed once Services have ClusterIPs"
            } else {
                no_rules_meaning(r.mode)
            },
        ),
        Ok(r) => check(
            "kube_proxy_rules",
            Status::Ok,
            format!("{} shows {} Service ports", r.program, r.map.len()),
            "connections are attributed to Services and endpoints; rejects of Services without endpoints are named",
        ),
        Err(e @ SaveError::NotInstalled) => check(
            "kube_proxy_rules",
            Status::Missing,
            "neither iptables-save nor nft found on PATH",
            format!(
                "{e} (install Debian's iptables and nftables packages; the agent's image has them)"
            ),
        ),
        Err(e) => check(
            "kube_proxy_rules",
            Status::Missing,
            e.to_string(),
            "no Service attribution until the rules can be read (the agent needs CAP_NET_ADMIN for iptables-save and nft); drops are still reported",
        ),
    };
    let (status, meaning) = match mode {
        ProxyMode::Iptables => (
            Status::Ok,
            "kube-proxy writes iptables chains (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*): Services, endpoint splits and no-endpoint rejects are read from iptables-save",
        ),
        ProxyMode::Nftables => (
            Status::Ok,
            "kube-proxy writes nftables (table ip/ip6 kube-proxy: service-ips and service-nodeports maps, service-*/endpoint-* chains): Services, endpoint splits and no-endpoint rejects are read from nft -j",
        ),
        ProxyMode::Ipvs => (
            Status::Missing,
            "kube-proxy balances Services with IPVS (deprecated upstream): podscope still sees each connection and the endpoint IPVS chose, and drops, but not which Service it was for, nor rejects of Services without endpoints (IPVS virtual servers are not listed)",
        ),
        ProxyMode::None => (
            Status::Missing,
            "no kube-proxy rules in iptables or nftables here: kube-proxy is not running, a replacement (eBPF dataplane) handles Services, or this is not the node's network namespace; connections and drops are shown without Services",
        ),
    };
    [
        rules,
        check("kube_proxy_mode", status, mode.as_str(), meaning),
    ]
}

#[cfg(feature = "daemon")]
/// What the agent running on this node (if any) says of its dependencies.
fn agent_check(agent: &super::client::AgentFlags) -> Check {
    let addr = &agent.agent;
    let body = match agent.get("/readyz?format=json") {
        Ok(b) => b,
        Err(e) => {
            return check(
                "agent",
                Status::Untested,
                // Already one sentence naming the agent's address.
                format!("{e:#}"),
                "start `podscope agent` (or pass --agent SOCKET|https://HOST:PORT) to see which of its dependencies are degraded",
            );
        }
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let deps = v["dependencies"].as_array().cloned().unwrap_or_default();
    let degraded: Vec<String> = deps
        .iter()
        .filter(|d| d["state"] == "degraded")
        .map(|d| {
            format!(
                "{} since {} ({})",
                d["dependency"].as_str().unwrap_or("?"),
                d["since"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let states: Vec<String> = deps
        .iter()
        .map(|d| {
            format!(
                "{} {}",
                d["dependency"].as_str().unwrap_or("?"),
                d["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if degraded.is_empty() {
        check(
            "agent",
            Status::Ok,
            format!(
                "agent at {addr}: ready={}; {}",
                v["ready"],
                states.join(", ")
            ),
            "every dependency of the agent answers; its probes drain whatever they do",
        )
    } else {
        let lost: Vec<String> = deps
            .iter()
            .filter(|d| d["state"] == "degraded")
            .map(|d| d["feature"].as_str().unwrap_or("?").to_string())
            .collect();
        check(
            "agent",
            Status::Missing,
            format!("agent at {addr}: degraded: {}", degraded.join("; ")),
            format!(
                "the probes keep draining; until it recovers the agent lacks {}",
                lost.join("; ")
            ),
        )
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The exit family's real hook selection (the code the agent runs), and why.
fn exits_check(btf: &Result<Btf, crate::kernel::btf::BtfError>) -> Check {
    // Every family's offsets: the object is loaded whole.
    let offsets = match btf.as_ref().map(KernelOffsets::resolve) {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return check(
                "exits",
                Status::Missing,
                e.to_string(),
                "exit tracing is unavailable",
            );
        }
        Err(_) => {
            return check(
                "exits",
                Status::Missing,
                "no kernel BTF",
                "exit tracing is unavailable",
            );
        }
    };
    match probes::exits::probe_selection(&offsets) {
        Ok(a) => {
            let refused: Vec<String> = a
                .refused
                .iter()
                .map(|(k, why)| format!("{k} refused: {why}"))
                .collect();
            let order = probes::exits::PREFERENCE.map(|k| k.to_string()).join(" > ");
            let detail = if refused.is_empty() {
                format!("{} {} (the first of {order})", a.attach_type, a.hook)
            } else {
                format!("{} {} ({})", a.attach_type, a.hook, refused.join("; "))
            };
            let meaning = if a.attach_type == probes::exits::PREFERENCE[0] {
                "every exit is traced with the cheapest hook".to_string()
            } else {
                format!(
                    "every exit is traced; {} is refused here, so the hook costs a little more",
                    probes::exits::PREFERENCE[0]
                )
            };
            check("exits", Status::Ok, detail, meaning)
        }
        Err(e) => check(
            "exits",
            Status::Missing,
            e.to_string(),
            "exit tracing is unavailable on this kernel",
        ),
    }
}

/// The signal, OOM and throttle probes, attached for real and detached:
/// what termination records and throttling figures can say on this kernel.
fn forensics_checks(btf: &Result<Btf, crate::kernel::btf::BtfError>) -> Vec<Check> {
    let Ok(Ok(offsets)) = btf.as_ref().map(KernelOffsets::resolve) else {
        return vec![];
    };
    let loaded = probes::load_object(&offsets, &probes::LoadOptions::with_ring_buffer(4096));
    let mut ebpf = match loaded {
        Ok(e) => e,
        Err(e) => {
            return vec![check(
                "signals",
                Status::Missing,
                e.to_string(),
                "termination records cannot name senders",
            )];
        }
    };
    let aya_btf = probes::attach_btf();
    let signals = match probes::signals::SignalProbe::attach(&mut ebpf, &aya_btf) {
        Ok(p) => check(
            "signals",
            Status::Ok,
            format!("{} {}", p.attachment.attach_type, p.attachment.hook),
            "termination records name who sent SIGTERM/SIGKILL and when (grace periods)",
        ),
        Err(e) => check(
            "signals",
            Status::Missing,
            e.to_string(),
            "termination records cannot name the sender or time a grace period",
        ),
    };
    let oom = match probes::oom::OomProbe::attach(&mut ebpf, &offsets.oom) {
        Ok(p) => {
            let figures = offsets.oom.tp_anon_rss != agent_common::OFFSET_ABSENT;
            let counters = offsets.oom.pc_parent != agent_common::OFFSET_ABSENT;
            let status = if counters {
                Status::Ok
            } else {
                Status::Fallback
            };
            check(
                "oom",
                status,
                format!(
                    "{} {}; victim memory figures {}; memory cgroup counters {}",
                    p.attachment.attach_type,
                    p.attachment.hook,
                    if figures {
                        "in the record"
                    } else {
                        "absent (kernel < 6.8)"
                    },
                    if counters {
                        "read at the OOM"
                    } else {
                        "not in BTF"
                    }
                ),
                if counters {
                    "OOM kills name their victim and scope (container, pod, node) with usage against the limit"
                } else {
                    "OOM scope is read from cgroup files, which may be gone when the container died"
                },
            )
        }
        Err(e) => check(
            "oom",
            Status::Missing,
            e.to_string(),
            "OOM kills show as SIGKILLs from the kernel, without scope or usage",
        ),
    };
    let throttle =
        match probes::throttle::ThrottleProbe::attach(&mut ebpf, &aya_btf, &offsets.throttle, None)
        {
            Ok(p) => check(
                "throttle",
                Status::Ok,
                format!("{} {}", p.attachment.attach_type, p.attachment.hook),
                "every CFS throttle of every container is measured, beside cpu.stat",
            ),
            Err(e) => check(
                "throttle",
                Status::Fallback,
                e.to_string(),
                "CPU throttling comes from cpu.stat only: counts, no per-throttle durations",
            ),
        };
    vec![signals, oom, throttle]
}

/// The CPU architecture, and what differs for podscope there: the same
/// programs and checks run on both, but BPF trampolines (fentry, LSM)
/// attach on arm64 only from 6.4 (measured: refused on Debian's arm64 6.1),
/// and only the two shipped architectures are tested.
fn architecture_check(arch: &str) -> Check {
    match arch {
        "x86_64" => check(
            "architecture",
            Status::Ok,
            "x86_64 (amd64)",
            "a shipped architecture: tested on this kernel and Debian's amd64 cloud kernels 6.1 and 6.12",
        ),
        "aarch64" => check(
            "architecture",
            Status::Ok,
            "aarch64 (arm64)",
            "a shipped architecture: tested on Debian's arm64 cloud kernels 6.1 and 6.12; BPF trampolines (fentry, LSM) attach on arm64 only from kernel 6.4 (through ftrace direct calls; x86_64: 5.5), and podscope needs none: every family has a tracepoint path",
        ),
        other => check(
            "architecture",
            Status::Fallback,
            other.to_string(),
            "not an architecture podscope is built or tested for: the checks below say what loads, nothing more is known",
        ),
    }
}

/// What each hook type's availability means for podscope.
fn hook_meaning(hook: Hook) -> (&'static str, &'static str) {
    match hook {
        Hook::Tracepoint => (
            "plain tracepoints work: the last-resort hook for every family",
            "no plain tracepoints until tracefs is mounted (podscope mounts it when needed)",
        ),
        Hook::RawTp => (
            "raw tracepoints work: the exits family's second choice",
            "families use tp_btf or plain tracepoints instead",
        ),
        Hook::TpBtf => (
            "BTF tracepoints work: exits and scheduler probes use them (cheapest tracepoint form)",
            "families fall back to raw or plain tracepoints (slightly more overhead)",
        ),
        Hook::Fentry => (
            "BPF trampolines work: fentry can accelerate function probes",
            "BPF trampolines are refused (fentry/fexit): podscope uses tracepoints, which cover every family",
        ),
        Hook::Kprobe => (
            "kprobes work",
            "no kprobes (CONFIG_KPROBES unset?): podscope needs none, tracepoints cover every family",
        ),
        Hook::Lsm => (
            "BPF LSM programs load and attach",
            "no BPF LSM programs (trampolines refused or CONFIG_BPF_LSM unset): podscope needs none",
        ),
        Hook::NetfilterLink => (
            "BPF netfilter links work (kernel ≥ 6.4): `trace net` sees each new connection right after the filter table, with its original and DNATed destination",
            "no BPF netfilter links (kernel < 6.4): packet paths fall back to conntrack's netlink events for forwarded connections and kfree_skb for rejects and drops; lost: connections are seen only once conntrack confirms them, a burst can overflow the netlink socket (counted as lost), and nothing comes when conntrack events are disabled (net.netfilter.nf_conntrack_events=0)",
        ),
    }
}

/// Loads each tiny doctor program and attaches it, then detaches.
fn hook_checks() -> Vec<Check> {
    let probed = match capabilities::probe_hooks() {
        Ok(p) => p,
        Err(e) => {
            return vec![check(
                "hooks",
                Status::Missing,
                e.to_string(),
                "podscope's eBPF object does not load on this kernel",
            )];
        }
    };
    probed
        .into_iter()
        .map(|p| {
            let (ok, absent) = hook_meaning(p.hook);
            verdict(p.hook.name(), p.result, ok, Status::Fallback, absent)
        })
        .collect()
}

fn verdict(
    name: &'static str,
    r: Result<(), String>,
    ok: &str,
    absent: Status,
    meaning_absent: &str,
) -> Check {
    match r {
        Ok(()) => check(name, Status::Ok, "loaded and attached", ok),
        Err(e) => check(name, absent, e, meaning_absent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shipped_architectures_are_ok_and_others_say_untested() {
        for (arch, status) in [
            ("x86_64", Status::Ok),
            ("aarch64", Status::Ok),
            ("riscv64", Status::Fallback),
        ] {
            let c = architecture_check(arch);
            assert_eq!(c.status, status, "{arch}");
            assert!(c.detail.starts_with(arch), "{}", c.detail);
        }
        assert!(architecture_check("aarch64").meaning.contains("6.4"));
    }
}
