//! kube-proxy's rules, read by running `iptables-save` (iptables mode) or
//! `nft -j list table ip|ip6 kube-proxy` (nftables mode) in the rules'
//! network namespace: on its own task, one read in flight at most, each
//! command under a deadline after which the child is killed and reaped, its
//! output capped (iptables text parsed as it streams, no copy kept; nft's
//! JSON kept whole under the cap, then parsed) and only a hash kept, to see
//! whether anything changed. The parsers are `net::iptables` and
//! `net::nftables`; the mode that answered last is asked first. While the tool is missing, fails or shows
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

use tokio::io::AsyncReadExt;

use super::{Backoff, Dependency, Health};
use crate::net::{ServiceMap, iptables::ServiceMapBuilder, local_addrs, nftables};

/// The commands that print the rules: the system's default backend first,
/// then each backend by name (Debian's iptables package has all three).
pub const SAVE_COMMANDS: [&str; 3] = ["iptables-save", "iptables-nft-save", "iptables-legacy-save"];

/// Every reader, in the order a node without a known mode is asked: the
/// iptables backends, then kube-proxy's nftables table.
pub const READERS: [&str; 4] = [SAVE_COMMANDS[0], SAVE_COMMANDS[1], SAVE_COMMANDS[2], NFT];

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
        "neither iptables-save nor nft is installed (not found on PATH), so kube-proxy's rules cannot be read: connections are shown without their Service, drops are still reported"
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

/// kube-proxy's mode on this node, as its rules show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    /// `KUBE-SERVICES` and its chains in an iptables backend.
    Iptables,
    /// `table ip kube-proxy` / `table ip6 kube-proxy` in nf_tables.
    Nftables,
    /// IPVS virtual servers (the `kube-ipvs0` interface, ipset matches in
    /// `KUBE-SERVICES`): the kernel's load balancer, not netfilter rules.
    Ipvs,
    /// None of kube-proxy's rules: no kube-proxy, a replacement (Cilium,
    /// kube-router, …), or not the node's network namespace.
    None,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::None => "none",
        }
    }
}

/// One successful read.
pub struct RulesRead {
    pub map: ServiceMap,
    /// A hash of the rules (counters and comments left out).
    pub hash: u64,
    /// Whether kube-proxy's chains (iptables) or table (nftables) are there.
    pub has_kube_chains: bool,
    pub program: &'static str,
    /// The mode these rules are kube-proxy's in (None when they are not).
    pub mode: ProxyMode,
}

/// The program that lists kube-proxy's nftables mode.
pub const NFT: &str = "nft";

/// Where the output of one command goes as it streams.
trait Sink: Send {
    fn bytes(&mut self, b: &[u8]);
}

/// `iptables-save` text, parsed line by line (no copy of the text is kept).
#[derive(Default)]
struct SaveSink {
    partial: Vec<u8>,
    builder: ServiceMapBuilder,
    hasher: std::collections::hash_map::DefaultHasher,
}

impl SaveSink {
    fn line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        // Counters and timestamps change without the rules changing.
        if line.starts_with('#') {
            return;
        }
        let rule = line.split(" [").next().unwrap_or(&line);
        rule.hash(&mut self.hasher);
        self.builder.line(rule);
    }
}

impl Sink for SaveSink {
    fn bytes(&mut self, mut b: &[u8]) {
        while let Some(nl) = b.iter().position(|c| *c == b'\n') {
            if self.partial.is_empty() {
                self.line(&b[..nl]);
            } else {
                let mut l = std::mem::take(&mut self.partial);
                l.extend_from_slice(&b[..nl]);
                self.line(&l);
            }
            b = &b[nl + 1..];
        }
        self.partial.extend_from_slice(b);
    }
}

/// `nft -j` output: one JSON document, kept (under the cap) until it ends.
#[derive(Default)]
struct JsonSink(Vec<u8>);

