//! `cargo xtask bench <capability>`: overhead measured side by side, in one
//! run, as ratios. Rounds alternate the conditions so that drift of the
//! machine (other load, CPU frequency) spreads over all of them alike.
//!
//! `exits`: a process fork/exit storm and a thread create/exit storm, each
//! without a tracer, under `podscope trace exits -o json` (decoded and
//! printed to /dev/null, the path a user's pipeline takes), and under
//! bpftrace on the same tracepoint, once counting in the kernel (its
//! cheapest form) and once printing each exit (like-for-like with podscope).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{build_podscope, setup};

const ROUNDS: usize = 7;

mod faults;
mod net;

pub fn run(args: &[String]) -> Result<ExitCode> {
    match args.first().map(String::as_str) {
        Some("exits") => exits(),
        Some("pods") => pods(),
        Some("agent") => agent(),
        Some("terminations") => terminations(),
        Some("net") => net::run(),
        Some("throttle") => throttle(),
        Some("faults") => faults::run(),
        _ => {
            bail!(
                "usage: cargo xtask bench <exits | pods | agent | terminations | net | throttle | faults>"
            )
        }
    }
}

/// Hidden task the benchmarks run as their workload: `xtask storm process|thread N WORKERS`.
pub fn storm(args: &[String]) -> Result<ExitCode> {
    let kind = args.first().map(String::as_str).unwrap_or("");
    let n: u32 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .context("storm needs a count")?;
    let workers: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let per = n / workers;
    let mut pids = vec![];
    for _ in 0..workers {
        // SAFETY: the worker only forks, waits and exits, or spawns threads.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            match kind {
                "process" => process_storm(per),
                "kill" => kill_storm(per, libc::SIGUSR1),
                "kill-filtered" => kill_storm(per, libc::SIGURG),
                _ => thread_storm(per),
            }
            unsafe { libc::_exit(0) };
        }
        pids.push(pid);
    }
    for pid in pids {
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    Ok(ExitCode::SUCCESS)
}

fn process_storm(n: u32) {
    for _ in 0..n {
        // SAFETY: the child exits at once.
        let c = unsafe { libc::fork() };
        if c == 0 {
            unsafe { libc::_exit(0) };
        }
        if c > 0 {
            unsafe { libc::waitpid(c, std::ptr::null_mut(), 0) };
        }
    }
}

/// `n` signals to a child that ignores them: signal_generate fires for each
/// (the tracepoint runs before the disposition is looked at), the child is
/// never woken. SIGUSR1's default action is fatal (the probe emits it);
/// SIGURG's is not (the probe filters it in the kernel).
fn kill_storm(n: u32, sig: i32) {
    // SAFETY: the child only sets a disposition and pauses.
    let c = unsafe { libc::fork() };
    if c == 0 {
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
            loop {
                libc::pause();
            }
        }
    }
    if c <= 0 {
        return;
    }
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..n {
        // SAFETY: our own child.
        unsafe { libc::kill(c, sig) };
    }
    unsafe {
        libc::kill(c, libc::SIGKILL);
        libc::waitpid(c, std::ptr::null_mut(), 0);
    }
}

