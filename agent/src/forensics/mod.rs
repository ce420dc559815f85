//! Termination forensics: one record per container death, joining the
//! main process's exit, the signals sent to it and by whom, and any OOM
//! kill, into a reason and an explanation (see [`record`]); and the deaths
//! of other processes that Kubernetes never sees.
//!
//! ```text
//! first exec ───▶ main process of each container (its entrypoint)
//! mark_victim ───▶ OOM (scope read from the cgroup files at once) ─┐
//! signal_generate ▶ per-container signal history ──────────────────┼─▶ main exits: TerminationRecord
//! exits ─────────▶ main exit, or a background death ───────────────┘   others: BackgroundDeath
//! ```
//!
//! Events of one moment come from different ring buffers, so a record is
//! finished one drain later ([`SETTLE`]): the OOM or the signal that
//! explains an exit may be read just after it.

pub mod journal;
pub mod netprobe;
pub mod record;
pub mod respawn;
pub mod role;
pub mod runtime_report;
pub mod scope;
pub mod state_dir;
pub mod store;
pub mod trigger;

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use self::{
    netprobe::{NetProbes, ProbeConnection},
    record::{
        Death, DeathCause, Evidence, MainExit, OomDetails, Reason, Sender, SenderKind,
        StopTimeline, TerminationRecord, decide, explain,
    },
    respawn::{ChildExit, RespawnReport, Respawns},
    role::ContainerType,
    runtime_report::RuntimeReports,
    scope::ScopeReader,
    trigger::{Aftermath, DeclaredHook, RuntimeExec, StopShape, TRIGGER_WAIT},
};
use crate::{
    events::Event,
    kernel::cgroups::CgroupLayout,
    metadata::{PodIdentity, Resolver},
    probes::{
        exits::Exit,
        oom::OomKill,
        signals::{Delivery, Handler, Origin, Signal},
    },
};

/// How long a finished main exit waits for the signals and OOM events that
/// explain it to be read from their ring buffers.
pub const SETTLE: Duration = Duration::from_millis(250);
/// An OOM whose victim has not been seen (by its SIGKILL or exit) by then is
/// reported with what is known.
const OOM_MATCH_WINDOW: Duration = Duration::from_secs(2);
const SIGNALS_KEPT: usize = 32;
const DEATHS_KEPT: usize = 5;
const OOMS_KEPT: usize = 4;
/// Processes the runtime exec'd into a container (probes, hooks) kept per container.
const EXECS_KEPT: usize = 32;
/// Sandbox ends and container starts remembered per pod, to decide triggers.
const POD_EVENTS_KEPT: usize = 4096;

/// Container runtimes' process names (as the kernel truncates them to 15
/// bytes): a signal from one of them is a stop the runtime carried out.
const RUNTIME_COMMS: &[&str] = &[
    "runc",
    "crun",
    "youki",
    "runsc",
    "containerd-shim",
    "containerd",
    "conmon",
    "crio",
    "dockerd",
    "docker-init",
    "cri-dockerd",
    "kata-runtime",
    "kata-shim",
];

/// A process of a container that died while the container lived on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackgroundDeath {
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    #[serde(flatten)]
    pub pod: PodIdentity,
    #[serde(flatten)]
    pub death: Death,
}

/// What the engine produces.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    Termination(Box<TerminationRecord>),
    BackgroundDeath(Box<BackgroundDeath>),
    Oom(Box<OomKill>),
    /// A command a process of the container restarted again.
    Respawn(Box<RespawnReport>),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ForensicsStats {
    pub terminations: u64,
    pub background_deaths: u64,
    pub oom_kills: u64,
    /// Containers whose cgroup went without a termination record: the main
    /// process was not known (started before podscope and not found in
    /// /proc) or its exit was lost.
    pub unknown_main: u64,
    /// Containers forgotten because the table was full.
    pub evicted: u64,
    /// Records and the runtime's reports of the ends.
    pub runtime: runtime_report::RuntimeReportStats,
}

#[derive(Default)]
struct ContainerState {
    main: Option<u32>,
    signals: VecDeque<Signal>,
    ooms: VecDeque<OomKill>,
    deaths: VecDeque<Death>,
    /// Processes the runtime exec'd into it (exec probes and hooks), oldest first.
    execs: VecDeque<RuntimeExec>,
    /// Commands restarted under a living parent (a supervisor).
    respawns: Respawns,
    ended: bool,
    removed: Option<Instant>,
}

struct Pending {
    due: Instant,
    cgroup_id: u64,
    exit: Exit,
    attempt: Option<u32>,
    /// When the exit was handled (to order a new container of the pod after it).
    seen: Instant,
    /// kubelet's annotations on the container, from CRI.
    pod_grace: Option<i64>,
    pre_stop: DeclaredHook,
    container_type: Option<ContainerType>,
    /// The container's declared TCP ports (kubelet's annotation).
    ports: Vec<u16>,
}

/// A record of a runtime stop that waits for what the pod does next.
struct Awaiting {
    due: Instant,
    seen: Instant,
    pod_uid: String,
    stop_ns: u64,
    shape: StopShape,
    record: TerminationRecord,
    /// Connections from the node to the pod's probed port before the kill.
    net: Vec<ProbeConnection>,
    kill_at: SystemTime,
}

