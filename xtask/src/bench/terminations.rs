//! `cargo xtask bench terminations`: the signal probe's cost on a kill
//! storm, and the journal's write cost per record.

use std::{
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::tracer::{
    ROUNDS, SIGNALS, TRACERS, Tracer, median, prepare_tracer_bench, start_on, stop,
    unmount_tracefs, workload,
};

/// `terminations`: a signal storm (200,000 kill(2) to a child that ignores
/// them) with and without podscope's signal probe and against bpftrace on
/// the same tracepoint, for a signal the probe emits (SIGUSR1: fatal by
/// default) and one it filters in the kernel (SIGURG); then the journal's
/// write cost per record (`benches/journal.rs`).
pub fn terminations() -> Result<ExitCode> {
    let (podscope, mounted_tracefs, _stats) = prepare_tracer_bench()?;
    let tracers = TRACERS;
    let n = 200_000u32;
    println!(
        "terminations benchmark: {ROUNDS} rounds, conditions interleaved, median wall time of the workload"
    );
    for (kind, label) in [
        (
            "kill",
            "kill storm: 200,000 SIGUSR1 (fatal by default: podscope emits each)",
        ),
        (
            "kill-filtered",
            "kill storm: 200,000 SIGURG (not fatal: podscope filters each in the kernel)",
        ),
    ] {
        let mut times: Vec<Vec<Duration>> = vec![vec![]; tracers.len()];
        let mut prog = vec![(0u64, 0u64); tracers.len()];
        let mut cpu = vec![Duration::ZERO; tracers.len()];
        let mut lost = 0u64;
        let mut shown = String::new();
        for _ in 0..ROUNDS {
            for (i, &tracer) in tracers.iter().enumerate() {
                let running = start_on(tracer, &podscope, &SIGNALS)?;
                times[i].push(workload(kind, n, 1)?);
                if let Some(r) = running {
                    std::thread::sleep(Duration::from_millis(300));
                    let s = stop(r)?;
                    prog[i].0 += s.prog_ns;
                    prog[i].1 += s.prog_runs;
                    cpu[i] += s.cpu;
                    if tracer == Tracer::Podscope
                        && let Some(l) = s.stderr.lines().find(|l| l.contains("signals shown"))
                    {
                        shown = l.to_string();
                        lost += l
                            .split("signals ")
                            .nth(2)
                            .and_then(|x| x.split(" lost (").next())
                            .and_then(|x| x.rsplit(", ").next())
                            .and_then(|x| x.trim().parse::<u64>().ok())
                            .unwrap_or(0);
                    }
                }
            }
        }
        let base = median(&mut times[0]);
        let spread = (times[0][ROUNDS - 1] - times[0][0]).as_secs_f64() / base.as_secs_f64();
        println!(
            "\n{label} (baseline spread min..max: {:.1}%)",
            spread * 100.0
        );
        println!(
            "  {:<18} {:>10} {:>9} {:>17} {:>14}",
            "tracer", "median", "ratio", "kernel ns/signal", "tracer CPU/run"
        );
        for (i, &tracer) in tracers.iter().enumerate() {
            let m = median(&mut times[i]);
            let ns = if prog[i].1 == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", prog[i].0 as f64 / prog[i].1 as f64)
            };
            let c = if tracer == Tracer::None {
                "-".to_string()
            } else {
                format!("{:.0} ms", cpu[i].as_secs_f64() * 1000.0 / ROUNDS as f64)
            };
            println!(
                "  {:<18} {:>9.3}s {:>9.3} {:>17} {:>14}",
                tracer.name(),
                m.as_secs_f64(),
                m.as_secs_f64() / base.as_secs_f64(),
                ns,
                c
            );
        }
        println!("  podscope, last round: {shown}");
        println!("  podscope signals lost over all rounds: {lost}");
    }
    if mounted_tracefs {
        unmount_tracefs();
    }
    println!(
        "\njournal (benches/journal.rs, on {}):",
        std::env::temp_dir().display()
    );
    let st = Command::new("cargo")
        .args(["bench", "--quiet", "-p", "podscope", "--bench", "journal"])
        .status()
        .context("cannot run cargo bench")?;
    if !st.success() {
        bail!("the journal benchmark failed");
    }
    Ok(ExitCode::SUCCESS)
}