fn thread_storm(n: u32) {
    for _ in 0..n {
        let _ = std::thread::spawn(|| {}).join();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tracer {
    None,
    Podscope,
    BpftraceCount,
    BpftracePrint,
    /// `podscope trace throttle`: the sched_switch probe.
    PodscopeThrottle,
    /// A do-nothing bpftrace program on sched_switch: the floor of what the
    /// kernel's per-program accounting reports for any program there.
    BpftraceEmptySwitch,
}

impl Tracer {
    fn name(self) -> &'static str {
        match self {
            Tracer::None => "no tracer",
            Tracer::Podscope => "podscope",
            Tracer::BpftraceCount => "bpftrace count()",
            Tracer::BpftracePrint => "bpftrace printf",
            Tracer::PodscopeThrottle => "podscope throttle",
            Tracer::BpftraceEmptySwitch => "bpftrace empty",
        }
    }
}

struct Running {
    child: Child,
    stderr: mpsc::Receiver<String>,
    /// CPU the tracer had used once attached (start-up is not the workload's cost).
    cpu_at_ready: Duration,
    /// The BPF programs this tracer loaded.
    progs: Vec<u32>,
}

/// What a benchmark traces: podscope's family and the same hook for bpftrace.
struct Traced {
    family: &'static str,
    bpftrace_count: &'static str,
    bpftrace_print: &'static str,
}

const EXITS: Traced = Traced {
    family: "exits",
    bpftrace_count: "tracepoint:sched:sched_process_exit { @exits = count(); }",
    bpftrace_print: "tracepoint:sched:sched_process_exit { printf(\"%d %d %s\\n\", pid, tid, comm); }",
};

const SIGNALS: Traced = Traced {
    family: "signals",
    bpftrace_count: "tracepoint:signal:signal_generate { @signals = count(); }",
    bpftrace_print: "tracepoint:signal:signal_generate { printf(\"%d %s -> %d %d %d\\n\", pid, comm, args->pid, args->sig, args->result); }",
};

/// Starts a tracer and returns once it has attached.
fn start(tracer: Tracer, podscope: &Path) -> Result<Option<Running>> {
    start_on(tracer, podscope, &EXITS)
}

fn start_on(tracer: Tracer, podscope: &Path, traced: &Traced) -> Result<Option<Running>> {
    let mut cmd = match tracer {
        Tracer::None => return Ok(None),
        Tracer::Podscope => {
            let mut c = Command::new(podscope);
            c.args([
                "trace",
                traced.family,
                "-o",
                "json",
                "--log",
                "podscope=debug",
                "--ring-buffer-size",
                "4194304",
            ]);
            c
        }
        Tracer::PodscopeThrottle => {
            let mut c = Command::new(podscope);
            c.args(["trace", "throttle", "-o", "json", "--log", "podscope=debug"]);
            c
        }
        Tracer::BpftraceEmptySwitch => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", "tracepoint:sched:sched_switch { }"]);
            c
        }
        Tracer::BpftraceCount => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", traced.bpftrace_count]);
            c
        }
        Tracer::BpftracePrint => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", traced.bpftrace_print]);
            c
        }
    };
    // Podscope says "attached" on stderr (debug log); bpftrace "Attaching" on stdout.
    let before = bpf_prog_stats()?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", tracer.name()))?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let tx = ready_tx.clone();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("Attaching") {
                let _ = tx.send(());
            }
            line.clear();
        }
    });
    std::thread::spawn(move || {
        let mut r = BufReader::new(stderr);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("attached") {
                let _ = ready_tx.send(());
            }
            let _ = err_tx.send(line.clone());
            line.clear();
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        let err: Vec<String> = err_rx.try_iter().collect();
        bail!(
            "{} did not attach within 30 s: {}",
            tracer.name(),
            err.join("")
        );
    }
    // Let the attach settle (bpftrace prints before its last step).
    std::thread::sleep(Duration::from_millis(300));
    let cpu_at_ready = proc_cpu(child.id()).unwrap_or_default();
    let progs = bpf_prog_stats()?
        .into_iter()
        .filter(|(id, _)| !before.iter().any(|(b, _)| b == id))
        .map(|(id, _)| id)
        .collect();
    Ok(Some(Running {
        child,
        stderr: err_rx,
        cpu_at_ready,
        progs,
    }))
}

struct Stopped {
    hwm_kib: u64,
    rss_kib: u64,
    /// Kernel time in the tracer's programs, and how often they ran.
    prog_ns: u64,
    prog_runs: u64,
    cpu: Duration,
    stderr: String,
}

fn stop(mut r: Running) -> Result<Stopped> {
    let pid = r.child.id();
    let hwm_kib = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss_kib = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let (prog_ns, prog_runs) = bpf_prog_stats()?
        .into_iter()
        .filter(|(id, _)| r.progs.contains(id))
        .fold((0, 0), |(ns, n), (_, (t, c))| (ns + t, n + c));
    let cpu = proc_cpu(pid)
        .unwrap_or_default()
        .saturating_sub(r.cpu_at_ready);
    // SAFETY: our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let _ = r.child.wait();
    let mut stderr: String = r.stderr.try_iter().collect();
    std::thread::sleep(Duration::from_millis(50));
    stderr.extend(r.stderr.try_iter());
    Ok(Stopped {
        hwm_kib,
        rss_kib,
        prog_ns,
        prog_runs,
        cpu,
        stderr,
    })
}

