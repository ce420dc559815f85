//! kube-proxy's rules, read by running `iptables-save` in the rules' network
//! namespace: on its own task, one read in flight at most, each under a
//! deadline after which the child is killed and reaped, its output capped
//! and parsed as it streams (no copy of the text is kept: only a hash, to
//! see whether anything changed). While the tool is missing, fails or shows
//! no kube-proxy chains, reads back off exponentially (2 s up to 5 min); a
//! read that hung is retried at the usual pace (its deadline already
//! spaces the reads out).

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::{Backoff, Dependency, Health};
use crate::net::{ServiceMap, iptables::ServiceMapBuilder, local_addrs};

/// The commands that print the rules: the system's default backend first,
/// then each backend by name (Debian's iptables package has all three).
pub const SAVE_COMMANDS: [&str; 3] = ["iptables-save", "iptables-nft-save", "iptables-legacy-save"];

#[derive(Clone, Debug)]
pub struct RulesOptions {
    /// Where the rules live (None: this process's network namespace).
    pub netns: Option<PathBuf>,
    /// How long one `*-save` may run before it is killed.
    pub timeout: Duration,
    /// The most output read from one `*-save`; more is an error.
    pub max_output: usize,
    /// How often the rules are re-read while they are readable.
    pub interval: Duration,
    /// The longest wait between reads while they are not.
    pub max_backoff: Duration,
}

impl Default for RulesOptions {
    fn default() -> Self {
        RulesOptions {
            netns: None,
            timeout: Duration::from_secs(10),
            max_output: 256 << 20,
            interval: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Why the rules could not be read: one sentence each, for the log and doctor.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(
        "iptables-save is not installed (not found on PATH), so kube-proxy's rules cannot be read: connections are shown without their Service, drops are still reported"
    )]
    NotInstalled,
    #[error("{program} did not finish within {timeout:?}: it was killed")]
    Timeout {
        program: &'static str,
        timeout: Duration,
    },
    #[error("{program} printed more than {max} bytes: its output was not used")]
    TooLarge { program: &'static str, max: usize },
    #[error(
        "cannot read kube-proxy's rules ({0}): connections are shown without their Service, drops are still reported"
    )]
    Failed(String),
}

/// One successful read.
pub struct RulesRead {
    pub map: ServiceMap,
    /// A hash of the rules (counters and comments left out).
    pub hash: u64,
    /// Whether kube-proxy's chains are there.
    pub has_kube_chains: bool,
    pub program: &'static str,
}

/// Runs one `*-save` command in the rules' namespace, parsing as it streams.
pub async fn save_with(program: &'static str, opts: &RulesOptions) -> Result<RulesRead, SaveError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Kept open until the child has started: it joins the namespace by fd.
    let _ns_file = match &opts.netns {
        Some(ns) => Some(enter_netns_on_exec(&mut cmd, ns)?),
        None => None,
    };
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SaveError::NotInstalled
        } else {
            SaveError::Failed(format!("{program}: {e}"))
        }
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let max = opts.max_output;
    let read = async move {
        let mut builder = ServiceMapBuilder::default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut total = 0usize;
        if let Some(out) = stdout {
            let mut lines = BufReader::new(out).lines();
            while let Some(line) = lines
                .next_line()
                .await
                .map_err(|e| SaveError::Failed(format!("{program}: {e}")))?
            {
                total += line.len() + 1;
                if total > max {
                    return Err(SaveError::TooLarge { program, max });
                }
                // Counters and timestamps change without the rules changing.
                if line.starts_with('#') {
                    continue;
                }
                let rule = line.split(" [").next().unwrap_or(&line);
                rule.hash(&mut hasher);
                builder.line(rule);
            }
        }
        let mut err = String::new();
        if let Some(e) = stderr {
            // Only the start of stderr matters for a message.
            let _ = e.take(4096).read_to_string(&mut err).await;
        }
        Ok((builder, hasher.finish(), err))
    };
    let outcome = tokio::time::timeout(opts.timeout, async {
        let r = read.await;
        let status = child.wait().await;
        (r, status)
    })
    .await;
    let (read, status) = match outcome {
        Ok(x) => x,
        Err(_) => {
            // Killed and reaped: no zombie, no second read in flight.
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            return Err(SaveError::Timeout {
                program,
                timeout: opts.timeout,
            });
        }
    };
    let (builder, hash, err) = match read {
        Ok(x) => x,
        Err(e) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            return Err(e);
        }
    };
    match status {
        Ok(st) if st.success() => {}
        Ok(st) => {
            return Err(SaveError::Failed(format!(
                "{program} ({st}): {}",
                err.trim()
            )));
        }
        Err(e) => return Err(SaveError::Failed(format!("{program}: {e}"))),
    }
    let has_kube_chains = builder.has_kube_chains;
    Ok(RulesRead {
        map: builder.finish(),
        hash,
        has_kube_chains,
        program,
    })
}