pub struct Forensics {
    containers: HashMap<u64, ContainerState>,
    /// Recent SIGKILLs, to find an OOM victim's container.
    recent_kills: VecDeque<Signal>,
    /// OOMs whose victim's container is not known yet.
    unmatched_ooms: VecDeque<(Instant, OomKill)>,
    pending: Vec<Pending>,
    awaiting: Vec<Awaiting>,
    /// Pod uid → when its sandbox's process ended (ns since boot).
    sandbox_ends: HashMap<String, u64>,
    /// Pod uid → when a container of the pod last started (its first exec).
    container_starts: HashMap<String, Instant>,
    /// Pod uid → when an app (not init) container of the pod last started.
    app_starts: HashMap<String, Instant>,
    /// Container id → (pod uid, first exec) of containers CRI had not listed
    /// yet at their first exec: init or app is settled once it has.
    untyped_starts: HashMap<String, (String, Instant)>,
    /// Connections to pods' addresses from no pod of this node (kubelet's
    /// httpGet and tcpSocket probes among them).
    net: NetProbes,
    findings: Vec<Finding>,
    /// Containers found at start-up whose main process is not known yet.
    unadopted: Vec<(u64, std::path::PathBuf, u32)>,
    scope: ScopeReader,
    /// The v2 hierarchy, to find a container's main process in /proc.
    v2_root: Option<std::path::PathBuf>,
    /// Finished records waiting for the runtime's report of the end.
    pub runtime: RuntimeReports,
    cap: usize,
    pub stats: ForensicsStats,
}

impl Forensics {
    pub fn new(layout: &CgroupLayout, cap: usize) -> Forensics {
        Forensics {
            containers: HashMap::new(),
            recent_kills: VecDeque::new(),
            unmatched_ooms: VecDeque::new(),
            pending: vec![],
            awaiting: vec![],
            sandbox_ends: HashMap::new(),
            container_starts: HashMap::new(),
            app_starts: HashMap::new(),
            untyped_starts: HashMap::new(),
            net: NetProbes::default(),
            findings: vec![],
            unadopted: vec![],
            scope: ScopeReader::new(layout),
            v2_root: layout.v2_root().cloned(),
            runtime: RuntimeReports::default(),
            cap,
            stats: ForensicsStats::default(),
        }
    }

    /// Containers that existed before podscope: their main process from
    /// /proc. A container still being created (only the runtime's bootstrap
    /// in it) is looked at again on the next ticks, for a few seconds.
    pub fn adopt_running(&mut self, resolver: &Resolver, v2_root: &Path) {
        let found: Vec<(u64, std::path::PathBuf)> = resolver
            .live_cgroups()
            .filter(|(_, _, r)| r.container_id.is_some())
            .map(|(id, path, _)| (id, v2_root.join(path.trim_start_matches('/'))))
            .collect();
        for (id, dir) in found {
            match guess_main(&dir) {
                Some(main) => {
                    self.state(id).main.get_or_insert(main);
                }
                None => self.unadopted.push((id, dir, 0)),
            }
        }
    }

    /// The containers [`Forensics::adopt_running`] could not settle yet:
    /// (cgroup id, its v2 directory). Their main process is looked for
    /// off the drain thread (it reads cgroupfs and /proc) and reported
    /// with [`Forensics::adoption_tried`].
    pub fn unadopted(&self) -> Vec<(u64, std::path::PathBuf)> {
        self.unadopted
            .iter()
            .map(|(id, dir, _)| (*id, dir.clone()))
            .collect()
    }

    /// What a look at an unadopted container found (None: nothing yet; it
    /// is looked at again, up to ten times, while its directory exists).
    pub fn adoption_tried(&mut self, cgroup_id: u64, main: Option<u32>, dir_exists: bool) {
        let Some(i) = self
            .unadopted
            .iter()
            .position(|(id, _, _)| *id == cgroup_id)
        else {
            return;
        };
        match main {
            Some(main) => {
                self.unadopted.swap_remove(i);
                self.state(cgroup_id).main.get_or_insert(main);
            }
            None => {
                self.unadopted[i].2 += 1;
                if self.unadopted[i].2 >= 10 || !dir_exists {
                    self.unadopted.swap_remove(i);
                }
            }
        }
    }

    fn state(&mut self, cgroup_id: u64) -> &mut ContainerState {
        if self.containers.len() >= self.cap && !self.containers.contains_key(&cgroup_id) {
            // Forget the longest-removed container first, else any.
            let victim = self
                .containers
                .iter()
                .filter_map(|(id, s)| s.removed.map(|t| (t, *id)))
                .min()
                .map(|(_, id)| id)
                .or_else(|| self.containers.keys().next().copied());
            if let Some(v) = victim {
                self.containers.remove(&v);
                self.stats.evicted += 1;
            }
        }
        self.containers.entry(cgroup_id).or_default()
    }

    /// The first exec in a container's cgroup: its entrypoint, the main process.
    pub fn on_first_exec(&mut self, resolver: &Resolver, cgroup_id: u64, tgid: u32) {
        let Some(r) = resolver.cgroup(cgroup_id) else {
            return;
        };
        let Some(cid) = r.container_id.as_deref() else {
            return;
        };
        if !resolver.is_sandbox(cid) {
            // A new container of the pod: a restart, for a stop waiting to be explained.
            bounded_insert(
                &mut self.container_starts,
                r.pod_uid.clone(),
                Instant::now(),
            );
            // A container that starts at once (an init container that
            // exits 1) can run before CRI's next listing names its type.
            match is_app(resolver, cid) {
                Some(false) => {}
                Some(true) => {
                    bounded_insert(&mut self.app_starts, r.pod_uid.clone(), Instant::now())
                }
                None => bounded_insert(
                    &mut self.untyped_starts,
                    cid.to_string(),
                    (r.pod_uid.clone(), Instant::now()),
                ),
            }
        }
        self.state(cgroup_id).main.get_or_insert(tgid);
    }