impl Sink for JsonSink {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// Runs one command in the rules' namespace under the deadline and the
/// cap, streaming its stdout into `sink`; Err(stderr) when it failed.
async fn run<S: Sink>(
    program: &'static str,
    args: &[&str],
    opts: &RulesOptions,
    mut sink: S,
) -> Result<Result<S, String>, SaveError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
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
        let mut total = 0usize;
        if let Some(mut out) = stdout {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = out
                    .read(&mut buf)
                    .await
                    .map_err(|e| SaveError::Failed(format!("{program}: {e}")))?;
                if n == 0 {
                    break;
                }
                total += n;
                if total > max {
                    return Err(SaveError::TooLarge { program, max });
                }
                sink.bytes(&buf[..n]);
            }
        }
        let mut err = String::new();
        if let Some(e) = stderr {
            // Only the start of stderr matters for a message.
            let _ = e.take(4096).read_to_string(&mut err).await;
        }
        Ok((sink, err))
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
    let (sink, err) = match read {
        Ok(x) => x,
        Err(e) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            return Err(e);
        }
    };
    match status {
        Ok(st) if st.success() => Ok(Ok(sink)),
        Ok(st) => Ok(Err(format!("{program} ({st}): {}", err.trim()))),
        Err(e) => Err(SaveError::Failed(format!("{program}: {e}"))),
    }
}

/// Runs one `*-save` command in the rules' namespace, parsing as it streams.
pub async fn save_with(program: &'static str, opts: &RulesOptions) -> Result<RulesRead, SaveError> {
    let mut sink = run(program, &[], opts, SaveSink::default())
        .await?
        .map_err(SaveError::Failed)?;
    if !sink.partial.is_empty() {
        let last = std::mem::take(&mut sink.partial);
        sink.line(&last);
    }
    let has_kube_chains = sink.builder.has_kube_chains;
    let ipvs = sink.builder.ipvs;
    Ok(RulesRead {
        map: sink.builder.finish(),
        hash: sink.hasher.finish(),
        has_kube_chains,
        program,
        mode: match (has_kube_chains, ipvs) {
            (_, true) => ProxyMode::Ipvs,
            (true, false) => ProxyMode::Iptables,
            (false, false) => ProxyMode::None,
        },
    })
}

