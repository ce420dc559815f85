//! `cargo xtask bench peers`: podscope against the tools an operator
//! reaches for instead, per family it shares with them, in one run and one
//! table: libbpf-tools (CO-RE C, Debian's `libbpf-tools`: `exitsnoop`,
//! `sigsnoop`, `killsnoop`, `runqlat`, `runqslower`, `oomkill`) and
//! bpftrace printing each event.
//!
//! Per tracer: the workload's median wall time against no tracer, kernel
//! time per event (all the tracer's programs, from the kernel's own
//! bpf_stats, divided by the events the workload made), the workload's own
//! CPU per event above no tracer's (what the hooks cost it in all: also the
//! work the kernel does outside the programs, such as a plain tracepoint's
//! record), the tracer's CPU per run after attaching, its resident memory
//! at the peak (VmHWM: start-up included) and at the end of a run, what it
//! lost in the measured rounds (a lost event costs its program less, so a
//! tracer that loses events looks cheaper per event), and what it lost or
//! did not show when the same workload ran on every core.
//!
//! `cargo xtask bench peers [--baseline PODSCOPE] [--shipped] [FAMILY...]`
//! runs only the families named (`exits`, `signals`, `signals_paced`,
//! `sched_switch`, `oom`); `--baseline` adds another podscope binary (an
//! earlier build) beside this one, for a before/after in the same run;
//! `--shipped` adds the static musl binary the image ships (its allocator
//! and memory are musl's, where the test build's are glibc's). After the
//! table, each tracer's programs with their runs and ns per run.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Result, bail};

use super::tracer::{
    EXITS, Peer, SIGNALS, Traced, Tracer, children_cpu, median, prepare_tracer_bench, start_on,
    stop, unmount_tracefs, workload_at,
};

const ROUNDS: usize = 5;

/// One family's comparison: the workload (an `xtask storm` kind or the
/// ping-pong), how many events one run makes, and the tracers.
struct Family {
    name: &'static str,
    traced: &'static Traced,
    workload: &'static str,
    n: u32,
    /// Events per unit of `n` (2 context switches per ping-pong round trip).
    events_per_n: u32,
    event: &'static str,
    tracers: &'static [Tracer],
    /// Events a second the workload is paced to (0: as fast as it goes).
    rate: u32,
}

/// 200,000 kill(2) of SIGUSR1 to a child that ignores it, at `rate` a
/// second (0: as fast as one core sends them).
const fn signals(name: &'static str, rate: u32) -> Family {
    Family {
        name,
        traced: &SIGNALS,
        workload: "kill",
        n: 200_000,
        events_per_n: 1,
        event: "signal",
        tracers: SIGNAL_TRACERS,
        rate,
    }
}

/// The signal tracers: podscope, libbpf-tools' two, bpftrace.
const SIGNAL_TRACERS: &[Tracer] = &[
    Tracer::None,
    Tracer::Podscope,
    Tracer::Peer(Peer {
        name: "sigsnoop",
        args: &[],
    }),
    Tracer::Peer(Peer {
        name: "killsnoop",
        args: &[],
    }),
    Tracer::BpftracePrint,
];

const FAMILIES: &[Family] = &[
    Family {
        name: "exits",
        traced: &EXITS,
        workload: "process",
        n: 20_000,
        events_per_n: 1,
        event: "exit",
        tracers: &[
            Tracer::None,
            Tracer::Podscope,
            Tracer::Peer(Peer {
                name: "exitsnoop",
                args: &[],
            }),
            Tracer::BpftracePrint,
        ],
        rate: 0,
    },
    // One core's kill loop outruns every printing tracer's reader: each
    // loses events, and a lost event costs its program less than a
    // delivered one, so the figures of a tracer that loses more look
    // better. The same signals paced to a rate every tracer keeps up with
    // compare the cost of delivering each one.
    signals("signals", 0),
    signals("signals_paced", 100_000),
    Family {
        name: "sched_switch",
        traced: &EXITS,
        workload: "pingpong",
        n: 200_000,
        events_per_n: 2,
        event: "switche",
        tracers: &[
            Tracer::None,
            Tracer::PodscopeThrottle,
            Tracer::Peer(Peer {
                name: "runqlat",
                args: &[],
            }),
            Tracer::Peer(Peer {
                name: "runqslower",
                args: &[],
            }),
            Tracer::BpftraceEmptySwitch,
        ],
        rate: 0,
    },
];

