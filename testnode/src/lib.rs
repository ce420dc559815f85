//! The podscope test node: a real containerd node without Kubernetes.
//!
//! Debian's containerd (CRI plugin), runc and CNI bridge run inside their own
//! network namespace (`podscope-node`), and this crate plays kubelet over CRI:
//! it turns ordinary Pod manifests into sandboxes and containers carrying
//! kubelet's labels, annotations and cgroup parents, restarts them by
//! `restartPolicy`, and stops them with the pod's grace period. podscope's
//! tests run real pods on it; `down` leaves the machine as it found it.
//!
//! Modules, in the order a pod meets them:
//! - [`paths`]: every path and name the node owns (the public interface).
//! - [`manifest`]: the supported Pod manifest subset, strictly parsed.
//! - [`qos`]: quantities, QoS class, cgroup parent and container resources, as kubelet computes them.
//! - [`podconfig`]: the sandbox and container configs kubelet would send.
//! - [`cri`]: the CRI gRPC client over containerd's unix socket.
//! - [`images`]: the local busybox + helper image, built as an OCI layout and imported.
//! - [`netns`]: the node's network namespace.
//! - [`containerd`]: containerd's config and life cycle.
//! - [`kubelet`]: the reconciling daemon (one task per pod).
//! - [`service`], [`kubeproxy`] and [`nftables`]: Service manifests, and kube-proxy's rules for them (iptables or nftables mode).
//! - [`status`]: the per-pod status files that `status` and `apply --wait` read.
//! - [`cleanup`]: `down`, which removes everything.
//! - [`process`]: pid files, daemons and signals, always by recorded PID.

pub mod cleanup;
pub mod containerd;
pub mod cri;
pub mod error;
pub mod images;
pub mod kubelet;
pub mod kubeproxy;
pub mod manifest;
pub mod netns;
pub mod nftables;
pub mod paths;
pub mod podconfig;
pub mod prober;
pub mod process;
pub mod qos;
pub mod service;
pub mod status;
#[cfg(test)]
mod upstream;
