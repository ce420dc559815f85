//! `podscope trace <family>`: a live view straight from the kernel, every
//! event attributed to its namespace, pod and container.

use std::{
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use clap::{Args, ValueEnum};
use tokio::{
    signal::unix::SignalKind,
    sync::broadcast::{self, error::RecvError},
};

use super::{Output, parse_duration};
use crate::{
    deps::{self, Health, rules::RulesOptions},
    driver::{Driver, DriverOptions, DriverStatus, Published},
    events::{Event, Filter},
    families::Kernel,
    kernel::privilege::Privileges,
    metadata::{PodIdentity, ResolverOptions},
    probes::{AttachType, LoadOptions},
};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// What to trace.
    #[arg(value_enum)]
    pub family: Family,
    /// Output format: a table, or one JSON object per line.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Stop after this long (e.g. 30s, 5m); runs until Ctrl-C otherwise.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Only events of pods in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only events of this pod (by name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only events of containers of this name.
    #[arg(long)]
    pub container: Option<String>,
    /// The container runtime's CRI socket (default: the first of the usual places that exists).
    #[arg(long, env = "PODSCOPE_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// Do not ask the runtime for names: events carry pod uids and container ids only.
    #[arg(long)]
    pub no_cri: bool,
    /// Ring buffer size in bytes (a power of two, at least 4096) [default:
    /// 512 KiB per CPU, 1 to 8 MiB].
    #[arg(long, default_value_t = crate::probes::default_ring_buffer_bytes(), hide_default_value = true, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
    /// Force one hook type instead of the best the kernel allows.
    #[arg(long, value_enum, default_value_t = AttachChoice::Auto)]
    pub attach: AttachChoice,
    /// `net`: the network namespace where kube-proxy's rules live (e.g.
    /// /run/netns/podscope-node) [default: this process's].
    #[arg(long, env = "PODSCOPE_NETNS")]
    pub netns: Option<PathBuf>,
}

pub use crate::families::View as Family;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachChoice {
    Auto,
    TpBtf,
    RawTp,
    Tracepoint,
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!(
            "{n} must be a power of two of at least 4096 (e.g. 1048576)"
        ));
    }
    Ok(n)
}