    /// Starts whose container CRI has listed since: app starts are kept,
    /// init ones dropped. Before records are finished, so that a failed init
    /// container's sentence knows whether the app containers started.
    fn settle_starts(&mut self, resolver: &Resolver) {
        if self.untyped_starts.is_empty() {
            return;
        }
        let app_starts = &mut self.app_starts;
        self.untyped_starts
            .retain(|cid, (uid, at)| match is_app(resolver, cid) {
                None => true,
                Some(false) => false,
                Some(true) => {
                    let last = app_starts.entry(uid.clone()).or_insert(*at);
                    *last = (*last).max(*at);
                    false
                }
            });
    }

    /// The size of every table forensics keeps (`podscope_agent_table_entries`):
    /// each is bounded, and this is how that is seen on a live node.
    pub fn tables(&self, out: &mut Vec<(&'static str, usize)>) {
        let items: usize = self
            .containers
            .values()
            .map(|s| {
                s.signals.len() + s.ooms.len() + s.deaths.len() + s.execs.len() + s.respawns.len()
            })
            .sum();
        let (net_pods, net_conns) = self.net.entries();
        out.extend([
            ("forensics_containers", self.containers.len()),
            ("forensics_container_events", items),
            ("forensics_recent_kills", self.recent_kills.len()),
            ("forensics_unmatched_ooms", self.unmatched_ooms.len()),
            ("forensics_pending", self.pending.len()),
            ("forensics_awaiting", self.awaiting.len()),
            ("forensics_awaiting_runtime", self.runtime.len()),
            ("forensics_sandbox_ends", self.sandbox_ends.len()),
            ("forensics_container_starts", self.container_starts.len()),
            ("forensics_app_starts", self.app_starts.len()),
            ("forensics_untyped_starts", self.untyped_starts.len()),
            ("forensics_unadopted", self.unadopted.len()),
            ("forensics_oom_counts", self.scope.entries()),
            ("netprobe_pods", net_pods),
            ("netprobe_connections", net_conns),
        ]);
    }

    /// A container's cgroup went. If its main process's end was not seen
    /// (it started before podscope and /proc did not tell, or an event was
    /// lost), that is counted: a death without a record.
    pub fn on_removed(&mut self, cgroup_id: u64) {
        if let Some(s) = self.containers.get_mut(&cgroup_id) {
            if s.removed.is_none() && !s.ended {
                self.stats.unknown_main += 1;
            }
            s.removed.get_or_insert_with(Instant::now);
        }
    }

    /// An OOM kill: its scope is read now, while the cgroups still exist.
    pub fn on_oom(&mut self, resolver: &Resolver, mut oom: OomKill) {
        let trigger_container = resolver
            .cgroup(oom.trigger_cgroup_id)
            .filter(|r| r.container_id.is_some())
            .and_then(|_| resolver.cgroup_path(oom.trigger_cgroup_id));
        // The kernel's counters at the OOM when the probe read them; the
        // cgroup files otherwise (they may be gone already).
        oom.scope = scope::from_levels(&oom.memcg, trigger_container)
            .or_else(|| Some(self.scope.read(trigger_container)));
        tracing::debug!(
            trigger = ?trigger_container,
            scope = ?oom.scope,
            "OOM kill of pid {}",
            oom.victim_pid
        );
        let kill = self
            .recent_kills
            .iter()
            .rev()
            .find(|k| k.target.tgid == oom.victim_pid)
            .cloned();
        match kill {
            Some(k) => self.oom_matched(oom, k.target.cgroup_id, &k.target.pod),
            None => self.unmatched_ooms.push_back((Instant::now(), oom)),
        }
    }

    fn oom_matched(&mut self, mut oom: OomKill, cgroup_id: u64, pod: &PodIdentity) {
        oom.victim_cgroup_id = cgroup_id;
        oom.pod = pod.clone();
        self.stats.oom_kills += 1;
        if pod.container_id.is_some() {
            let s = self.state(cgroup_id);
            if s.ooms.len() == OOMS_KEPT {
                s.ooms.pop_front();
            }
            s.ooms.push_back(oom.clone());
        }
        self.findings.push(Finding::Oom(Box::new(oom)));
    }

    /// A signal, attributed on both sides.
    pub fn on_signal(&mut self, sig: &Signal) {
        if sig.signo == 9 {
            if let Some(i) = self
                .unmatched_ooms
                .iter()
                .position(|(_, o)| o.victim_pid == sig.target.tgid)
                && let Some((_, oom)) = self.unmatched_ooms.remove(i)
            {
                self.oom_matched(oom, sig.target.cgroup_id, &sig.target.pod);
            }
            if self.recent_kills.len() == SIGNALS_KEPT {
                self.recent_kills.pop_front();
            }
            self.recent_kills.push_back(sig.clone());
        }
        if sig.target.pod.container_id.is_some() {
            let s = self.state(sig.target.cgroup_id);
            if s.signals.len() == SIGNALS_KEPT {
                s.signals.pop_front();
            }
            s.signals.push_back(sig.clone());
        }
    }

    /// An exit, attributed.
    pub fn on_exit(&mut self, resolver: &Resolver, exit: &Exit) {
        if exit.thread || exit.pod.container_id.is_none() {
            return;
        }
        let cid = exit.pod.container_id.as_deref().unwrap_or_default();
        if resolver.is_sandbox(cid) || exit.pod.container.as_deref() == Some("POD") {
            // The pause container: its end is the pod's teardown, not a death
            // to explain. Only its main process's end is: runc's bootstrap
            // (`runc:[…]`) and other short processes in its cgroup end at the
            // pod's creation.
            let state = self.containers.get_mut(&exit.cgroup_id);
            if exit.comm.starts_with("runc:[") {
                // The bootstrap may have been taken for the main process.
                if let Some(s) = state.filter(|s| s.main == Some(exit.tgid)) {
                    s.main = None;
                }
                return;
            }
            if state.and_then(|s| s.main).is_some_and(|m| m != exit.tgid) {
                return;
            }
            if let Some(s) = self.containers.get_mut(&exit.cgroup_id) {
                s.ended = true;
            }
            if let Some(uid) = &exit.pod.pod_uid {
                bounded_insert(&mut self.sandbox_ends, uid.to_string(), exit.ts_boot_ns);
            }
            return;
        }
        // An OOM victim whose SIGKILL was not seen is found by its exit.
        if let Some(i) = self
            .unmatched_ooms
            .iter()
            .position(|(_, o)| o.victim_pid == exit.tgid)
            && let Some((_, oom)) = self.unmatched_ooms.remove(i)
        {
            self.oom_matched(oom, exit.cgroup_id, &exit.pod);
        }
        let attempt = resolver.attempt(cid);
        let meta = resolver.container_meta(cid);
        let pod_grace = meta.and_then(|m| m.pod_grace_seconds);
        let pre_stop = DeclaredHook::parse(meta.and_then(|m| m.pre_stop_handler.as_deref()));
        let container_type =
            ContainerType::from_annotation(meta.and_then(|m| m.container_type.as_deref()));
        let ports = netprobe::declared_ports(meta.and_then(|m| m.ports.as_deref()));
        // The runtime's own bootstrap (`runc:[1:CHILD]`) is no exec'd command.
        let runtime_exec = !exit.comm.starts_with("runc:[") && is_runtime_comm(&exit.parent_comm);
        let s = self.state(exit.cgroup_id);
        if s.ended && !runtime_exec {
            return;
        }
        if s.main == Some(exit.tgid) && exit.comm.starts_with("runc:[") {
            // runc's bootstrap exec'd first (runc re-executes a copy of
            // itself, racing with its move into the cgroup): not the
            // entrypoint. The real one is the pid namespace's init, alive
            // now: found in /proc, or retried on the next ticks.
            let dir = self
                .v2_root
                .as_ref()
                .zip(resolver.cgroup_path(exit.cgroup_id))
                .map(|(root, path)| root.join(path.trim_start_matches('/')));
            let main = dir.as_deref().and_then(guess_main);
            let s = self.state(exit.cgroup_id);
            s.main = main;
            if let (None, Some(dir)) = (main, dir) {
                self.unadopted.push((exit.cgroup_id, dir, 0));
            }
            return;
        }
        if s.main == Some(exit.tgid) {
            if s.ended {
                // The same exit again (it is not a second termination).
                return;
            }
            s.ended = true;
            self.pending.push(Pending {
                due: Instant::now() + SETTLE,
                cgroup_id: exit.cgroup_id,
                exit: exit.clone(),
                attempt,
                seen: Instant::now(),
                pod_grace,
                pre_stop,
                container_type,
                ports,
            });
            return;
        }
        if runtime_exec {
            // An exec probe or hook: evidence for the trigger, not a death.
            if s.execs.len() == EXECS_KEPT {
                s.execs.pop_front();
            }
            let lifetime = Duration::from_nanos(exit.lifetime_ns);
            s.execs.push_back(RuntimeExec {
                pid: exit.tgid,
                command: exit.comm.clone(),
                started_at: exit.ts.checked_sub(lifetime).unwrap_or(exit.ts),
                duration_seconds: lifetime.as_secs_f64(),
                exit_code: exit.exit_code,
                signal: exit.signal.as_ref().map(|s| s.to_string()),
                start_boot_ns: exit.ts_boot_ns.saturating_sub(exit.lifetime_ns),
                end_boot_ns: exit.ts_boot_ns,
            });
            return;
        }
        let main = s.main;
        let respawn = s
            .respawns
            .on_exit(
                &ChildExit {
                    comm: &exit.comm,
                    ppid: exit.ppid,
                    parent_comm: &exit.parent_comm,
                    exit_code: exit.exit_code,
                    signal: exit.signal.as_deref(),
                    at: exit.ts,
                },
                main,
            )
            .cloned();
        let main_alive = !s.ended;
        if let Some(respawn) = respawn {
            self.findings.push(Finding::Respawn(Box::new(RespawnReport {
                pod: exit.pod.clone(),
                main_pid: main,
                main_alive,
                respawn,
            })));
        }
        let s = self.state(exit.cgroup_id);
        let Some(death) = death_of(exit, s) else {
            return;
        };
        if s.deaths.len() == DEATHS_KEPT {
            s.deaths.pop_front();
        }
        s.deaths.push_back(death.clone());
        let teardown = death
            .sender
            .as_ref()
            .is_some_and(|x| x.kind == SenderKind::PidNamespaceTeardown);
        if death.cause != DeathCause::Error && !teardown {
            self.stats.background_deaths += 1;
            self.findings
                .push(Finding::BackgroundDeath(Box::new(BackgroundDeath {
                    ts: exit.ts,
                    pod: exit.pod.clone(),
                    death,
                })));
        }
    }

    /// Published packet events: TCP connections to a pod's address from a
    /// source that is no pod of this node, and their refusals or drops
    /// (see [`netprobe`]).
    pub fn on_net_events(&mut self, resolver: &Resolver, events: &[Event]) {
        // The pod a connection from outside the node's pods goes to.
        let target = |src: std::net::SocketAddr, dst: std::net::SocketAddr| {
            if resolver.is_pod_ip(src.ip()) {
                return None;
            }
            resolver.pod_by_ip(dst.ip())?.pod_uid
        };
        for e in events {
            match e {
                Event::Connection(c) if c.protocol == "tcp" => {
                    if let Some(uid) = target(c.src, c.dst) {
                        self.net.connection(&uid, c.ts, c.src, c.dst);
                    }
                }
                Event::Drop(d) if d.protocol == Some("tcp") => {
                    if let (Some(src), Some(dst)) = (d.src, d.dst)
                        && let Some(uid) = target(src, dst)
                    {
                        self.net.drop(&uid, d.ts, src, dst, &d.reason);
                    }
                }
                _ => {}
            }
        }
    }

    /// Records that are due (finished: next they wait for the runtime's
    /// report, see [`Forensics::await_runtime`]), deaths and OOMs found
    /// since the last call.
    pub fn take_findings(&mut self, resolver: &Resolver, now: Instant) -> Vec<Finding> {
        self.settle_starts(resolver);
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.due <= now);
        self.pending = later;
        for p in due {
            if let Some(record) = self.finish(p) {
                self.findings.push(Finding::Termination(Box::new(record)));
            }
        }
        self.settle_triggers(now);
        while let Some((t, _)) = self.unmatched_ooms.front() {
            if now.duration_since(*t) < OOM_MATCH_WINDOW {
                break;
            }
            if let Some((_, oom)) = self.unmatched_ooms.pop_front() {
                self.stats.oom_kills += 1;
                self.findings.push(Finding::Oom(Box::new(oom)));
            }
        }
        std::mem::take(&mut self.findings)
    }

