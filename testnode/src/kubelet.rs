//! The kubelet daemon (`podscope-testnode kubelet`, started by `up`): it runs
//! the manifests it finds in the manifests directory like kubelet runs static
//! pods, one task per pod, and writes each pod's status file.
//!
//! One `ListContainers` per tick feeds every pod task (a snapshot on a watch
//! channel), so 100 idle pods cost one CRI call per tick, not hundreds; a
//! task asks for a container's full status only when its state changes.
//! Init containers run in order, each to completion, before the app
//! containers; probes and lifecycle hooks run as kubelet runs them
//! ([`crate::prober`]); a failed liveness or startup probe kills the
//! container (preStop first) and it restarts in the same sandbox. Restarts
//! follow `restartPolicy` with kubelet's back-off (immediate, then 10 s
//! doubling to 5 min, shown as `CrashLoopBackOff`) and increasing attempt
//! numbers; the previous attempt's exited container is kept (as kubelet
//! keeps one) and older ones are removed. `delete` renames the manifest to
//! `<key>.yaml.deleted` (with `<key>.delete.json` for a grace override or an
//! eviction), which makes the task (or, if the daemon was restarted
//! meanwhile, a new one) kill every container as kubelet's killContainer
//! does (preStop bounded by the grace period, then CRI StopContainer with
//! what is left, at least 2 s: SIGTERM, then SIGKILL), stop and remove the
//! sandbox, write the final status (phase `Deleted`) and end.
//!
//! The daemon keeps no state of its own beyond the status files, so a new
//! daemon (after `up` replaced a rebuilt binary, or a crash) adopts the
//! running pods from them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    cri::{Cri, CriError, api},
    error::{Error, IoContext, Result},
    manifest::{Container, Handler, Pod, Probe, RestartPolicy},
    paths,
    podconfig::{ContainerType, PodPlan},
    prober::{self, Backoff, Kind, Outcome},
    status::{self, ContainerStatus, Phase, PodStatus, Termination},
};

const TICK: Duration = Duration::from_millis(250);
/// How long a `Deleted` status file stays for `delete --wait` and `status`.
const DELETED_RETENTION: Duration = Duration::from_secs(60);
/// Status files are scanned for expired `Deleted` pods every 5 s, not every tick.
const GC_EVERY_TICKS: u64 = 20;

/// The containers CRI knows, by id → CRI state, from one ListContainers.
#[derive(Debug, Default)]
struct Snapshot {
    /// False while containerd is unreachable: tasks then change nothing.
    reachable: bool,
    states: HashMap<String, i32>,
}

pub fn log(msg: impl AsRef<str>) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{} {}",
        status::now_rfc3339(),
        msg.as_ref()
    );
}

/// Runs the daemon until SIGTERM or SIGINT. Pods keep running when it stops.
pub async fn run() -> Result<()> {
    let dir = paths::manifests_dir();
    std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let mut cri = Cri::lazy(paths::SOCKET);
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
    // Manifests that failed to parse, by modification time, so a broken file
    // is reported once rather than every tick.
    let mut broken: HashMap<PathBuf, SystemTime> = HashMap::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .ctx(|| "cannot handle SIGTERM".into())?;
    let mut reported_down = false;
    let mut tick: u64 = 0;
    log(format!("kubelet: watching {}", dir.display()));
    loop {
        let snapshot = match cri.list_containers().await {
            Ok(list) => {
                if reported_down {
                    log("kubelet: containerd is back");
                    reported_down = false;
                }
                Snapshot {
                    reachable: true,
                    states: list.into_iter().map(|c| (c.id, c.state)).collect(),
                }
            }
            Err(e) => {
                if !reported_down {
                    log(format!(
                        "kubelet: containerd unreachable, pods left as they are: {e}"
                    ));
                    reported_down = true;
                }
                Snapshot::default()
            }
        };
        tx.send_replace(Arc::new(snapshot));

        workers.retain(|_, h| !h.is_finished());
        // Deletions first: a pod being deleted blocks its key until it is gone.
        for (file, deleting) in manifest_files(&dir) {
            let Some(key) = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('.').next())
                .map(str::to_string)
            else {
                continue;
            };
            if workers.contains_key(&key) {
                continue;
            }
            let mtime = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
            if mtime.is_some() && broken.get(&file) == mtime.as_ref() {
                continue;
            }
            match Pod::from_file(&file) {
                Ok(pod) => {
                    broken.remove(&file);
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    match PodPlan::new(pod, uid) {
                        Ok(plan) => {
                            let worker = PodWorker::new(plan, file.clone(), deleting, cri.clone());
                            workers.insert(key, tokio::spawn(worker.run(rx.clone())));
                        }
                        Err(e) => log(format!("kubelet: {}: {e}", file.display())),
                    }
                }
                Err(e) => {
                    log(format!("kubelet: {e}"));
                    if let Some(m) = mtime {
                        broken.insert(file, m);
                    }
                }
            }
        }
        // kube-proxy's part: Services follow the pods' readiness and addresses.
        if let Err(e) = crate::kubeproxy::sync() {
            log(format!("kube-proxy: {e}"));
        }
        tick += 1;
        if tick.is_multiple_of(GC_EVERY_TICKS) {
            collect_deleted(&workers);
        }

        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    log("kubelet: stopping; pods keep running");
    Ok(())
}

