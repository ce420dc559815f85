//! Attribution: cgroup id → container → pod, for every event.
//!
//! The cgroup path (learned when the cgroup is created, see
//! [`cgroup_map`]) gives the pod uid and container id; CRI gives the names.
//! Without CRI (socket absent or down) events keep the identity the path
//! gives, the degradation is logged once and counted, and names come back
//! with the socket.

pub mod cgroup_map;
pub mod cgroup_path;
pub mod cri;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use self::{
    cgroup_map::CgroupMap,
    cri::{ContainerMeta, Cri, SandboxMeta},
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
}

impl Default for ResolverOptions {
    fn default() -> Self {
        ResolverOptions {
            cri_socket: None,
            use_cri: true,
            retention: Duration::from_secs(600),
            max_cgroups: 65_536,
        }
    }
}

/// Counters that make every degradation visible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResolverStats {
    pub cri_refreshes: u64,
    pub cri_errors: u64,
    /// Events of a container CRI did not know: shown with uid and id only.
    pub unnamed_container_events: u64,
    pub malformed_cgroup_paths: u64,
    pub cgroups_refused_full: u64,
}

enum CriState {
    /// Not configured, or no socket found.
    Off,
    Up,
    Down {
        retry_at: Instant,
        backoff: Duration,
    },
}

pub struct Resolver {
    cgroups: CgroupMap,
    containers: HashMap<String, (Arc<ContainerMeta>, Option<Instant>)>,
    sandboxes: HashMap<String, (Arc<SandboxMeta>, Option<Instant>)>,
    cri: Option<Cri>,
    cri_socket: Option<PathBuf>,
    cri_state: CriState,
    /// A container cgroup appeared that CRI has not been asked about yet.
    stale: bool,
    last_refresh: Option<Instant>,
    retention: Duration,
    stats: ResolverStats,
    /// Pod IP → sandbox id, from PodSandboxStatus (asked once per sandbox).
    pod_ips: HashMap<std::net::IpAddr, String>,
    /// Sandboxes whose IPs were asked for.
    ips_known: std::collections::HashSet<String>,
}

impl Resolver {
    /// Scans the existing pod cgroups and connects to CRI (without failing
    /// when it is absent: attribution then degrades, visibly).
    pub async fn new(opts: &ResolverOptions) -> Resolver {
        let mut cgroups = CgroupMap::new(opts.max_cgroups, opts.retention);
        match CgroupLayout::current().v2_root() {
            Some(root) => cgroups.scan(root),
            None => tracing::warn!(
                "no cgroup v2 hierarchy is mounted: events cannot be attributed to pods"
            ),
        }
        let cri_socket = if opts.use_cri {
            opts.cri_socket.clone().or_else(cri::detect_socket)
        } else {
            None
        };
        let mut r = Resolver {
            cgroups,
            containers: HashMap::new(),
            sandboxes: HashMap::new(),
            cri: None,
            cri_socket: cri_socket.clone(),
            cri_state: CriState::Off,
            stale: true,
            last_refresh: None,
            retention: opts.retention,
            stats: ResolverStats::default(),
            pod_ips: HashMap::new(),
            ips_known: Default::default(),
        };
        match (&cri_socket, opts.use_cri) {
            (Some(_), _) => {
                r.cri_state = CriState::Down {
                    retry_at: Instant::now(),
                    backoff: Duration::from_secs(1),
                };
                r.refresh().await;
            }
            (None, true) => tracing::warn!(
                "no CRI socket found (looked in {}): events carry pod uids and container ids but no names; pass --cri-socket",
                cri::KNOWN_SOCKETS.join(", ")
            ),
            (None, false) => {}
        }
        r
    }

    pub fn stats(&self) -> ResolverStats {
        ResolverStats {
            malformed_cgroup_paths: self.cgroups.stats.malformed_paths,
            cgroups_refused_full: self.cgroups.stats.refused_full,
            ..self.stats
        }
    }