    /// A finished record, to wait for the runtime's report of the end.
    pub fn await_runtime(&mut self, record: Box<TerminationRecord>) {
        self.runtime.add(record, Instant::now());
    }

    /// The records whose runtime report came, or that waited long enough,
    /// in order (a `now` far ahead, at stop, releases every one).
    pub fn released(&mut self, resolver: &Resolver, now: Instant) -> Vec<Box<TerminationRecord>> {
        let out = self.runtime.take(resolver, now);
        self.stats.terminations += out.len() as u64;
        self.stats.runtime = self.runtime.stats;
        out
    }

    /// Forgets containers a minute after their cgroup went (from the
    /// periodic tick, not every drain: the table can hold thousands).
    pub fn gc(&mut self, now: Instant) {
        self.containers.retain(|_, s| {
            s.removed
                .is_none_or(|t| now.duration_since(t) < Duration::from_secs(60))
        });
        self.container_starts
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        // An app start is kept while the pod may still have init containers
        // failing (a pod's init phase can last long; the map is bounded).
        self.app_starts
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(3600));
        self.untyped_starts
            .retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(3600));
        // A sandbox's end matters to the stops awaiting their aftermath
        // (seconds); an hour is ample, and keeps the map to the churn of one.
        let hour_ago = crate::kernel::clock::boot_ns().saturating_sub(3600 * 1_000_000_000);
        self.sandbox_ends.retain(|_, ended| *ended >= hour_ago);
        self.net.gc(SystemTime::now());
        self.scope.gc();
    }

    /// Decides the waiting records whose pod did something since (its
    /// sandbox ended, a container started), or whose wait is over.
    fn settle_triggers(&mut self, now: Instant) {
        let waiting = std::mem::take(&mut self.awaiting);
        for mut a in waiting {
            let sandbox = self.sandbox_ends.get(&a.pod_uid).copied();
            let started = self
                .container_starts
                .get(&a.pod_uid)
                .is_some_and(|t| *t > a.seen);
            let aftermath = match sandbox {
                Some(end) => Some(Aftermath::SandboxEnded {
                    after_seconds: (end as f64 - a.stop_ns as f64) / 1e9,
                }),
                None if started => Some(Aftermath::NewContainer {
                    name: a.record.pod.container.as_deref().map(str::to_string),
                }),
                None if now >= a.due => Some(Aftermath::Nothing),
                None => None,
            };
            match aftermath {
                Some(x) => {
                    let mut t = trigger::from_aftermath(&x, &a.shape);
                    // A new container in the same pod after the node's
                    // connections to it: a network probe (see netprobe).
                    let net = netprobe::trigger(&a.net, a.kill_at);
                    match (&x, net) {
                        (Aftermath::NewContainer { .. }, Some(n)) => t = n,
                        (Aftermath::Nothing, Some(mut n))
                            if n.basis == trigger::Basis::Observed =>
                        {
                            n.decided = false;
                            t = n;
                        }
                        _ => t.probe_connections = std::mem::take(&mut a.net),
                    }
                    a.record.trigger = Some(t);
                    self.findings.push(Finding::Termination(Box::new(a.record)));
                }
                None => self.awaiting.push(a),
            }
        }
    }

    /// Whether anything waits to be finished (the caller drains again soon).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
            || !self.unmatched_ooms.is_empty()
            || !self.awaiting.is_empty()
            || !self.runtime.is_empty()
    }

    /// Builds the record; None when it waits for its trigger's evidence
    /// (then [`Forensics::settle_triggers`] emits it).
    fn finish(&mut self, p: Pending) -> Option<TerminationRecord> {
        let s = self.containers.entry(p.cgroup_id).or_default();
        let exit = &p.exit;
        let main = exit.tgid;
        let to_main: Vec<&Signal> = s
            .signals
            .iter()
            .filter(|x| x.target.tgid == main && x.ts_boot_ns <= exit.ts_boot_ns)
            .collect();
        let exit_boot = exit.ts_boot_ns;
        let oom = s
            .ooms
            .iter()
            .rev()
            .find(|o| o.victim_pid == main)
            .map(|o| OomDetails::new(o.victim_pid, &o.victim_comm, o.scope.as_ref(), o.memory));
        let oom_kill_ts = s
            .ooms
            .iter()
            .rev()
            .find(|o| o.victim_pid == main)
            .map(|o| o.ts_boot_ns);
        let kind_of = |x: &Signal| {
            classify(
                x,
                oom_kill_ts.is_some_and(|t| x.signo == 9 && x.ts_boot_ns >= t),
            )
        };
        let sigterm = to_main.iter().find(|x| x.signo == 15).copied();
        let sigkill = to_main.iter().rev().find(|x| x.signo == 9).copied();
        let mut stop = StopTimeline::default();
        if let Some(t) = sigterm {
            stop.sigterm_at = Some(t.ts);
            stop.sigterm_sender = Some(kind_of(t));
            stop.sigterm_handled = Some(
                t.delivery == Delivery::Delivered && t.handler == Handler::Custom
                    || exit.signal.is_none(),
            );
            // SIG_DFL to a namespace's init: the kernel drops it.
            stop.sigterm_discarded =
                Some(t.delivery == Delivery::Ignored && t.handler == Handler::Default);
            let end = sigkill.map_or(exit_boot, |k| k.ts_boot_ns);
            stop.grace_used_seconds = Some(end.saturating_sub(t.ts_boot_ns) as f64 / 1e9);
        }
        if let Some(k) = sigkill {
            stop.sigkill_at = Some(k.ts);
            stop.sigkill_sender = Some(kind_of(k));
        }
        // The signal that ended it: the last one of its kind sent to it.
        let fatal = exit
            .signal
            .as_ref()
            .and_then(|_| {
                to_main
                    .iter()
                    .rev()
                    .find(|x| Some(x.signal.as_ref()) == exit.signal.as_deref())
            })
            .copied();
        let fatal_sender = fatal.map(|x| sender_of(x, kind_of(x)));
        let fatal_was_fault = fatal.is_some_and(|x| x.origin == Origin::Fault);
        let signo = exit
            .signal
            .as_ref()
            .map(|n| (crate::signals::number(n).unwrap_or(0), n.clone()));
        let main_exit = MainExit {
            pid: main,
            comm: &exit.comm,
            exit_code: exit.exit_code,
            signal: signo.clone(),
            core_dumped: exit.core_dumped,
        };
        let ev = Evidence {
            fatal_sender: fatal_sender.as_ref(),
            fatal_was_fault,
            oom: oom.as_ref(),
            stop: &stop,
        };
        let reason = decide(&main_exit, &ev);
        let deaths: Vec<Death> = s.deaths.iter().cloned().collect();
        let explanation = explain(&main_exit, reason, &ev, &deaths);
        let sender = match reason {
            Reason::KilledAfterGracePeriod => sigkill.map(|k| sender_of(k, kind_of(k))),
            Reason::GracefulStop => sigterm.map(|t| sender_of(t, kind_of(t))),
            Reason::OomKilled | Reason::NodeOomKilled => fatal_sender.clone().map(|mut x| {
                x.kind = SenderKind::OomKiller;
                x
            }),
            _ => fatal_sender.clone(),
        };
        // Why the runtime stopped it: the preStop hook and failing exec
        // probes among the runtime's execs; else what the pod does next.
        let runtime_stop = stop.sigterm_sender.is_some_and(SenderKind::is_stop)
            || stop.sigkill_sender.is_some_and(SenderKind::is_stop);
        let stop_ns = sigterm.or(sigkill).map_or(exit_boot, |x| x.ts_boot_ns);
        let execs: Vec<RuntimeExec> = s.execs.iter().cloned().collect();
        let (hook_at, hook) = trigger::pre_stop(&execs, stop_ns, sigterm.is_some(), &p.pre_stop);
        let probe = if runtime_stop {
            // The probe failed before kubelet began the kill (the hook's start).
            let kill_ns = hook_at
                .and_then(|i| execs.get(i))
                .map_or(stop_ns, |e| e.start_boot_ns);
            trigger::probe_trigger(&execs, hook_at, kill_ns)
        } else {
            None
        };
        let shape = StopShape {
            killed_after: sigkill
                .zip(sigterm)
                .map(|(k, t)| k.ts_boot_ns.saturating_sub(t.ts_boot_ns) as f64 / 1e9),
            pod_grace: p.pod_grace,
            pre_stop_ran: hook.ran,
            pre_stop_declared: p.pre_stop != DeclaredHook::None,
            pre_stop_seconds: hook.duration_seconds.unwrap_or(0.0),
        };
        let pod_uid = exit.pod.pod_uid.clone();
        // A failed init container: what it held back, in the same sentence.
        let explanation = match &p.container_type {
            Some(t) if t.is_init() && reason != Reason::Completed && !runtime_stop => {
                // A start of a type still unknown may have been an app
                // container's: then nothing is claimed.
                let app_started = pod_uid.as_ref().is_some_and(|u| {
                    self.app_starts.get(&**u).is_some_and(|t| *t <= p.seen)
                        || self
                            .untyped_starts
                            .values()
                            .any(|(pu, t)| pu.as_str() == &**u && *t <= p.seen)
                });
                let name = exit.pod.container.as_deref().unwrap_or("?");
                match role::blocked_sentence(app_started) {
                    Some(blocked) => format!("init container {name}: {explanation}; {blocked}"),
                    None => format!("init container {name}: {explanation}"),
                }
            }
            _ => explanation,
        };
        let respawns = s.respawns.reported();
        let record = TerminationRecord {
            pod: exit.pod.clone(),
            restart_attempt: p.attempt,
            started_at: exit.ts.checked_sub(exit.lifetime()).unwrap_or(exit.ts),
            finished_at: exit.ts,
            pid: main,
            comm: exit.comm.clone(),
            exit_code: match (&signo, exit.exit_code) {
                (Some((n, _)), _) => 128 + n,
                (None, code) => u32::from(code.unwrap_or(0)),
            },
            signal: exit.signal.as_ref().map(|s| s.to_string()),
            core_dumped: exit.core_dumped,
            reason,
            explanation,
            sender,
            stop,
            oom,
            previous_deaths: deaths,
            trigger: probe.clone(),
            pre_stop: (runtime_stop && (hook.ran || hook.declared.is_some())).then_some(hook),
            late_connections: None,
            runtime_reported: None,
            container_type: p.container_type.clone(),
            respawns,
        };
        match (runtime_stop, probe, pod_uid) {
            (true, None, Some(pod_uid)) => {
                // kubelet began the kill with the preStop hook, else SIGTERM.
                let kill_at = record
                    .pre_stop
                    .as_ref()
                    .and_then(|h| h.started_at)
                    .or(record.stop.sigterm_at)
                    .or(record.stop.sigkill_at)
                    .unwrap_or(record.finished_at);
                let net = self.net.before(&pod_uid, kill_at, &p.ports);
                self.awaiting.push(Awaiting {
                    net,
                    kill_at,
                    due: Instant::now() + TRIGGER_WAIT,
                    seen: p.seen,
                    pod_uid: pod_uid.to_string(),
                    stop_ns,
                    shape,
                    record,
                });
                None
            }
            _ => Some(record),
        }
    }
}

