//! Attribution: cgroup id → container → pod, for every event.
//!
//! The cgroup path (learned when the cgroup is created, see
//! [`cgroup_map`]) gives the pod uid and container id; CRI gives the names.
//! The [`Resolver`] answers from memory only (it runs on the drain thread);
//! the names come as [`Names`] snapshots from the CRI task
//! (`deps::cri`), which alone talks to the runtime. Without CRI (socket
//! absent, slow or down) events keep the identity the path gives, the
//! degradation is counted and reported, and names come back with the socket.

pub mod cgroup_map;
pub mod cgroup_path;
pub mod cri;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use self::{
    cgroup_map::CgroupMap,
    cri::{ContainerMeta, SandboxMeta},
};
use crate::kernel::cgroups::CgroupLayout;

/// Who an event belongs to. All None: a host process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
    pub container_id: Option<String>,
}

impl PodIdentity {
    pub fn is_host(&self) -> bool {
        self.pod_uid.is_none()
    }
}

#[derive(Clone, Debug)]
pub struct ResolverOptions {
    /// The CRI socket; None: look in the usual places.
    pub cri_socket: Option<PathBuf>,
    /// Ask CRI for names at all.
    pub use_cri: bool,
    /// How long mappings of removed cgroups and containers are kept.
    pub retention: Duration,
    /// Most cgroups remembered.
    pub max_cgroups: usize,
    /// Deadline of one CRI call.
    pub cri_timeout: Duration,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        ResolverOptions {
            cri_socket: None,
            use_cri: true,
            retention: Duration::from_secs(600),
            max_cgroups: 65_536,
            cri_timeout: Duration::from_secs(5),
        }
    }
}

impl ResolverOptions {
    /// The socket to ask, if CRI is used and one is configured or found.
    pub fn socket(&self) -> Option<PathBuf> {
        if !self.use_cri {
            return None;
        }
        self.cri_socket.clone().or_else(cri::detect_socket)
    }
}

/// Counters that make every degradation visible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResolverStats {
    /// Successful listings of the runtime's containers and sandboxes.
    pub cri_refreshes: u64,
    pub cri_errors: u64,
    /// Events of a container CRI did not know: shown with uid and id only.
    pub unnamed_container_events: u64,
    pub malformed_cgroup_paths: u64,
    pub cgroups_refused_full: u64,
    /// Live cgroup entries a periodic scan found gone (a lost rmdir event).
    pub cgroups_reconciled: u64,
}

/// Where CRI stands, as the CRI task last saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CriState {
    /// Not configured, or no socket found: names are never waited for.
    #[default]
    Off,
    /// Not asked yet.
    Connecting,
    Up,
    /// Failing or too slow: events go out with uids and ids only.
    Down,
}

/// What CRI said, as one immutable snapshot the drain thread swaps in.
#[derive(Debug, Default)]
pub struct Names {
    pub state: CriState,
    /// When the listing this snapshot holds was asked for.
    pub listed_at: Option<Instant>,
    /// Container id → metadata, and when CRI stopped listing it.
    pub containers: HashMap<String, (Arc<ContainerMeta>, Option<Instant>)>,
    pub sandboxes: HashMap<String, (Arc<SandboxMeta>, Option<Instant>)>,
    /// Pod IP → sandbox id (PodSandboxStatus).
    pub pod_ips: HashMap<IpAddr, String>,
    /// Counters of the CRI task.
    pub refreshes: u64,
    pub errors: u64,
}

impl Names {
    pub fn knows(&self, container_id: &str) -> bool {
        self.containers.contains_key(container_id) || self.sandboxes.contains_key(container_id)
    }

    /// Whether a pod (by namespace and name) has a container the runtime still lists.
    pub fn pod_alive(&self, namespace: &str, pod: &str) -> bool {
        self.containers
            .values()
            .any(|(c, gone)| gone.is_none() && c.namespace == namespace && c.pod == pod)
    }

