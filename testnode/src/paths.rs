//! Every path and name the test node owns. Other code (the agent's tests,
//! scripts) may rely on these: they are the node's public interface.

use std::path::{Path, PathBuf};

/// The network namespace that plays the node (`ip netns` name).
pub const NETNS: &str = "podscope-node";
/// Runtime state: containerd's state and socket, manifests, pod status, logs.
pub const STATE_DIR: &str = "/run/podscope-node";
/// Persistent root: containerd's content store and snapshots, the image tar.
pub const ROOT_DIR: &str = "/var/lib/podscope-node";
/// Serialises `up`, `down` and `containerd start|stop` (flock); `down` removes it.
pub const LOCK_FILE: &str = "/run/podscope-node.lock";
/// containerd's gRPC socket, which serves CRI (runtime.v1).
pub const SOCKET: &str = "/run/podscope-node/containerd.sock";
/// The containerd namespace CRI uses.
pub const CONTAINERD_NAMESPACE: &str = "k8s.io";
/// The image every container uses unless its manifest names another.
pub const IMAGE: &str = "docker.io/podscope/testnode:latest";
/// The sandbox ("pause") image; `sandbox_image` in containerd's config.
pub const PAUSE_IMAGE: &str = "docker.io/podscope/pause:latest";
/// The CNI bridge inside the node's network namespace.
pub const BRIDGE: &str = "podscope0";
/// Pod addresses (a benchmarking range, never RFC 1918; docs/architecture.md).
pub const POD_SUBNET: &str = "198.18.0.0/16";
/// The bridge's own address, the pods' gateway.
pub const POD_GATEWAY: &str = "198.18.0.1";
/// The cgroup every pod lives under, in each v1 controller and in the v2 tree.
pub const KUBEPODS: &str = "kubepods";
/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn state(rel: &str) -> PathBuf {
    Path::new(STATE_DIR).join(rel)
}

pub fn containerd_config() -> PathBuf {
    state("containerd.toml")
}
pub fn containerd_state() -> PathBuf {
    state("containerd")
}
pub fn containerd_pid() -> PathBuf {
    state("containerd.pid")
}
pub fn containerd_log() -> PathBuf {
    state("containerd.log")
}
/// runc's state root (otherwise `/run/containerd/runc`, shared with any other containerd).
pub fn runc_root() -> PathBuf {
    state("runc")
}
pub fn cni_conf_dir() -> PathBuf {
    state("cni/net.d")
}
pub fn cni_ipam_dir() -> PathBuf {
    state("cni/ipam")
}
pub fn kubelet_pid() -> PathBuf {
    state("kubelet.pid")
}
pub fn kubelet_log() -> PathBuf {
    state("kubelet.log")
}
/// `apply` writes manifests here (`<namespace>_<name>.yaml`); the kubelet daemon runs what it finds.
pub fn manifests_dir() -> PathBuf {
    state("manifests")
}
/// `apply` writes Service manifests here (`<namespace>_<name>.yaml`); the kube-proxy part of the daemon serves them.
pub fn services_dir() -> PathBuf {
    state("services")
}
/// The rules last written for the Services (what `iptables-restore` or `nft -f` was given).
pub fn kube_proxy_rules() -> PathBuf {
    state("kube-proxy.rules")
}
/// The kube-proxy mode the node plays (`iptables` or `nftables`; absent: iptables).
pub fn kube_proxy_mode() -> PathBuf {
    state("kube-proxy.mode")
}
/// How long a terminating pod stays an endpoint (as a humantime duration;
/// absent: 0), as EndpointSlice propagation delays it in a cluster.
pub fn endpoint_delay() -> PathBuf {
    state("endpoint-propagation-delay")
}
/// Serialises rule syncs between the daemon and `apply`/`delete` (flock).
pub fn kube_proxy_lock() -> PathBuf {
    state("kube-proxy.lock")
}
/// Services' cluster IPs, as kube-proxy's `--cluster-cidr` would say (for KUBE-MARK-MASQ).
pub const SERVICE_SUBNET: &str = "198.19.0.0/16";
/// The kubelet daemon writes one `<namespace>_<name>.json` per pod here.
pub fn pods_dir() -> PathBuf {
    state("pods")
}
/// Container logs, as kubelet's `/var/log/pods/<ns>_<name>_<uid>/<container>/<attempt>.log`.
pub fn logs_dir() -> PathBuf {
    state("logs")
}
/// Every pod uid the node ever created, one per line, so `down` finds their cgroups.
pub fn uid_ledger() -> PathBuf {
    state("pod-uids")
}
/// What existed before the first `up`, so `down` removes only what the node created.
pub fn preexisting() -> PathBuf {
    state("preexisting.json")
}
pub fn images_dir() -> PathBuf {
    Path::new(ROOT_DIR).join("images")
}

/// A pod's key in file names: `<namespace>_<name>` (neither may contain `_`
/// in Kubernetes, which allows only DNS labels there).
pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}
pub fn manifest_file(namespace: &str, name: &str) -> PathBuf {
    manifests_dir().join(format!("{}.yaml", pod_key(namespace, name)))
}
/// `delete` renames the manifest to this marker, which keeps the spec until
/// the daemon has torn the pod down (even a daemon started after the delete).
pub fn deleting_file(namespace: &str, name: &str) -> PathBuf {
    manifests_dir().join(format!("{}.yaml.deleted", pod_key(namespace, name)))
}
/// `delete --grace-period` and `evict` leave their options here for the daemon.
pub fn delete_options_file(namespace: &str, name: &str) -> PathBuf {
    manifests_dir().join(format!("{}.delete.json", pod_key(namespace, name)))
}
pub fn status_file(namespace: &str, name: &str) -> PathBuf {
    pods_dir().join(format!("{}.json", pod_key(namespace, name)))
}