/// A container runtime's process (or runc's exec bootstrap, `runc:[1:CHILD]`):
/// a process whose parent is one was exec'd into the container by the
/// runtime (an exec probe or hook), not started by the container's processes.
fn is_runtime_comm(comm: &str) -> bool {
    RUNTIME_COMMS.contains(&comm) || comm.starts_with("runc:[")
}

/// Whether CRI lists the container as one of the pod's app containers:
/// not an init container, not the sandbox (None: CRI has not listed it yet).
fn is_app(resolver: &Resolver, container_id: &str) -> Option<bool> {
    if resolver.is_sandbox(container_id) {
        return Some(false);
    }
    resolver.container_meta(container_id).map(|m| {
        !ContainerType::from_annotation(m.container_type.as_deref()).is_some_and(|t| t.is_init())
    })
}

/// Inserts into a map that must stay bounded (a burst of pods cannot grow it).
fn bounded_insert<V>(m: &mut HashMap<String, V>, k: String, v: V) {
    if m.len() >= POD_EVENTS_KEPT && !m.contains_key(&k) {
        m.clear();
    }
    m.insert(k, v);
}

/// How a background process died, if that matters.
fn death_of(exit: &Exit, s: &ContainerState) -> Option<Death> {
    let sig = exit.signal.as_deref();
    let fatal = s
        .signals
        .iter()
        .rev()
        .find(|x| x.target.tgid == exit.tgid && Some(x.signal.as_ref()) == sig);
    let oom = s.ooms.iter().any(|o| o.victim_pid == exit.tgid);
    let kind = fatal.map(|x| classify(x, oom && x.signo == 9));
    let cause = match (sig, exit.exit_code) {
        (Some("SIGKILL"), _) if oom => DeathCause::OomKilled,
        (Some(n), _)
            if exit.core_dumped
                || fatal.is_some_and(|x| x.origin == Origin::Fault)
                || (matches!(
                    n,
                    "SIGABRT" | "SIGSEGV" | "SIGBUS" | "SIGILL" | "SIGFPE" | "SIGSYS" | "SIGTRAP"
                ) && kind.is_none_or(|k| {
                    k == SenderKind::SameContainer || k == SenderKind::KernelFault
                })) =>
        {
            DeathCause::Crashed
        }
        (Some(_), _) => DeathCause::Killed,
        (None, Some(0)) | (None, None) => return None,
        (None, Some(_)) => DeathCause::Error,
    };
    Some(Death {
        at: exit.ts,
        pid: exit.tgid,
        comm: exit.comm.clone(),
        cause,
        exit_code: exit.exit_code,
        signal: exit.signal.as_ref().map(|s| s.to_string()),
        sender: fatal.zip(kind).map(|(x, k)| sender_of(x, k)),
    })
}