    /// Containers the runtime lists and that have not gone.
    pub fn live_containers(&self) -> usize {
        self.containers
            .values()
            .filter(|(_, gone)| gone.is_none())
            .count()
    }

    /// The pods the runtime still lists: (namespace, name).
    pub fn live_pods(&self) -> std::collections::HashSet<(String, String)> {
        self.containers
            .values()
            .filter(|(_, gone)| gone.is_none())
            .map(|(c, _)| (c.namespace.clone(), c.pod.clone()))
            .chain(
                self.sandboxes
                    .values()
                    .filter(|(_, gone)| gone.is_none())
                    .map(|(s, _)| (s.namespace.clone(), s.pod.clone())),
            )
            .collect()
    }
}

/// Attribution from memory: the cgroup map (fed by the cgroups probe and a
/// periodic scan) and the latest [`Names`]. Never does I/O after [`Resolver::new`].
pub struct Resolver {
    cgroups: CgroupMap,
    names: Arc<Names>,
    stats: ResolverStats,
}

impl Resolver {
    /// Scans the existing pod cgroups (start-up I/O, before the drain runs).
    pub fn new(opts: &ResolverOptions) -> Resolver {
        let mut cgroups = CgroupMap::new(opts.max_cgroups, opts.retention);
        match CgroupLayout::current().v2_root() {
            Some(root) => cgroups.scan(root),
            None => tracing::warn!(
                "no cgroup v2 hierarchy is mounted: events cannot be attributed to pods"
            ),
        }
        let state = if opts.socket().is_some() {
            CriState::Connecting
        } else {
            CriState::Off
        };
        if opts.use_cri && state == CriState::Off {
            tracing::warn!(
                "no CRI socket found (looked in {}): events carry pod uids and container ids but no names; pass --cri-socket",
                cri::KNOWN_SOCKETS.join(", ")
            );
        }
        Resolver {
            cgroups,
            names: Arc::new(Names {
                state,
                ..Names::default()
            }),
            stats: ResolverStats::default(),
        }
    }

    pub fn stats(&self) -> ResolverStats {
        ResolverStats {
            malformed_cgroup_paths: self.cgroups.stats.malformed_paths,
            cgroups_refused_full: self.cgroups.stats.refused_full,
            cgroups_reconciled: self.cgroups.stats.reconciled_removed,
            cri_refreshes: self.names.refreshes,
            cri_errors: self.names.errors,
            ..self.stats
        }
    }

    /// The names in use now.
    pub fn names(&self) -> &Arc<Names> {
        &self.names
    }

    pub fn set_names(&mut self, names: Arc<Names>) {
        self.names = names;
    }

    /// Whether CRI has been asked at least once (answering or not: without
    /// it the agent still serves, degraded and counting), or is not used.
    pub fn synced(&self) -> bool {
        self.names.state != CriState::Connecting
    }

    /// Whether events of this cgroup would go out without the names CRI
    /// could give if asked now: a container cgroup CRI has not listed, while
    /// CRI is up (or not asked yet).
    pub fn lacks_names(&self, cgroup_id: u64) -> Option<&str> {
        if !matches!(self.names.state, CriState::Up | CriState::Connecting) {
            return None;
        }
        let cid = self.cgroups.get(cgroup_id)?.container_id.as_deref()?;
        (!self.names.knows(cid)).then_some(cid)
    }

    /// Whether names cannot come now (CRI off or down): nothing waits for them.
    pub fn names_unavailable(&self) -> bool {
        !matches!(self.names.state, CriState::Up | CriState::Connecting)
    }

    /// Pod cgroups and containers currently known.
    pub fn tracked(&self) -> (usize, usize) {
        (self.cgroups.len(), self.names.containers.len())
    }

    /// Containers' cgroups that exist now: (v2 id, path relative to the v2 root).
    pub fn live_container_cgroups(&self) -> Vec<(u64, Arc<str>)> {
        self.cgroups
            .live_containers()
            .map(|(id, p)| (id, p.clone()))
            .collect()
    }

