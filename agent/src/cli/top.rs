//! `podscope top`: containers sorted by CPU throttling, refreshed like
//! top(1). It runs its own pipeline (like `trace`), so it needs no daemon:
//! the sched_switch probe measures every throttle and each container's
//! cpu.stat is read beside it, both from the moment `top` started. `-o json`
//! prints one snapshot after one interval and exits.

use std::{
    collections::HashMap,
    io::{self, IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde::Serialize;
use tokio::signal::unix::SignalKind;

use super::{
    Output, parse_duration,
    trace::{container_column, human_duration, pod_column},
};
use crate::{
    deps::{self, Health},
    driver::{Driver, DriverOptions},
    events::Filter,
    kernel::privilege::Privileges,
    metadata::ResolverOptions,
    throttle::{ContainerThrottle, DURATION_BUCKETS},
};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Output format: a refreshing table, or one JSON snapshot after one interval.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Time between refreshes (and the measuring window of the JSON snapshot).
    #[arg(short = 'd', long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Stop after this many refreshes (runs until Ctrl-C otherwise).
    #[arg(long)]
    pub count: Option<u64>,
    /// Only containers of pods in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only this pod (by name).
    #[arg(long)]
    pub pod: Option<String>,
    /// The container runtime's CRI socket (default: the first of the usual places that exists).
    #[arg(long, env = "PODSCOPE_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// Do not ask the runtime for names: pod uids and container ids only.
    #[arg(long)]
    pub no_cri: bool,
}

/// The JSON snapshot.
#[derive(Serialize)]
struct Snapshot<'a> {
    /// How long podscope measured.
    window_seconds: f64,
    /// Upper bounds of `measured.buckets` (seconds; one more bucket above the last).
    duration_buckets: &'a [f64],
    /// Most throttled first.
    containers: Vec<ContainerThrottle>,
}