/// Who sent it, as a closed set.
pub fn classify(sig: &Signal, oom_kill: bool) -> SenderKind {
    if oom_kill {
        return SenderKind::OomKiller;
    }
    if sig.origin == Origin::Fault {
        return SenderKind::KernelFault;
    }
    if sig.origin == Origin::Kernel {
        return if sig.signo == 9 && sig.sender_exiting && sig.sender.tgid != sig.target.tgid {
            SenderKind::PidNamespaceTeardown
        } else {
            SenderKind::Kernel
        };
    }
    match (&sig.sender.pod.pod_uid, &sig.sender.pod.container_id) {
        (None, _) if RUNTIME_COMMS.contains(&sig.sender.comm.as_str()) => SenderKind::Runtime,
        (None, _) if sig.sender.comm == "kubelet" => SenderKind::Kubelet,
        (None, _) => SenderKind::HostProcess,
        (Some(_), c) if c.is_some() && *c == sig.target.pod.container_id => {
            SenderKind::SameContainer
        }
        (Some(_), _) => SenderKind::OtherContainer,
    }
}

fn sender_of(sig: &Signal, kind: SenderKind) -> Sender {
    let p = &sig.sender.pod;
    Sender {
        kind,
        pid: sig.sender.tgid,
        comm: sig.sender.comm.clone(),
        namespace: p.namespace.as_deref().map(str::to_string),
        pod: p.pod.as_deref().map(str::to_string),
        container: p.container.as_deref().map(str::to_string),
    }
}

