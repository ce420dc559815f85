//! The one list of what podscope traces. Two kinds of name, each defined once:
//!
//! - a [`Kernel`] family is one eBPF program family with its own ring buffer
//!   (or per-CPU counters): it is what `podscope_probe_attached{probe}`,
//!   `podscope_events_lost_total{source}`, doctor's attach report and the
//!   kernel matrix name;
//! - a [`View`] is what a user asks for (`podscope trace <view>`): the
//!   events of one capability, made from one or more kernel families.
//!
//! Adding a family is adding a row here (and its probe module); the CLI's
//! names, the metrics' `source` label and the attach report derive from it.

use serde::Serialize;

/// A kernel-side program family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// Process and thread exits (sched_process_exit).
    Exits,
    /// Signals that can end a process (signal_generate).
    Signals,
    /// OOM kills (oom:mark_victim).
    Oom,
    /// cgroup creation/removal and the first exec in a cgroup: attribution.
    Cgroups,
    /// CFS throttling of containers (sched_switch).
    Throttle,
    /// New connections after kube-proxy's rules (netfilter hooks).
    Netfilter,
    /// Packet drops with the kernel's reason (skb:kfree_skb).
    Drops,
}

impl Kernel {
    pub const ALL: [Kernel; 7] = [
        Kernel::Exits,
        Kernel::Signals,
        Kernel::Oom,
        Kernel::Cgroups,
        Kernel::Throttle,
        Kernel::Netfilter,
        Kernel::Drops,
    ];

    /// The name in metrics (`source`, `probe`), logs and doctor.
    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Exits => "exits",
            Kernel::Signals => "signals",
            Kernel::Oom => "oom",
            Kernel::Cgroups => "cgroups",
            Kernel::Throttle => "throttle",
            Kernel::Netfilter => "netfilter",
            Kernel::Drops => "drops",
        }
    }

    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a user traces: `podscope trace <view>`, and the family an event
/// belongs to in every stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "daemon", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Process and thread exits: exit code, signal, core dump.
    Exits,
    /// Signals that can end a process: sender, target, what the kernel did with it.
    Signals,
    /// OOM kills: victim, scope (container, pod, node), usage against the limit.
    Oom,
    /// Container terminations explained, and deaths of other processes in containers.
    Terminations,
    /// New connections through kube-proxy's rules (pod → ClusterIP → endpoint,
    /// rejected, dropped) and packet drops with the kernel's reason.
    Net,
    /// CPU throttling: each time a container's CPU quota ran out on a CPU, and for how long.
    Throttle,
}

impl View {
    pub const fn name(self) -> &'static str {
        match self {
            View::Exits => "exits",
            View::Signals => "signals",
            View::Oom => "oom",
            View::Terminations => "terminations",
            View::Net => "net",
            View::Throttle => "throttle",
        }
    }

    /// The kernel families this view attaches beyond exits and cgroups (the
    /// process table and attribution, always attached). A view attaches
    /// what its events need and no more: `trace exits` runs no signal
    /// program, whose filtered SIGCHLD cost every exit about 250 ns
    /// (BENCHMARKS.md, "Against the peers"); terminations and the packet
    /// path join signals and OOM kills (forensics, dying endpoints).
    pub const fn families(self) -> &'static [Kernel] {
        match self {
            View::Exits => &[],
            View::Signals => &[Kernel::Signals],
            View::Oom => &[Kernel::Oom],
            View::Terminations => &[Kernel::Signals, Kernel::Oom],
            View::Net => &[
                Kernel::Signals,
                Kernel::Oom,
                Kernel::Netfilter,
                Kernel::Drops,
            ],
            View::Throttle => &[Kernel::Throttle],
        }
    }

    pub fn needs(self, k: Kernel) -> bool {
        self.families().contains(&k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Kernel::ALL.len());
        for k in Kernel::ALL {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
        }
        // The CLI's names are the serde names (JSON) and clap's.
        use clap::ValueEnum;
        for v in View::value_variants() {
            assert_eq!(
                v.to_possible_value().map(|p| p.get_name().to_string()),
                Some(v.name().to_string())
            );
            assert_eq!(serde_json::to_value(v).unwrap(), v.name());
        }
    }
}
