//! `cargo xtask bench throttle`: the sched_switch probe's cost on
//! context-switch-heavy workloads, and what reading cpu.stat costs.

use std::{
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{build_podscope, setup};

use super::tracer::{
    BpfStats, ROUNDS, Tracer, ensure_tracefs, median, start, stop, timed, unmount_tracefs,
};

/// `throttle`: the sched_switch probe's cost on context-switch-heavy
/// workloads, with vs without `podscope trace throttle`, and the cost of
/// reading one container's cpu.stat (what cAdvisor-style polling costs).
pub fn throttle() -> Result<ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    let mounted_tracefs = ensure_tracefs()?;
    let me = std::env::current_exe()?;
    const ROUND_TRIPS: u64 = 200_000;
    type Workload = Box<dyn Fn() -> Result<Duration>>;
    let mut workloads: Vec<(String, Workload)> = vec![(
        format!("pipe ping-pong: {ROUND_TRIPS} round trips, 2 processes pinned to CPU 0"),
        Box::new(move || timed(Command::new(&me).args(["pingpong", &ROUND_TRIPS.to_string()]))),
    )];
    let perf_works = Command::new("perf")
        .args(["bench", "sched", "messaging", "-g", "1", "-l", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if perf_works {
        workloads.push((
            "perf bench sched messaging -g 10 -l 400 (400 processes over sockets)".into(),
            Box::new(|| {
                timed(Command::new("perf").args([
                    "bench",
                    "sched",
                    "messaging",
                    "-g",
                    "10",
                    "-l",
                    "400",
                ]))
            }),
        ));
    } else {
        println!("perf bench is not available: the messaging workload is skipped");
    }
    println!(
        "throttle benchmark: {ROUNDS} rounds with vs without `podscope trace throttle`, interleaved, \
         kernel.bpf_stats_enabled off (its own clock reads cost more than the probe); then one run \
         of each with it on, for the probe's cost per switch"
    );
    let tracers = [Tracer::None, Tracer::PodscopeThrottle];
    for (label, run) in &workloads {
        let mut times: Vec<Vec<Duration>> = vec![vec![]; tracers.len()];
        let mut cpu = Duration::ZERO;
        for _ in 0..ROUNDS {
            for (i, &tracer) in tracers.iter().enumerate() {
                let running = start(tracer, &podscope)?;
                times[i].push(run()?);
                if let Some(r) = running {
                    cpu += stop(r)?.cpu;
                }
            }
        }
        let base = median(&mut times[0]);
        let spread = (times[0][ROUNDS - 1] - times[0][0]).as_secs_f64() / base.as_secs_f64();
        let with = median(&mut times[1]);
        println!(
            "\n{label} (baseline spread min..max: {:.1}%)",
            spread * 100.0
        );
        println!(
            "  without: {:.3}s   with podscope: {:.3}s   ratio {:.3}   podscope CPU {:.0} ms per run",
            base.as_secs_f64(),
            with.as_secs_f64(),
            with.as_secs_f64() / base.as_secs_f64(),
            cpu.as_secs_f64() * 1000.0 / ROUNDS as f64
        );
        // The kernel's per-program clock: podscope's probe, and an empty
        // program on the same tracepoint for the accounting's own floor.
        let stats = BpfStats::enable()?;
        let mut per_run = vec![];
        for tracer in [Tracer::PodscopeThrottle, Tracer::BpftraceEmptySwitch] {
            let r = start(tracer, &podscope)?.context("tracer did not start")?;
            let took = run()?;
            let s = stop(r)?;
            per_run.push((
                s.prog_ns as f64 / s.prog_runs.max(1) as f64,
                s.prog_runs,
                took,
            ));
        }
        drop(stats);
        let (ns, switches, took) = per_run[0];
        let floor = per_run[1].0;
        let per_switch = took.as_secs_f64() * 1e9 / switches.max(1) as f64;
        println!(
            "  probe: {ns:.0} ns per sched_switch as bpf_stats counts it (an empty program there: {floor:.0} ns), \
             {switches} switches in {:.3}s = {per_switch:.0} ns of workload per switch: \
             the probe's own work ({:.0} ns) is {:.2}% of it, {:.2}% counting the accounting floor too",
            took.as_secs_f64(),
            (ns - floor).max(0.0),
            100.0 * (ns - floor).max(0.0) / per_switch,
            100.0 * ns / per_switch
        );
    }
    if mounted_tracefs {
        unmount_tracefs();
    }

    // Reading cpu.stat: what podscope's per-container refresh (and any
    // cpu.stat poller) costs, for comparison with the probe.
    let layout = cgroup_cpu_dirs();
    if let Some((cpu, cpuacct)) = layout {
        let files = [
            cpu.join("cpu.stat"),
            cpu.join("cpu.cfs_quota_us"),
            cpu.join("cpu.cfs_period_us"),
            cpuacct.join("cpuacct.usage"),
        ];
        let n = 20_000;
        let t = Instant::now();
        for _ in 0..n {
            std::fs::read_to_string(&files[0])?;
        }
        let stat_only = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            for f in &files {
                std::fs::read_to_string(f)?;
            }
        }
        let all = t.elapsed() / n;
        println!(
            "\nreading cpu.stat of one cgroup ({}): {:.1} µs; with quota, period and cpuacct.usage (podscope's refresh per container): {:.1} µs",
            cpu.display(),
            stat_only.as_secs_f64() * 1e6,
            all.as_secs_f64() * 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The v1 cpu and cpuacct roots (hybrid/v1), or the v2 root twice.
fn cgroup_cpu_dirs() -> Option<(PathBuf, PathBuf)> {
    let cpu = PathBuf::from("/sys/fs/cgroup/cpu");
    let cpuacct = PathBuf::from("/sys/fs/cgroup/cpuacct");
    if cpu.join("cpu.stat").exists() && cpuacct.join("cpuacct.usage").exists() {
        return Some((cpu, cpuacct));
    }
    None
}