pub fn run(args: TopArgs) -> Result<ExitCode> {
    Privileges::current()
        .require_tracing()
        .map_err(|m| anyhow!(m))?;
    if args.interval < Duration::from_millis(100) {
        return Err(anyhow!(
            "--interval {:?} is too short: use 100ms or more",
            args.interval
        ));
    }
    let opts = DriverOptions {
        resolver: ResolverOptions {
            cri_socket: args.cri_socket.clone(),
            use_cri: !args.no_cri,
            ..Default::default()
        },
        throttle: true,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = rt.block_on(async move {
        let driver = Driver::start(&opts)?;
        let health = Arc::new(Health::new());
        // The book gets every container's cpu.stat baseline at once: both
        // sides count from here.
        // top feeds its own book (no background cpu.stat rounds): both
        // sides of each window end at the same instant.
        let deps = deps::spawn_all(&driver, &opts, &health, Default::default(), false);
        let mut events = driver.subscribe();
        let link = driver.link();
        let mut window = Window::default();
        window.close(&link, &mut events, &deps.book).await;
        let filter = Filter {
            namespace: args.namespace.clone(),
            pod: args.pod.clone(),
            container: None,
        };
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let start = Instant::now();
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + args.interval,
            args.interval,
        );
        let mut shown = 0u64;
        let mut usage_before: HashMap<u64, (u64, Instant)> = HashMap::new();
        let clear = io::stdout().is_terminal();
        let result: Result<()> = loop {
            tokio::select! {
                _ = refresh.tick() => {
                    window.close(&link, &mut events, &deps.book).await;
                    let containers: Vec<_> = match deps.book.lock() {
                        Ok(b) => b.snapshot().into_iter().filter(|c| filter.matches(&c.pod)).collect(),
                        Err(_) => vec![],
                    };
                    let mut out = io::stdout().lock();
                    let written = match args.output {
                        Output::Json => {
                            let snap = Snapshot {
                                window_seconds: start.elapsed().as_secs_f64(),
                                duration_buckets: &DURATION_BUCKETS,
                                containers,
                            };
                            serde_json::to_writer(&mut out, &snap)
                                .map_err(io::Error::from)
                                .and_then(|()| writeln!(out))
                                .and_then(|()| out.flush())
                                .map(|()| true)
                        }
                        Output::Table => write_table(
                            &mut out,
                            &containers,
                            &mut usage_before,
                            start.elapsed(),
                            clear,
                        )
                        .map(|()| false),
                    };
                    match written {
                        Ok(true) => break Ok(()),
                        Ok(false) => {}
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break Ok(()),
                        Err(e) => break Err(e.into()),
                    }
                    shown += 1;
                    if args.count.is_some_and(|c| shown >= c) {
                        break Ok(());
                    }
                }
                _ = sigint.recv() => break Ok(()),
                _ = sigterm.recv() => break Ok(()),
            }
        };
        deps.abort();
        tokio::task::spawn_blocking(move || driver.stop(Duration::from_secs(1))).await.ok();
        result.map(|()| ExitCode::SUCCESS)
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// Closes `top`'s measurement windows: cpu.stat read at an instant T, the
/// drain flushed past T, and every throttle that began before T counted
/// (those that began after wait for the next window).
#[derive(Default)]
struct Window {
    later: Vec<crate::probes::throttle::Throttle>,
}

impl Window {
    async fn close(
        &mut self,
        link: &crate::driver::DriverLink,
        events: &mut tokio::sync::broadcast::Receiver<Arc<crate::driver::Published>>,
        book: &std::sync::Mutex<crate::throttle::ThrottleBook>,
    ) {
        // The driver's first status lists the containers that exist.
        link.first_status(Duration::from_secs(5)).await;
        let live = link.status.borrow().live_containers.clone();
        let layout = crate::kernel::cgroups::CgroupLayout::current();
        let read =
            tokio::task::spawn_blocking(move || crate::throttle::read_cpu_stats(&layout, &live));
        let readings = tokio::time::timeout(Duration::from_secs(2), read).await;
        let (ack_tx, ack) = std::sync::mpsc::channel();
        if link.send(crate::driver::Input::Flush(ack_tx)) {
            let _ =
                tokio::task::spawn_blocking(move || ack.recv_timeout(Duration::from_secs(1))).await;
        }
        let Ok(mut b) = book.lock() else { return };
        let cutoff = match &readings {
            Ok(Ok(r)) => r.started_boot_ns,
            _ => u64::MAX,
        };
        let mut pending = std::mem::take(&mut self.later);
        loop {
            match events.try_recv() {
                Ok(p) => {
                    if let crate::events::Event::Throttle(t) = &p.event {
                        pending.push(t.clone());
                    }
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => b.missed += n,
                Err(_) => break,
            }
        }
        for t in pending {
            if t.start_boot_ns < cutoff {
                b.observe(&t);
            } else {
                self.later.push(t);
            }
        }
        if let Ok(Ok(r)) = readings {
            b.apply(r);
        }
    }
}

/// The duration-histogram columns: short (< 10 ms), medium, long (≥ 50 ms).
fn split_buckets(buckets: &[u64]) -> (u64, u64, u64) {
    let idx = |bound: f64| {
        DURATION_BUCKETS
            .iter()
            .position(|b| *b == bound)
            .unwrap_or(0)
    };
    let (short_end, long_start) = (idx(0.01), idx(0.05) + 1);
    let sum = |r: std::ops::Range<usize>| buckets.get(r).map_or(0, |s| s.iter().sum());
    (
        sum(0..short_end + 1),
        sum(short_end + 1..long_start),
        sum(long_start..buckets.len()),
    )
}

fn write_table(
    out: &mut impl Write,
    containers: &[ContainerThrottle],
    usage_before: &mut HashMap<u64, (u64, Instant)>,
    elapsed: Duration,
    clear: bool,
) -> io::Result<()> {
    if clear {
        // Home and clear, as top(1) redraws.
        write!(out, "\x1b[H\x1b[2J")?;
    }
    let throttled = containers
        .iter()
        .filter(|c| c.measured.throttles > 0)
        .count();
    writeln!(
        out,
        "podscope top: {} containers, {throttled} throttled, over the last {} (counts since start; CPU.STAT is the kernel's own count)",
        containers.len(),
        human_duration(elapsed)
    )?;
    writeln!(
        out,
        "{:<40} {:<20} {:>6} {:>6} {:>8} {:>8} {:>10} {:>6} {:>7} {:>6}",
        "NAMESPACE/POD",
        "CONTAINER",
        "LIMIT",
        "USAGE",
        "PERIODS",
        "CPU.STAT",
        "THROTTLED",
        "<10ms",
        "10-50ms",
        ">50ms"
    )?;
    let now = Instant::now();
    for c in containers {
        let k = c.kernel.as_ref();
        let limit = k
            .and_then(|k| k.limit_cores)
            .map_or("-".to_string(), |l| format!("{l:.2}"));
        let usage = match (k.and_then(|k| k.usage_ns), usage_before.get(&c.cgroup_id)) {
            (Some(u), Some((before, at))) if now > *at => {
                let cores =
                    u.saturating_sub(*before) as f64 / now.duration_since(*at).as_nanos() as f64;
                format!("{cores:.2}")
            }
            _ => "-".to_string(),
        };
        if let Some(u) = k.and_then(|k| k.usage_ns) {
            usage_before.insert(c.cgroup_id, (u, now));
        }
        let (short, medium, long) = split_buckets(&c.measured.buckets);
        writeln!(
            out,
            "{:<40} {:<20} {:>6} {:>6} {:>8} {:>8} {:>10} {:>6} {:>7} {:>6}",
            super::escape::escape(&pod_column(&c.pod)),
            super::escape::escape(&container_column(&c.pod)),
            limit,
            usage,
            c.measured.periods,
            k.map_or("-".to_string(), |k| k.throttled_periods.to_string()),
            human_duration(Duration::from_nanos(c.measured.throttled_ns)),
            short,
            medium,
            long
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_into_short_medium_long() {
        // 1 ms, 2.5, 5, 10 | 25, 50 | 75, 100, 250, 500, 1000, +Inf
        let b = [1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3];
        assert_eq!(split_buckets(&b), (4, 4, 18));
    }
}
