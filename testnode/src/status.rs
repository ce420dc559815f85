//! Per-pod status, written by the kubelet daemon as one JSON file per pod
//! (`/run/podscope-node/pods/<namespace>_<name>.json`) and read by `status`,
//! `apply --wait`, `exec` and tests. This JSON is a public interface.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, IoContext, Result},
    manifest::RestartPolicy,
    paths,
    prober::HookRun,
    qos::QosClass,
};

/// The pod's phase: Kubernetes' four, plus `Terminating` while `delete`
/// stops it and `Deleted` once the sandbox is gone (the file is kept a
/// minute so `delete --wait` can read how the containers ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Terminating,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub phase: Phase,
    pub qos_class: QosClass,
    /// kubelet's cgroup parent, e.g. `/kubepods/burstable/pod<uid>`.
    pub cgroup_parent: String,
    pub restart_policy: RestartPolicy,
    pub termination_grace_period_seconds: i64,
    pub sandbox_id: Option<String>,
    pub pod_ip: Option<String>,
    /// The pod's network namespace file (`/var/run/netns/cni-…`).
    pub netns_path: Option<String>,
    /// The last error reconciling the pod (e.g. an image that does not exist).
    pub message: Option<String>,
    /// kubectl's STATUS when it is not the phase: `Init:0/2`, `Init:Error`,
    /// `Init:CrashLoopBackOff`, `PodInitializing`, `CrashLoopBackOff`, `Evicted`.
    #[serde(default)]
    pub reason: Option<String>,
    /// Run in order, each to completion, before `containers`.
    #[serde(default)]
    pub init_containers: Vec<ContainerStatus>,
    pub containers: Vec<ContainerStatus>,
    /// RFC 3339.
    pub updated_at: String,
    /// When the pod started terminating (RFC 3339): kube-proxy keeps its
    /// endpoint until the node's endpoint propagation delay has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating_since: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    /// The current attempt's container (null until created).
    pub container_id: Option<String>,
    /// CRI's ContainerMetadata.attempt of the current container.
    pub attempt: u32,
    pub restart_count: u32,
    /// `waiting`, `created`, `running`, `exited` or `unknown`.
    pub state: String,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    /// CRI's reason, e.g. `Completed`, `Error`, `OOMKilled`.
    pub reason: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The cgroups path in the OCI spec: `<cgroup_parent>/<container id>`.
    pub cgroups_path: Option<String>,
    /// How the previous attempt ended (Kubernetes' lastState.terminated).
    pub last_termination: Option<Termination>,
    /// Running, started (startup probe passed) and its readiness probe passing.
    #[serde(default)]
    pub ready: bool,
    /// Why a container that should run does not: `CrashLoopBackOff`, `PodInitializing`.
    #[serde(default)]
    pub waiting_reason: Option<String>,
    /// Why kubelet stopped the current attempt, when it did: e.g.
    /// `liveness probe failed: …`, `pod deleted`, `evicted`.
    #[serde(default)]
    pub kill_reason: Option<String>,
    /// The last postStart and preStop hooks of this container.
    #[serde(default)]
    pub post_start: Option<HookRun>,
    #[serde(default)]
    pub pre_stop: Option<HookRun>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Termination {
    pub container_id: String,
    pub attempt: u32,
    pub exit_code: i32,
    pub reason: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why kubelet stopped it (None: it ended by itself).
    #[serde(default)]
    pub kill_reason: Option<String>,
}

impl PodStatus {
    pub fn container(&self, name: &str) -> Option<&ContainerStatus> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// Every container is running.
    pub fn all_running(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(|c| c.state == "running")
    }

    /// Every container has started at least once (it may have ended since).
    pub fn all_started(&self) -> bool {
        !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|c| c.started_at.is_some() || c.last_termination.is_some())
    }

    /// Every container has ended at least once (now or in an earlier attempt).
    pub fn all_exited_once(&self) -> bool {
        !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|c| c.state == "exited" || c.last_termination.is_some())
    }
}

/// Reads a pod's status file; None when the pod has none.
pub fn read(namespace: &str, name: &str) -> Result<Option<PodStatus>> {
    read_file(&paths::status_file(namespace, name))
}

pub fn read_file(p: &Path) -> Result<Option<PodStatus>> {
    match std::fs::read(p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Msg(format!("{} is not a pod status: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("cannot read {}", p.display())),
    }
}

/// Every pod's status, sorted by namespace and name.
pub fn read_all() -> Result<Vec<PodStatus>> {
    let mut out = Vec::new();
    let dir = paths::pods_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).ctx(|| format!("cannot read {}", dir.display())),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|x| x == "json")
            && let Some(s) = read_file(&p)?
        {
            out.push(s);
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

/// Writes atomically (temp file + rename), so a reader never sees half a file.
pub fn write(s: &PodStatus) -> Result<()> {
    let dir = paths::pods_dir();
    std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let p = paths::status_file(&s.namespace, &s.name);
    let tmp = p.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(s)
        .map_err(|e| Error::Msg(format!("cannot encode a pod status: {e}")))?;
    std::fs::write(&tmp, json).ctx(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).ctx(|| format!("cannot write {}", p.display()))
}

/// Nanoseconds since the epoch (CRI's timestamps) as RFC 3339; None for 0.
pub fn rfc3339_ns(ns: i64) -> Option<String> {
    if ns <= 0 {
        return None;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64);
    Some(humantime::format_rfc3339_nanos(t).to_string())
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}