/// The main process of a running container: the namespace's init when the
/// container has its own pid namespace, else its oldest process.
pub fn guess_main(cgroup_dir: &Path) -> Option<u32> {
    let procs = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")).ok()?;
    let pids: Vec<u32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
    if let Some(init) = pids.iter().copied().find(|&pid| {
        status(pid).is_some_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|v| {
                    v.split_whitespace().count() > 1 && v.split_whitespace().last() == Some("1")
                })
        })
    }) {
        return Some(init);
    }
    let start = |pid: u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command (which may contain spaces): field 22 is starttime.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(19)?
            .parse()
            .ok()
    };
    pids.into_iter()
        .filter_map(|p| start(p).map(|s| (s, p)))
        .min()
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use agent_common::{exits::ExitEvent, oom::OomEvent, signals::SignalEvent};

    use super::*;
    use crate::{kernel::clock::BootClock, metadata::ResolverOptions, probes::oom::OomScope};

    const UID: &str = "0b1e5c2a-5d0e-4e8e-9a57-5f0b8c1d2e3f";
    const CID: &str = "3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f";

    fn comm(s: &str) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    fn container() -> PodIdentity {
        PodIdentity {
            namespace: Some("shop".into()),
            pod: Some("cart".into()),
            pod_uid: Some(UID.into()),
            container: Some("app".into()),
            container_id: Some(CID.into()),
        }
    }

    /// The order the ring buffers can deliver a memory-limit kill in: the
    /// SIGKILL and the exit read before the OOM that explains them.
    #[test]
    fn an_oom_read_after_its_kill_and_exit_still_explains_the_death() {
        let mut resolver = Resolver::new(&ResolverOptions {
            use_cri: false,
            ..Default::default()
        });
        let path = format!("/kubepods/burstable/pod{UID}/{CID}");
        resolver.cgroup_created(100, &path);
        let clock = BootClock::new();
        let mut f = Forensics::new(&CgroupLayout::None, 1000);
        f.on_first_exec(&resolver, 100, 10);

        let mut kill = Signal::decode(
            &SignalEvent {
                ts_boot_ns: 2_000,
                sender_cgroup_id: 100,
                target_cgroup_id: 100,
                sender_pid: 10,
                sender_tgid: 10,
                target_pid: 10,
                target_tgid: 10,
                sig: 9,
                code: 0x80,
                result: 0,
                handler: 0,
                flags: agent_common::signals::SIGNAL_FLAG_PRIV,
                sender_comm: comm("java"),
                target_comm: comm("java"),
            },
            &clock,
        );
        kill.sender.pod = container();
        kill.target.pod = container();
        let mut exit = crate::probes::exits::Exit::decode(
            &ExitEvent {
                ts_boot_ns: 3_000,
                start_boot_ns: 1_000,
                cgroup_id: 100,
                pid: 10,
                tgid: 10,
                ppid: 1,
                wait_status: 9,
                flags: agent_common::exits::EXIT_FLAG_GROUP_DEAD,
                _pad: 0,
                comm: comm("java"),
                parent_comm: comm("containerd-shim"),
            },
            &clock,
        );
        exit.pod = container();
        let mib = 1u64 << 20;
        let mut memcg = [agent_common::oom::MemcgLevel::default(); 5];
        memcg[0].usage_pages = 64 * mib / 4096;
        memcg[0].max_pages = 64 * mib / 4096;
        memcg[1].usage_pages = 64 * mib / 4096;
        memcg[1].max_pages = u64::MAX / 8192;
        let oom = OomKill::decode(
            &OomEvent {
                ts_boot_ns: 1_500,
                trigger_cgroup_id: 100,
                total_vm_kb: 0,
                anon_rss_kb: 0,
                file_rss_kb: 0,
                shmem_rss_kb: 0,
                pgtables_kb: 0,
                victim_pid: 10,
                trigger_pid: 10,
                trigger_tgid: 10,
                oom_score_adj: 0,
                flags: 0,
                memcg_levels: 2,
                victim_comm: comm("java"),
                trigger_comm: comm("java"),
                memcg,
            },
            &clock,
        );

        f.on_signal(&kill);
        f.on_exit(&resolver, &exit);
        f.on_oom(&resolver, oom);
        let found = f.take_findings(&resolver, Instant::now() + SETTLE);
        let record = found
            .iter()
            .find_map(|x| match x {
                Finding::Termination(t) => Some(t),
                _ => None,
            })
            .expect("a termination record");
        assert_eq!(record.reason, Reason::OomKilled, "{record:#?}");
        assert_eq!(record.exit_code, 137);
        assert_eq!(
            record.sender.as_ref().map(|s| s.kind),
            Some(SenderKind::OomKiller)
        );
        let oom = record.oom.as_ref().expect("OOM details");
        assert_eq!(oom.scope, OomScope::Container);
        assert_eq!(oom.limit_bytes, Some(64 * mib));
        assert_eq!(record.pod.container.as_deref(), Some("app"));
        assert!(
            found
                .iter()
                .any(|x| matches!(x, Finding::Oom(o) if o.pod.container.as_deref() == Some("app")))
        );
        // A second exit of the same (ended) container is not a second termination.
        f.on_exit(&resolver, &exit);
        assert!(
            f.take_findings(&resolver, Instant::now() + SETTLE)
                .is_empty()
        );
    }
}
