//! `podscope-testnode`: a real containerd node without Kubernetes.
//! See testnode/README.md; the work is in the library's modules.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use testnode::{
    cleanup, containerd,
    cri::Cri,
    error::Error,
    images, kubelet, kubeproxy,
    manifest::Pod,
    netns, paths, process,
    service::{self, Service},
    status::{self, Phase, PodStatus},
};

#[derive(Parser)]
#[command(
    name = "podscope-testnode",
    about = "A real containerd node without Kubernetes, for podscope's tests",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the node (netns, containerd, images, kubelet daemon); idempotent.
    Up {
        /// kube-proxy's mode the node plays for Services (default: the mode it has, iptables at first).
        #[arg(long, value_enum)]
        proxy_mode: Option<kubeproxy::ProxyMode>,
    },
    /// How long a terminating pod stays a Service endpoint (0 s unless set),
    /// as EndpointSlice propagation delays its removal in a cluster.
    EndpointDelay {
        #[arg(value_parser = humantime::parse_duration)]
        delay: Duration,
    },
    /// Print the rules kube-proxy would write for N synthetic Services (two
    /// endpoints each; for the rules-read benchmark): `iptables-restore`
    /// input or `nft -f` input.
    #[command(hide = true)]
    RenderRules {
        #[arg(long, value_enum)]
        proxy_mode: kubeproxy::ProxyMode,
        #[arg(long)]
        services: u32,
    },
    /// Switch the running node's Services to another kube-proxy mode (the
    /// other mode's rules are removed, as kube-proxy does on a mode change).
    ProxyMode {
        #[arg(value_enum)]
        mode: kubeproxy::ProxyMode,
    },
    /// Run a Pod manifest, or serve a ClusterIP Service (kube-proxy's rules, in the node's mode).
    Apply {
        /// The manifest file (`-` reads stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Wait until every container runs, or has exited at least once.
        #[arg(long, value_enum, default_value_t = Wait::None)]
        wait: Wait,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete a pod (preStop, SIGTERM, SIGKILL after its grace period, remove the sandbox), or a Service.
    Delete {
        /// NAMESPACE/POD (or just POD in `default`), or service/NAMESPACE/NAME.
        pod: String,
        /// Replaces the pod's terminationGracePeriodSeconds; 0 skips preStop
        /// hooks and gives the 2 s minimum, as kubelet does.
        #[arg(long)]
        grace_period: Option<i64>,
        /// Wait until the pod is gone and print how its containers ended.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Evict a pod as kubelet's eviction manager does (hard eviction: grace
    /// override 0, so no preStop and the 2 s minimum; phase Failed, reason Evicted).
    Evict {
        /// NAMESPACE/POD.
        pod: String,
        /// The eviction grace override (kubelet's --eviction-max-pod-grace-period for soft evictions).
        #[arg(long, default_value_t = 0)]
        grace_period: i64,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show pods and their containers.
    Status {
        /// NAMESPACE/POD; all pods when omitted.
        pod: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Run a command in a container (CRI ExecSync); exits with its exit code.
    Exec {
        /// NAMESPACE/POD.
        pod: String,
        container: String,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop or start containerd alone; containers keep running in their shims.
    Containerd {
        #[arg(value_enum)]
        action: Action,
    },
    /// Remove everything `up` and the pods created; idempotent.
    Down,
    /// The kubelet daemon (`up` starts it).
    #[command(hide = true)]
    Kubelet,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Wait {
    Running,
    Exited,
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Action {
    Stop,
    Start,
}

/// A mistake in what the user asked (exit status 2), as opposed to a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "podscope-testnode: cannot start tokio: {e}"
            );
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "podscope-testnode: {e:#}");
            let usage = e.downcast_ref::<UsageError>().is_some()
                || matches!(e.downcast_ref::<Error>(), Some(Error::Manifest(_)));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

async fn run(cmd: Cmd) -> Result<ExitCode> {
    if let Cmd::RenderRules {
        proxy_mode,
        services,
    } = cmd
    {
        print!("{}", kubeproxy::render_synthetic(proxy_mode, services));
        return Ok(ExitCode::SUCCESS);
    }
    if !process::is_root() {
        bail!(
            "the test node needs root (it creates network namespaces, cgroups and runs containerd): run it with sudo"
        );
    }
    match cmd {
        Cmd::Up { proxy_mode } => {
            let code = up().await?;
            if let Some(m) = proxy_mode {
                kubeproxy::set_mode(m)?;
            }
            Ok(code)
        }
        Cmd::RenderRules { .. } => unreachable!("handled above"),
        Cmd::EndpointDelay { delay } => {
            require_up()?;
            kubeproxy::set_endpoint_delay(delay)?;
            println!(
                "endpoint propagation delay: {}",
                humantime::format_duration(delay)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ProxyMode { mode } => {
            require_up()?;
            kubeproxy::set_mode(mode)?;
            println!("kube-proxy mode: {}", mode.as_str());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Apply {
            file,
            wait,
            timeout,
            output,
        } => apply(&file, wait, timeout, output).await,
        Cmd::Delete {
            pod,
            grace_period,
            wait,
            timeout,
            output,
        } => {
            let opts = kubelet::DeleteOptions {
                grace_period_seconds: grace_period,
                evicted: false,
            };
            delete(&pod, opts, wait, timeout, output).await
        }
        Cmd::Evict {
            pod,
            grace_period,
            wait,
            timeout,
            output,
        } => {
            if pod.starts_with("service/") || pod.starts_with("svc/") {
                return Err(UsageError("only pods can be evicted".into()).into());
            }
            let opts = kubelet::DeleteOptions {
                grace_period_seconds: Some(grace_period),
                evicted: true,
            };
            delete(&pod, opts, wait, timeout, output).await
        }
        Cmd::Status { pod, output } => show_status(pod.as_deref(), output),
        Cmd::Exec {
            pod,
            container,
            timeout,
            command,
        } => exec(&pod, &container, command, timeout).await,
        Cmd::Containerd { action } => containerd_cmd(action).await,
        Cmd::Down => {
            let _lock = process::NodeLock::acquire()?;
            let lines = cleanup::down().await?;
            // Still holding it: a waiting `up` then locks the unlinked file, which is fine.
            let _ = std::fs::remove_file(paths::LOCK_FILE);
            for line in lines {
                println!("{line}");
            }
            println!("the test node is down");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kubelet => {
            kubelet::run().await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

const KUBELET_MARKER: &str = "podscope-testnode kubelet";

async fn up() -> Result<ExitCode> {
    let t = Instant::now();
    let _lock = process::NodeLock::acquire()?;
    std::fs::create_dir_all(paths::STATE_DIR)
        .with_context(|| format!("cannot create {}", paths::STATE_DIR))?;
    cleanup::record_preexisting()?;
    for dir in [paths::manifests_dir(), paths::pods_dir(), paths::logs_dir()] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if netns::ensure()? {
        println!("created network namespace {}", paths::NETNS);
    } else {
        println!("network namespace {} exists", paths::NETNS);
    }
    if containerd::write_config()?
        && let Some(pid) = containerd::stop()?
    {
        println!("containerd's config changed: stopped containerd (pid {pid}) to restart it");
    }
    let (pid, started) = containerd::start().await?;
    let mut cri = Cri::connect(paths::SOCKET).await?;
    let version = cri.version().await?;
    if started {
        println!(
            "started {version} in {} (pid {pid}), socket {}",
            paths::NETNS,
            paths::SOCKET
        );
    } else {
        println!("{version} runs (pid {pid}), socket {}", paths::SOCKET);
    }
    println!("{}", images::ensure(&mut cri).await?);
    println!("{}", ensure_kubelet()?);
    println!("the test node is up ({:.1}s)", t.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// Starts the kubelet daemon unless it runs from this very binary (a daemon
/// from a rebuilt binary is replaced; it adopts the pods from their status).
fn ensure_kubelet() -> Result<String> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    if let Some(pid) = process::recorded(&paths::kubelet_pid(), KUBELET_MARKER) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe == me {
            return Ok(format!("kubelet daemon runs (pid {pid})"));
        }
        process::terminate(pid, Duration::from_secs(5))?;
    }
    let mut cmd = std::process::Command::new(&me);
    cmd.arg("kubelet");
    // In the node's network namespace: probes and httpGet hooks connect
    // from the node to the pods' addresses, as kubelet's do.
    let ns = netns::path();
    let pid = process::spawn_daemon(cmd, &paths::kubelet_log(), &paths::kubelet_pid(), Some(&ns))?;
    Ok(format!(
        "started the kubelet daemon (pid {pid}, log {})",
        paths::kubelet_log().display()
    ))
}

fn require_up() -> Result<()> {
    if process::recorded(&paths::kubelet_pid(), KUBELET_MARKER).is_none() {
        bail!("the test node is not up (no kubelet daemon): run `podscope-testnode up` first");
    }
    Ok(())
}

/// NAMESPACE/POD, or POD in `default`.
fn split_pod(s: &str) -> Result<(String, String)> {
    let (ns, name) = s.split_once('/').unwrap_or(("default", s));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(UsageError(format!("`{s}` is not NAMESPACE/POD")).into());
    }
    Ok((ns.to_string(), name.to_string()))
}

async fn apply(file: &Path, wait: Wait, timeout: Duration, output: Output) -> Result<ExitCode> {
    let (text, origin) = if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the manifest from stdin")?;
        (text, "<stdin>".to_string())
    } else {
        let text = std::fs::read_to_string(file).map_err(|source| {
            Error::Manifest(testnode::manifest::ManifestError::Read {
                path: file.display().to_string(),
                source,
            })
        })?;
        (text, file.display().to_string())
    };
    let docs = testnode::manifest::documents(&text, &origin).map_err(Error::from)?;
    // Everything is validated before anything is applied.
    for d in &docs {
        match d.kind.as_str() {
            "Service" => {
                Service::parse(&d.text, &d.origin).map_err(Error::from)?;
            }
            _ => {
                let pod = Pod::parse(&d.text, &d.origin).map_err(Error::from)?;
                testnode::qos::qos_class(&pod).map_err(Error::from)?;
            }
        }
    }
    let mut code = ExitCode::SUCCESS;
    for d in docs {
        code = match d.kind.as_str() {
            "Service" => apply_service(&d.text, &d.origin, output)?,
            _ => apply_pod(&d.text, &d.origin, wait, timeout, output).await?,
        };
    }
    Ok(code)
}

/// One Pod document: stored for the daemon, then waited for as asked.
async fn apply_pod(
    text: &str,
    origin: &str,
    wait: Wait,
    timeout: Duration,
    output: Output,
) -> Result<ExitCode> {
    let mut pod = Pod::parse(text, origin).map_err(Error::from)?;
    require_up()?;
    for c in pod.spec.init_containers.iter().chain(&pod.spec.containers) {
        if let Some(n) = c.image_notice() {
            eprintln!("{n}");
        }
    }
    let (ns, name) = (pod.namespace().to_string(), pod.name().to_string());
    let target = paths::manifest_file(&ns, &name);
    let deadline = Instant::now() + timeout;

    // A pod of that name still being deleted: wait for it to go first.
    let deleting = paths::deleting_file(&ns, &name);
    while !target.exists()
        && (deleting.exists()
            || status::read(&ns, &name)?.is_some_and(|s| s.phase == Phase::Terminating))
    {
        if Instant::now() > deadline {
            bail!("pod {ns}/{name} is still being deleted; try again later");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let existing = match std::fs::read_to_string(&target) {
        Ok(text) => Some(Pod::parse(&text, &target.display().to_string()).map_err(Error::from)?),
        Err(_) => None,
    };
    let verb = match existing {
        Some(old) => {
            // Same spec (the stored copy carries the uid apply filled in): nothing to do.
            let mut cmp = pod.clone();
            if cmp.metadata.uid.is_none() {
                cmp.metadata.uid = old.metadata.uid.clone();
            }
            if cmp != old {
                return Err(UsageError(format!(
                    "pod {ns}/{name} exists with a different spec; delete it first (`podscope-testnode delete {ns}/{name} --wait`)"
                ))
                .into());
            }
            pod = old;
            "unchanged"
        }
        None => {
            if pod.metadata.uid.is_none() {
                pod.metadata.uid = Some(process::random_uuid()?);
            }
            let tmp = target.with_extension("yaml.tmp");
            std::fs::write(&tmp, pod.to_yaml().context("cannot encode the manifest")?)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("cannot write {}", target.display()))?;
            "created"
        }
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let st = match wait {
        Wait::None => status::read(&ns, &name)?.filter(|s| s.uid == uid),
        Wait::Running | Wait::Exited => Some(
            wait_for(&ns, &name, &uid, deadline, |s| {
                if wait == Wait::Running {
                    if s.all_running() {
                        return Ok(true);
                    }
                    // A short-lived container can run and end between two
                    // looks on a loaded machine: it ran, which is what the
                    // caller waits for.
                    if matches!(s.phase, Phase::Succeeded | Phase::Failed) {
                        if s.all_started() {
                            return Ok(true);
                        }
                        bail!(
                            "pod {ns}/{name} ended ({:?}) before all its containers ran",
                            s.phase
                        );
                    }
                    Ok(false)
                } else {
                    Ok(s.all_exited_once())
                }
            })
            .await?,
        ),
    };
    match output {
        Output::Json => {
            let v = match &st {
                Some(s) => serde_json::to_value(s)?,
                None => serde_json::json!({
                    "namespace": ns, "name": name, "uid": uid, "phase": "Pending", "containers": []
                }),
            };
            println!("{v}");
        }
        Output::Table => {
            println!("pod/{ns}/{name} {verb} (uid {uid})");
            if let Some(s) = &st
                && wait != Wait::None
            {
                print_table(std::slice::from_ref(s));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the pod's status (matching `uid`) until `done` says so.
async fn wait_for(
    ns: &str,
    name: &str,
    uid: &str,
    deadline: Instant,
    mut done: impl FnMut(&PodStatus) -> Result<bool>,
) -> Result<PodStatus> {
    let mut last = None;
    loop {
        if let Some(s) = status::read(ns, name)?.filter(|s| s.uid == uid) {
            if done(&s)? {
                return Ok(s);
            }
            last = Some(s);
        }
        if Instant::now() > deadline {
            let detail = last
                .map(|s| {
                    format!(
                        "; it is {:?}{}",
                        s.phase,
                        s.message.map(|m| format!(": {m}")).unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            bail!("timed out waiting for pod {ns}/{name}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stores a Service and writes kube-proxy's rules for it at once.
fn apply_service(text: &str, origin: &str, output: Output) -> Result<ExitCode> {
    let svc = Service::parse(text, origin).map_err(Error::from)?;
    require_up()?;
    let (verb, svc) = service::store(svc).map_err(|e| UsageError(e.to_string()))?;
    kubeproxy::sync()?;
    let ip = svc
        .spec
        .cluster_ip
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let node_ports: Vec<u16> = svc.spec.ports.iter().filter_map(|p| p.node_port).collect();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"kind": "Service", "namespace": svc.namespace(), "name": svc.name(), "clusterIP": ip, "nodePorts": node_ports})
        ),
        Output::Table => println!(
            "service/{}/{} {verb} (cluster IP {ip}{})",
            svc.namespace(),
            svc.name(),
            node_ports
                .iter()
                .map(|p| format!(", node port {p}"))
                .collect::<String>()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(
    pod: &str,
    opts: kubelet::DeleteOptions,
    wait: bool,
    timeout: Duration,
    output: Output,
) -> Result<ExitCode> {
    if opts.grace_period_seconds.is_some_and(|g| g < 0) {
        return Err(UsageError("--grace-period must not be negative".into()).into());
    }
    if let Some(rest) = pod
        .strip_prefix("service/")
        .or_else(|| pod.strip_prefix("svc/"))
    {
        let (ns, name) = split_pod(rest)?;
        if !service::remove(&ns, &name)? {
            return Err(UsageError(format!("there is no service {ns}/{name}")).into());
        }
        kubeproxy::sync()?;
        if output == Output::Table {
            println!("service/{ns}/{name} deleted");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let pod = pod.strip_prefix("pod/").unwrap_or(pod);
    let (ns, name) = split_pod(pod)?;
    let manifest = paths::manifest_file(&ns, &name);
    let before = status::read(&ns, &name)?;
    if !manifest.exists() {
        match &before {
            Some(s) if s.phase != Phase::Deleted => {}
            _ => return Err(UsageError(format!("there is no pod {ns}/{name}")).into()),
        }
    } else {
        // Renamed, not removed: the marker keeps the spec until the daemon
        // has torn the pod down, even if the daemon restarts meanwhile.
        let marker = paths::deleting_file(&ns, &name);
        if opts != kubelet::DeleteOptions::default() {
            opts.write(&ns, &name)?;
        }
        std::fs::rename(&manifest, &marker)
            .with_context(|| format!("cannot rename {}", manifest.display()))?;
    }
    if !wait {
        if output == Output::Table {
            println!("pod/{ns}/{name} deleting");
        }
        return Ok(ExitCode::SUCCESS);
    }
    require_up()?;
    let t = Instant::now();
    let uid = before.map(|s| s.uid).unwrap_or_default();
    let done = wait_for(&ns, &name, &uid, t + timeout, |s| {
        Ok(s.phase == Phase::Deleted)
    })
    .await;
    let done = match done {
        Ok(s) => s,
        // It never got a status (no sandbox yet): nothing ran, nothing to wait for.
        Err(_) if uid.is_empty() => {
            println!("pod/{ns}/{name} deleted");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string(&done)?),
        Output::Table => {
            println!(
                "pod/{ns}/{name} {} in {:.1}s",
                if opts.evicted { "evicted" } else { "deleted" },
                t.elapsed().as_secs_f64()
            );
            for c in done.init_containers.iter().chain(&done.containers) {
                println!(
                    "  {}: {}{}",
                    c.name,
                    c.exit_code
                        .map(|x| format!("exit {x}"))
                        .unwrap_or_else(|| c.state.clone()),
                    c.reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_status(pod: Option<&str>, output: Output) -> Result<ExitCode> {
    let pods: Vec<PodStatus> = match pod {
        Some(p) => {
            let (ns, name) = split_pod(p)?;
            match status::read(&ns, &name)? {
                Some(s) => vec![s],
                None => return Err(UsageError(format!("there is no pod {ns}/{name}")).into()),
            }
        }
        None => status::read_all()?,
    };
    match (output, pod) {
        (Output::Json, Some(_)) => println!("{}", serde_json::to_string(&pods[0])?),
        (Output::Json, None) => println!("{}", serde_json::to_string(&pods)?),
        (Output::Table, _) => print_table(&pods),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(pods: &[PodStatus]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<32} {:<12} {:<11} {:<15} {:<13}",
        "POD", "STATUS", "QOS", "IP", "SANDBOX"
    );
    for p in pods {
        let _ = writeln!(
            out,
            "{:<32} {:<12} {:<11} {:<15} {:<13}",
            format!("{}/{}", p.namespace, p.name),
            p.reason.clone().unwrap_or_else(|| format!("{:?}", p.phase)),
            p.qos_class.to_string(),
            p.pod_ip.as_deref().unwrap_or("-"),
            p.sandbox_id
                .as_deref()
                .map(|s| &s[..s.len().min(12)])
                .unwrap_or("-"),
        );
        let inits = p.init_containers.iter().map(|c| (c, true));
        for (c, init) in inits.chain(p.containers.iter().map(|c| (c, false))) {
            let _ = writeln!(
                out,
                "  {:<16} {:<16} attempt {:<3} restarts {:<3} {:<20} pid {:<8} {}",
                if init {
                    format!("{} (init)", c.name)
                } else {
                    c.name.clone()
                },
                match (&c.waiting_reason, c.ready) {
                    (Some(w), _) => w.clone(),
                    (None, true) => format!("{} ready", c.state),
                    (None, false) => c.state.clone(),
                },
                c.attempt,
                c.restart_count,
                match (c.exit_code, &c.reason) {
                    (Some(x), Some(r)) => format!("exit {x} {r}"),
                    (Some(x), None) => format!("exit {x}"),
                    _ => "-".into(),
                },
                c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                c.container_id
                    .as_deref()
                    .map(|s| &s[..s.len().min(12)])
                    .unwrap_or("-"),
            );
        }
        if let Some(m) = &p.message {
            let _ = writeln!(out, "  ! {m}");
        }
    }
}

async fn exec(pod: &str, container: &str, cmd: Vec<String>, timeout: Duration) -> Result<ExitCode> {
    let (ns, name) = split_pod(pod)?;
    let st = status::read(&ns, &name)?
        .ok_or_else(|| UsageError(format!("there is no pod {ns}/{name}")))?;
    let c = st.container(container).ok_or_else(|| {
        UsageError(format!(
            "pod {ns}/{name} has no container `{container}` (it has {})",
            st.containers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let Some(id) = c.container_id.clone().filter(|_| c.state == "running") else {
        bail!(
            "container {container} of pod {ns}/{name} is not running (it is {})",
            c.state
        );
    };
    let mut cri = Cri::connect(paths::SOCKET).await?;
    let (code, stdout, stderr) = cri.exec_sync(&id, cmd, timeout).await?;
    std::io::stdout().write_all(&stdout)?;
    std::io::stderr().write_all(&stderr)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

async fn containerd_cmd(action: Action) -> Result<ExitCode> {
    // No node, nothing to do (and no lock file to leave behind).
    if !Path::new(paths::STATE_DIR).exists() {
        if action == Action::Start {
            bail!("the test node is not up: run `podscope-testnode up`");
        }
        println!("containerd is not running");
        return Ok(ExitCode::SUCCESS);
    }
    let _lock = process::NodeLock::acquire()?;
    match action {
        Action::Stop => match containerd::stop()? {
            Some(pid) => println!("stopped containerd (pid {pid}); containers keep running"),
            None => println!("containerd is not running"),
        },
        Action::Start => {
            if !netns::is_nsfs(&netns::path()) {
                bail!("the test node is not up (no network namespace): run `podscope-testnode up`");
            }
            let (pid, started) = containerd::start().await?;
            if started {
                println!("started containerd (pid {pid})");
            } else {
                println!("containerd runs (pid {pid})");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
