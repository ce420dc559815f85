//! The kubelet daemon (`podscope-testnode kubelet`, started by `up`): it runs
//! the manifests it finds in the manifests directory like kubelet runs static
//! pods, one task per pod, and writes each pod's status file.
//!
//! One `ListContainers` per tick feeds every pod task (a snapshot on a watch
//! channel), so 100 idle pods cost one CRI call per tick, not hundreds; a
//! task asks for a container's full status only when its state changes.
//! Restarts follow `restartPolicy` with a fixed 1 s back-off and increasing
//! attempt numbers; the previous attempt's exited container is kept (as
//! kubelet keeps one) and older ones are removed. `delete` renames the
//! manifest to `<key>.yaml.deleted`, which makes the task (or, if the daemon
//! was restarted meanwhile, a new one) stop the containers with the pod's grace period (CRI
//! StopContainer timeout: SIGTERM, then SIGKILL), remove the sandbox, write
//! the final status (phase `Deleted`) and end.
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
    manifest::Pod,
    paths,
    podconfig::PodPlan,
    status::{self, ContainerStatus, Phase, PodStatus, Termination},
};

const TICK: Duration = Duration::from_millis(250);
/// kubelet backs off exponentially up to 5 min; tests want it short and fixed.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
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

/// Per-container bookkeeping the status file does not need to show.
#[derive(Debug, Default, Clone)]
struct Track {
    /// The exited container of the previous attempt (kept, as kubelet keeps one).
    previous_id: Option<String>,
    /// When this task saw the current container exit (for the back-off).
    exited_seen: Option<Instant>,
    /// The last CRI state we refreshed the details for.
    known_state: Option<i32>,
}