pub fn run(args: TraceArgs) -> Result<ExitCode> {
    Privileges::current()
        .require_tracing()
        .map_err(|m| anyhow!(m))?;
    let opts = DriverOptions {
        load: LoadOptions::with_ring_buffer(args.ring_buffer_size),
        exits_attach: match args.attach {
            AttachChoice::Auto => None,
            AttachChoice::TpBtf => Some(AttachType::TpBtf),
            AttachChoice::RawTp => Some(AttachType::RawTp),
            AttachChoice::Tracepoint => Some(AttachType::Tracepoint),
        },
        resolver: ResolverOptions {
            cri_socket: args.cri_socket,
            use_cri: !args.no_cri,
            ..Default::default()
        },
        signals: args.family.needs(Kernel::Signals),
        oom: args.family.needs(Kernel::Oom),
        net: args.family.needs(Kernel::Netfilter),
        netns: args.netns.clone(),
        throttle: args.family.needs(Kernel::Throttle),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let filter = Filter {
        namespace: args.namespace,
        pod: args.pod,
        container: args.container,
    };
    let code = rt.block_on(async move {
        let driver = Driver::start(&opts)?;
        tracing::debug!("attached");
        let health = Arc::new(Health::new());
        let rules = RulesOptions {
            netns: opts.netns.clone(),
            ..Default::default()
        };
        let deps = deps::spawn_all(&driver, &opts, &health, rules, false);
        let session = Session {
            events: driver.subscribe(),
            filter,
            family: args.family,
            output: args.output,
            shown: 0,
            missed: 0,
        };
        let r = session.stream(driver, args.duration).await;
        deps.abort();
        r
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// A running trace: the driver's events, the filter, and where the lines go.
struct Session {
    events: broadcast::Receiver<Arc<Published>>,
    filter: Filter,
    family: Family,
    output: Output,
    shown: u64,
    /// Events the terminal (or pipe) was too slow to take: the drain went
    /// on and they were not shown.
    missed: u64,
}

impl Session {
    async fn stream(mut self, driver: Driver, duration: Option<Duration>) -> Result<ExitCode> {
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let deadline = tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
        tokio::pin!(deadline);
        let mut status = driver.status();
        let mut lost_reported = 0u64;
        let mut out = io::BufWriter::new(io::stdout().lock());
        if self.output == Output::Table {
            writeln!(out, "{}", table_header(self.family))?;
            out.flush()?;
        }
        let result: io::Result<()> = loop {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Ok(p) => {
                        if let Err(e) = self.write_event(&p, &mut out) {
                            break Err(e);
                        }
                        // Flush when nothing else waits: lines appear at once.
                        if self.events.is_empty()
                            && let Err(e) = out.flush()
                        {
                            break Err(e);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        self.missed += n;
                        tracing::warn!("{n} events not shown: the output was too slow to take them");
                    }
                    Err(RecvError::Closed) => break Ok(()),
                },
                _ = status.changed() => {
                    let lost: u64 = status.borrow_and_update().sources.iter().map(|s| s.stats.lost).sum();
                    if lost > lost_reported {
                        tracing::warn!(
                            "{} events lost: a ring buffer was full (a larger --ring-buffer-size helps)",
                            lost - lost_reported
                        );
                        lost_reported = lost;
                    }
                }
                _ = sigint.recv() => break Ok(()),
                _ = sigterm.recv() => break Ok(()),
                _ = &mut deadline => break Ok(()),
            }
        };
        // What the kernel still holds, and every record forensics was
        // settling: published by the drain thread's last round.
        let status = driver.status();
        let unavailable = driver.unavailable.clone();
        let stopped = tokio::task::spawn_blocking(move || driver.stop(Duration::from_secs(1)))
            .await
            .unwrap_or(false);
        let result = result.and_then(|()| {
            if !stopped {
                return Ok(());
            }
            loop {
                match self.events.try_recv() {
                    Ok(p) => self.write_event(&p, &mut out)?,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => self.missed += n,
                    Err(_) => break,
                }
            }
            out.flush()
        });
        match result {
            Ok(()) => {}
            // The reader went away (e.g. `| head`): not an error.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(e.into()),
        }
        let st = status.borrow().clone();
        self.summary(&st, &unavailable);
        Ok(ExitCode::SUCCESS)
    }

    /// What the kernel saw and lost, on stderr.
    fn summary(&self, st: &DriverStatus, unavailable: &[(&'static str, String)]) {
        if self.missed > 0 {
            eprintln!(
                "podscope: {} events were not shown: the output was too slow to take them",
                self.missed
            );
        }
        if self.family == Family::Net {
            for s in &st.sources {
                if matches!(s.source, "netfilter" | "drops") {
                    eprintln!(
                        "podscope: {}: kernel: {} seen, {} reported, {} lost (ring buffer full), {} read errors, {} not reported on purpose (established traffic, unspecific drop reasons)",
                        s.source,
                        s.stats.hits,
                        s.stats.emitted,
                        s.stats.lost,
                        s.stats.read_errors,
                        s.stats.filtered
                    );
                }
            }
            for (family, why) in unavailable {
                eprintln!("podscope: {family} unavailable: {why}");
            }
            eprintln!("podscope: {} lines shown", self.shown);
            return;
        }
        let rs = st.resolver;
        if self.family == Family::Throttle {
            let stats = st
                .sources
                .iter()
                .find(|s| s.source == Kernel::Throttle.name())
                .map(|s| s.stats)
                .unwrap_or_default();
            eprintln!(
                "podscope: {} throttles shown; kernel: {} throttled switch-outs, {} lost, {} run queues removed while throttled; attribution: {} CRI errors",
                self.shown, stats.hits, stats.lost, stats.read_errors, rs.cri_errors,
            );
            return;
        }
        let kernel: Vec<String> = st
            .sources
            .iter()
            .map(|s| {
                format!(
                    "{} {} seen, {} lost (ring buffer full), {} read errors, {} filtered",
                    s.source,
                    s.stats.hits - s.stats.filtered,
                    s.stats.lost,
                    s.stats.read_errors,
                    s.stats.filtered
                )
            })
            .collect();
        // What "filtered" means, for the families that ran.
        let filtered: Vec<&str> = st
            .sources
            .iter()
            .filter_map(|s| match Kernel::from_name(s.source)? {
                Kernel::Exits => Some("exits: threads folded into their process's exit"),
                Kernel::Cgroups => Some("cgroups: those of v1 hierarchies"),
                Kernel::Signals => Some("signals: those that cannot end a process"),
                _ => None,
            })
            .collect();
        eprintln!(
            "podscope: {} {} shown; kernel: {} (filtered: {}); attribution: {} CRI errors, {} events of containers CRI did not name",
            self.shown,
            self.family.name(),
            kernel.join("; "),
            filtered.join("; "),
            rs.cri_errors,
            rs.unnamed_container_events,
        );
    }

    fn write_event(
        &mut self,
        p: &Published,
        out: &mut io::BufWriter<io::StdoutLock<'_>>,
    ) -> io::Result<()> {
        let event = &p.event;
        if event.view() != self.family || !self.filter.matches(event.pod()) {
            return Ok(());
        }
        self.shown += 1;
        match self.output {
            Output::Json => out.write_all(p.json_line()),
            Output::Table => writeln!(out, "{}", super::escape::escape(&table_row(event))),
        }
    }
}

fn table_header(family: Family) -> String {
    match family {
        Family::Exits => format!(
            "{:<12} {:>7} {:>7} {:>7} {:<16} {:<7} {:<16} {:>10}  {:<40} {}",
            "TIME",
            "PID",
            "TID",
            "PPID",
            "COMM",
            "KIND",
            "RESULT",
            "LIFETIME",
            "NAMESPACE/POD",
            "CONTAINER"
        ),
        Family::Signals => format!(
            "{:<12} {:<9} {:<28} {:<28} {:<10} {:<8} {:<40} {}",
            "TIME",
            "SIGNAL",
            "SENDER",
            "TARGET",
            "DELIVERY",
            "HANDLER",
            "NAMESPACE/POD",
            "CONTAINER"
        ),
        Family::Oom => format!(
            "{:<12} {:>7} {:<16} {:<10} {:<24} {:<40} {}",
            "TIME", "PID", "VICTIM", "SCOPE", "USAGE/LIMIT", "NAMESPACE/POD", "CONTAINER"
        ),
        Family::Terminations => format!(
            "{:<12} {:<40} {:<16} {:<22} {:>4}  {}",
            "TIME", "NAMESPACE/POD", "CONTAINER", "REASON", "CODE", "EXPLANATION"
        ),
        Family::Throttle => format!(
            "{:<12} {:>3} {:>10} {:<8}  {:<40} {}",
            "TIME", "CPU", "THROTTLED", "QUOTA", "NAMESPACE/POD", "CONTAINER"
        ),
        Family::Net => format!(
            "{:<12} {:<5} {:<32} {:<22} {:<30} {:<32} {}",
            "TIME",
            "PROTO",
            "NAMESPACE/POD",
            "SOURCE",
            "DESTINATION (SERVICE)",
            "ENDPOINT",
            "OUTCOME"
        ),
    }
}

fn time_column(t: std::time::SystemTime) -> String {
    let ts = humantime::format_rfc3339_millis(t).to_string();
    ts.get(11..23).unwrap_or(&ts).to_string()
}

fn table_row(event: &Event) -> String {
    match event {
        Event::Connection(c) => {
            let ts = humantime::format_rfc3339_millis(c.ts).to_string();
            let dst = match &c.service {
                Some(s) => format!("{} ({}/{}:{})", c.dst, s.namespace, s.name, s.port),
                None => c.dst.to_string(),
            };
            let endpoint = match (&c.endpoint, &c.endpoint_pod) {
                (Some(e), Some(p)) => format!("{e} ({}/{})", p.namespace, p.pod),
                (Some(e), None) => e.to_string(),
                (None, _) => "-".into(),
            };
            let outcome = match &c.reason {
                Some(r) => format!("{} ({r})", c.outcome.as_str()),
                None => c.outcome.as_str().to_string(),
            };
            format!(
                "{:<12} {:<5} {:<32} {:<22} {:<30} {:<32} {}",
                ts.get(11..23).unwrap_or(&ts),
                c.protocol,
                pod_column(&c.pod),
                c.src.to_string(),
                dst,
                endpoint,
                outcome
            )
        }
        Event::Drop(d) => {
            let ts = humantime::format_rfc3339_millis(d.ts).to_string();
            let addr = |a: Option<std::net::SocketAddr>| {
                a.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
            };
            format!(
                "{:<12} {:<5} {:<32} {:<22} {:<30} {:<32} drop ({})",
                ts.get(11..23).unwrap_or(&ts),
                d.protocol.unwrap_or("-"),
                pod_column(&d.pod),
                addr(d.src),
                addr(d.dst),
                "-",
                d.reason
            )
        }
        Event::Exit(e) => {
            let result = match (&e.signal, e.exit_code) {
                (Some(sig), _) if e.core_dumped => format!("{sig} (core)"),
                (Some(sig), _) => sig.to_string(),
                (None, Some(code)) => format!("exit {code}"),
                (None, None) => "?".into(),
            };
            format!(
                "{:<12} {:>7} {:>7} {:>7} {:<16} {:<7} {:<16} {:>10}  {:<40} {}",
                time_column(e.ts),
                e.tgid,
                e.pid,
                e.ppid,
                e.comm,
                if e.thread { "thread" } else { "process" },
                result,
                human_duration(e.lifetime()),
                pod_column(&e.pod),
                container_column(&e.pod)
            )
        }
        Event::Signal(s) => {
            let party = |p: &crate::probes::signals::Party| {
                let place = if p.pod.is_host() {
                    "host".to_string()
                } else {
                    container_column(&p.pod)
                };
                format!("{}/{} ({place})", p.comm, p.tgid)
            };
            format!(
                "{:<12} {:<9} {:<28} {:<28} {:<10} {:<8} {:<40} {}",
                time_column(s.ts),
                s.signal,
                party(&s.sender),
                party(&s.target),
                format!("{:?}", s.delivery).to_lowercase(),
                format!("{:?}", s.handler).to_lowercase(),
                pod_column(&s.target.pod),
                container_column(&s.target.pod)
            )
        }
        Event::Oom(o) => {
            let usage = o
                .scope
                .as_ref()
                .map(|s| match (s.usage_bytes, s.limit_bytes) {
                    (Some(u), Some(l)) => format!(
                        "{} / {}",
                        crate::forensics::record::mib(u),
                        crate::forensics::record::mib(l)
                    ),
                    _ => "-".into(),
                })
                .unwrap_or_else(|| "-".into());
            format!(
                "{:<12} {:>7} {:<16} {:<10} {:<24} {:<40} {}",
                time_column(o.ts),
                o.victim_pid,
                o.victim_comm,
                o.scope.as_ref().map_or("node", |s| s.scope.as_str()),
                usage,
                pod_column(&o.pod),
                container_column(&o.pod)
            )
        }
        Event::Termination(t) => format!(
            "{:<12} {:<40} {:<16} {:<22} {:>4}  {}",
            time_column(t.finished_at),
            pod_column(&t.pod),
            container_column(&t.pod),
            t.reason.as_str(),
            t.exit_code,
            match t.runtime_reported.as_ref().and_then(|k| k.note.as_ref()) {
                Some(note) => format!("{}. {note}", t.explanation),
                None => t.explanation.clone(),
            }
        ),
        Event::BackgroundDeath(d) => format!(
            "{:<12} {:<40} {:<16} {:<22} {:>4}  a background process died while the container runs: {} (pid {}) {}{}",
            time_column(d.ts),
            pod_column(&d.pod),
            container_column(&d.pod),
            format!("background:{}", d.death.cause.as_str()),
            "-",
            d.death.comm,
            d.death.pid,
            d.death.signal.as_deref().unwrap_or("exited"),
            d.death
                .sender
                .as_ref()
                .map(|s| format!(" from {} ({})", s.comm, s.kind.as_str()))
                .unwrap_or_default()
        ),
        Event::Respawn(r) => format!(
            "{:<12} {:<40} {:<16} {:<22} {:>4}  {} restarted by {} (pid {}): {} respawns, {} failed exits{}",
            time_column(r.respawn.last_exit_at),
            pod_column(&r.pod),
            container_column(&r.pod),
            "respawn",
            r.respawn
                .last_exit_code
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            r.respawn.command,
            r.respawn.parent_comm,
            r.respawn.parent_pid,
            r.respawn.respawns,
            r.respawn.failed_exits,
            if r.main_alive { ", PID 1 alive" } else { "" }
        ),
        Event::Throttle(t) => {
            let ts = humantime::format_rfc3339_millis(t.ts).to_string();
            format!(
                "{:<12} {:>3} {:>10} {:<8}  {:<40} {}",
                ts.get(11..23).unwrap_or(&ts),
                t.cpu,
                human_duration(t.duration()),
                if t.ancestor { "ancestor" } else { "own" },
                pod_column(&t.pod),
                container_column(&t.pod)
            )
        }
    }
}

/// "namespace/pod", the pod uid when CRI did not name it, or "(host)".
pub(super) fn pod_column(id: &PodIdentity) -> String {
    match (&id.namespace, &id.pod, &id.pod_uid) {
        (Some(ns), Some(pod), _) => format!("{ns}/{pod}"),
        (_, _, Some(uid)) => format!("pod {uid}"),
        _ => "(host)".to_string(),
    }
}

pub(super) fn container_column(id: &PodIdentity) -> String {
    match (&id.container, &id.container_id) {
        (Some(name), _) => name.to_string(),
        (None, Some(cid)) => cid.chars().take(13).collect(),
        (None, None) => "-".to_string(),
    }
}

pub(super) fn human_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    match ms {
        m if m < 1.0 => format!("{:.0}µs", m * 1000.0),
        m if m < 1000.0 => format!("{m:.1}ms"),
        m if m < 60_000.0 => format!("{:.2}s", m / 1000.0),
        m if m < 3_600_000.0 => format!("{:.1}m", m / 60_000.0),
        m => format!("{:.1}h", m / 3_600_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_must_be_powers_of_two() {
        assert_eq!(parse_ring_size("4096").unwrap(), 4096);
        assert!(parse_ring_size("4097").is_err());
        assert!(parse_ring_size("1024").is_err());
        assert!(parse_ring_size("lots").is_err());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_micros(250)), "250µs");
        assert_eq!(human_duration(Duration::from_millis(12)), "12.0ms");
        assert_eq!(human_duration(Duration::from_secs(3)), "3.00s");
        assert_eq!(human_duration(Duration::from_secs(600)), "10.0m");
    }
}