#[derive(Default, Clone)]
struct Figures {
    times: Vec<Duration>,
    /// The workload's own CPU, per round.
    work_cpu: Vec<Duration>,
    prog_ns: u64,
    /// What the tracer said it lost in the measured rounds.
    lost_rounds: u64,
    cpu: Duration,
    hwm_kib: u64,
    rss_kib: u64,
    lost: Option<u64>,
    /// Per program over the rounds: name → (ns, runs).
    programs: Vec<(String, u64, u64)>,
}

pub fn run(args: &[String]) -> Result<ExitCode> {
    // --shipped anywhere: podscope's rows also run the static (musl)
    // binary the image ships, beside the test build.
    let shipped_wanted = args.iter().any(|a| a == "--shipped");
    let args: Vec<String> = args.iter().filter(|a| *a != "--shipped").cloned().collect();
    let (baseline, only) = match args.as_slice() {
        [flag, path, rest @ ..] if flag == "--baseline" => (Some(PathBuf::from(path)), rest),
        rest => (None, rest),
    };
    if let Some(b) = baseline.as_ref().filter(|b| !b.is_file()) {
        bail!("--baseline {}: no such podscope binary", b.display());
    }
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if let Some(o) = only
        .iter()
        .find(|o| *o != "oom" && !FAMILIES.iter().any(|f| f.name == o.as_str()))
    {
        bail!(
            "no family {o} in the peers benchmark: {}, oom",
            FAMILIES
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (podscope, mounted_tracefs, _stats) = prepare_tracer_bench()?;
    let shipped = if shipped_wanted {
        Some(crate::dist::shipped_for_host()?)
    } else {
        None
    };
    // podscope's other builds, each a row of its own beside the test build.
    let others: Vec<(&Path, &str)> = baseline
        .as_deref()
        .map(|b| (b, "baseline"))
        .into_iter()
        .chain(shipped.as_deref().map(|b| (b, "shipped, static musl")))
        .collect();
    for p in [
        "exitsnoop",
        "sigsnoop",
        "killsnoop",
        "runqlat",
        "runqslower",
        "oomkill",
    ] {
        let peer = Peer { name: p, args: &[] };
        if !peer.path().exists() {
            bail!(
                "{} is missing: `cargo xtask setup` installs libbpf-tools",
                peer.path().display()
            );
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2);
    println!(
        "peers benchmark: {ROUNDS} rounds per family, tracers interleaved within each round; \
         kernel.bpf_stats_enabled on for the whole run"
    );
    println!(
        "\n| family | tracer | workload ratio | kernel ns/event | workload CPU ns/event added | tracer CPU/run | RSS peak / steady | dropped in the kernel in the rounds | lost or not shown at the highest rate |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut breakdown = vec![];
    for f in FAMILIES.iter().filter(|f| wanted(f.name)) {
        // Each tracer with the podscope binary it runs (podscope's own rows
        // twice with a baseline).
        let rows: Vec<(Tracer, &Path, String)> = f
            .tracers
            .iter()
            .flat_map(|&t| {
                let this = (t, podscope.as_path(), t.name().to_string());
                let mine = matches!(t, Tracer::Podscope | Tracer::PodscopeThrottle);
                let others = others
                    .iter()
                    .filter(move |_| mine)
                    .map(move |(b, label)| (t, *b, format!("{} ({label})", t.name())));
                std::iter::once(this).chain(others)
            })
            .collect();
        let mut figs = vec![Figures::default(); rows.len()];
        for _ in 0..ROUNDS {
            for (i, &(tracer, podscope, _)) in rows.iter().enumerate() {
                let running = start_on(tracer, podscope, f.traced)?;
                let cpu = children_cpu();
                figs[i].times.push(run_workload(f, f.n, 1)?);
                figs[i].work_cpu.push(children_cpu().saturating_sub(cpu));
                if let Some(r) = running {
                    std::thread::sleep(Duration::from_millis(300));
                    let s = stop(r)?;
                    figs[i].lost_rounds += lost_in_kernel(&s.stderr);
                    figs[i].prog_ns += s.prog_ns;
                    for (name, ns, runs) in s.programs {
                        match figs[i].programs.iter_mut().find(|p| p.0 == name) {
                            Some(p) => {
                                p.1 += ns;
                                p.2 += runs;
                            }
                            None => figs[i].programs.push((name, ns, runs)),
                        }
                    }
                    figs[i].cpu += s.cpu;
                    figs[i].hwm_kib = figs[i].hwm_kib.max(s.hwm_kib);
                    figs[i].rss_kib = figs[i].rss_kib.max(s.rss_kib);
                }
            }
        }
        // The highest rate: the same workload on every core, once per tracer
        // (not for a paced workload: its highest rate is its unpaced family's).
        for (i, &(tracer, podscope, _)) in rows.iter().enumerate() {
            if tracer == Tracer::None || f.rate > 0 {
                continue;
            }
            let running = start_on(tracer, podscope, f.traced)?;
            run_workload(f, f.n * cores, cores)?;
            if let Some(r) = running {
                std::thread::sleep(Duration::from_millis(500));
                figs[i].lost = Some(lost(&stop(r)?.stderr));
            }
        }
        for (i, (_, _, name)) in rows.iter().enumerate().skip(1) {
            breakdown.push((f.name, name.clone(), figs[i].clone()));
        }
        let base = median(&mut figs[0].times.clone());
        let base_cpu = median(&mut figs[0].work_cpu.clone());
        let per_round = u64::from(f.n) * u64::from(f.events_per_n);
        let events = per_round * ROUNDS as u64;
        for (i, (tracer, _, name)) in rows.iter().enumerate() {
            let m = median(&mut figs[i].times.clone());
            let ratio = m.as_secs_f64() / base.as_secs_f64();
            if *tracer == Tracer::None {
                println!(
                    "| {} | no tracer | 1.000 ({:.3} s, {} {}s{}) | - | - ({:.0} ns/{}) | - | - | - | - |",
                    f.name,
                    m.as_secs_f64(),
                    per_round,
                    f.event,
                    if f.rate > 0 {
                        format!(" at {}/s", f.rate)
                    } else {
                        String::new()
                    },
                    base_cpu.as_nanos() as f64 / per_round as f64,
                    f.event
                );
                continue;
            }
            let cpu = median(&mut figs[i].work_cpu.clone());
            let added = (cpu.as_nanos() as f64 - base_cpu.as_nanos() as f64) / per_round as f64;
            println!(
                "| {} | {} | {:.3} | {:.0} | {:.0} | {:.0} ms | {:.1} / {:.1} MiB | {} of {} | {} |",
                f.name,
                name,
                ratio,
                figs[i].prog_ns as f64 / events as f64,
                added,
                figs[i].cpu.as_secs_f64() * 1000.0 / ROUNDS as f64,
                figs[i].hwm_kib as f64 / 1024.0,
                figs[i].rss_kib as f64 / 1024.0,
                figs[i].lost_rounds,
                events,
                figs[i].lost.map_or("-".into(), |l| l.to_string())
            );
        }
    }
    if wanted("oom") {
        oom_peers()?;
    }
    println!(
        "\nPer program over the measured rounds (runs include whatever else ran on the machine meanwhile):\n"
    );
    println!("| family | tracer | program | runs | ns/run |");
    println!("|---|---|---|---|---|");
    for (family, tracer, figs) in &breakdown {
        for (name, ns, runs) in &figs.programs {
            println!(
                "| {family} | {tracer} | {name} | {runs} | {:.0} |",
                *ns as f64 / (*runs).max(1) as f64
            );
        }
    }
    if mounted_tracefs {
        unmount_tracefs();
    }
    Ok(ExitCode::SUCCESS)
}

fn run_workload(f: &Family, n: u32, workers: u32) -> Result<Duration> {
    if f.workload == "pingpong" {
        // Pinned to CPU 0 whatever the worker count: one pair per core would
        // not raise the rate of a probe that runs per switch.
        let me = std::env::current_exe()?;
        return super::tracer::timed(Command::new(me).args(["pingpong", &n.to_string()]));
    }
    workload_at(f.workload, n, workers, f.rate)
}

/// OOM kills are rare events: what matters is whether a tool can see them
/// at all. libbpf-tools' `oomkill` attaches a kprobe; podscope uses the
/// `oom:mark_victim` tracepoint. Each is started and its first words
/// reported (a kernel without kprobes refuses `oomkill`).
fn oom_peers() -> Result<()> {
    let out = Command::new(Peer::path(Peer {
        name: "oomkill",
        args: &[],
    }))
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .and_then(|mut c| {
        std::thread::sleep(Duration::from_secs(2));
        let alive = c.try_wait()?.is_none();
        if alive {
            // SAFETY: our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        }
        let o = c.wait_with_output()?;
        Ok((alive, o))
    });
    let line = match out {
        Ok((true, _)) => "attached (kprobe on oom_kill_process)".to_string(),
        Ok((false, o)) => format!(
            "could not attach: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| l.contains("failed"))
                .unwrap_or("exited at once")
                .trim()
        ),
        Err(e) => format!("could not run: {e}"),
    };
    println!(
        "\noom: oomkill {line}; podscope attaches `oom:mark_victim` (a tracepoint: no kprobe needed; `podscope doctor` shows it)"
    );
    Ok(())
}

/// What a tracer said it lost or did not show: podscope's summary ("N lost
/// (ring buffer full)", "N events were not shown"), libbpf-tools' "lost N
/// events on CPU #c", bpftrace's "Lost N events".
fn lost(stderr: &str) -> u64 {
    lost_in_kernel(stderr) + not_shown(stderr)
}

/// What a tracer's kernel side dropped (its buffer was full): events whose
/// program stopped early.
fn lost_in_kernel(stderr: &str) -> u64 {
    count_words(stderr, false)
}

/// What podscope's kernel side sent but its output could not take.
fn not_shown(stderr: &str) -> u64 {
    count_words(stderr, true)
}

fn count_words(stderr: &str, not_shown: bool) -> u64 {
    let mut total = 0u64;
    for line in stderr.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let num = |j: usize| {
                words.get(j).and_then(|x| {
                    x.trim_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u64>()
                        .ok()
                })
            };
            // "<N> lost" (podscope) / "lost <N> events" (libbpf-tools, bpftrace)
            if !not_shown && w.eq_ignore_ascii_case("lost") {
                if let Some(n) = i.checked_sub(1).and_then(num) {
                    total += n;
                } else if words.get(i + 2).is_some_and(|x| x.starts_with("event"))
                    && let Some(n) = num(i + 1)
                {
                    total += n;
                }
            }
            if not_shown && *w == "were" && words.get(i + 1) == Some(&"not") && i >= 2 {
                total += num(i - 2).unwrap_or(0);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::{lost, lost_in_kernel};

    #[test]
    fn losses_are_read_from_each_tools_words() {
        assert_eq!(
            lost("lost 12 events on CPU #1\nlost 3 events on CPU #0"),
            15
        );
        assert_eq!(lost("Lost 7 events"), 7);
        assert_eq!(
            lost(
                "podscope: exits: kernel: 20000 seen, 20000 reported, 4 lost (ring buffer full), 0 read errors"
            ),
            4
        );
        assert_eq!(
            lost("podscope: 9 events were not shown: the output was too slow"),
            9
        );
        assert_eq!(lost("PCOMM PID\nsleep 1 0.1 0"), 0);
        // The kernel's drops alone: what makes a program's average cheaper.
        assert_eq!(
            lost_in_kernel(
                "podscope: 9 events were not shown: the output was too slow\n\
                 podscope: signals: kernel: 100 seen, 90 reported, 10 lost (ring buffer full)"
            ),
            10
        );
    }
}