struct PodWorker {
    plan: PodPlan,
    /// The manifest this task runs, or the deletion marker it tears down.
    manifest: PathBuf,
    manifest_inode: Option<u64>,
    deleting: bool,
    cri: Cri,
    status: PodStatus,
    tracks: Vec<Track>,
    last_written: Option<PodStatus>,
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
            containers: pod
                .spec
                .containers
                .iter()
                .map(|c| ContainerStatus {
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
                })
                .collect(),
            updated_at: status::now_rfc3339(),
        };
        // Adopt what an earlier daemon left for this very pod (same uid).
        let status = match status::read(pod.namespace(), pod.name()) {
            Ok(Some(old))
                if old.uid == plan.uid
                    && old.phase != Phase::Deleted
                    && old.containers.len() == fresh.containers.len() =>
            {
                old
            }
            _ => fresh,
        };
        let tracks = vec![Track::default(); status.containers.len()];
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
        let marker = paths::deleting_file(&self.status.namespace, &self.status.name);
        let ours = Pod::from_file(&marker)
            .is_ok_and(|p| p.metadata.uid.as_deref() == Some(self.plan.uid.as_str()));
        if ours {
            let _ = std::fs::remove_file(marker);
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
        for i in 0..self.status.containers.len() {
            self.reconcile_container(i, snapshot).await?;
        }
        self.status.phase = self.phase();
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

    async fn reconcile_container(&mut self, i: usize, snapshot: &Snapshot) -> Result<()> {
        let Some(id) = self.status.containers[i].container_id.clone() else {
            return self.start_container(i).await;
        };
        let state = snapshot.states.get(&id).copied();
        if state.is_none() {
            // Removed behind our back (or containerd lost it): start afresh
            // unless the policy says this container is finished.
            let c = &mut self.status.containers[i];
            if c.state != "exited" {
                c.state = "unknown".into();
            }
        } else if state != self.tracks[i].known_state {
            self.refresh_container(i, &id).await?;
            self.tracks[i].known_state = state;
        }
        let c = &self.status.containers[i];
        let ended = c.state == "exited" || c.state == "unknown";
        if !ended {
            self.tracks[i].exited_seen = None;
            return Ok(());
        }
        let code = c.exit_code.unwrap_or(-1);
        if !self.plan.pod.restart_policy().restarts(code) {
            return Ok(());
        }
        let seen = *self.tracks[i].exited_seen.get_or_insert_with(Instant::now);
        if seen.elapsed() < RESTART_BACKOFF {
            return Ok(());
        }
        // Restart: remember how this attempt ended, start the next one, and
        // drop the attempt before it (kubelet keeps one exited container).
        let c = &mut self.status.containers[i];
        c.last_termination = Some(Termination {
            container_id: id.clone(),
            attempt: c.attempt,
            exit_code: code,
            reason: c.reason.clone(),
            started_at: c.started_at.clone(),
            finished_at: c.finished_at.clone(),
        });
        c.attempt += 1;
        c.restart_count += 1;
        c.container_id = None;
        c.state = "waiting".into();
        let older = self.tracks[i].previous_id.replace(id);
        self.tracks[i].exited_seen = None;
        self.tracks[i].known_state = None;
        self.start_container(i).await?;
        if let Some(old) = older
            && let Err(e) = self.cri.remove_container(&old).await
            && !e.is_not_found()
        {
            log(format!("kubelet: {e}"));
        }
        Ok(())
    }

    async fn start_container(&mut self, i: usize) -> Result<()> {
        let Some(sandbox) = self.status.sandbox_id.clone() else {
            return Ok(());
        };
        let spec = self.plan.pod.spec.containers[i].clone();
        let (attempt, restarts) = {
            let c = &self.status.containers[i];
            (c.attempt, c.restart_count)
        };
        let config = self.plan.container_config(&spec, attempt, restarts)?;
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
        self.status.containers[i].container_id = Some(id.clone());
        self.status.containers[i].state = "created".into();
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
        self.refresh_container(i, &id).await?;
        if let Err(e) = started {
            self.status.message = Some(e.to_string());
        }
        Ok(())
    }

    /// Copies CRI's ContainerStatus (and the verbose pid and cgroups path).
    async fn refresh_container(&mut self, i: usize, id: &str) -> Result<()> {
        let (st, info) = match self.cri.container_status(id).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => {
                self.status.containers[i].state = "unknown".into();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.tracks[i].known_state = Some(st.state);
        let c = &mut self.status.containers[i];
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
        }
        Ok(())
    }

    /// Kubernetes' phase, from the containers and the restart policy.
    fn phase(&self) -> Phase {
        let cs = &self.status.containers;
        if self.status.sandbox_id.is_none() {
            return Phase::Pending;
        }
        let policy = self.plan.pod.restart_policy();
        // An `unknown` container (removed behind our back) counts as ended
        // with an unknown code, so a Never pod still reaches a final phase.
        let finished = |c: &ContainerStatus| {
            (c.state == "exited" || c.state == "unknown")
                && !policy.restarts(c.exit_code.unwrap_or(-1))
        };
        if cs.iter().all(finished) {
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

    /// Stops every container with the grace period (in parallel, as kubelet
    /// does), removes the sandbox and writes the final status.
    async fn teardown(&mut self) {
        self.status.phase = Phase::Terminating;
        self.publish();
        let grace = self.plan.pod.grace_period_seconds();
        loop {
            match self.try_teardown(grace).await {
                Ok(()) => break,
                Err(e) => {
                    self.status.message = Some(e.to_string());
                    self.publish();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.status.phase = Phase::Deleted;
        self.status.message = None;
        self.publish();
    }

    async fn try_teardown(&mut self, grace: i64) -> Result<()> {
        let mut stops = tokio::task::JoinSet::new();
        for c in &self.status.containers {
            if let Some(id) = c.container_id.clone()
                && c.state != "exited"
            {
                let mut cri = self.cri.clone();
                stops.spawn(async move { cri.stop_container(&id, grace).await });
            }
        }
        while let Some(r) = stops.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_not_found() => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(Error::Msg(format!("a stop task failed: {e}"))),
            }
        }
        for i in 0..self.status.containers.len() {
            if let Some(id) = self.status.containers[i].container_id.clone() {
                self.refresh_container(i, &id).await?;
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
