//! podscope: an eBPF node agent that explains why pods die, stall or lose
//! packets. This library is everything but `main`:
//!
//! - [`families`]: the one list of kernel families and user views;
//! - [`kernel`]: BTF, clocks, privileges, cgroup layout, raw bpf(2);
//! - [`probes`]: the eBPF object, one module per event family (attach, decode);
//! - [`driver`]: the drain thread every command shares (rings → attributed events);
//! - [`deps`]: the slow dependencies (CRI, kube-proxy's rules, cgroupfs), each on its own task;
//! - [`metadata`]: attribution of events to pods and containers (cgroups, CRI);
//! - [`events`]: the typed events consumers see;
//! - [`net`]: the packet path: kube-proxy's rules (iptables, nftables) as one Service map; connections and drops attributed to pods and Services;
//! - [`cli`]: the `podscope` subcommands;
//! - [`heap`]: the agent's own live heap, counted (a leak told from fragmentation);
//! - [`selftest`]: the kernel-facing tests, shared by `cargo test` and the static `podscope-kernel-tests`.
//!
//! Without the `daemon` feature (default on) only the kernel side is built:
//! no `driver`, `deps`, `metrics` or `daemon`, and of `cli` only doctor's
//! kernel checks; that is what the kernel matrix's static test binaries need.

#[cfg(feature = "daemon")]
pub mod cli;
/// Without the daemon: doctor's kernel checks alone (the matrix runs them).
#[cfg(not(feature = "daemon"))]
pub mod cli {
    pub mod doctor;
}
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod deps;
#[cfg(feature = "daemon")]
pub mod driver;
pub mod events;
pub mod families;
pub mod forensics;
pub mod heap;
pub mod kernel;
pub mod metadata;
#[cfg(feature = "daemon")]
pub mod metrics;
pub mod net;
pub mod probes;
pub mod selftest;
pub mod signals;
pub mod throttle;
