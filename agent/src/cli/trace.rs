//! `podscope trace <family>`: a live view straight from the kernel, every
//! event attributed to its namespace, pod and container.

use std::{
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use clap::{Args, ValueEnum};
use tokio::signal::unix::SignalKind;

use super::{Output, parse_duration};
use crate::{
    events::{Event, Filter},
    kernel::privilege::Privileges,
    metadata::{PodIdentity, ResolverOptions},
    pipeline::{DRAIN_INTERVAL, Pipeline, PipelineOptions, Rings},
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
    /// Ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, default_value_t = 1 << 20, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
    /// Force one hook type instead of the best the kernel allows.
    #[arg(long, value_enum, default_value_t = AttachChoice::Auto)]
    pub attach: AttachChoice,
    /// `net`: the network namespace where kube-proxy's rules live (e.g.
    /// /run/netns/podscope-node) [default: this process's].
    #[arg(long, env = "PODSCOPE_NETNS")]
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Family {
    /// Process and thread exits: exit code, signal, core dump.
    Exits,
    /// Signals that can end a process: sender, target, what the kernel did with it.
    Signals,
    /// OOM kills: victim, scope (container, pod, node), usage against the limit.
    Oom,
    /// Container terminations explained, and deaths of other processes in containers.
    Terminations,
    /// New connections through kube-proxy's rules (pod → ClusterIP → endpoint,
    /// rejected, dropped) and packet drops with the kernel's reason.
    Net,
    /// CPU throttling: each time a container's CPU quota ran out on a CPU, and for how long.
    Throttle,
}

impl Family {
    /// The name `Event::family` gives the family's events.
    pub fn name(self) -> &'static str {
        match self {
            Family::Exits => "exits",
            Family::Signals => "signals",
            Family::Oom => "oom",
            Family::Terminations => "terminations",
            Family::Net => "net",
            Family::Throttle => crate::probes::throttle::FAMILY,
        }
    }
}

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
    let opts = PipelineOptions {
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
        net: args.family == Family::Net,
        netns: args.netns.clone(),
        throttle: args.family == Family::Throttle,
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
    rt.block_on(async move {
        let pipeline = Pipeline::start(&opts).await?;
        tracing::debug!("attached");
        Session {
            pipeline,
            filter,
            family: args.family,
            output: args.output,
            shown: 0,
        }
        .stream(args.duration)
        .await
    })
}

/// A running trace: the pipeline, the filter, and where the lines go.
struct Session {
    pipeline: Pipeline,
    filter: Filter,
    family: Family,
    output: Output,
    shown: u64,
}

impl Session {
    async fn stream(mut self, duration: Option<Duration>) -> Result<ExitCode> {
        // Dropped before the pipeline, which owns the fds.
        let rings = Rings::register(&self.pipeline)
            .map_err(|e| anyhow!("cannot poll the ring buffers: {e}"))?;
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let deadline = tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        let mut ticks = 0u64;
        let mut lost_reported = 0u64;
        let mut out = io::BufWriter::new(io::stdout().lock());
        if self.output == Output::Table {
            writeln!(out, "{}", table_header(self.family))?;
            out.flush()?;
        }
        let result: io::Result<()> = loop {
            tokio::select! {
                _ = rings.readable() => {
                    if let Err(e) = self.write_batch(&mut out).await {
                        break Err(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.write_batch(&mut out).await {
                        break Err(e);
                    }
                    ticks += 1;
                    if !ticks.is_multiple_of(10) {
                        continue;
                    }
                    self.pipeline.tick().await;
                    let lost: u64 = self.pipeline.source_stats().iter().map(|s| s.stats.lost).sum();
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
        let result = match result {
            Ok(()) => self.write_final_batch(&mut out).await,
            e => e,
        };
        match result {
            Ok(()) => {}
            // The reader went away (e.g. `| head`): not an error.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(e.into()),
        }
        drop(rings);
        if self.family == Family::Net {
            for s in self.pipeline.source_stats() {
                if matches!(
                    s.source,
                    crate::probes::net::FAMILY_CONNS | crate::probes::net::FAMILY_DROPS
                ) {
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
            for (family, why) in &self.pipeline.unavailable {
                eprintln!("podscope: {family} unavailable: {why}");
            }
            eprintln!("podscope: {} lines shown", self.shown);
            return Ok(ExitCode::SUCCESS);
        }
        let rs = self.pipeline.resolver_stats();
        if self.family == Family::Throttle {
            let stats = self
                .pipeline
                .source_stats()
                .into_iter()
                .find(|s| s.source == self.family.name())
                .map(|s| s.stats)
                .unwrap_or_default();
            eprintln!(
                "podscope: {} throttles shown; kernel: {} throttled switch-outs, {} lost, {} run queues removed while throttled; attribution: {} CRI errors",
                self.shown, stats.hits, stats.lost, stats.read_errors, rs.cri_errors,
            );
            return Ok(ExitCode::SUCCESS);
        }
        let kernel: Vec<String> = self
            .pipeline
            .source_stats()
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
        eprintln!(
            "podscope: {} {} shown; kernel: {} (filtered: threads folded into their process's exit, signals that cannot end a process); attribution: {} CRI errors, {} events of containers CRI did not name",
            self.shown,
            self.family.name(),
            kernel.join("; "),
            rs.cri_errors,
            rs.unnamed_container_events,
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn write_batch(&mut self, out: &mut io::BufWriter<io::StdoutLock<'_>>) -> io::Result<()> {
        let batch = self.pipeline.next_batch().await;
        self.write_events(batch, out)
    }

    async fn write_final_batch(
        &mut self,
        out: &mut io::BufWriter<io::StdoutLock<'_>>,
    ) -> io::Result<()> {
        let batch = self.pipeline.final_batch().await;
        self.write_events(batch, out)
    }

    fn write_events(
        &mut self,
        batch: Vec<Event>,
        out: &mut io::BufWriter<io::StdoutLock<'_>>,
    ) -> io::Result<()> {
        for event in batch {
            if event.family() != self.family.name() || !self.filter.matches(event.pod()) {
                continue;
            }
            self.shown += 1;
            match self.output {
                Output::Json => event.write_json_line(&mut *out)?,
                Output::Table => writeln!(out, "{}", super::escape::escape(&table_row(&event)))?,
            }
        }
        out.flush()
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
            t.explanation
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
        (Some(name), _) => name.clone(),
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