    /// Whether CRI has been asked at least once (answering or not: without
    /// it the agent still serves, degraded and counting), or is not used.
    pub fn synced(&self) -> bool {
        matches!(self.cri_state, CriState::Off) || self.last_refresh.is_some()
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

    /// Pod cgroups and containers currently known.
    pub fn tracked(&self) -> (usize, usize) {
        (self.cgroups.len(), self.containers.len())
    }

    /// Containers' cgroups that exist now: (v2 id, path relative to the v2 root).
    pub fn live_container_cgroups(&self) -> Vec<(u64, Arc<str>)> {
        self.cgroups
            .live_containers()
            .map(|(id, p)| (id, p.clone()))
            .collect()
    }

    pub fn cgroup_created(&mut self, id: u64, path: &str) {
        if let Some(pod) = self.cgroups.insert(id, path)
            && pod
                .container_id
                .as_ref()
                .is_some_and(|c| !self.containers.contains_key(c))
        {
            self.stale = true;
        }
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
        self.containers.get(container_id).map(|(m, _)| m.attempt)
    }

    /// What CRI said about a container (kept a while after it went).
    pub fn container_meta(&self, container_id: &str) -> Option<&Arc<ContainerMeta>> {
        self.containers.get(container_id).map(|(m, _)| m)
    }

    /// Whether the container id is a pod sandbox's (pause) container.
    pub fn is_sandbox(&self, container_id: &str) -> bool {
        self.sandboxes.contains_key(container_id)
    }

    pub fn cgroup_removed(&mut self, id: u64) {
        self.cgroups.remove(id);
    }

    /// Who the task in cgroup `id` belongs to.
    pub async fn identify(&mut self, cgroup_id: u64) -> PodIdentity {
        let Some(cg) = self.cgroups.get(cgroup_id).cloned() else {
            return PodIdentity::default();
        };
        let known = |r: &Resolver| {
            cg.container_id
                .as_ref()
                .is_none_or(|c| r.containers.contains_key(c) || r.sandboxes.contains_key(c))
        };
        if !known(self) && self.refresh_allowed() {
            self.refresh().await;
        }
        let mut id = PodIdentity {
            pod_uid: Some(cg.pod_uid.clone()),
            container_id: cg.container_id.clone(),
            ..PodIdentity::default()
        };
        let container = cg
            .container_id
            .as_ref()
            .and_then(|c| self.containers.get(c))
            .map(|(m, _)| m.clone());
        if let Some(m) = container {
            id.namespace = Some(m.namespace.clone());
            id.pod = Some(m.pod.clone());
            id.container = Some(m.name.clone());
            return id;
        }
        // A pause container, or a container CRI does not know: name the pod at least.
        if let Some((s, _)) = self
            .sandboxes
            .values()
            .find(|(s, _)| s.pod_uid == cg.pod_uid)
        {
            id.namespace = Some(s.namespace.clone());
            id.pod = Some(s.pod.clone());
        }
        // The sandbox's own (pause) container: named "POD", as kubelet and
        // cAdvisor name it, so its exits (runc's bootstrap) are not unlabelled.
        if cg
            .container_id
            .as_ref()
            .is_some_and(|c| self.sandboxes.contains_key(c))
        {
            id.container = Some("POD".to_string());
        }
        if cg
            .container_id
            .as_ref()
            .is_some_and(|c| !self.sandboxes.contains_key(c))
        {
            self.stats.unnamed_container_events += 1;
        }
        id
    }

    /// A refresh is worth its cost when a new container cgroup appeared since
    /// the last one, or when CRI is due for a retry; never more than 20 times a second.
    fn refresh_allowed(&self) -> bool {
        let recent = self
            .last_refresh
            .is_some_and(|t| t.elapsed() < Duration::from_millis(50));
        match self.cri_state {
            CriState::Off => false,
            CriState::Up => self.stale && !recent,
            CriState::Down { retry_at, .. } => Instant::now() >= retry_at,
        }
    }

    /// Periodic upkeep: pick up new containers, retry CRI when down, forget
    /// what expired.
    pub async fn tick(&mut self) {
        let periodic = self
            .last_refresh
            .is_none_or(|t| t.elapsed() > Duration::from_secs(30));
        let want = match self.cri_state {
            CriState::Off => false,
            CriState::Up => self.stale || periodic,
            CriState::Down { retry_at, .. } => Instant::now() >= retry_at,
        };
        if want {
            self.refresh().await;
        }
        let now = Instant::now();
        self.cgroups.gc(now);
        let retention = self.retention;
        let keep = |gone: &Option<Instant>| gone.is_none_or(|t| now.duration_since(t) < retention);
        self.containers.retain(|_, (_, gone)| keep(gone));
        self.sandboxes.retain(|_, (_, gone)| keep(gone));
    }

    async fn refresh(&mut self) {
        self.last_refresh = Some(Instant::now());
        let Some(socket) = self.cri_socket.clone() else {
            return;
        };
        if self.cri.is_none() {
            match Cri::connect(&socket).await {
                Ok(c) => self.cri = Some(c),
                Err(e) => return self.cri_failed(e),
            }
        }
        let Some(cri) = self.cri.as_mut() else { return };
        let listed = match (cri.containers().await, cri.sandboxes().await) {
            (Ok(c), Ok(s)) => (c, s),
            (Err(e), _) | (_, Err(e)) => return self.cri_failed(e),
        };
        self.stats.cri_refreshes += 1;
        self.stale = false;
        if matches!(self.cri_state, CriState::Down { .. }) && self.stats.cri_errors > 0 {
            tracing::info!(
                "CRI at {} answers again: events carry names again",
                socket.display()
            );
        }
        self.cri_state = CriState::Up;
        let now = Instant::now();
        merge(
            &mut self.containers,
            listed.0.into_iter().map(|c| (c.id.clone(), c)),
            now,
        );
        merge(
            &mut self.sandboxes,
            listed.1.into_iter().map(|s| (s.id.clone(), s)),
            now,
        );
        self.refresh_pod_ips().await;
    }

    /// Asks CRI for the IPs of sandboxes not asked about yet (an IP does not
    /// change in a sandbox's life), and forgets those of sandboxes gone.
    async fn refresh_pod_ips(&mut self) {
        let Some(cri) = self.cri.as_mut() else { return };
        let new: Vec<String> = self
            .sandboxes
            .iter()
            .filter(|(id, (_, gone))| gone.is_none() && !self.ips_known.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in new {
            match cri.sandbox_ips(&id).await {
                Ok(ips) => {
                    for ip in ips {
                        self.pod_ips.insert(ip, id.clone());
                    }
                    self.ips_known.insert(id);
                }
                Err(e) => {
                    self.stats.cri_errors += 1;
                    tracing::debug!("{e}");
                }
            }
        }
        let sandboxes = &self.sandboxes;
        self.pod_ips.retain(|_, id| sandboxes.contains_key(id));
        self.ips_known.retain(|id| sandboxes.contains_key(id));
    }

    /// The pod an IP belongs to (namespace, name, uid), from CRI.
    pub fn pod_by_ip(&self, ip: std::net::IpAddr) -> Option<PodIdentity> {
        let id = self.pod_ips.get(&ip)?;
        let (s, _) = self.sandboxes.get(id)?;
        Some(PodIdentity {
            namespace: Some(s.namespace.clone()),
            pod: Some(s.pod.clone()),
            pod_uid: Some(s.pod_uid.clone()),
            container: None,
            container_id: None,
        })
    }

    /// Asks CRI again at the next tick (an unknown pod IP was seen).
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    fn cri_failed(&mut self, err: String) {
        self.stats.cri_errors += 1;
        let backoff = match self.cri_state {
            CriState::Down { backoff, .. } if self.stats.cri_errors > 1 => {
                (backoff * 2).min(Duration::from_secs(10))
            }
            _ => Duration::from_secs(1),
        };
        if matches!(self.cri_state, CriState::Up) || self.stats.cri_errors == 1 {
            tracing::warn!(
                "CRI unavailable ({err}): events keep their pod uid and container id; names return when it answers"
            );
        }
        // A fresh connection next time: the runtime may have restarted.
        self.cri = None;
        self.cri_state = CriState::Down {
            retry_at: Instant::now() + backoff,
            backoff,
        };
    }
}

/// Replaces a cache with what CRI listed now; entries it no longer lists are
/// kept, marked gone, for the retention.
fn merge<T>(
    cache: &mut HashMap<String, (Arc<T>, Option<Instant>)>,
    listed: impl Iterator<Item = (String, T)>,
    now: Instant,
) {
    let mut seen = std::collections::HashSet::new();
    for (id, v) in listed {
        seen.insert(id.clone());
        cache.insert(id, (Arc::new(v), None));
    }
    for (id, (_, gone)) in cache.iter_mut() {
        if !seen.contains(id) {
            gone.get_or_insert(now);
        }
    }
}
