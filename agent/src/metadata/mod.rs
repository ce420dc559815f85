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
    cri::{ContainerMeta, RuntimeEnd, SandboxMeta},
};
use crate::kernel::cgroups::CgroupLayout;

/// Who an event belongs to. All None: a host process.
///
/// The names are shared, not copied: every event of a container carries
/// the same five strings, so cloning an identity (once per event and per
/// consumer) only counts references.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PodIdentity {
    pub namespace: Option<Arc<str>>,
    pub pod: Option<Arc<str>>,
    pub pod_uid: Option<Arc<str>>,
    pub container: Option<Arc<str>>,
    pub container_id: Option<Arc<str>>,
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
    /// Container id → how the runtime reported its end (ContainerStatus),
    /// for containers that exited while the agent watched.
    pub ends: HashMap<String, Arc<RuntimeEnd>>,
    /// Exited containers whose end will not be asked or did not come (they
    /// exited before the first listing, or the answer failed).
    pub no_ends: std::collections::HashSet<String>,
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
    /// Identities already worked out, by cgroup id (with whether CRI did
    /// not name the container): an event's attribution is then one lookup
    /// and five reference counts. Forgotten whenever names or cgroups change.
    identities: HashMap<u64, (PodIdentity, bool)>,
}

/// The identity cache's bound: more cgroups than this between two changes
/// of names (CRI refreshes every few seconds) start it afresh.
const IDENTITIES_MAX: usize = 8192;

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
            identities: HashMap::new(),
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
        self.identities.clear();
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

    /// The size of every table attribution keeps (`podscope_agent_table_entries`).
    pub fn tables(&self, out: &mut Vec<(&'static str, usize)>) {
        out.extend([
            ("cgroups", self.cgroups.len()),
            ("cgroups_retained", self.cgroups.retained()),
            ("identities", self.identities.len()),
            ("cri_containers", self.names.containers.len()),
            ("cri_sandboxes", self.names.sandboxes.len()),
            ("cri_pod_ips", self.names.pod_ips.len()),
            ("cri_container_ends", self.names.ends.len()),
        ]);
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
        self.identities.remove(&id);
    }

    /// See [`CgroupMap::reconcile`].
    pub fn reconcile_cgroups(&mut self, found: &[(u64, String)], scanned_at: Instant) {
        self.cgroups.reconcile(found, scanned_at);
        self.identities.clear();
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

    /// How the runtime reported the container's end, once it has.
    pub fn runtime_end(&self, container_id: &str) -> Option<&Arc<RuntimeEnd>> {
        self.names.ends.get(container_id)
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
        let (id, unnamed) = match self.identities.get(&cgroup_id) {
            Some((id, unnamed)) => (id.clone(), *unnamed),
            None => {
                let Some(cg) = self.cgroups.get(cgroup_id) else {
                    return PodIdentity::default();
                };
                let (id, unnamed) = identity_of(cg, &self.names);
                if self.identities.len() >= IDENTITIES_MAX {
                    self.identities.clear();
                }
                self.identities.insert(cgroup_id, (id.clone(), unnamed));
                (id, unnamed)
            }
        };
        if unnamed {
            self.stats.unnamed_container_events += 1;
        }
        id
    }

    /// Forgets removed cgroups after the retention.
    pub fn gc(&mut self, now: Instant) {
        self.cgroups.gc(now);
        self.identities.clear();
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
            namespace: Some(s.namespace.as_str().into()),
            pod: Some(s.pod.as_str().into()),
            pod_uid: Some(s.pod_uid.as_str().into()),
            container: None,
            container_id: None,
        })
    }
}

/// What the cgroup's path and CRI's names say of a cgroup, and whether CRI
/// did not name its container.
fn identity_of(cg: &cgroup_path::CgroupRef, names: &Names) -> (PodIdentity, bool) {
    let shared = |s: &str| Some(Arc::<str>::from(s));
    let mut id = PodIdentity {
        pod_uid: shared(&cg.pod_uid),
        container_id: cg.container_id.as_deref().and_then(shared),
        ..PodIdentity::default()
    };
    if let Some((m, _)) = cg
        .container_id
        .as_ref()
        .and_then(|c| names.containers.get(c))
    {
        id.namespace = shared(&m.namespace);
        id.pod = shared(&m.pod);
        id.container = shared(&m.name);
        return (id, false);
    }
    // A pause container, or a container CRI does not know: name the pod at least.
    if let Some((s, _)) = names
        .sandboxes
        .values()
        .find(|(s, _)| s.pod_uid == cg.pod_uid)
    {
        id.namespace = shared(&s.namespace);
        id.pod = shared(&s.pod);
    }
    // The sandbox's own (pause) container: named "POD", as kubelet and
    // cAdvisor name it, so its exits (runc's bootstrap) are not unlabelled.
    match cg.container_id.as_ref() {
        Some(c) if names.sandboxes.contains_key(c) => {
            id.container = shared("POD");
            (id, false)
        }
        Some(_) => (id, true),
        None => (id, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b1e5c2a-5d0e-4e8e-9a57-5f0b8c1d2e3f";
    const CID: &str = "4f3c2b1a00000000000000000000000000000000000000000000000000000000";

    fn resolver_with_container() -> Resolver {
        let mut r = Resolver::new(&ResolverOptions {
            use_cri: false,
            ..Default::default()
        });
        r.cgroup_created(7, &format!("/kubepods/burstable/pod{UID}/{CID}"));
        r
    }

    fn names_of(container: &str) -> Arc<Names> {
        let meta = ContainerMeta {
            id: CID.into(),
            name: container.into(),
            attempt: 0,
            namespace: "shop".into(),
            pod: "cart".into(),
            pod_uid: UID.into(),
            sandbox_id: "s".into(),
            pod_grace_seconds: None,
            pre_stop_handler: None,
            container_type: None,
            ports: None,
            exited: false,
        };
        let mut names = Names {
            state: CriState::Up,
            ..Names::default()
        };
        names.containers.insert(CID.into(), (Arc::new(meta), None));
        Arc::new(names)
    }

    /// The identities kept between events follow CRI: a container named
    /// after its first events carries the names from then on, and a
    /// rename (a new snapshot) is seen at once; unnamed events are counted
    /// one by one although their identity is remembered.
    #[test]
    fn remembered_identities_follow_the_names() {
        let mut r = resolver_with_container();
        let id = r.identify(7);
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.container_id.as_deref(), Some(CID));
        assert_eq!(id.container, None);
        r.identify(7);
        assert_eq!(r.stats().unnamed_container_events, 2);

        r.set_names(names_of("app"));
        let id = r.identify(7);
        assert_eq!(
            (
                id.namespace.as_deref(),
                id.pod.as_deref(),
                id.container.as_deref()
            ),
            (Some("shop"), Some("cart"), Some("app"))
        );
        assert_eq!(r.stats().unnamed_container_events, 2);

        r.set_names(names_of("worker"));
        assert_eq!(r.identify(7).container.as_deref(), Some("worker"));
        // A host process (a cgroup not in the map) is nobody's.
        assert!(r.identify(8).is_host());
    }
}