/// kube-proxy's nftables mode: `nft -j list table ip kube-proxy` and the
/// same for `ip6` (a single-stack node has one of them), one after the
/// other, each under the deadline.
pub async fn nft_with(opts: &RulesOptions) -> Result<RulesRead, SaveError> {
    let mut listings = vec![];
    let mut missing = vec![];
    for family in ["ip", "ip6"] {
        let args = ["-j", "list", "table", family, nftables::TABLE];
        match run(NFT, &args, opts, JsonSink::default()).await? {
            Ok(sink) => listings.push(sink.0),
            Err(e) => missing.push(e),
        }
    }
    // A table that is not there is "No such file or directory"; anything
    // else (no CAP_NET_ADMIN, …) is a failure to report.
    if listings.is_empty()
        && let Some(e) = missing
            .into_iter()
            .find(|e| !e.contains("No such file or directory"))
    {
        return Err(SaveError::Failed(e));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    listings.hash(&mut hasher);
    let slices: Vec<&[u8]> = listings.iter().map(Vec::as_slice).collect();
    let (map, has) =
        nftables::parse(&slices).map_err(|e| SaveError::Failed(format!("{NFT}: {e}")))?;
    Ok(RulesRead {
        map,
        hash: hasher.finish(),
        has_kube_chains: has,
        program: NFT,
        mode: if has {
            ProxyMode::Nftables
        } else {
            ProxyMode::None
        },
    })
}

/// One reader, by the program that prints the rules.
pub async fn read_with(program: &'static str, opts: &RulesOptions) -> Result<RulesRead, SaveError> {
    if program == NFT {
        nft_with(opts).await
    } else {
        save_with(program, opts).await
    }
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

/// kube-proxy's rules from whichever mode and backend holds them (the
/// node's kube-proxy may write nftables, or iptables through nf_tables or
/// legacy iptables, and each tool shows only its own); `preferred` is asked
/// first, so a steady node costs one command per read (two for nftables:
/// one per family). Commands run one after another. A node in IPVS mode is
/// recognised from its iptables rules and its `kube-ipvs0` interface.
pub async fn read(preferred: &str, opts: &RulesOptions) -> Result<RulesRead, SaveError> {
    let mut order: Vec<&'static str> = READERS.to_vec();
    order.sort_by_key(|p| *p != preferred);
    let mut failed: Vec<(&'static str, Result<RulesRead, SaveError>)> = vec![];
    for program in order {
        let r = read_with(program, opts).await;
        if let Ok(read) = &r
            && (read.has_kube_chains || read.mode == ProxyMode::Ipvs)
        {
            return r;
        }
        // A hung tool is not asked again in the same read: one deadline each read.
        if matches!(r, Err(SaveError::Timeout { .. })) {
            return r;
        }
        failed.push((program, r));
    }
    // What is reported when no reader found kube-proxy's rules: the plain
    // `iptables-save`'s answer, else the first installed reader's.
    let installed = |r: &Result<RulesRead, SaveError>| !matches!(r, Err(SaveError::NotInstalled));
    let pick = failed
        .iter()
        .position(|(p, r)| *p == READERS[0] && installed(r))
        .or_else(|| failed.iter().position(|(_, r)| installed(r)));
    let mut r = match pick {
        Some(i) => failed.swap_remove(i).1,
        None => Err(SaveError::NotInstalled),
    };
    // IPVS mode leaves its dummy interface even where the rules' tool differs.
    if let Ok(read) = &mut r
        && read.mode == ProxyMode::None
        && has_ipvs_interface(opts.netns.clone()).await
    {
        read.mode = ProxyMode::Ipvs;
    }
    r
}

/// Whether the rules' namespace has kube-proxy's IPVS dummy interface.
async fn has_ipvs_interface(netns: Option<PathBuf>) -> bool {
    tokio::task::spawn_blocking(move || {
        crate::kernel::bpf_sys::in_netns(netns.as_deref(), || {
            // SAFETY: a NUL-terminated name.
            unsafe { libc::if_nametoindex(c"kube-ipvs0".as_ptr()) != 0 }
        })
        .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
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

/// What it costs when the rules name no Service (one sentence, for the
/// log, /readyz and doctor).
pub fn no_rules_meaning(mode: ProxyMode) -> &'static str {
    match mode {
        ProxyMode::Ipvs => {
            "kube-proxy is in IPVS mode: Services are IPVS virtual servers, not netfilter rules, so connections are shown with the endpoint IPVS chose but without their Service name, and rejects of Services without endpoints are not named; drops are still reported"
        }
        _ => {
            "no kube-proxy rules (iptables KUBE-SERVICES or nftables table kube-proxy): kube-proxy is not running here, a replacement handles Services, or this is not the node's network namespace; drops are still reported"
        }
    }
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
        let mut backend: &'static str = READERS[0];
        let mut last: Option<(u64, std::collections::HashSet<std::net::IpAddr>)> = None;
        loop {
            let wait = match read(backend, &opts).await {
                Ok(r) if r.has_kube_chains && r.mode != ProxyMode::Ipvs => {
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
                        // nftables mode's `nodeport-ips`, when it names addresses.
                        if map.local_addrs.is_empty() {
                            map.local_addrs = addrs.clone();
                        }
                        publish(Arc::new(map));
                        last = Some((r.hash, addrs));
                    }
                    opts.interval
                }
                Ok(r) => {
                    health.degraded(Dependency::KubeProxyRules, no_rules_meaning(r.mode));
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