/// The manifests (`<key>.yaml`, false) and deletion markers
/// (`<key>.yaml.deleted`, true), markers first.
fn manifest_files(dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut v: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter_map(|p| {
                    let name = p.file_name()?.to_str()?.to_string();
                    if name.ends_with(".yaml.deleted") {
                        Some((p, true))
                    } else if name.ends_with(".yaml") {
                        Some((p, false))
                    } else {
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The file's inode: `apply` writes a new file (rename), so a changed inode
/// means the manifest this task runs was deleted or replaced.
fn inode(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// Removes `Deleted` status files past their retention.
fn collect_deleted(workers: &HashMap<String, JoinHandle<()>>) {
    let Ok(all) = status::read_all() else { return };
    for s in all {
        let key = paths::pod_key(&s.namespace, &s.name);
        if s.phase != Phase::Deleted || workers.contains_key(&key) {
            continue;
        }
        let file = paths::status_file(&s.namespace, &s.name);
        let old = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > DELETED_RETENTION);
        if old {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Appends a pod uid to the ledger `down` uses to find the pod's cgroups.
fn record_uid(uid: &str) -> Result<()> {
    use std::io::Write;
    let p = paths::uid_ledger();
    if std::fs::read_to_string(&p).is_ok_and(|t| t.lines().any(|l| l == uid)) {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .ctx(|| format!("cannot write {}", p.display()))?;
    writeln!(f, "{uid}").ctx(|| format!("cannot write {}", p.display()))
}

/// How a pod is to be deleted: `delete --grace-period N` and `evict` write
/// this beside the deletion marker before renaming the manifest.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeleteOptions {
    /// Replaces the pod's terminationGracePeriodSeconds (kubelet's
    /// gracePeriodOverride); 0 means the 2 s minimum, without preStop hooks.
    pub grace_period_seconds: Option<i64>,
    /// Evicted (kubelet's eviction manager) rather than deleted.
    pub evicted: bool,
}

impl DeleteOptions {
    pub fn write(&self, namespace: &str, name: &str) -> Result<()> {
        let p = paths::delete_options_file(namespace, name);
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::Msg(format!("cannot encode the delete options: {e}")))?;
        std::fs::write(&p, json).ctx(|| format!("cannot write {}", p.display()))
    }

    fn read(namespace: &str, name: &str) -> DeleteOptions {
        std::fs::read(paths::delete_options_file(namespace, name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// kubelet's minimumGracePeriodInSeconds: every container gets at least
/// this long between SIGTERM and SIGKILL.
const MIN_GRACE_SECONDS: i64 = 2;
/// A postStart hook that never returns would block the pod forever.
const POST_START_LIMIT: Duration = Duration::from_secs(120);
/// A pod annotation that shortens the initial restart back-off for tests
/// (kubelet's is fixed at 10 s; the doubling and the 5 min cap are kept).
pub const BACKOFF_ANNOTATION: &str = "testnode.podscope.dev/backoff-initial-seconds";

/// The probe workers of one container (kubelet's prober workers).
struct Probes {
    container_id: String,
    startup: Option<prober::Worker>,
    liveness: Option<prober::Worker>,
    readiness: Option<prober::Worker>,
}

/// Per-container bookkeeping the status file does not need to show.
struct Track {
    /// The exited container of the previous attempt (kept, as kubelet keeps one).
    previous_id: Option<String>,
    /// When this task saw the current container exit (for the back-off).
    exited_seen: Option<Instant>,
    /// The last CRI state we refreshed the details for.
    known_state: Option<i32>,
    backoff: Backoff,
    probes: Option<Probes>,
}

struct PodWorker {
    plan: PodPlan,
    /// The manifest this task runs, or the deletion marker it tears down.
    manifest: PathBuf,
    manifest_inode: Option<u64>,
    deleting: bool,
    cri: Cri,
    status: PodStatus,
    /// Init containers first, then app containers (see [`PodWorker::cs`]).
    tracks: Vec<Track>,
    last_written: Option<PodStatus>,
}

fn waiting(c: &Container) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image().into(),
        container_id: None,
        attempt: 0,
        restart_count: 0,
        state: "waiting".into(),
        pid: None,
        exit_code: None,
        reason: None,
        started_at: None,
        finished_at: None,
        cgroups_path: None,
        last_termination: None,
        ready: false,
        waiting_reason: None,
        kill_reason: None,
        post_start: None,
        pre_stop: None,
    }
}

/// Stops one container as kubelet's killContainer does: the preStop hook
/// first (bounded by the grace period, skipped when the grace is 0), then
/// StopContainer with what is left of the grace, never under 2 s.
async fn kill(
    mut cri: Cri,
    id: String,
    grace: i64,
    pre_stop: Option<(Handler, prober::Target)>,
) -> (std::result::Result<(), CriError>, Option<prober::HookRun>) {
    let mut grace = grace;
    let mut hook = None;
    if let Some((h, mut target)) = pre_stop
        && grace > 0
    {
        let run = prober::run_hook(&h, &mut target, Duration::from_secs(grace as u64)).await;
        // kubelet subtracts whole seconds spent in the hook.
        grace -= (run.duration_ms / 1000) as i64;
        hook = Some(run);
    }
    let r = cri.stop_container(&id, grace.max(MIN_GRACE_SECONDS)).await;
    (r, hook)
}

impl PodWorker {
    fn new(plan: PodPlan, manifest: PathBuf, deleting: bool, cri: Cri) -> PodWorker {
        let pod = &plan.pod;
        let fresh = PodStatus {
            namespace: pod.namespace().into(),
            name: pod.name().into(),
            uid: plan.uid.clone(),
            phase: Phase::Pending,
            qos_class: plan.qos,
            cgroup_parent: plan.cgroup_parent.clone(),
            restart_policy: pod.restart_policy(),
            termination_grace_period_seconds: pod.grace_period_seconds(),
            sandbox_id: None,
            pod_ip: None,
            netns_path: None,
            message: None,
            reason: None,
            init_containers: pod.spec.init_containers.iter().map(waiting).collect(),
            containers: pod.spec.containers.iter().map(waiting).collect(),
            updated_at: status::now_rfc3339(),
            terminating_since: None,
        };
        // Adopt what an earlier daemon left for this very pod (same uid).
        let status = match status::read(pod.namespace(), pod.name()) {
            Ok(Some(old))
                if old.uid == plan.uid
                    && old.phase != Phase::Deleted
                    && old.containers.len() == fresh.containers.len()
                    && old.init_containers.len() == fresh.init_containers.len() =>
            {
                old
            }
            _ => fresh,
        };
        let initial = pod
            .metadata
            .annotations
            .get(BACKOFF_ANNOTATION)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(prober::BACKOFF_INITIAL);
        let n = status.init_containers.len() + status.containers.len();
        let tracks = (0..n)
            .map(|_| Track {
                previous_id: None,
                exited_seen: None,
                known_state: None,
                backoff: Backoff::new(initial, prober::BACKOFF_MAX),
                probes: None,
            })
            .collect();
        PodWorker {
            plan,
            manifest_inode: inode(&manifest),
            manifest,
            deleting,
            cri,
            status,
            tracks,
            last_written: None,
        }
    }

    fn n_init(&self) -> usize {
        self.status.init_containers.len()
    }
    fn is_init(&self, k: usize) -> bool {
        k < self.n_init()
    }
    /// Container `k`'s status: init containers first, then app containers.
    fn cs(&self, k: usize) -> &ContainerStatus {
        let n = self.n_init();
        if k < n {
            &self.status.init_containers[k]
        } else {
            &self.status.containers[k - n]
        }
    }
    fn cs_mut(&mut self, k: usize) -> &mut ContainerStatus {
        let n = self.n_init();
        if k < n {
            &mut self.status.init_containers[k]
        } else {
            &mut self.status.containers[k - n]
        }
    }
    fn spec(&self, k: usize) -> &Container {
        let n = self.n_init();
        if k < n {
            &self.plan.pod.spec.init_containers[k]
        } else {
            &self.plan.pod.spec.containers[k - n]
        }
    }
    fn all(&self) -> std::ops::Range<usize> {
        0..self.tracks.len()
    }

    fn target(&self, k: usize, id: &str) -> prober::Target {
        prober::Target {
            container_id: id.to_string(),
            pod_ip: self.status.pod_ip.as_deref().and_then(|s| s.parse().ok()),
            spec: self.spec(k).clone(),
            cri: self.cri.clone(),
        }
    }

    /// Whether kubelet restarts container `k` after it ended with `code`:
    /// init containers unless the policy is Never and only after a failure;
    /// a container killed for a failed probe unless the policy is Never.
    fn restarts(&self, k: usize, code: i32) -> bool {
        let policy = self.plan.pod.restart_policy();
        if self.is_init(k) {
            return policy != RestartPolicy::Never && code != 0;
        }
        let probe_kill = self
            .cs(k)
            .kill_reason
            .as_deref()
            .is_some_and(|r| r.contains("probe failed"));
        policy.restarts(code) || (probe_kill && policy != RestartPolicy::Never)
    }

    async fn run(mut self, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
        let key = paths::pod_key(&self.status.namespace, &self.status.name);
        log(format!("kubelet: pod {key} (uid {})", self.plan.uid));
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            if self.deleting || inode(&self.manifest) != self.manifest_inode {
                self.teardown().await;
                self.remove_marker();
                log(format!("kubelet: pod {key} deleted"));
                return;
            }
            if snapshot.reachable
                && let Err(e) = self.reconcile(&snapshot).await
            {
                self.status.message = Some(e.to_string());
            }
            self.publish();
            let _ = tokio::time::timeout(Duration::from_secs(1), snapshots.changed()).await;
        }
    }

    /// Removes the deletion marker if it is this pod's (a later pod of the
    /// same name may have been applied and deleted meanwhile).
    fn remove_marker(&self) {
        let (ns, name) = (&self.status.namespace, &self.status.name);
        let marker = paths::deleting_file(ns, name);
        let ours = Pod::from_file(&marker)
            .is_ok_and(|p| p.metadata.uid.as_deref() == Some(self.plan.uid.as_str()));
        if ours {
            let _ = std::fs::remove_file(marker);
            let _ = std::fs::remove_file(paths::delete_options_file(ns, name));
        }
    }

    /// Writes the status file when something other than the time changed.
    fn publish(&mut self) {
        let mut cmp = self.status.clone();
        if let Some(last) = &self.last_written {
            cmp.updated_at = last.updated_at.clone();
            if &cmp == last {
                return;
            }
        }
        self.status.updated_at = status::now_rfc3339();
        match status::write(&self.status) {
            Ok(()) => self.last_written = Some(self.status.clone()),
            Err(e) => log(format!("kubelet: {e}")),
        }
    }

    async fn reconcile(&mut self, snapshot: &Snapshot) -> Result<()> {
        // Cleared first: a failed StartContainer below sets it again.
        self.status.message = None;
        if self.status.sandbox_id.is_none() {
            self.run_sandbox().await?;
        }
        // Init containers in order, each to completion (exit 0), before
        // any app container starts.
        let mut initialized = true;
        for k in 0..self.n_init() {
            let done = |c: &ContainerStatus| c.state == "exited" && c.exit_code == Some(0);
            if !done(self.cs(k)) {
                self.reconcile_container(k, snapshot).await?;
            }
            if !done(self.cs(k)) {
                initialized = false;
                break;
            }
        }
        for k in self.n_init()..self.tracks.len() {
            if initialized {
                self.reconcile_container(k, snapshot).await?;
                self.sync_probes(k).await?;
            } else {
                self.cs_mut(k).waiting_reason = Some("PodInitializing".into());
            }
        }
        self.status.phase = self.phase();
        self.status.reason = self.display_reason();
        Ok(())
    }

    async fn run_sandbox(&mut self) -> Result<()> {
        record_uid(&self.plan.uid)?;
        let config = self.plan.sandbox_config();
        let logs = &config.log_directory;
        std::fs::create_dir_all(logs).ctx(|| format!("cannot create {logs}"))?;
        let id = self
            .cri
            .runtime
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(CriError::call("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        self.status.sandbox_id = Some(id.clone());
        let (st, info) = self.cri.sandbox_status(&id).await?;
        self.status.pod_ip = st.network.map(|n| n.ip).filter(|ip| !ip.is_empty());
        self.status.netns_path = info.as_ref().and_then(network_namespace_path);
        Ok(())
    }

    async fn reconcile_container(&mut self, k: usize, snapshot: &Snapshot) -> Result<()> {
        let Some(id) = self.cs(k).container_id.clone() else {
            return self.start_container(k).await;
        };
        let state = snapshot.states.get(&id).copied();
        if state.is_none() {
            // Removed behind our back (or containerd lost it): start afresh
            // unless the policy says this container is finished.
            let c = self.cs_mut(k);
            if c.state != "exited" {
                c.state = "unknown".into();
            }
        } else if state != self.tracks[k].known_state {
            self.refresh_container(k, &id).await?;
            self.tracks[k].known_state = state;
        }
        let c = self.cs(k);
        let ended = c.state == "exited" || c.state == "unknown";
        if !ended {
            self.tracks[k].exited_seen = None;
            self.cs_mut(k).waiting_reason = None;
            return Ok(());
        }
        let code = c.exit_code.unwrap_or(-1);
        if !self.restarts(k, code) {
            return Ok(());
        }
        // kubelet's back-off: counted from when the container finished.
        let now = Instant::now();
        let seen = *self.tracks[k].exited_seen.get_or_insert(now);
        if self.tracks[k].backoff.waiting(seen, now).is_some() {
            self.cs_mut(k).waiting_reason = Some("CrashLoopBackOff".into());
            return Ok(());
        }
        self.tracks[k].backoff.next(now);
        // Restart: remember how this attempt ended, start the next one, and
        // drop the attempt before it (kubelet keeps one exited container).
        let c = self.cs_mut(k);
        c.last_termination = Some(Termination {
            container_id: id.clone(),
            attempt: c.attempt,
            exit_code: code,
            reason: c.reason.clone(),
            started_at: c.started_at.clone(),
            finished_at: c.finished_at.clone(),
            kill_reason: c.kill_reason.take(),
        });
        c.attempt += 1;
        c.restart_count += 1;
        c.container_id = None;
        c.state = "waiting".into();
        c.waiting_reason = None;
        let older = self.tracks[k].previous_id.replace(id);
        self.tracks[k].exited_seen = None;
        self.tracks[k].known_state = None;
        self.start_container(k).await?;
        if let Some(old) = older
            && let Err(e) = self.cri.remove_container(&old).await
            && !e.is_not_found()
        {
            log(format!("kubelet: {e}"));
        }
        Ok(())
    }

    async fn start_container(&mut self, k: usize) -> Result<()> {
        let Some(sandbox) = self.status.sandbox_id.clone() else {
            return Ok(());
        };
        let spec = self.spec(k).clone();
        let (attempt, restarts) = {
            let c = self.cs(k);
            (c.attempt, c.restart_count)
        };
        let kind = if self.is_init(k) {
            ContainerType::Init
        } else {
            ContainerType::Container
        };
        let config = self.plan.container_config(&spec, kind, attempt, restarts)?;
        let id = self
            .cri
            .runtime
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox,
                config: Some(config),
                sandbox_config: Some(self.plan.sandbox_config()),
            })
            .await
            .map_err(CriError::call("CreateContainer"))?
            .into_inner()
            .container_id;
        self.cs_mut(k).container_id = Some(id.clone());
        self.cs_mut(k).state = "created".into();
        let started = self
            .cri
            .runtime
            .start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(CriError::call("StartContainer"));
        // Whether or not it started, CRI's view is the truth from here on
        // (a failed start shows as exited with code 128, which the restart
        // policy then handles like any other exit).
        self.refresh_container(k, &id).await?;
        if let Err(e) = started {
            self.status.message = Some(e.to_string());
            return Ok(());
        }
        // postStart runs right after the start, and a failure kills the
        // container (kubelet: FailedPostStartHook).
        if let Some(h) = spec.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
            let mut target = self.target(k, &id);
            let run = prober::run_hook(&h, &mut target, POST_START_LIMIT).await;
            let failed = run.outcome != "succeeded";
            let why = format!("postStart hook failed: {}", run.outcome);
            self.cs_mut(k).post_start = Some(run);
            if failed {
                log(format!("kubelet: {}: {why}", spec.name));
                let grace = self.plan.pod.grace_period_seconds();
                self.kill_container(k, grace, why).await?;
            }
        }
        Ok(())
    }

    /// Starts the probe workers of a running container, turns their
    /// results into readiness, and kills the container when its liveness or
    /// startup probe failed (with the probe's grace period if it has one).
    async fn sync_probes(&mut self, k: usize) -> Result<()> {
        let c = self.cs(k);
        let Some(id) = c.container_id.clone().filter(|_| c.state == "running") else {
            self.tracks[k].probes = None;
            self.cs_mut(k).ready = false;
            return Ok(());
        };
        if self.tracks[k].probes.as_ref().map(|p| &p.container_id) != Some(&id) {
            let spec = self.spec(k).clone();
            let target = self.target(k, &id);
            let startup = spec
                .startup_probe
                .clone()
                .map(|p| prober::spawn(Kind::Startup, p, target.clone(), None));
            let gate = startup.as_ref().map(|w| w.result.clone());
            let spawn = |kind, p: Option<Probe>| {
                p.map(|p| prober::spawn(kind, p, target.clone(), gate.clone()))
            };
            self.tracks[k].probes = Some(Probes {
                container_id: id.clone(),
                liveness: spawn(Kind::Liveness, spec.liveness_probe.clone()),
                readiness: spawn(Kind::Readiness, spec.readiness_probe.clone()),
                startup,
            });
        }
        let Some(p) = &self.tracks[k].probes else {
            return Ok(());
        };
        let is = |w: &Option<prober::Worker>, o| w.as_ref().is_none_or(|w| *w.result.borrow() == o);
        let started = is(&p.startup, Outcome::Success);
        let ready = started && is(&p.readiness, Outcome::Success);
        let failed = [(Kind::Startup, &p.startup), (Kind::Liveness, &p.liveness)]
            .into_iter()
            .find_map(|(kind, w)| {
                let w = w.as_ref()?;
                (*w.result.borrow() == Outcome::Failure).then(|| (kind, w.detail.borrow().clone()))
            });
        self.cs_mut(k).ready = ready;
        if let Some((kind, detail)) = failed {
            let spec = self.spec(k);
            let probe = match kind {
                Kind::Startup => spec.startup_probe.as_ref(),
                _ => spec.liveness_probe.as_ref(),
            };
            let grace = probe
                .and_then(|p| p.termination_grace_period_seconds)
                .unwrap_or(self.plan.pod.grace_period_seconds());
            let why = format!("{} probe failed: {detail}", kind.name());
            log(format!(
                "kubelet: {}/{} container {}: {why}, will be restarted",
                self.status.namespace, self.status.name, spec.name
            ));
            self.tracks[k].probes = None;
            self.cs_mut(k).ready = false;
            self.kill_container(k, grace, why).await?;
        }
        Ok(())
    }

    /// Kills one running container (preStop, then StopContainer) and records why.
    async fn kill_container(&mut self, k: usize, grace: i64, why: String) -> Result<()> {
        let Some(id) = self.cs(k).container_id.clone() else {
            return Ok(());
        };
        self.cs_mut(k).kill_reason = Some(why);
        let pre_stop = self.pre_stop(k, &id);
        let (r, hook) = kill(self.cri.clone(), id.clone(), grace, pre_stop).await;
        if hook.is_some() {
            self.cs_mut(k).pre_stop = hook;
        }
        match r {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
        self.refresh_container(k, &id).await
    }

    fn pre_stop(&self, k: usize, id: &str) -> Option<(Handler, prober::Target)> {
        let h = self.spec(k).lifecycle.as_ref()?.pre_stop.clone()?;
        Some((h, self.target(k, id)))
    }

    /// Copies CRI's ContainerStatus (and the verbose pid and cgroups path).
    async fn refresh_container(&mut self, k: usize, id: &str) -> Result<()> {
        let (st, info) = match self.cri.container_status(id).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => {
                self.cs_mut(k).state = "unknown".into();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.tracks[k].known_state = Some(st.state);
        let c = self.cs_mut(k);
        c.state = match api::ContainerState::try_from(st.state) {
            Ok(api::ContainerState::ContainerCreated) => "created",
            Ok(api::ContainerState::ContainerRunning) => "running",
            Ok(api::ContainerState::ContainerExited) => "exited",
            _ => "unknown",
        }
        .into();
        let exited = c.state == "exited";
        c.exit_code = exited.then_some(st.exit_code);
        c.reason = Some(st.reason).filter(|r| !r.is_empty());
        c.started_at = status::rfc3339_ns(st.started_at);
        c.finished_at = status::rfc3339_ns(st.finished_at);
        if let Some(info) = &info {
            c.pid = info
                .get("pid")
                .and_then(|p| p.as_u64())
                .filter(|p| *p > 0 && !exited)
                .map(|p| p as u32);
            c.cgroups_path = info
                .pointer("/runtimeSpec/linux/cgroupsPath")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .or(c.cgroups_path.take());
        }
        if exited {
            c.pid = None;
            c.ready = false;
        }
        Ok(())
    }

    /// Kubernetes' phase, from the containers and the restart policy.
    fn phase(&self) -> Phase {
        if self.status.sandbox_id.is_none() {
            return Phase::Pending;
        }
        let policy = self.plan.pod.restart_policy();
        let ended = |c: &ContainerStatus| c.state == "exited" || c.state == "unknown";
        // An init container that failed for good fails the pod.
        for c in &self.status.init_containers {
            if ended(c) && c.exit_code != Some(0) && policy == RestartPolicy::Never {
                return Phase::Failed;
            }
            if !(c.state == "exited" && c.exit_code == Some(0)) {
                return Phase::Pending;
            }
        }
        let cs = &self.status.containers;
        // An `unknown` container (removed behind our back) counts as ended
        // with an unknown code, so a Never pod still reaches a final phase.
        let n = self.n_init();
        let finished = cs
            .iter()
            .enumerate()
            .all(|(i, c)| ended(c) && !self.restarts(n + i, c.exit_code.unwrap_or(-1)));
        if finished {
            return if cs.iter().all(|c| c.exit_code == Some(0)) {
                Phase::Succeeded
            } else {
                Phase::Failed
            };
        }
        let started = |c: &ContainerStatus| {
            c.state == "running" || c.state == "exited" || c.last_termination.is_some()
        };
        if cs.iter().all(started) {
            Phase::Running
        } else {
            Phase::Pending
        }
    }

    /// kubectl's STATUS column when it says more than the phase.
    fn display_reason(&self) -> Option<String> {
        let inits = &self.status.init_containers;
        for (i, c) in inits.iter().enumerate() {
            if c.state == "exited" && c.exit_code == Some(0) {
                continue;
            }
            if let Some(w) = c.waiting_reason.as_deref() {
                return Some(format!("Init:{w}"));
            }
            if c.state == "exited" {
                return Some(format!("Init:{}", c.reason.as_deref().unwrap_or("Error")));
            }
            return Some(format!("Init:{i}/{}", inits.len()));
        }
        self.status
            .containers
            .iter()
            .find_map(|c| c.waiting_reason.clone())
    }

    /// Stops every container with the grace period (in parallel, as kubelet
    /// does), removes the sandbox and writes the final status.
    async fn teardown(&mut self) {
        self.status.phase = Phase::Terminating;
        self.status.terminating_since = Some(status::now_rfc3339());
        for t in &mut self.tracks {
            t.probes = None;
        }
        self.publish();
        let opts = DeleteOptions::read(&self.status.namespace, &self.status.name);
        let grace = opts
            .grace_period_seconds
            .unwrap_or(self.plan.pod.grace_period_seconds());
        let why = if opts.evicted {
            "evicted"
        } else {
            "pod deleted"
        };
        loop {
            match self.try_teardown(grace, why).await {
                Ok(()) => break,
                Err(e) => {
                    self.status.message = Some(e.to_string());
                    self.publish();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.status.phase = Phase::Deleted;
        self.status.reason = opts.evicted.then(|| "Evicted".to_string());
        self.status.message = opts
            .evicted
            .then(|| "evicted by `podscope-testnode evict`".to_string());
        self.publish();
    }

    async fn try_teardown(&mut self, grace: i64, why: &str) -> Result<()> {
        let mut stops = tokio::task::JoinSet::new();
        for k in self.all() {
            let c = self.cs(k);
            if let Some(id) = c.container_id.clone()
                && c.state != "exited"
            {
                let pre_stop = self.pre_stop(k, &id);
                self.cs_mut(k).kill_reason = Some(why.to_string());
                let cri = self.cri.clone();
                stops.spawn(async move { (k, kill(cri, id, grace, pre_stop).await) });
            }
        }
        while let Some(r) = stops.join_next().await {
            match r {
                Ok((k, (r, hook))) => {
                    if hook.is_some() {
                        self.cs_mut(k).pre_stop = hook;
                    }
                    match r {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(Error::Msg(format!("a stop task failed: {e}"))),
            }
        }
        for k in self.all() {
            if let Some(id) = self.cs(k).container_id.clone() {
                self.refresh_container(k, &id).await?;
            }
        }
        if let Some(sandbox) = self.status.sandbox_id.clone() {
            for r in [
                self.cri.stop_sandbox(&sandbox).await,
                self.cri.remove_sandbox(&sandbox).await,
            ] {
                match r {
                    Err(e) if !e.is_not_found() => return Err(e.into()),
                    _ => {}
                }
            }
        }
        // kubelet removes the pod's cgroup after its sandbox; without this a
        // churned node keeps one empty cgroup per deleted pod.
        let parent = self.plan.cgroup_parent.clone();
        let _ =
            tokio::task::spawn_blocking(move || crate::cleanup::remove_pod_cgroup(&parent)).await;
        Ok(())
    }
}

/// The network namespace path in containerd's verbose sandbox info.
fn network_namespace_path(info: &serde_json::Value) -> Option<String> {
    info.pointer("/runtimeSpec/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .map(str::to_string)
}