/// Every loaded BPF program's id with its (run_time_ns, run_cnt), as the
/// kernel counts them while `kernel.bpf_stats_enabled` is 1.
fn bpf_prog_stats() -> Result<Vec<(u32, (u64, u64))>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("cannot run bpftool")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool printed no JSON")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let id = p["id"].as_u64()? as u32;
                    Some((
                        id,
                        (
                            p["run_time_ns"].as_u64().unwrap_or(0),
                            p["run_cnt"].as_u64().unwrap_or(0),
                        ),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Turns the kernel's per-program statistics on for the benchmark's
/// duration, and back to what they were when dropped.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(KNOB).context("cannot read kernel.bpf_stats_enabled")?;
        std::fs::write(KNOB, "1").context("cannot enable kernel.bpf_stats_enabled")?;
        Ok(BpfStats(was.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn proc_cpu(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

fn workload(kind: &str, n: u32, workers: u32) -> Result<Duration> {
    let me = std::env::current_exe()?;
    let t = Instant::now();
    let st = Command::new(me)
        .args(["storm", kind, &n.to_string(), &workers.to_string()])
        .status()?;
    if !st.success() {
        bail!("the {kind} storm failed ({st})");
    }
    Ok(t.elapsed())
}

/// podscope against no tracer and bpftrace's cheapest and like-for-like forms.
const TRACERS: [Tracer; 4] = [
    Tracer::None,
    Tracer::Podscope,
    Tracer::BpftraceCount,
    Tracer::BpftracePrint,
];

/// Set-up, a release podscope, tracefs for bpftrace (whether this mounted
/// it), and the kernel's per-program statistics on while the guard lives.
fn prepare_tracer_bench() -> Result<(PathBuf, bool, BpfStats)> {
    setup::run()?;
    let podscope = build_podscope()?;
    let mounted_tracefs = ensure_tracefs()?;
    Ok((podscope, mounted_tracefs, BpfStats::enable()?))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn exits() -> Result<ExitCode> {
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

/// `terminations`: a signal storm (200,000 kill(2) to a child that ignores
/// them) with and without podscope's signal probe and against bpftrace on
/// the same tracepoint, for a signal the probe emits (SIGUSR1: fatal by
/// default) and one it filters in the kernel (SIGURG); then the journal's
/// write cost per record (`benches/journal.rs`).
fn terminations() -> Result<ExitCode> {
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

/// bpftrace attaches plain tracepoints through tracefs.
fn ensure_tracefs() -> Result<bool> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(false);
    }
    let st = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()?;
    if !st.success() {
        bail!("cannot mount tracefs at /sys/kernel/tracing (bpftrace needs it)");
    }
    Ok(true)
}

fn unmount_tracefs() {
    let _ = Command::new("umount")
        .arg("/sys/kernel/tracing")
        .stderr(Stdio::null())
        .status();
}

use crate::NODE_SOCKET;
const BENCH_NS: &str = "podscope-bench";
const BENCH_PODS: usize = 100;

/// The test node with 100 pods x 3 containers, removed again on drop
/// (the node itself only if this brought it up).
struct BenchNode {
    testnode: PathBuf,
    was_up: bool,
    dir: PathBuf,
}

impl BenchNode {
    fn node(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.testnode).args(args).output()?;
        if !out.status.success() {
            bail!(
                "podscope-testnode {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn up() -> Result<BenchNode> {
        crate::status(crate::cargo().args(["build", "--release", "--quiet", "-p", "testnode"]))?;
        let n = BenchNode {
            testnode: crate::root().join("target/release/podscope-testnode"),
            was_up: Path::new(NODE_SOCKET).exists(),
            dir: std::env::temp_dir().join(format!("podscope-bench-pods-{}", std::process::id())),
        };
        n.node(&["up"])?;
        std::fs::create_dir_all(&n.dir)?;
        Ok(n)
    }

    /// Every container starts `sh`, which runs `true` once (so each has an
    /// exit series) and then sleeps.
    fn fill(&self) -> Result<Duration> {
        let t = Instant::now();
        for i in 0..BENCH_PODS {
            let file = self.dir.join(format!("p{i}.yaml"));
            let mut m = format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: {BENCH_NS}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n"
            );
            for c in ["app", "sidecar", "proxy"] {
                m.push_str(&format!(
                    "  - name: {c}\n    command: [\"sh\", \"-c\", \"/bin/true; exec sleep 3600\"]\n"
                ));
            }
            std::fs::write(&file, m)?;
            self.node(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&self.node(&["status", "-o", "json"])?).unwrap_or_default();
            let running = status
                .as_array()
                .map(|pods| {
                    pods.iter()
                        .filter(|p| p["namespace"] == BENCH_NS)
                        .flat_map(|p| p["containers"].as_array().cloned().unwrap_or_default())
                        .filter(|c| c["state"] == "running")
                        .count()
                })
                .unwrap_or(0);
            if running >= BENCH_PODS * 3 {
                return Ok(t.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {running} of {} containers ran within 300 s",
                    BENCH_PODS * 3
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        for i in 0..BENCH_PODS {
            let _ = self.node(&["delete", &format!("{BENCH_NS}/p{i}")]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !self.was_up {
            let _ = self.node(&["down"]);
        }
    }
}

/// `cargo xtask bench pods`: what attribution costs with 100 pods × 3
/// containers on the test node: the resolver's time per event, and the
/// tracer's resident memory with those pods against an empty node.
fn pods() -> Result<ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    let node = BenchNode::up()?;
    let rss_empty = tracer_rss(&podscope)?;
    println!("pods benchmark: {BENCH_PODS} pods x 3 containers on the test node");
    let took = node.fill()?;
    println!(
        "  {} containers running after {:.1} s",
        BENCH_PODS * 3,
        took.as_secs_f64()
    );
    let rss_full = tracer_rss(&podscope)?;
    let out = Command::new(crate::cargo().get_program())
        .current_dir(crate::root())
        .args([
            "bench",
            "-q",
            "-p",
            "podscope",
            "--bench",
            "attribution",
            "--",
            "--cri-socket",
            NODE_SOCKET,
        ])
        .output()?;
    drop(node);
    if !out.status.success() {
        bail!(
            "the attribution bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    println!(
        "  tracer RSS (podscope trace exits, steady): {:.1} MiB on an empty node, {:.1} MiB with {} containers: {:+.1} MiB",
        rss_empty as f64 / 1024.0,
        rss_full as f64 / 1024.0,
        BENCH_PODS * 3,
        (rss_full as f64 - rss_empty as f64) / 1024.0
    );
    Ok(ExitCode::SUCCESS)
}

/// A plain HTTP/1.0 GET on loopback, returning the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A benchmark agent's API socket, beside its state directory (the
/// default one is for an agent a person runs).
pub(crate) fn api_socket(state: &std::path::Path) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}.api.sock", state.display()))
}

/// `cargo xtask bench agent`: `podscope agent` on the test node with 100
/// pods: idle CPU and memory, /metrics render time with 300 containers'
/// series, and the events per second it carries to an HTTP stream reader
/// on its API socket.
fn agent() -> Result<ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    let node = BenchNode::up()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let state = std::env::temp_dir().join(format!("podscope-bench-agent-{}", std::process::id()));
    let socket = api_socket(&state);
    let mut agent = Command::new(&podscope)
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cri-socket",
            NODE_SOCKET,
            // The packet probes watch the node's namespace, not the machine's.
            "--netns",
            "/run/netns/podscope-node",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--api-socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/readyz")
            .map(|b| !b.starts_with("ready"))
            .unwrap_or(true)
        {
            if Instant::now() > deadline {
                bail!("the agent did not become ready");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The pods start under the agent, so every container has exit series.
        let took = node.fill()?;
        println!(
            "agent benchmark: {BENCH_PODS} pods x 3 containers running (after {:.1} s)",
            took.as_secs_f64()
        );
        // Idle: the pods sleep; nothing but the agent's own upkeep runs.
        std::thread::sleep(Duration::from_secs(3));
        let pid = agent.id();
        let (cpu0, t0) = (proc_cpu(pid).unwrap_or_default(), Instant::now());
        std::thread::sleep(Duration::from_secs(20));
        let idle =
            (proc_cpu(pid).unwrap_or_default() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        let rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
        let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
        println!(
            "  idle CPU {:.2}% of one core over 20 s; RSS {:.1} MiB (peak {:.1} MiB)",
            idle * 100.0,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );

        // Scrape time with every container's series present.
        let body = http_get(port, "/metrics")?;
        let series = body
            .lines()
            .filter(|l| l.starts_with("podscope_process_exits_total{"))
            .count();
        let mut times = vec![];
        for _ in 0..50 {
            let t = Instant::now();
            http_get(port, "/metrics")?;
            times.push(t.elapsed());
        }
        let scrape = median(&mut times);
        println!(
            "  /metrics: {series} process_exits series, {} bytes, median {:.2} ms over 50 scrapes (HTTP included)",
            body.len(),
            scrape.as_secs_f64() * 1000.0
        );

        // Throughput: a reader on /api/v1/events (the API's socket) while
        // both cores fork and exit.
        let before = http_get(port, "/metrics")?;
        let reader = {
            use std::io::{BufRead, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&socket)?;
            write!(s, "GET /api/v1/events HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let closer = s.try_clone()?;
            let handle = std::thread::spawn(move || {
                let mut n = 0u64;
                for line in std::io::BufReader::new(s).lines() {
                    match line {
                        Ok(l) if l.starts_with("{\"kind\":\"exit\"") => n += 1,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                n
            });
            (handle, closer)
        };
        std::thread::sleep(Duration::from_millis(300));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2);
        let n = 40_000;
        let t = Instant::now();
        workload("process", n, workers)?;
        let storm = t.elapsed();
        // Let the last batch through (the agent drains every 100 ms), then hang up.
        std::thread::sleep(Duration::from_millis(1500));
        let _ = reader.1.shutdown(std::net::Shutdown::Both);
        let received = reader
            .0
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let after = http_get(port, "/metrics")?;
        let delta = |name: &str| metric_sum(&after, name) - metric_sum(&before, name);
        println!(
            "  stream: {n} fork+exit on {workers} workers in {:.2} s ({:.0} exits/s); the reader received {received} exit events; kernel lost {}, stream dropped {}",
            storm.as_secs_f64(),
            n as f64 / storm.as_secs_f64(),
            delta("podscope_events_lost_total"),
            delta("podscope_stream_events_dropped_total")
        );
        Ok(())
    })();
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&state);
    drop(node);
    result.map(|_| ExitCode::SUCCESS)
}

/// Steady resident memory of `podscope trace exits` attached to the test node.
fn tracer_rss(podscope: &Path) -> Result<u64> {
    let mut child = Command::new(podscope)
        .args([
            "trace",
            "exits",
            "-o",
            "json",
            "--cri-socket",
            NODE_SOCKET,
            "--log",
            "podscope=debug",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("attached") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("podscope did not attach")?;
    // Let a resolver tick (and a CRI refresh) pass.
    std::thread::sleep(Duration::from_secs(3));
    let rss = proc_status_kib(child.id(), "VmRSS:").unwrap_or(0);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    Ok(rss)
}

/// Hidden task: `xtask pingpong N`: two processes pinned to CPU 0 pass a
/// byte back and forth through two pipes N times, 2 context switches per
/// round trip and almost nothing else: the worst case for a sched_switch probe.
pub fn pingpong(args: &[String]) -> Result<ExitCode> {
    let n: u64 = args
        .first()
        .and_then(|s| s.parse().ok())
        .context("pingpong needs a count")?;
    // SAFETY: plain syscalls on fds and a cpu set of our own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        let (mut a, mut b) = ([0i32; 2], [0i32; 2]);
        if libc::pipe(a.as_mut_ptr()) != 0 || libc::pipe(b.as_mut_ptr()) != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        let mut byte = 0u8;
        let buf = &mut byte as *mut u8 as *mut libc::c_void;
        let pid = libc::fork();
        if pid == 0 {
            for _ in 0..n {
                if libc::read(a[0], buf, 1) != 1 || libc::write(b[1], buf, 1) != 1 {
                    libc::_exit(1);
                }
            }
            libc::_exit(0);
        }
        for _ in 0..n {
            if libc::write(a[1], buf, 1) != 1 || libc::read(b[0], buf, 1) != 1 {
                bail!("the ping-pong partner went away");
            }
        }
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    Ok(ExitCode::SUCCESS)
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(t.elapsed())
}

/// `throttle`: the sched_switch probe's cost on context-switch-heavy
/// workloads, with vs without `podscope trace throttle`, and the cost of
/// reading one container's cpu.stat (what cAdvisor-style polling costs).
fn throttle() -> Result<ExitCode> {
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