    pub fn cgroup_created(&mut self, id: u64, path: &str) {
        self.cgroups.insert(id, path);
    }

    /// See [`CgroupMap::reconcile`].
    pub fn reconcile_cgroups(&mut self, found: &[(u64, String)], scanned_at: Instant) {
        self.cgroups.reconcile(found, scanned_at);
    }

    /// What the cgroup's path says (pod uid, container id), if it is a pod's.
    pub fn cgroup(&self, id: u64) -> Option<&Arc<cgroup_path::CgroupRef>> {
        self.cgroups.get(id)
    }

    /// The cgroup's path relative to the hierarchy roots, if it is a pod's.
    pub fn cgroup_path(&self, id: u64) -> Option<&str> {
        self.cgroups.path(id)
    }

    /// Pod cgroups that exist now: (id, path, what the path says).
    pub fn live_cgroups(&self) -> impl Iterator<Item = (u64, &str, &Arc<cgroup_path::CgroupRef>)> {
        self.cgroups.live()
    }

    /// CRI's restart attempt of a container (0 for the first run).
    pub fn attempt(&self, container_id: &str) -> Option<u32> {
        self.names
            .containers
            .get(container_id)
            .map(|(m, _)| m.attempt)
    }

    /// What CRI said about a container (kept a while after it went).
    pub fn container_meta(&self, container_id: &str) -> Option<&Arc<ContainerMeta>> {
        self.names.containers.get(container_id).map(|(m, _)| m)
    }

    /// Whether the container id is a pod sandbox's (pause) container.
    pub fn is_sandbox(&self, container_id: &str) -> bool {
        self.names.sandboxes.contains_key(container_id)
    }

    pub fn cgroup_removed(&mut self, id: u64) {
        self.cgroups.remove(id);
    }

    /// Who the task in cgroup `id` belongs to, from memory.
    pub fn identify(&mut self, cgroup_id: u64) -> PodIdentity {
        let Some(cg) = self.cgroups.get(cgroup_id).cloned() else {
            return PodIdentity::default();
        };
        let mut id = PodIdentity {
            pod_uid: Some(cg.pod_uid.clone()),
            container_id: cg.container_id.clone(),
            ..PodIdentity::default()
        };
        let names = &self.names;
        if let Some((m, _)) = cg
            .container_id
            .as_ref()
            .and_then(|c| names.containers.get(c))
        {
            id.namespace = Some(m.namespace.clone());
            id.pod = Some(m.pod.clone());
            id.container = Some(m.name.clone());
            return id;
        }
        // A pause container, or a container CRI does not know: name the pod at least.
        if let Some((s, _)) = names
            .sandboxes
            .values()
            .find(|(s, _)| s.pod_uid == cg.pod_uid)
        {
            id.namespace = Some(s.namespace.clone());
            id.pod = Some(s.pod.clone());
        }
        // The sandbox's own (pause) container: named "POD", as kubelet and
        // cAdvisor name it, so its exits (runc's bootstrap) are not unlabelled.
        match cg.container_id.as_ref() {
            Some(c) if names.sandboxes.contains_key(c) => id.container = Some("POD".to_string()),
            Some(_) => self.stats.unnamed_container_events += 1,
            None => {}
        }
        id
    }

    /// Forgets removed cgroups after the retention.
    pub fn gc(&mut self, now: Instant) {
        self.cgroups.gc(now);
    }

    /// Whether an IP is a pod's of this node (without copying its names).
    pub fn is_pod_ip(&self, ip: IpAddr) -> bool {
        self.names.pod_ips.contains_key(&ip)
    }

    /// The pod an IP belongs to (namespace, name, uid), from CRI.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<PodIdentity> {
        let id = self.names.pod_ips.get(&ip)?;
        let (s, _) = self.names.sandboxes.get(id)?;
        Some(PodIdentity {
            namespace: Some(s.namespace.clone()),
            pod: Some(s.pod.clone()),
            pod_uid: Some(s.pod_uid.clone()),
            container: None,
            container_id: None,
        })
    }
}