fn enter_netns_on_exec(
    cmd: &mut tokio::process::Command,
    ns: &Path,
) -> Result<std::fs::File, SaveError> {
    let file = std::fs::File::open(ns).map_err(|e| {
        SaveError::Failed(format!(
            "cannot open the network namespace {}: {e}",
            ns.display()
        ))
    })?;
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: setns in the forked child before exec; the fd stays open in
    // the parent until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(file)
}

/// kube-proxy's rules from whichever iptables backend holds them (the
/// node's kube-proxy may use nf_tables or legacy iptables, and each `*-save`
/// shows only its own backend's tables); `preferred` is asked first, so a
/// steady node costs one command per read. Commands run one after another.
pub async fn read(preferred: &str, opts: &RulesOptions) -> Result<RulesRead, SaveError> {
    let mut order: Vec<&'static str> = SAVE_COMMANDS.to_vec();
    order.sort_by_key(|p| *p != preferred);
    let mut first: Option<Result<RulesRead, SaveError>> = None;
    for program in order {
        let r = save_with(program, opts).await;
        if let Ok(read) = &r
            && read.has_kube_chains
        {
            return r;
        }
        // A hung tool is not asked again in the same read: one deadline each read.
        let timed_out = matches!(r, Err(SaveError::Timeout { .. }));
        // The plain `iptables-save` decides what is reported when no
        // backend has kube-proxy's chains.
        if first.is_none() || program == SAVE_COMMANDS[0] || timed_out {
            first = Some(r);
        }
        if timed_out {
            break;
        }
    }
    first.unwrap_or(Err(SaveError::NotInstalled))
}

/// The namespace's addresses, where NodePorts answer (blocking: a thread).
async fn addresses(netns: Option<PathBuf>) -> Option<std::collections::HashSet<std::net::IpAddr>> {
    tokio::task::spawn_blocking(move || {
        crate::kernel::bpf_sys::in_netns(netns.as_deref(), local_addrs)
            .ok()
            .flatten()
    })
    .await
    .ok()
    .flatten()
}

/// Reads the rules until the process ends, handing each changed map to
/// `publish` (which must not block). Failed reads are counted in `errors`.
pub fn spawn(
    opts: RulesOptions,
    health: Arc<Health>,
    errors: Arc<AtomicU64>,
    publish: impl Fn(Arc<ServiceMap>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Backoff::new(opts.interval, opts.max_backoff);
        let mut backend: &'static str = SAVE_COMMANDS[0];
        let mut last: Option<(u64, std::collections::HashSet<std::net::IpAddr>)> = None;
        loop {
            let wait = match read(backend, &opts).await {
                Ok(r) if r.has_kube_chains => {
                    backend = r.program;
                    health.ok(Dependency::KubeProxyRules);
                    backoff.succeeded();
                    let addrs = addresses(opts.netns.clone()).await;
                    let addrs = addrs
                        .or_else(|| last.as_ref().map(|(_, a)| a.clone()))
                        .unwrap_or_default();
                    if last
                        .as_ref()
                        .is_none_or(|(h, a)| *h != r.hash || *a != addrs)
                    {
                        let mut map = r.map;
                        map.local_addrs = addrs.clone();
                        publish(Arc::new(map));
                        last = Some((r.hash, addrs));
                    }
                    opts.interval
                }
                Ok(_) => {
                    health.degraded(
                        Dependency::KubeProxyRules,
                        "no kube-proxy chains (KUBE-SERVICES) in any iptables backend: kube-proxy is not in iptables mode here, or not running",
                    );
                    backoff.failed()
                }
                // A read that hung was already bounded by its deadline (and
                // one read is in flight at most): try again at the usual
                // pace, so that the Services come back soon after the tool does.
                Err(e @ SaveError::Timeout { .. }) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    health.degraded(Dependency::KubeProxyRules, e.to_string());
                    opts.interval
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    health.degraded(Dependency::KubeProxyRules, e.to_string());
                    backoff.failed()
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}
