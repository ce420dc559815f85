//! `cargo xtask bench exits`: a process fork/exit storm and a thread
//! create/exit storm, each without a tracer, under `podscope trace exits -o
//! json` (decoded and printed, the path a user's pipeline takes), and under
//! bpftrace on the same tracepoint, once counting in the kernel (its
//! cheapest form) and once printing each exit (like-for-like with podscope).

use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result};

use super::tracer::{
    ROUNDS, TRACERS, Tracer, median, prepare_tracer_bench, start, stop, unmount_tracefs, workload,
};

pub fn exits() -> Result<ExitCode> {
    let (podscope, mounted_tracefs, _stats) = prepare_tracer_bench()?;
    let tracers = TRACERS;
    let storms = [
        (
            "process",
            20_000u32,
            1u32,
            "process storm: 20,000 fork+exit, 1 worker",
        ),
        (
            "thread",
            40_000,
            1,
            "thread storm: 40,000 thread create+exit, 1 worker",
        ),
    ];

    println!(
        "exits benchmark: {ROUNDS} rounds, conditions interleaved, median wall time of the workload"
    );
    for (kind, n, workers, label) in storms {
        let mut times: Vec<Vec<Duration>> = vec![vec![]; tracers.len()];
        let mut hwm = vec![0u64; tracers.len()];
        let mut rss = vec![0u64; tracers.len()];
        let mut prog = vec![(0u64, 0u64); tracers.len()];
        let mut cpu = vec![Duration::ZERO; tracers.len()];
        for _ in 0..ROUNDS {
            for (i, &tracer) in tracers.iter().enumerate() {
                let running = start(tracer, &podscope)?;
                times[i].push(workload(kind, n, workers)?);
                if let Some(r) = running {
                    let s = stop(r)?;
                    hwm[i] = hwm[i].max(s.hwm_kib);
                    rss[i] = rss[i].max(s.rss_kib);
                    prog[i].0 += s.prog_ns;
                    prog[i].1 += s.prog_runs;
                    cpu[i] += s.cpu;
                }
            }
        }
        let base = median(&mut times[0]);
        // The spread of the baseline is the resolution of every ratio below.
        let spread = (times[0][ROUNDS - 1] - times[0][0]).as_secs_f64() / base.as_secs_f64();
        println!(
            "\n{label} (baseline spread min..max: {:.1}%)",
            spread * 100.0
        );
        println!(
            "  {:<18} {:>10} {:>9} {:>15} {:>14} {:>20}",
            "tracer", "median", "ratio", "kernel ns/exit", "tracer CPU/run", "tracer RSS peak/now"
        );
        for (i, &tracer) in tracers.iter().enumerate() {
            let m = median(&mut times[i]);
            let ratio = m.as_secs_f64() / base.as_secs_f64();
            let ns_per = if prog[i].1 == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", prog[i].0 as f64 / prog[i].1 as f64)
            };
            let (cpu_s, rss_s) = if tracer == Tracer::None {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:.0} ms", cpu[i].as_secs_f64() * 1000.0 / ROUNDS as f64),
                    format!(
                        "{:.1} / {:.1} MiB",
                        hwm[i] as f64 / 1024.0,
                        rss[i] as f64 / 1024.0
                    ),
                )
            };
            println!(
                "  {:<18} {:>9.3}s {:>9.3} {:>15} {:>14} {:>20}",
                tracer.name(),
                m.as_secs_f64(),
                ratio,
                ns_per,
                cpu_s,
                rss_s
            );
        }
    }

    // The highest rate this machine reaches: a process storm on every core.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2);
    let n = 40_000;
    let running = start(Tracer::Podscope, &podscope)?.context("podscope did not start")?;
    let took = workload("process", n, workers)?;
    std::thread::sleep(Duration::from_millis(300));
    let s = stop(running)?;
    let summary = s
        .stderr
        .lines()
        .find(|l| l.contains("exits shown"))
        .unwrap_or("(no summary)")
        .to_string();
    println!(
        "\nhighest rate: {n} fork+exit on {workers} workers in {:.2}s = {:.0} exits/s under podscope\n  {summary}\n  podscope RSS peak {:.1} MiB, at the end {:.1} MiB",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        s.hwm_kib as f64 / 1024.0,
        s.rss_kib as f64 / 1024.0
    );

    if mounted_tracefs {
        unmount_tracefs();
    }
    Ok(ExitCode::SUCCESS)
}
